"""Held-out accuracy on anatomy the model never saw: the MNI152Lin and MNI305 templates with their human
AFIDs annotations (../shared/data/afids-templates), each under 10 seeded random head positions (up to 25
degrees and 20 mm), re-acquired with 2.2 mm axial slices and a random field of view (top of the head or
the neck cut). Compared in one run with atlas registration of the training template
(MNI152NLin2009cAsym) onto each test scan, carrying its AFIDs across:
  (b) SimpleITK affine (rigid, then affine; Mattes mutual information),
  (c) SimpleITK affine + B-spline,
  (d) ANTs SyN through antspyx (the optional `bench` extra; on the first --ants-cases cases per template).
The model runs with 50-pass uncertainty, so the table also gives the 90% ellipsoids' coverage and the
Spearman correlation of uncertainty and error. The last line is one JSON object.

    python benchmarks/heldout.py [--motions 10] [--ants-cases 3] [--model M] [--data DIR]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from _common import ROOT
from LandmarkDetectionLib.augment import invert_points
from LandmarkDetectionLib.detect import UncertaintyOptions, detect_volume
from LandmarkDetectionLib.fileio import read_landmarks, read_volume
from LandmarkDetectionLib.geometry import LPS_TO_RAS, apply_matrix, centered_grid, move_image, physical_center_ras
from LandmarkDetectionLib.metrics import radial_errors
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.preprocess import resample_isotropic
from LandmarkDetectionLib.resources import bundled_model_path
from LandmarkDetectionLib.testscans import random_head_position, sample_case

TEMPLATES = {"MNI152Lin": ("avg152T1_spm12_2mm.nii.gz", "tpl-MNI152Lin_res-01_desc-groundtruth_afids.fcsv"),
             "MNI305": ("avg305T1_spm12_2mm.nii.gz", "tpl-MNI305_desc-groundtruth_afids.fcsv")}


def test_scan(image: sitk.Image, rng: np.random.Generator):
    """A random head position (up to 25 degrees, 20 mm) and a 2.2 mm axial acquisition whose field of view
    covers 150-200 mm from a random height: the vertex or the neck may be cut."""
    motion = random_head_position(image, rng, 25.0, 20.0)
    moved = move_image(image, motion)
    slices = int(rng.integers(68, 91))
    center = physical_center_ras(moved) + np.array([0.0, 0.0, rng.uniform(-15, 15)])
    grid = centered_grid(center, (192, 224, slices), (1.0, 1.0, 2.2))
    background = float(sitk.GetArrayViewFromImage(moved).min())
    scan = sitk.Resample(moved, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    return scan, motion


def _method(shrink, smooth, iterations, lbfgsb=False):
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(0.05, seed=1)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetShrinkFactorsPerLevel(shrink)
    r.SetSmoothingSigmasPerLevel(smooth)
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if lbfgsb:  # B-spline: L-BFGS-B, which takes no parameter scales
        r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations)
    else:
        r.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, iterations, relaxationFactor=0.6)
        r.SetOptimizerScalesFromPhysicalShift()
    return r


def register_sitk(fixed: sitk.Image, moving: sitk.Image, bspline: bool = True):
    """Rigid, then affine, then (unless ``bspline`` is False) B-spline; returns (affine, affine + B-spline
    or None), each the fixed -> moving transform (SimpleITK convention), and the seconds each took."""
    started = time.perf_counter()
    # Register at 2 mm (the test templates' own resolution): the scan's slices add nothing finer.
    fixed, moving = resample_isotropic(fixed, 2.0), sitk.Cast(moving, sitk.sitkFloat32)
    rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    r = _method([4, 2], [4.0, 2.0], 100)
    r.SetInitialTransform(rigid, inPlace=True)
    r.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    r = _method([2, 1], [2.0, 0.0], 100)
    r.SetInitialTransform(affine, inPlace=True)
    r.Execute(fixed, moving)
    affine_seconds = time.perf_counter() - started
    if not bspline:
        return affine, None, affine_seconds, None
    deformation = sitk.BSplineTransformInitializer(fixed, [5, 5, 5])
    r = _method([2, 1], [2.0, 0.0], 30, lbfgsb=True)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(deformation, inPlace=True)
    r.Execute(fixed, moving)
    return affine, sitk.CompositeTransform([affine, deformation]), affine_seconds, time.perf_counter() - started


def register_ants_syn(scan: sitk.Image, atlas: sitk.Image, atlas_points_ras: np.ndarray) -> np.ndarray:
    """The atlas landmarks carried onto the scan by ANTs SyN (antspyx)."""
    import ants
    import pandas as pd

    def to_ants(image):
        array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).transpose(2, 1, 0)
        direction = np.array(image.GetDirection()).reshape(3, 3)
        return ants.from_numpy(array.copy(), origin=list(image.GetOrigin()), spacing=list(image.GetSpacing()),
                               direction=direction)

    fixed, moving = to_ants(resample_isotropic(scan, 2.0)), to_ants(atlas)
    result = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=1)
    # ANTs maps points with the transforms that resample images the other way: the fixed -> moving
    # transforms (fwdtransforms) take moving-space (atlas) points to fixed-space (scan) points.
    points = pd.DataFrame(atlas_points_ras @ LPS_TO_RAS, columns=["x", "y", "z"])
    carried = ants.apply_transforms_to_points(3, points, result["invtransforms"], whichtoinvert=[True, False])
    return carried[["x", "y", "z"]].to_numpy() @ LPS_TO_RAS


def summary(errors, seconds):
    errors = np.concatenate(errors) if errors else np.array([np.nan])
    return {"mre_mm": float(np.nanmean(errors)), "median_mm": float(np.nanmedian(errors)),
            "sdr_2mm": float(np.mean(errors <= 2) * 100), "sdr_4mm": float(np.mean(errors <= 4) * 100),
            "s_per_case": float(np.mean(seconds)) if seconds else None, "cases": len(seconds)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--motions", type=int, default=10)
    parser.add_argument("--ants-cases", type=int, default=3, help="cases per template for ANTs SyN (slow)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "afids-templates"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--passes", type=int, default=50, help="uncertainty passes of the model")
    parser.add_argument("--skip-registration", action="store_true", help="only the model (to compare models fast)")
    parser.add_argument("--record", metavar="MODEL_OUT", help="write a copy of the model whose metadata records "
                                                                "this held-out table (metrics.heldout)")
    args = parser.parse_args()
    model_path = args.model or bundled_model_path()
    model = load_model(model_path)
    atlas, atlas_afids, schema, _ = sample_case()
    atlas = resample_isotropic(atlas, 2.0)  # 2 mm: the resolution of the test templates
    try:
        import ants  # noqa: F401
        have_ants = not args.skip_registration
    except ImportError:
        have_ants = False
        print("ANTs SyN: antspyx is not installed (pip install '.[bench]'); its column is left empty")
    options = UncertaintyOptions(passes=args.passes, seed=0)
    methods = ("model", "sitk_affine", "sitk_bspline", "ants_syn")
    table = {}
    for name, (volume_file, afids_file) in TEMPLATES.items():
        image = read_volume(Path(args.data) / volume_file)
        truth0 = read_landmarks(Path(args.data) / afids_file, schema)
        errors = {m: [] for m in methods}
        seconds = {m: [] for m in methods}
        semi, covered = [], []
        for n in range(args.motions):
            scan, motion = test_scan(image, np.random.default_rng([2024, n, len(name)]))
            truth = apply_matrix(motion, truth0)
            start = time.perf_counter()
            detection = detect_volume(model, scan, "cpu", name, options if args.passes else None)
            seconds["model"].append(time.perf_counter() - start)
            errors["model"].append(radial_errors(detection.landmarks_ras, truth))
            if detection.uncertainty is not None:
                semi.append(detection.uncertainty.max_semi_axis())
                covered.append(detection.uncertainty.covers(truth))
            line = f"{name} motion {n}: model {errors['model'][-1].mean():.2f} mm ({seconds['model'][-1]:.1f} s)"
            if not args.skip_registration:
                affine, bspline, affine_s, bspline_s = register_sitk(scan, atlas)
                for method, transform, s in (("sitk_affine", affine, affine_s), ("sitk_bspline", bspline, bspline_s)):
                    carried, _ = invert_points(transform, atlas_afids)
                    errors[method].append(radial_errors(carried, truth))
                    seconds[method].append(s)
                line += (f", affine {errors['sitk_affine'][-1].mean():.2f}, B-spline "
                         f"{errors['sitk_bspline'][-1].mean():.2f} mm ({bspline_s:.0f} s)")
            if have_ants and n < args.ants_cases:
                start = time.perf_counter()
                carried = register_ants_syn(scan, atlas, atlas_afids)
                seconds["ants_syn"].append(time.perf_counter() - start)
                errors["ants_syn"].append(radial_errors(carried, truth))
                line += f", ANTs SyN {errors['ants_syn'][-1].mean():.2f} mm ({seconds['ants_syn'][-1]:.0f} s)"
            print(line, flush=True)
        rows = {m: summary(errors[m], seconds[m]) for m in methods}
        record = {"cases": args.motions}
        for m in methods:
            record[f"{m}_mre_mm"] = rows[m]["mre_mm"] if rows[m]["cases"] else None
            record[f"{m}_s_per_case"] = rows[m]["s_per_case"]
        record["ants_syn_cases"] = rows["ants_syn"]["cases"]
        record["model_coverage90"], record["model_spearman"] = None, None
        if semi:
            from scipy.stats import spearmanr

            all_errors, all_semi = np.concatenate(errors["model"]), np.concatenate(semi)
            record["model_coverage90"] = float(np.concatenate(covered).mean())
            record["model_spearman"] = float(spearmanr(all_semi, all_errors).statistic)
        record["rows"] = rows
        table[name] = record
    print(f"\n{'template':<11}{'method':<14}{'cases':>6}{'MRE':>7}{'median':>8}{'SDR2':>7}{'SDR4':>7}{'s/case':>8}")
    for name, record in table.items():
        for m in methods:
            r = record["rows"][m]
            if not r["cases"]:
                print(f"{name:<11}{m:<14}{'not run':>6}")
                continue
            print(f"{name:<11}{m:<14}{r['cases']:>6}{r['mre_mm']:>7.2f}{r['median_mm']:>8.2f}{r['sdr_2mm']:>7.1f}"
                  f"{r['sdr_4mm']:>7.1f}{r['s_per_case']:>8.1f}")
        if record["model_coverage90"] is not None:
            print(f"{name:<11}model uncertainty: {record['model_coverage90'] * 100:.0f}% of truths inside the 90% "
                  f"ellipsoids, Spearman(uncertainty, error) {record['model_spearman']:.2f}")
    for record in table.values():
        del record["rows"]
    if args.record:
        model.metrics["heldout"] = {"benchmark": "benchmarks/heldout.py", "templates": table,
                                    "note": "held-out templates under random head positions; measured only"}
        model.save(args.record)
    print(json.dumps({"model": str(model_path), "templates": table}))


if __name__ == "__main__":
    main()
