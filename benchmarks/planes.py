"""Scan-plane accuracy on held-out brains: the mid-sagittal plane and the AC-PC line computed
(LandmarkDetectionLib.planes) from the model's landmarks vs from the human AFIDs, on the MNI152Lin and
MNI305 templates (../shared/data/afids-templates) moved by N seeded random rigid motions and re-acquired
with 1 x 1 x 2.2 mm slices, exactly as benchmarks/heldout.py does. Compared in the same run with the
planes from atlas-registration-carried AFIDs (heldout.register_sitk, affine + B-spline; --skip-registration to leave it out).

Errors per case: MSP angle (deg) between the normals and offset (mm) between the planes at the true
plane's centre along its normal; AC-PC line angle (deg) and offset (mm, the distance of the true AC-PC
midpoint from the predicted line); AC-PC frame rotation (deg). Per template the mean over motions, then
one JSON line.

    python benchmarks/planes.py [--motions 10] [--data ../shared/data/afids-templates] [--model M]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from _common import ROOT
from heldout import TEMPLATES, register_sitk
from LandmarkDetectionLib.augment import invert_points
from LandmarkDetectionLib.resources import bundled_model_path
from LandmarkDetectionLib.testscans import acquire, random_head_position, sample_case
from LandmarkDetectionLib.detect import detect_image
from LandmarkDetectionLib.geometry import apply_matrix, move_image
from LandmarkDetectionLib.fileio import read_landmarks, read_volume
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.planes import compute_planes
from LandmarkDetectionLib.preprocess import resample_isotropic

KEYS = ("msp_angle_deg", "msp_offset_mm", "acpc_angle_deg", "acpc_offset_mm", "frame_rotation_deg")


def _angle(a, b, signed=True):
    cosine = float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cosine if signed else abs(cosine), -1.0, 1.0))))


def plane_errors(schema, predicted, truth) -> dict:
    """Errors of the MSP and AC-PC line from ``predicted`` landmarks against those from ``truth``."""
    p, t = compute_planes(schema, predicted), compute_planes(schema, truth)
    pm, tm = p.planes["mid-sagittal"], t.planes["mid-sagittal"]
    ac, pc = schema.names.index(schema.planes.ac), schema.names.index(schema.planes.pc)
    line_p, line_t = predicted[ac] - predicted[pc], truth[ac] - truth[pc]
    direction = line_p / np.linalg.norm(line_p)
    midpoint = (truth[ac] + truth[pc]) / 2 - predicted[pc]
    relative = p.acpc.rotation.T @ t.acpc.rotation
    return {"msp_angle_deg": _angle(pm.normal, tm.normal),
            "msp_offset_mm": float(abs(pm.normal @ (pm.centre - tm.centre) / (pm.normal @ tm.normal))),
            "acpc_angle_deg": _angle(line_p, line_t),
            "acpc_offset_mm": float(np.linalg.norm(midpoint - (midpoint @ direction) * direction)),
            "frame_rotation_deg": float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1.0, 1.0)))),
            "msp_excluded": list(pm.excluded), "warnings": len(p.warnings)}


def _mean(rows) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS}


def _line(errors) -> str:
    return (f"MSP {errors['msp_angle_deg']:.2f} deg / {errors['msp_offset_mm']:.2f} mm, AC-PC {errors['acpc_angle_deg']:.2f} "
            f"deg / {errors['acpc_offset_mm']:.2f} mm, frame {errors['frame_rotation_deg']:.2f} deg")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--motions", type=int, default=10)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "afids-templates"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--skip-registration", action="store_true", help="only the model")
    args = parser.parse_args()
    model = load_model(args.model or bundled_model_path())
    atlas, atlas_afids, schema, _ = sample_case()
    atlas = resample_isotropic(atlas, 2.0)  # 2 mm: the resolution of the test templates
    methods = ["model"] + ([] if args.skip_registration else ["registration"])
    rows = {m: [] for m in methods}
    seconds = {m: [] for m in methods}
    for name, (volume_file, afids_file) in TEMPLATES.items():
        image = read_volume(Path(args.data) / volume_file)
        truth0 = read_landmarks(Path(args.data) / afids_file, schema)
        per_template = {m: [] for m in methods}
        for n in range(args.motions):
            motion = random_head_position(image, np.random.default_rng([2024, n, len(name)]))  # heldout's motions
            scan = acquire(move_image(image, motion))
            truth = apply_matrix(motion, truth0)
            start = time.perf_counter()
            predicted = {"model": detect_image(model, scan, "cpu")}
            seconds["model"].append(time.perf_counter() - start)
            if "registration" in methods:
                start = time.perf_counter()
                predicted["registration"], _ = invert_points(register_sitk(scan, atlas)[1], atlas_afids)
                seconds["registration"].append(time.perf_counter() - start)
            parts = []
            for method in methods:
                errors = plane_errors(schema, predicted[method], truth)
                per_template[method].append(errors)
                rows[method].append(errors)
                excluded = f" (MSP left out {', '.join(errors['msp_excluded'])})" if errors["msp_excluded"] else ""
                parts.append(f"{method} {_line(errors)}{excluded}")
            print(f"{name} motion {n}: " + "; ".join(parts), flush=True)
        for method in methods:
            print(f"{name} mean over {args.motions} motion(s), {method}: {_line(_mean(per_template[method]))}", flush=True)
    result = {"cases": len(rows["model"]), "templates": list(TEMPLATES), "model": str(args.model or bundled_model_path())}
    for method in methods:
        result.update({f"{method}_{k}": v for k, v in _mean(rows[method]).items()})
        result.update({f"{method}_{k}_max": float(np.max([r[k] for r in rows[method]])) for k in KEYS[:4]})
        result[f"{method}_s_per_case"] = float(np.mean(seconds[method]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
