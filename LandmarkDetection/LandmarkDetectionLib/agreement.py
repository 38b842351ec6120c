"""Inter-annotator agreement (the paper's Fig. 6) for cases annotated by two or more annotators.

For each case, landmark and annotator: the distance (mm) from the annotator's point to the mean position
of that landmark over the case's annotators (a landmark placed by fewer than two of them has no
distance). With two annotators each is half their mutual distance from the mean. Per annotator and
sub-anatomy: planarity, the RMS distance of the sub-anatomy's points from their least-squares plane, which
the annotation guidelines ask to be small; it is the annotation QA's measure (annotation.annotation_qa,
plane fit planes.fit_plane), for the sub-anatomies the schema gives a plane of their own.

Inputs: an annotation dataset (datasets.py; each annotator's newest version) or a CSV manifest with
``landmarks`` and ``annotator`` columns (case from ``name``, else the image's file name; where a case has
several rows by one annotator, the highest ``version`` wins).

Outputs (``write_agreement``): agreement.csv (case, annotator, landmark, distance), planarity.csv (case,
annotator, sub-anatomy, RMS), agreement_summary.csv (per sub-anatomy), and three box plots:
agreement_sub_anatomy.png, agreement_landmarks.png and planarity.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LandmarkError
from .fileio import atomic_write_text, check_outputs, read_landmarks, stem, written_together
from .schema import Schema, load_schema, schema_of_labels

FILES = {"distances": "agreement.csv", "planarity": "planarity.csv", "summary": "agreement_summary.csv",
         "sub_anatomy_plot": "agreement_sub_anatomy.png", "landmark_plot": "agreement_landmarks.png",
         "planarity_plot": "planarity.png"}


@dataclass
class CaseAgreement:
    case: str
    annotators: list[str]
    landmarks: np.ndarray  # (A, K, 3) RAS mm, NaN where an annotator left a landmark out
    mean: np.ndarray  # (K, 3) mean position over the annotators who placed the landmark
    distances: np.ndarray  # (A, K) mm from the mean; NaN where fewer than 2 annotators placed it
    planarity: np.ndarray  # (A, S) RMS mm from each sub-anatomy's best-fit plane; NaN with fewer than 3 points


@dataclass
class Agreement:
    schema: Schema
    cases: list[CaseAgreement]
    single: list[str]  # cases left out: annotated by one annotator only

    @property
    def annotators(self) -> list[str]:
        return sorted({a for c in self.cases for a in c.annotators})

    def distances_of(self, indices, annotator: str | None = None) -> np.ndarray:
        """Every finite distance (mm) of the given landmarks over cases (and annotators, or one)."""
        values = [c.distances[i, indices] for c in self.cases for i, a in enumerate(c.annotators)
                  if annotator is None or a == annotator]
        values = np.concatenate(values) if values else np.zeros(0)
        return values[np.isfinite(values)]

    def planarity_of(self, sub: int, annotator: str | None = None) -> np.ndarray:
        values = np.array([c.planarity[i, sub] for c in self.cases for i, a in enumerate(c.annotators)
                           if annotator is None or a == annotator])
        return values[np.isfinite(values)]


# ------------------------------------------------------------------------------------------------ inputs
def annotation_files(source: str | Path) -> tuple[Schema | None, dict[str, dict[str, Path]]]:
    """{case: {annotator: landmark file}} of a dataset folder or a manifest with an annotator column, and
    the dataset's schema (None for a manifest)."""
    from . import datasets

    source = Path(source)
    if not source.exists():
        raise LandmarkError(source, "dataset does not exist")
    files: dict[str, dict[str, Path]] = {}
    if source.is_dir():
        for entry in datasets.read_entries(source):  # a LandmarkError when it is not a dataset
            files.setdefault(entry.case, {})[entry.annotator] = entry.landmarks
        return datasets.dataset_schema(source), files
    try:
        reader = csv.DictReader(io.StringIO(source.read_text(encoding="utf-8-sig")))
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LandmarkError(source, f"not a readable CSV manifest ({error})") from None
    columns = set(reader.fieldnames or ())
    if not {"landmarks", "annotator"} <= columns or not ({"name", "image"} & columns):
        raise LandmarkError(source, "a manifest for agreement needs 'landmarks', 'annotator' and 'name' (or 'image') "
                                    "columns")
    versions: dict[tuple[str, str], int] = {}
    for line, row in enumerate(rows, start=2):
        row = {key: (value or "").strip() for key, value in row.items() if key is not None}
        case = row.get("name") or (stem(row["image"]) if row.get("image") else "")
        if not case or not row["annotator"] or not row["landmarks"]:
            raise LandmarkError(source, f"line {line}: needs a case name (or image), an annotator and a landmarks file")
        try:
            version = int(row.get("version") or 0)
        except ValueError:
            raise LandmarkError(source, f"line {line}: version {row['version']!r} is not a number") from None
        key = (case, row["annotator"])
        if key in versions and version == versions[key]:
            raise LandmarkError(source, f"line {line}: case '{case}' has two rows by annotator '{row['annotator']}' "
                                        "(give them different version numbers)")
        if version >= versions.get(key, -1):
            versions[key] = version
            files.setdefault(case, {})[row["annotator"]] = (source.parent / row["landmarks"]).resolve()
    return None, files


