"""Evaluation of predicted landmarks against the truth: per landmark, per sub-anatomy, per group.

Predictions: a folder of ``NAME.mrk.json`` (or .fcsv/.csv). Truth: a folder of landmark files with
the same names, or a dataset manifest CSV (its ``group`` column gives per-group rows).
"""

from __future__ import annotations

import csv
import io as _io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import discover_cases
from .errors import LandmarkError
from .fileio import LANDMARK_SUFFIXES, atomic_write_text, read_landmarks, stem
from .metrics import SDR_THRESHOLDS_MM, radial_errors, summarize
from .schema import Schema


@dataclass
class Evaluation:
    schema: Schema
    cases: list[str]
    groups: list[str]
    errors: np.ndarray  # (N cases, K landmarks) radial error in mm
    uncertainty_mm: np.ndarray | None = None  # (N, K) longest ellipsoid semi-axis, where predictions have one
    calibration: dict | None = None  # coverage and error-uncertainty correlations
    files: list = field(default_factory=list)  # every file read: outputs must never replace one

    def rows(self) -> list[dict]:
        """Rows of the report: overall, per sub-anatomy, per group, per landmark."""
        rows = [{"level": "overall", "name": "all landmarks", **summarize(self.errors)}]
        for sub in self.schema.sub_anatomies:
            idx = self.schema.indices_of(sub.name)
            rows.append({"level": "sub_anatomy", "name": sub.name, **summarize(self.errors[:, idx])})
        for group in sorted(set(g for g in self.groups if g)):
            keep = [i for i, g in enumerate(self.groups) if g == group]
            rows.append({"level": "group", "name": group, **summarize(self.errors[keep])})
        for k, lm in enumerate(self.schema.landmarks):
            rows.append({"level": "landmark", "name": lm.name, "sub_anatomy": lm.sub_anatomy,
                         **summarize(self.errors[:, k])})
        return rows


def _landmark_file(folder: Path, name: str) -> Path | None:
    return next((folder / f"{name}{s}" for s in LANDMARK_SUFFIXES if (folder / f"{name}{s}").is_file()), None)


def _truth_pairs(truth: Path) -> list[tuple[str, Path, str]]:
    """(case name, truth landmark file, group) from a dataset manifest or a folder of landmark files."""
    if truth.is_file():  # a dataset manifest
        return [(c.name, c.landmarks, c.group) for c in discover_cases(truth)]
    if truth.is_dir():
        names = sorted({stem(p) for p in truth.iterdir() if p.name.lower().endswith(LANDMARK_SUFFIXES)})
        if not names:
            raise LandmarkError(truth, "holds no landmark files (.mrk.json, .fcsv, .csv)")
        return [(n, _landmark_file(truth, n), "") for n in names]
    raise LandmarkError(truth, "truth does not exist")


def truth_files(truth: str | Path) -> list[Path]:
    return [path for _, path, _ in _truth_pairs(Path(truth))]


