"""Remake the README's annotation screenshots from the sample data (offscreen, matplotlib Agg).

    .venv/bin/python Resources/Screenshots/make_screenshots.py [--output Resources/Screenshots]

The sample is the MNI152NLin2009cAsym T1w template with its human AFIDs-32 consensus (fetched with pip
and cached, see LandmarkDetectionLib.sample_data). It writes:

- qa_midline.png: the QA figure of the consensus' Midline sub-anatomy (real data), as ``landmark-detection
  qa --figures`` draws it;
- qa_midline_illustration.png and qa_overview_illustration.png: the same for an ILLUSTRATION, the
  consensus with PC moved 5 mm to the patient's right and ICS left out, to show a failing check;
- agreement_illustration.png: the agreement box plot (``landmark-detection agreement``) of an
  ILLUSTRATION, three simulated annotators (the consensus plus seeded random displacements), not a real
  inter-rater study.

Figures are saved at 85 dpi (the box plot at 100) as optimised RGB PNGs, each under 200 KB.
"""

from __future__ import annotations

import argparse
import csv
import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from LandmarkDetectionLib import agreement, figures
from LandmarkDetectionLib.annotation import annotation_qa
from LandmarkDetectionLib.fileio import atomic_path, read_landmarks, read_volume, write_markups_json
from LandmarkDetectionLib.sample_data import fetch_sample
from LandmarkDetectionLib.schema import load_schema

DPI = 85
SAMPLE = "AFIDs-32 human consensus on the MNI152NLin2009cAsym T1w template (the sample data)"
# The illustration's simulated annotators: per-axis standard deviation (mm) of each one's displacement,
# scaled per sub-anatomy by how hard its points are to place (made-up values, for the picture only).
ANNOTATOR_SD_MM = {"sim-A": 0.5, "sim-B": 0.7, "sim-C": 0.9}
DIFFICULTY = {"Midline": 0.7, "Mesencephalon": 1.0, "Lateral Ventricles": 1.2, "Temporal Horns": 1.4,
              "Cortical": 1.8}


def save_small(figure, path: Path, dpi: int = DPI) -> None:
    """Save a figure at ``dpi`` as an optimised RGB PNG, atomically."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(figure)
    buffer.seek(0)
    picture = Image.open(buffer).convert("RGB")
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    print(f"{path}: {path.stat().st_size / 1024:.0f} KB, {picture.width}x{picture.height} px")


def qa_screenshots(output: Path, image, schema, consensus) -> None:
    window = figures.intensity_window(image)
    result = annotation_qa(schema, consensus)
    save_small(figures.sub_anatomy_figure(image, schema, consensus, "Midline", row=result.row("Midline"),
                                          window=window, note=SAMPLE), output / "qa_midline.png")

    edited = consensus.copy()
    edited[schema.lookup("PC")] += (5.0, 0.0, 0.0)  # RAS: 5 mm to the patient's right
    edited[schema.lookup("ICS")] = np.nan
    note = "ILLUSTRATION: the consensus with PC moved 5 mm to the patient's right and ICS left out"
    result = annotation_qa(schema, edited)
    save_small(figures.sub_anatomy_figure(image, schema, edited, "Midline", row=result.row("Midline"),
                                          window=window, note=note), output / "qa_midline_illustration.png")
    save_small(figures.qa_overview_figure(result, note=note), output / "qa_overview_illustration.png")


def agreement_screenshot(output: Path, schema, consensus) -> None:
    """The sub-anatomy box plot of agreement.py for three simulated annotators of the sample."""
    rng = np.random.default_rng(2026)
    difficulty = np.array([DIFFICULTY[lm.sub_anatomy] for lm in schema.landmarks])[:, None]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for annotator, sd in ANNOTATOR_SD_MM.items():
            path = Path(tmp) / f"{annotator}.mrk.json"
            write_markups_json(path, schema, consensus + rng.normal(0.0, sd, consensus.shape) * difficulty)
            rows.append({"name": "MNI152NLin2009cAsym", "landmarks": path.name, "annotator": annotator})
        with open(Path(tmp) / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["name", "landmarks", "annotator"])
            writer.writeheader()
            writer.writerows(rows)
        result = agreement.agreement_of(Path(tmp) / "manifest.csv", schema)

    # agreement.plot_sub_anatomies draws the figure and hands it to figures.save; take it from there to
    # label it as an illustration and save it small
    original_save = figures.save

    def labelled(figure, path):
        figure.text(0.01, -0.02, "ILLUSTRATION: three simulated annotators (the AFIDs consensus plus seeded random "
                                 "displacements of 0.5-0.9 mm per axis, larger for harder sub-anatomies);\nnot a real "
                                 "inter-rater study. Made by Resources/Screenshots/make_screenshots.py.",
                    fontsize=8, color="#b00020", va="top")
        save_small(figure, Path(path), dpi=100)  # a plain plot: small even at 100 dpi, and its legend readable

    figures.save = labelled
    try:
        agreement.plot_sub_anatomies(result, output / "agreement_illustration.png")
    finally:
        figures.save = original_save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent), help="folder for the PNGs")
    output = Path(parser.parse_args().output)
    schema = load_schema("afids-32")
    sample = fetch_sample()
    image = read_volume(sample.t1w)
    consensus = read_landmarks(sample.afids, schema)
    qa_screenshots(output, image, schema, consensus)
    agreement_screenshot(output, schema, consensus)


if __name__ == "__main__":
    main()