def agreement_of(source: str | Path, schema: Schema | str | Path | None = None,
                 annotators: list[str] | None = None, progress=None) -> Agreement:
    """Read a dataset folder or manifest and compute the agreement of its cases with 2+ annotators,
    optionally only among ``annotators``. ``schema`` defaults to the dataset's, or the built-in schema
    the first annotation's labels fit. ``progress`` (runtime.Progress) hears of each case read."""
    found, files = annotation_files(source)
    known = sorted({a for per_case in files.values() for a in per_case})
    if annotators:
        unknown = [a for a in annotators if a not in known]
        if unknown:
            raise LandmarkError(source, f"unknown annotator(s) {', '.join(unknown)}; the annotators are "
                                        f"{', '.join(known) or 'none'}")
        files = {case: {a: p for a, p in per_case.items() if a in annotators} for case, per_case in files.items()}
    if not any(len(per_case) >= 2 for per_case in files.values()):
        raise LandmarkError(source, f"no case is annotated by 2 or more annotators ({len(files)} case(s), annotators: "
                                    f"{', '.join(annotators or known) or 'none'}); agreement needs at least one")
    if schema is None:
        schema = found or schema_of_labels(next(p for per_case in files.values() for p in per_case.values()))
    elif not isinstance(schema, Schema):
        schema = load_schema(schema)
    if progress is not None:
        progress.start("agreement: reading annotations", len(files))
    coords = {}
    for step, (case, per_case) in enumerate(sorted(files.items()), start=1):
        coords[case] = {a: read_landmarks(p, schema) for a, p in sorted(per_case.items())}
        if progress is not None:
            progress.update(step)
    return compute_agreement(schema, coords)


# ----------------------------------------------------------------------------------------------- numbers
def planarity(schema: Schema, landmarks: np.ndarray) -> np.ndarray:
    """(S,) RMS distance (mm) of each sub-anatomy's placed points from their least-squares plane, exactly as
    the annotation QA measures it (annotation.annotation_qa): NaN for a sub-anatomy without a plane of its
    own in the schema, or with fewer than 3 placed points, or points on one line."""
    from .annotation import annotation_qa

    rms = {row.sub_anatomy: row.rms_mm for row in annotation_qa(schema, landmarks).rows}
    return np.array([rms.get(sub.name, np.nan) for sub in schema.sub_anatomies], dtype=float)


def case_agreement(schema: Schema, case: str, annotations: dict[str, np.ndarray]) -> CaseAgreement:
    """One case's distances to the mean and planarities; ``annotations``: {annotator: (K, 3) RAS}."""
    names = sorted(annotations)
    stack = np.stack([np.asarray(annotations[a], dtype=float) for a in names])  # (A, K, 3)
    placed = np.isfinite(stack).all(axis=2)  # (A, K)
    count = placed.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(placed[..., None], stack, 0.0).sum(axis=0) / count[:, None]
    mean[count == 0] = np.nan
    distances = np.linalg.norm(stack - mean, axis=2)
    distances[~placed | (count < 2)[None, :]] = np.nan
    return CaseAgreement(case, names, stack, mean, distances, np.stack([planarity(schema, x) for x in stack]))