def evaluate(predictions: str | Path, truth: str | Path, schema: Schema) -> Evaluation:
    predictions, truth = Path(predictions), Path(truth)
    if not predictions.is_dir():
        raise LandmarkError(predictions, "predictions must be a folder of landmark files")
    pairs = _truth_pairs(truth)
    rows, names, groups, semi_axes, inside, level, files = [], [], [], [], [], None, [truth]
    for name, truth_file, group in pairs:
        predicted = _landmark_file(predictions, name)
        if predicted is None:
            continue
        truth_ras = read_landmarks(truth_file, schema)
        rows.append(radial_errors(read_landmarks(predicted, schema), truth_ras))
        files += [predicted, truth_file]
        names.append(name)
        groups.append(group)
        uncertainty_file = predictions / f"{name}.uncertainty.json"
        if uncertainty_file.exists():
            from .uncertainty import read_uncertainty

            result, _ = read_uncertainty(uncertainty_file)
            files.append(uncertainty_file)
            level = result.level
            semi_axes.append(result.max_semi_axis())
            inside.append(result.covers(truth_ras))
    if not rows:
        raise LandmarkError(predictions, f"no prediction matches a truth file in {truth} (names must agree)")
    evaluation = Evaluation(schema, names, groups, np.vstack(rows), files=files)
    if semi_axes and len(semi_axes) == len(rows):
        from scipy.stats import pearsonr, spearmanr

        evaluation.uncertainty_mm = np.vstack(semi_axes)
        errors, uncertainty = evaluation.errors.ravel(), evaluation.uncertainty_mm.ravel()
        keep = np.isfinite(errors) & np.isfinite(uncertainty)
        evaluation.calibration = {
            "level": level, "n": int(keep.sum()), "coverage": float(np.concatenate(inside)[keep].mean()),
            "spearman": float(spearmanr(uncertainty[keep], errors[keep]).statistic) if keep.sum() > 2 else float("nan"),
            "pearson": float(pearsonr(uncertainty[keep], errors[keep]).statistic) if keep.sum() > 2 else float("nan")}
    return evaluation


def plot_uncertainty(evaluation: Evaluation, path) -> None:
    """Error against uncertainty, one dot per landmark and case."""
    from .figures import uncertainty_scatter

    c = evaluation.calibration
    uncertainty_scatter(evaluation.errors, evaluation.uncertainty_mm, c["level"], path, coverage=c["coverage"])


EVALUATION_COLUMNS = ["level", "name", "sub_anatomy", "n", "mre_mm", "sd_mm", "median_mm", "rmse_mm", "max_mm",
                  *(f"sdr_{t:g}mm" for t in SDR_THRESHOLDS_MM), "value"]


def evaluation_csv(evaluation: Evaluation) -> str:
    out = _io.StringIO()
    writer = csv.DictWriter(out, fieldnames=EVALUATION_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in evaluation.rows():
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    if evaluation.calibration:
        c = evaluation.calibration
        writer.writerow({"level": "uncertainty", "name": f"coverage of {c['level']:.0%} ellipsoids", "n": c["n"],
                         "value": f"{c['coverage']:.4f}"})
        writer.writerow({"level": "uncertainty", "name": "spearman(uncertainty, error)", "n": c["n"],
                         "value": f"{c['spearman']:.4f}"})
        writer.writerow({"level": "uncertainty", "name": "pearson(uncertainty, error)", "n": c["n"],
                         "value": f"{c['pearson']:.4f}"})
    return out.getvalue()


def write_evaluation_csv(evaluation: Evaluation, path: str | Path) -> None:
    atomic_write_text(path, evaluation_csv(evaluation))


def format_table(evaluation: Evaluation) -> str:
    """The printed summary: overall, sub-anatomies (the paper's Table IV: MAE and RMSE of the radial error
    per sub-anatomy) and groups."""
    header = f"{'':<28}{'n':>6}{'MAE':>8}{'SD':>8}{'RMSE':>8}" + "".join(f"{f'SDR{t:g}':>8}" for t in SDR_THRESHOLDS_MM)
    lines = [f"{len(evaluation.cases)} case(s), schema {evaluation.schema.name}; radial errors in mm (MAE: their mean, "
             "the MRE), SDR in %; the sub-anatomy rows are the source paper's Table IV", header]
    for row in evaluation.rows():
        if row["level"] == "landmark" or row.get("n", 0) == 0:
            continue
        label = row["name"] if row["level"] == "overall" else f"  {row['name']}"
        lines.append(f"{label[:27]:<28}{row['n']:>6}{row['mre_mm']:>8.2f}{row['sd_mm']:>8.2f}{row['rmse_mm']:>8.2f}"
                     + "".join(f"{row[f'sdr_{t:g}mm']:>8.1f}" for t in SDR_THRESHOLDS_MM))
    return "\n".join(lines)
