"""Plausibility of brain-88 detections on brains without a brain-88 ground truth: the held-out MNI152Lin
and MNI305 templates (../shared/data/afids-templates), each under 10 seeded random head positions with
2.2 mm slices and a field-of-view cut (heldout.test_scan: the same scans as benchmarks/heldout.py).

Per template and sub-anatomy, the model's 88 points are checked against the annotation guidelines with
the project's annotation QA (annotation.annotation_qa, no boundary curves: spacing and order are
measured in straight lines between a pair's primaries):
  plane mm      mean and max distance of the points to their sub-anatomy's best-fit plane,
  spacing CV    coefficient of variation of the secondaries' spacing (the worst primary pair; mean
                over cases),
  order         the fraction of cases with secondaries out of order between their primaries,
  in view       the fraction of points inside the scan's field of view (the test scans cut the vertex
                or the neck: points beyond the cut are not wrong, but nothing in the scan shows them),
  inside        of the points in view, the fraction inside the scan's head mask (head_mask),
  QA pass       the fraction of cases whose QA row passes. The plane-angle check is not graded: the
                head lies at a random angle in the scanner, so the angle to the scanner's planes would
                measure the simulated motion, not the detection.
The same checks run on the project's brain-88 reference annotation of the training template
(Resources/ReferenceAnnotations), carried onto each scan by registering the training template to it
(default: SimpleITK affine + B-spline, heldout.register_sitk): what a careful annotation looks like on
that scan. "to ref" is the mean distance (mm) between the model's points and the carried reference: the
carried reference is no ground truth (registration errs by 2-4 mm on these templates, see heldout.py),
so a few mm here is agreement, not error. The last line is one JSON object.

    python benchmarks/plausibility.py [--motions 10] [--model M] [--data DIR] [--passes 0]
                                      [--registration sitk_bspline|sitk_affine|ants_syn]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from _common import ROOT
from heldout import TEMPLATES, register_ants_syn, register_sitk, test_scan
from LandmarkDetectionLib.annotation import PASS, annotation_qa
from LandmarkDetectionLib.augment import invert_points
from LandmarkDetectionLib.detect import UncertaintyOptions, detect_volume
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_volume
from LandmarkDetectionLib.geometry import LPS_TO_RAS
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.preprocess import resample_isotropic
from LandmarkDetectionLib.resources import bundled_model_path
from LandmarkDetectionLib.schema import Schema
from LandmarkDetectionLib.testscans import sample_case

REGISTRATIONS = ("sitk_bspline", "sitk_affine", "ants_syn")
SOURCES = ("model", "reference")


# ------------------------------------------------------------------------------------------- the head
def head_mask(scan: sitk.Image) -> sitk.Image:
    """The head in a T1w scan (uint8, the scan's grid): air versus everything else.

    Otsu with two thresholds splits air, dark tissue (skull, CSF) and bright tissue; the lower threshold
    separates air from the whole head whatever the intensity scale (the templates span 0-1 to 0-10000),
    where a single Otsu threshold would also cut out the skull and CSF. The largest component drops
    noise and ghosts in the air. Holes are filled slice by slice along the scan's third (slice) axis:
    a field-of-view cut leaves the head's cavities open at the cut in 3D, while every slice of a head
    has a closed outline (the skin).
    """
    tissue = sitk.OtsuMultipleThresholds(sitk.Cast(scan, sitk.sitkFloat32), numberOfThresholds=2) > 0
    head = sitk.RelabelComponent(sitk.ConnectedComponent(tissue), sortByObjectSize=True) == 1
    array = sitk.GetArrayFromImage(head).astype(bool)  # (slices, rows, columns)
    filled = np.stack([ndimage.binary_fill_holes(plane) for plane in array]).astype(np.uint8)
    mask = sitk.GetImageFromArray(filled)
    mask.CopyInformation(scan)
    return mask


def _nearest_voxels(image: sitk.Image, points_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest voxel index (x, y, z) of each point (K, 3 RAS) and whether it lies on the grid."""
    points = np.asarray(points_ras, dtype=float).reshape(-1, 3)
    finite = np.isfinite(points).all(axis=1)
    index = np.zeros((len(points), 3), dtype=int)
    for k in np.flatnonzero(finite):
        index[k] = np.round(image.TransformPhysicalPointToContinuousIndex(tuple(LPS_TO_RAS @ points[k])))
    on_grid = finite & np.all(index >= 0, axis=1) & np.all(index < np.array(image.GetSize()), axis=1)
    return index, on_grid


def in_view(image: sitk.Image, points_ras: np.ndarray) -> np.ndarray:
    """Per point (K, 3 RAS), whether it lies in the scan's field of view (its nearest voxel is on the grid)."""
    return _nearest_voxels(image, points_ras)[1]


def inside_head(mask: sitk.Image, points_ras: np.ndarray) -> np.ndarray:
    """Per point (K, 3 RAS), whether its nearest voxel of ``mask`` is head; False for a point outside the
    field of view or NaN (nothing in the scan shows it on the head)."""
    index, on_grid = _nearest_voxels(mask, points_ras)
    array = sitk.GetArrayViewFromImage(mask)
    return np.array([bool(ok and array[k[2], k[1], k[0]]) for k, ok in zip(index, on_grid)], dtype=bool)


# ------------------------------------------------------------------------------------------ the checks
def plausibility_thresholds(schema: Schema):
    """The schema's QA limits with the plane angle never failing (see the module docstring)."""
    return dataclasses.replace(schema.qa_thresholds, plane_angle_deg=(math.inf, math.inf))


def case_checks(schema: Schema, landmarks: np.ndarray, mask: sitk.Image) -> dict[str, dict]:
    """The checks of one landmark set on one scan, per sub-anatomy: the absolute plane distances of its
    points (mm), the QA row's spacing CV, whether secondaries are out of order (None where the
    sub-anatomy has no secondaries), which points are in the field of view and which inside the head, and
    the QA row's status."""
    qa = annotation_qa(schema, landmarks, thresholds=plausibility_thresholds(schema))
    inside, visible = inside_head(mask, landmarks), in_view(mask, landmarks)
    checks = {}
    for row in qa.rows:
        indices = schema.indices_of(row.sub_anatomy)
        checks[row.sub_anatomy] = {
            "plane_mm": np.abs(qa.distances[indices]),
            "spacing_cv": row.spacing_cv,
            "out_of_order": None if row.status["order"] == "n/a" else bool(row.out_of_order),
            "in_view": visible[indices],
            "inside": inside[indices],
            "status": row.overall,
        }
    return checks


def _mean(values) -> float | None:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _inside_of_visible(rows: list[dict]) -> float | None:
    inside = np.concatenate([r["inside"] for r in rows])
    visible = np.concatenate([r["in_view"] for r in rows])
    return float(inside[visible].mean()) if visible.any() else None


def summarize(cases: list[dict[str, dict]]) -> dict[str, dict]:
    """Per sub-anatomy over the cases (case_checks results): plane_mean_mm and plane_max_mm (pooled over
    points and cases), spacing_cv (mean over cases), order_violations (fraction of cases with points out
    of order; None without secondaries), in_view (fraction of points in the field of view), inside (of
    those, the fraction inside the head), qa_pass (fraction of cases whose QA row passes). Values that
    do not apply are None."""
    summary = {}
    for sub in cases[0]:
        rows = [case[sub] for case in cases]
        plane = np.concatenate([r["plane_mm"] for r in rows])
        plane = plane[np.isfinite(plane)]
        orders = [r["out_of_order"] for r in rows if r["out_of_order"] is not None]
        summary[sub] = {
            "plane_mean_mm": float(plane.mean()) if len(plane) else None,
            "plane_max_mm": float(plane.max()) if len(plane) else None,
            "spacing_cv": _mean(r["spacing_cv"] for r in rows),
            "order_violations": float(np.mean(orders)) if orders else None,
            "in_view": float(np.concatenate([r["in_view"] for r in rows]).mean()),
            "inside": _inside_of_visible(rows),
            "qa_pass": float(np.mean([r["status"] == PASS for r in rows])),
        }
    return summary


def qa_pass_rate(cases: list[dict[str, dict]]) -> float:
    """The fraction of (case, sub-anatomy) rows whose QA passes."""
    return float(np.mean([row["status"] == PASS for case in cases for row in case.values()]))


def inside_rate(cases: list[dict[str, dict]]) -> float | None:
    """Of all points of all cases (case_checks results) in the field of view, the fraction inside the head."""
    return _inside_of_visible([row for case in cases for row in case.values()])


def distances_by_sub_anatomy(schema: Schema, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per sub-anatomy, the mean distance (mm) between two landmark sets."""
    distance = np.linalg.norm(np.asarray(a) - np.asarray(b), axis=1)
    return {sub.name: float(np.nanmean(distance[schema.indices_of(sub.name)])) for sub in schema.sub_anatomies}


# -------------------------------------------------------------------------------------------- the run
def carry_reference(scan: sitk.Image, atlas: sitk.Image, reference: np.ndarray, method: str):
    """The atlas's reference annotation carried onto ``scan`` by registration, and the seconds it took."""
    start = time.perf_counter()
    if method == "ants_syn":
        return register_ants_syn(scan, atlas, reference), time.perf_counter() - start
    affine, bspline, affine_s, bspline_s = register_sitk(scan, atlas, bspline=method == "sitk_bspline")
    transform, seconds = (affine, affine_s) if method == "sitk_affine" else (bspline, bspline_s)
    carried, _ = invert_points(transform, reference)
    return carried, seconds


def _model_path(given: str | None) -> Path:
    if given:
        return Path(given)
    try:
        path = bundled_model_path("brain-88")
    except LandmarkError:
        path = None
    if path is None or not path.is_file():
        sys.exit("plausibility: no bundled brain-88 model yet (Resources/Models); pass --model MODEL.safetensors")
    return path


def _cell(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = (("plane mean", "plane_mean_mm", 2), ("plane max", "plane_max_mm", 2), ("spacing CV", "spacing_cv", 3),
           ("order viol", "order_violations", 2), ("in view", "in_view", 2),
           ("inside", "inside", 2), ("QA pass", "qa_pass", 2))


def print_table(name: str, record: dict) -> None:
    print(f"\n{name}: {record['cases']} cases; model {record['model_s_per_case']:.1f} s/case, "
          f"{record['registration']} {record['registration_s_per_case']:.1f} s/case; "
          f"each cell: model | carried reference")
    print(f"{'sub-anatomy':<22}" + "".join(f"{title:>16}" for title, _, _ in COLUMNS) + f"{'to ref mm':>11}")
    for sub, row in record["sub_anatomies"].items():
        cells = "".join(f"{_cell(row['model'][key], digits):>7} | {_cell(row['reference'][key], digits):<6}"
                        for _, key, digits in COLUMNS)
        print(f"{sub:<22}{cells}{row['model_to_reference_mm']:>11.2f}")
    print(f"{'all':<22}{'':>80}{_cell(record['inside_model']):>7} | {_cell(record['inside_reference']):<6}"
          f"{record['qa_pass_model']:>7.2f} | {record['qa_pass_reference']:<6.2f}{record['model_to_reference_mm']:>11.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--motions", type=int, default=10, help="random head positions per template")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "afids-templates"))
    parser.add_argument("--model", default=None, help="brain-88 model (default: the bundled one)")
    parser.add_argument("--passes", type=int, default=0, help="uncertainty passes (0: one plain forward pass)")
    parser.add_argument("--registration", choices=REGISTRATIONS, default="sitk_bspline",
                        help="how the reference annotation is carried onto each scan (default: SimpleITK "
                             "affine + B-spline, heldout.register_sitk)")
    args = parser.parse_args()
    if args.motions < 1:
        parser.error("--motions must be at least 1")
    if not Path(args.data).is_dir():
        sys.exit(f"plausibility: {args.data}: the held-out templates are not there (--data)")
    model_path = _model_path(args.model)
    atlas, reference, schema, _ = sample_case("brain-88")
    try:
        model = load_model(model_path)
        model.check_schema(schema, model_path)
    except LandmarkError as error:
        sys.exit(f"plausibility: {error}")
    atlas = resample_isotropic(atlas, 2.0)  # 2 mm: the resolution of the test templates (as heldout.py)
    options = UncertaintyOptions(passes=args.passes, seed=0) if args.passes else None

    table = {}
    for name, (volume_file, _) in TEMPLATES.items():
        image = read_volume(Path(args.data) / volume_file)
        checks = {source: [] for source in SOURCES}
        distances, overall, seconds = [], [], {"model": [], "registration": []}
        for n in range(args.motions):
            scan, _ = test_scan(image, np.random.default_rng([2024, n, len(name)]))  # heldout.py's seeds
            start = time.perf_counter()
            predicted = detect_volume(model, scan, "cpu", name, options).landmarks_ras
            seconds["model"].append(time.perf_counter() - start)
            carried, registration_s = carry_reference(scan, atlas, reference, args.registration)
            seconds["registration"].append(registration_s)
            mask = head_mask(scan)
            checks["model"].append(case_checks(schema, predicted, mask))
            checks["reference"].append(case_checks(schema, carried, mask))
            distances.append(distances_by_sub_anatomy(schema, predicted, carried))
            overall.append(float(np.nanmean(np.linalg.norm(predicted - carried, axis=1))))
            print(f"{name} motion {n}: QA pass model {qa_pass_rate(checks['model'][-1:]):.2f}, reference "
                  f"{qa_pass_rate(checks['reference'][-1:]):.2f}; model to reference "
                  f"{overall[-1]:.2f} mm ({seconds['model'][-1]:.1f} s, "
                  f"{args.registration} {registration_s:.0f} s)", flush=True)
        summaries = {source: summarize(checks[source]) for source in SOURCES}
        to_reference = {sub: float(np.mean([d[sub] for d in distances])) for sub in summaries["model"]}
        table[name] = {
            "cases": args.motions,
            "registration": args.registration,
            "model_s_per_case": float(np.mean(seconds["model"])),
            "registration_s_per_case": float(np.mean(seconds["registration"])),
            "qa_pass_model": qa_pass_rate(checks["model"]),
            "qa_pass_reference": qa_pass_rate(checks["reference"]),
            "inside_model": inside_rate(checks["model"]),
            "inside_reference": inside_rate(checks["reference"]),
            "model_to_reference_mm": float(np.mean(overall)),  # all 88 points
            "sub_anatomies": {sub: {"model": summaries["model"][sub], "reference": summaries["reference"][sub],
                                    "model_to_reference_mm": to_reference[sub]} for sub in summaries["model"]},
        }
    for name, record in table.items():
        print_table(name, record)
    print(json.dumps({"model": str(model_path), "registration": args.registration, "templates": table}))


if __name__ == "__main__":
    main()