def compute_agreement(schema: Schema, annotations: dict[str, dict[str, np.ndarray]]) -> Agreement:
    """Agreement over cases: ``annotations`` {case: {annotator: (K, 3) RAS}}; cases with one annotator are
    listed in ``single`` and left out."""
    cases = [case_agreement(schema, case, per_case) for case, per_case in sorted(annotations.items())
             if len(per_case) >= 2]
    return Agreement(schema, cases, sorted(case for case, per_case in annotations.items() if len(per_case) < 2))


# -------------------------------------------------------------------------------------------------- CSVs
def _csv(header, rows) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[f"{v:.4f}" if isinstance(v, (float, np.floating)) and np.isfinite(v) else
                       "" if isinstance(v, (float, np.floating)) else v for v in row] for row in rows])
    return out.getvalue()


def distances_csv(result: Agreement) -> str:
    """One row per case, landmark and annotator: distance (mm) to the landmark's mean position."""
    rows = [(c.case, lm.number, lm.name, lm.sub_anatomy, a, c.distances[i, k])
            for c in result.cases for k, lm in enumerate(result.schema.landmarks) for i, a in enumerate(c.annotators)]
    return _csv(("case", "number", "landmark", "sub_anatomy", "annotator", "distance_to_mean_mm"), rows)


def planarity_csv(result: Agreement) -> str:
    """One row per case, sub-anatomy and annotator: RMS distance (mm) from the best-fit plane."""
    rows = []
    for c in result.cases:
        for s, sub in enumerate(result.schema.sub_anatomies):
            indices = result.schema.indices_of(sub.name)
            for i, a in enumerate(c.annotators):
                points = int(np.isfinite(c.landmarks[i, indices]).all(axis=1).sum())
                rows.append((c.case, sub.name, sub.plane, a, points, c.planarity[i, s]))
    return _csv(("case", "sub_anatomy", "plane", "annotator", "points", "planarity_rms_mm"), rows)


def summary_csv(result: Agreement) -> str:
    """Per sub-anatomy (and all landmarks): distance-to-mean statistics and mean planarity (mm)."""
    schema = result.schema
    groups = [(sub.name, schema.indices_of(sub.name), s) for s, sub in enumerate(schema.sub_anatomies)]
    rows = []
    for name, indices, s in [*groups, ("all", list(range(len(schema))), None)]:
        d = result.distances_of(indices)
        flat = np.concatenate([result.planarity_of(t) for t in range(len(groups))]) if s is None else \
            result.planarity_of(s)
        stats = (d.mean(), d.std(), np.median(d), np.percentile(d, 90), d.max()) if d.size else (np.nan,) * 5
        rows.append((name, len(indices), len(result.cases), len(result.annotators), d.size, *stats,
                     flat.mean() if flat.size else np.nan))
    return _csv(("sub_anatomy", "landmarks", "cases", "annotators", "distances", "mean_mm", "sd_mm", "median_mm",
                 "p90_mm", "max_mm", "planarity_rms_mean_mm"), rows)


# ------------------------------------------------------------------------------------------------- plots
def _subtitle(result: Agreement) -> str:
    return (f"{len(result.cases)} case(s) with 2+ annotators; annotators: {', '.join(result.annotators)}; "
            f"schema {result.schema.name}")


def _annotator_colors(result: Agreement) -> dict[str, tuple]:
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    return {a: palette(i % 10) for i, a in enumerate(result.annotators)}


def _boxes(ax, data, positions, colors, width=0.6, dots=None):
    """Boxes with the median (black line) and mean (white diamond); empty data draws nothing. ``dots``:
    the values as dots in the box's colour, always (True), never (False) or for boxes of fewer than 5
    values (None), whose boxes collapse to lines."""
    keep = [i for i, d in enumerate(data) if len(d)]
    if not keep:
        return
    boxes = ax.boxplot([data[i] for i in keep], positions=[positions[i] for i in keep], widths=width,
                       patch_artist=True, showmeans=True, manage_ticks=False, showfliers=dots is not True,
                       medianprops={"color": "black", "linewidth": 1.2},
                       meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black",
                                  "markersize": 4},
                       flierprops={"marker": "o", "markersize": 3, "markerfacecolor": "none",
                                   "markeredgecolor": "0.3"})
    rng = np.random.default_rng(0)
    for patch, i in zip(boxes["boxes"], keep):
        patch.set_facecolor(colors[i])
        patch.set_edgecolor("black")
        patch.set_alpha(0.75)
        if dots or (dots is None and len(data[i]) < 5):
            x = positions[i] + rng.uniform(-0.2, 0.2, len(data[i])) * width
            ax.scatter(x, data[i], s=16, color=colors[i], edgecolors="black", linewidths=0.6, zorder=3)


