"""The main job out of the box: the sample brain, an unseen test scan made from it, detection and its
accuracy against the known truth, with uncertainty, Grad-CAM and an HTML report.

The demo's test scan comes from the same template the bundled model was trained on (moved to a new head
position, re-acquired with 2.2 mm slices, with scanner artefacts). It shows the tool working; it is not
a measure of accuracy on new anatomy: benchmarks/heldout.py measures that on other brains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .detect import write_detection
from .fileio import atomic_write_text, check_outputs, check_writable_dir, write_markups_json, write_volume
from .metrics import radial_errors, summarize
from .modelfile import load_model
from .resources import bundled_model_path
from .testscans import SURVEY_SIZE, make_test_scan, sample_case



DEMO_FILES = ("test_scan.nii.gz", "truth.mrk.json", "test_scan.mrk.json", "test_scan.csv", "test_scan.uncertainty.json",
              "test_scan.uncertainty.csv", "landmarks.png", "errors.png", "uncertainty.png", "gradcam.png",
              "report.html", "summary.json")


# The landmarks whose Grad-CAM the demo shows: for AFIDs four of the commissures and deep structures, for
# brain-88 the first of each sub-anatomy.
GRADCAM_LANDMARKS = {"afids-32": ("AC", "PC", "GENU", "RALTH")}


def run_demo(output: str | Path, model_path: str | Path | None = None, device: str = "auto", seed: int = 2026,
             passes: int = 50, flag_mm: float = 5.0, gradcam_landmarks=None, overwrite: bool = False,
             schema_name: str = "afids-32") -> dict:
    """Make the unseen test scan, detect the landmarks of ``schema_name`` with uncertainty (the sample brain's
    annotation of that schema is the truth), explain a few landmarks with Grad-CAM, and write everything with
    report.html into ``output`` (an earlier demo's files only replaced with ``overwrite``). The scan is
    acquired in the paper's survey geometry."""
    from . import demo_report, figures
    from .detect import UncertaintyOptions, detect_volume
    from .gradcam import compute_gradcam
    from .runtime import pick_device

    started = time.monotonic()
    check_outputs([Path(output) / name for name in DEMO_FILES], overwrite=overwrite)
    output = check_writable_dir(output)
    device = pick_device(device)
    model_path = Path(model_path) if model_path else bundled_model_path(schema_name)
    model = load_model(model_path, device)
    image, landmarks, schema, files = sample_case(schema_name)
    model.check_schema(schema, model_path)
    scan, truth, _ = make_test_scan(image, landmarks, seed, SURVEY_SIZE)
    write_volume(scan, output / "test_scan.nii.gz")
    write_markups_json(output / "truth.mrk.json", schema, truth, name="truth")

    options = UncertaintyOptions(passes=passes, flag_mm=flag_mm, seed=seed)
    detect_started = time.monotonic()
    detection = detect_volume(model, scan, device, "test_scan", options)
    detect_seconds = time.monotonic() - detect_started
    predicted, uncertainty = detection.landmarks_ras, detection.uncertainty
    errors = radial_errors(predicted, truth)
    paths = write_detection(model, detection, output, overwrite=True, extra_columns={"error_mm": errors},
                            options=options)

    if gradcam_landmarks is None:
        gradcam_landmarks = GRADCAM_LANDMARKS.get(schema.name) or [
            next(lm.name for lm in schema.landmarks if lm.sub_anatomy == sub.name) for sub in schema.sub_anatomies]
    chosen = [schema.lookup(name) for name in gradcam_landmarks if schema.lookup(name) is not None]
    cams = compute_gradcam(model, scan, chosen, device=device)
    (output / "gradcam").mkdir(exist_ok=True)
    cam_volumes = {}
    for n, index in enumerate(chosen):
        cam_volumes[index] = cams.volume(n, scan)
        write_volume(cam_volumes[index], output / "gradcam" / f"test_scan_gradcam_{schema.landmarks[index].name}.nii.gz")

    semi = uncertainty.max_semi_axis()
    summary = summarize(errors)
    summary.update(seconds=round(time.monotonic() - started, 1), detect_seconds=round(detect_seconds, 2),
                   device=str(device), model=str(model_path), passes=passes,
                   flagged=int(detection.flagged(flag_mm).sum()), coverage=float(uncertainty.covers(truth).mean()),
                   landmarks=str(paths["markups"]), schema=schema.name,
                   note="The test scan was made from the training template (new head position, 2.2 mm slices, "
                        "scanner artefacts); accuracy on unseen anatomy is measured by benchmarks/heldout.py.")
    figure_paths = {key: output / f"{key}.png" for key in ("landmarks", "errors", "uncertainty", "gradcam")}
    demo_report.landmark_panels(scan, schema, predicted, truth, uncertainty, figure_paths["landmarks"])
    demo_report.error_figure(schema, errors, figure_paths["errors"])
    figures.uncertainty_scatter(errors, semi, uncertainty.level, figure_paths["uncertainty"], schema.names, flag_mm,
                                summary["coverage"])
    demo_report.gradcam_figure(scan, schema, cam_volumes, predicted, figure_paths["gradcam"], cams.layer)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["files"] = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file()) + ["report.html"]
    demo_report.write_html(output / "report.html", summary, model, schema, errors, semi, flag_mm, figure_paths,
                      files.attribution)
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2))
    summary["report"] = str(output / "report.html")
    return summary