def _box_legend_handles(fliers=True):
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", lw=1.2, label="median"),
               Line2D([], [], ls="", marker="D", markerfacecolor="white", markeredgecolor="black", markersize=5,
                      label="mean")]
    if fliers:
        handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="0.3", markersize=4,
                              label="beyond 1.5 x IQR"))
    return handles


def _wrapped(name: str) -> str:
    return textwrap.fill(name, 12, break_long_words=False)


def _ymax(values) -> float:
    finite = [v for v in values if v.size]
    top = max((float(v.max()) for v in finite), default=0.0)
    return max(top * 1.12, 1.0)  # at least 1 mm, so that tiny differences do not look large


def plot_sub_anatomies(result: Agreement, path) -> None:
    """One box per sub-anatomy of every annotator's distance to the mean, with each annotator's values as
    dots."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .figures import save

    schema = result.schema
    subs = schema.sub_anatomies
    data = [result.distances_of(schema.indices_of(s.name)) for s in subs]
    colors = [s.rgb for s in subs]
    figure, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(subs) + 2.5), 5.0))
    positions = np.arange(1, len(subs) + 1)
    _boxes(ax, data, positions, colors, dots=False)
    rng = np.random.default_rng(0)
    annotator_colors = _annotator_colors(result)
    offsets = np.linspace(-0.22, 0.22, len(result.annotators)) if len(result.annotators) > 1 else [0.0]
    for a, offset in zip(result.annotators, offsets):
        for p, sub in zip(positions, subs):
            values = result.distances_of(schema.indices_of(sub.name), a)
            x = p + offset + rng.uniform(-0.04, 0.04, values.size)
            ax.scatter(x, values, s=6, color=annotator_colors[a], alpha=0.6, zorder=3, linewidths=0)
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{_wrapped(s.name)}\n(n={d.size})" for s, d in zip(subs, data)], fontsize=8)
    ax.set_xlim(0.4, len(subs) + 0.6)
    ax.set_ylim(0, _ymax(data))
    ax.set_xlabel("sub-anatomy (n = distances: landmarks x annotators x cases)")
    ax.set_ylabel("distance to the mean annotation (mm)")
    ax.set_title(f"Inter-annotator agreement by sub-anatomy\n{_subtitle(result)}", fontsize=10)
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    handles = _box_legend_handles() + [Line2D([], [], ls="", marker="o", color=annotator_colors[a], markersize=4,
                                              label=f"annotator {a}") for a in result.annotators]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    save(figure, path)


def _rows_of(counts: list[int], capacity: int) -> list[list[int]]:
    """Sub-anatomy indices packed in schema order into rows of at most ``capacity`` landmarks."""
    rows, current, used = [], [], 0
    for s, n in enumerate(counts):
        if current and used + n > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(s)
        used += n
    return rows + [current] if current else rows


def plot_landmarks(result: Agreement, path) -> None:
    """One box per landmark (distances over annotators and cases), one panel per sub-anatomy in its
    colour; panels packed into rows at one scale, so that every box has the same width and height scale."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .figures import save

    schema = result.schema
    subs = schema.sub_anatomies
    counts = [len(schema.indices_of(s.name)) for s in subs]
    capacity = max(max(counts), 34)
    rows = _rows_of(counts, capacity)
    data = [result.distances_of([k]) for k in range(len(schema))]
    ymax = _ymax(data)
    # below each row of panels: its vertical landmark names (7 pt) and the next row's titles
    gaps = [0.06 * max(len(schema.landmarks[k].name) for s in row for k in schema.indices_of(subs[s].name)) + 0.65
            for row in rows]
    panel_in, top_in = 2.4, 1.3
    width = max(8.0, 0.36 * (capacity + 2 * max(len(r) for r in rows)) + 1.5)
    height = top_in + len(rows) * panel_in + sum(gaps)
    figure = plt.figure(figsize=(width, height))
    outer = figure.add_gridspec(2 * len(rows), 1, height_ratios=[h for gap in gaps for h in (panel_in, gap)],
                                hspace=0, top=1 - top_in / height, bottom=0, left=0.8 / width, right=1 - 0.2 / width)
    for r, row in enumerate(rows):
        ratios = [counts[s] + 1 for s in row]
        filler = capacity + 2 * max(len(rr) for rr in rows) - sum(ratios)
        inner = outer[2 * r].subgridspec(1, len(row) + 1, width_ratios=[*ratios, max(filler, 0.01)], wspace=0.15)
        for j, s in enumerate(row):
            ax = figure.add_subplot(inner[0, j])
            indices = schema.indices_of(subs[s].name)
            positions = np.arange(1, len(indices) + 1)
            _boxes(ax, [data[k] for k in indices], positions, [subs[s].rgb] * len(indices), width=0.65)
            ax.set_xticks(positions)
            ax.set_xticklabels([schema.landmarks[k].name for k in indices], rotation=90, fontsize=7)
            ax.set_xlim(0.4, len(indices) + 0.6)
            ax.set_ylim(0, ymax)
            ax.grid(axis="y", color="0.9")
            ax.set_axisbelow(True)
            ax.set_title(f"{subs[s].name} ({len(indices)})", fontsize=9, color="black",
                         bbox={"facecolor": subs[s].rgb, "alpha": 0.35, "edgecolor": "none", "pad": 2})
            if j == 0:
                ax.set_ylabel("distance to mean (mm)", fontsize=8)
            else:
                ax.tick_params(labelleft=False)
            ax.tick_params(axis="y", labelsize=7)
    handles = [Patch(facecolor=s.rgb, edgecolor="black", alpha=0.75, label=s.name) for s in subs]
    figure.legend(handles=handles + _box_legend_handles(), loc="upper center", ncol=min(len(handles) + 3, 6),
                  fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.6 / height))
    figure.suptitle(f"Inter-annotator agreement per landmark: each annotator's distance to the mean position "
                    f"(mm)\n{_subtitle(result)}", fontsize=11, y=1 - 0.1 / height, va="top")
    save(figure, path)


def plot_planarity(result: Agreement, path) -> None:
    """Per sub-anatomy, one box per annotator (over cases) of the RMS distance from the best-fit plane."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from .figures import save

    planar = [s for s in range(len(result.schema.sub_anatomies)) if result.planarity_of(s).size]
    subs = [result.schema.sub_anatomies[s] for s in planar]
    annotators = result.annotators
    colors = _annotator_colors(result)
    figure, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(subs) * len(annotators) + 0.6 * len(subs) + 2.5), 5.0))
    step = 0.8 / len(annotators)
    all_values = []
    for j, a in enumerate(annotators):
        positions = np.arange(1, len(subs) + 1) - 0.4 + step * (j + 0.5)
        values = [result.planarity_of(s, a) for s in planar]
        all_values += values
        _boxes(ax, values, positions, [colors[a]] * len(subs), width=step * 0.8, dots=True)
    for boundary in np.arange(1.5, len(subs), 1.0):
        ax.axvline(boundary, color="0.85", lw=0.8)
    ax.set_xticks(np.arange(1, len(subs) + 1))
    ax.set_xticklabels([f"{_wrapped(s.name)}\n({s.plane})" for s in subs], fontsize=8)
    ax.set_xlim(0.5, max(len(subs), 1) + 0.5)
    if not subs:
        ax.text(1.0, 0.5, "no planarity: the schema gives no sub-anatomy a plane of its own,\nor too few points "
                          "were placed", ha="center", va="center", fontsize=9)
    ax.set_ylim(0, _ymax(all_values))
    ax.set_xlabel("sub-anatomy (the plane its guideline asks for)")
    ax.set_ylabel("RMS distance to the best-fit plane (mm)")
    ax.set_title(f"Planarity of each annotator's sub-anatomy points (lower = more planar)\n{_subtitle(result)}",
                 fontsize=10)
    ax.grid(axis="y", color="0.9")
    ax.set_axisbelow(True)
    handles = [Patch(facecolor=colors[a], edgecolor="black", alpha=0.75, label=f"annotator {a}") for a in annotators]
    ax.legend(handles=handles + _box_legend_handles(fliers=False), fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    save(figure, path)


# ------------------------------------------------------------------------------------------------ writing
def output_paths(output: str | Path) -> dict[str, Path]:
    return {key: Path(output) / name for key, name in FILES.items()}


def write_agreement(result: Agreement, output: str | Path, overwrite: bool = False, inputs=(),
                    progress=None) -> dict[str, Path]:
    """Write the CSVs and PNGs (see FILES) into ``output``; existing files are refused without
    ``overwrite``, inputs always; all files land together or none. ``progress`` hears of each file."""
    paths = output_paths(output)
    check_outputs(paths.values(), inputs, overwrite)
    tables = {"distances": distances_csv, "planarity": planarity_csv, "summary": summary_csv}
    plots = {"sub_anatomy_plot": plot_sub_anatomies, "landmark_plot": plot_landmarks, "planarity_plot": plot_planarity}
    if progress is not None:
        progress.start("agreement: writing tables and plots", len(paths))
    with written_together():
        for step, (key, path) in enumerate(paths.items(), start=1):
            if key in tables:
                atomic_write_text(path, tables[key](result))
            else:
                plots[key](result, path)
            if progress is not None:
                progress.update(step)
    return paths


def summary_text(result: Agreement) -> str:
    lines = [_subtitle(result)]
    if result.single:
        lines.append(f"left out {len(result.single)} case(s) with one annotator: {', '.join(result.single[:5])}"
                     f"{' ...' if len(result.single) > 5 else ''}")
    for s, sub in enumerate(result.schema.sub_anatomies):
        d = result.distances_of(result.schema.indices_of(sub.name))
        p = result.planarity_of(s)
        lines.append(f"  {sub.name:<22} distance to mean: " +
                     (f"mean {d.mean():.2f} mm, median {np.median(d):.2f} mm, max {d.max():.2f} mm" if d.size
                      else "none") + (f"; planarity RMS mean {p.mean():.2f} mm" if p.size else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def add_agreement_command(subparsers) -> argparse.ArgumentParser:
    """Define ``agreement`` on an argparse subparsers object; its handler is ``args.handler(args)``."""
    p = subparsers.add_parser("agreement", help="inter-annotator agreement: distances to the mean annotation and "
                                                "planarity, as CSV and box plots",
                              description="Inter-annotator agreement for cases annotated by 2+ annotators: each "
                                          "annotator's distance to the mean landmark position, per landmark and "
                                          "sub-anatomy, and each sub-anatomy's planarity.")
    p.add_argument("dataset", metavar="DATASET", help="dataset folder (landmark-detection dataset create) or a CSV "
                                                      "manifest with landmarks, annotator and name columns")
    p.add_argument("--output", required=True, help="folder for agreement.csv, planarity.csv, agreement_summary.csv "
                                                   "and the PNG box plots")
    p.add_argument("--annotators", default=None, metavar="A,B,...",
                   help="compare only these annotators (comma-separated; default all)")
    p.add_argument("--schema", default=None, help="schema name or JSON file (default: the dataset's, or the "
                                                  "built-in schema the annotations' labels fit)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                   help="progress bar for people, or JSON lines for the Slicer GUI (cases read, files written)")
    p.set_defaults(handler=run_agreement)
    return p


def run_agreement(args) -> int:
    from .runtime import Progress

    annotators = [a.strip() for a in args.annotators.split(",") if a.strip()] if args.annotators else None
    check_outputs(output_paths(args.output).values(), [args.dataset], args.overwrite)  # before any work
    progress = Progress(args.progress)
    try:
        result = agreement_of(args.dataset, args.schema, annotators, progress)
        paths = write_agreement(result, args.output, args.overwrite, inputs=[args.dataset], progress=progress)
    finally:
        progress.close()
    print(summary_text(result))
    print(f"outputs: {Path(args.output)} ({', '.join(p.name for p in paths.values())})")
    return 0
