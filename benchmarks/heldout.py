"""Held-out accuracy on anatomy the demo model never saw: the MNI152Lin and MNI305 templates with their
human AFIDs annotations (../shared/data/afids-templates), each moved by 10 seeded random rigid motions
(+-15 degrees, +-15 mm) and re-acquired with 1 x 1 x 2.2 mm axial slices. Compared in one run with the
classic atlas approach: register the training template (MNI152NLin2009cAsym) onto the test scan with
SimpleITK (rigid, then affine, then B-spline; Mattes mutual information) and carry its AFIDs across.
Last line: one JSON object.

    python benchmarks/heldout.py [--motions 10] [--data ../shared/data/afids-templates]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from _common import ROOT
from LandmarkDetectionLib.augment import invert_points
from LandmarkDetectionLib.resources import bundled_model_path
from LandmarkDetectionLib.testscans import acquire, random_head_position, sample_case
from LandmarkDetectionLib.detect import detect_image
from LandmarkDetectionLib.geometry import apply_matrix, move_image
from LandmarkDetectionLib.io import read_landmarks, read_volume
from LandmarkDetectionLib.metrics import radial_errors, summarize
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.preprocess import resample_isotropic

TEMPLATES = {"MNI152Lin": ("avg152T1_spm12_2mm.nii.gz", "tpl-MNI152Lin_res-01_desc-groundtruth_afids.fcsv"),
             "MNI305": ("avg305T1_spm12_2mm.nii.gz", "tpl-MNI305_desc-groundtruth_afids.fcsv")}


def register(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """Rigid, then affine, then B-spline; returns the fixed -> moving transform (SimpleITK convention)."""
    def method(shrink, smooth, iterations, lbfgsb=False):
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

    # Register at 2 mm (the test templates' own resolution): the scan's slices add nothing finer.
    fixed, moving = resample_isotropic(fixed, 2.0), sitk.Cast(moving, sitk.sitkFloat32)
    rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    r = method([4, 2], [4.0, 2.0], 100)
    r.SetInitialTransform(rigid, inPlace=True)
    r.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    r = method([2, 1], [2.0, 0.0], 100)
    r.SetInitialTransform(affine, inPlace=True)
    r.Execute(fixed, moving)
    bspline = sitk.BSplineTransformInitializer(fixed, [5, 5, 5])
    r = method([2, 1], [2.0, 0.0], 30, lbfgsb=True)
    r.SetMovingInitialTransform(affine)
    r.SetInitialTransform(bspline, inPlace=True)
    r.Execute(fixed, moving)
    return sitk.CompositeTransform([affine, bspline])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--motions", type=int, default=10)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "afids-templates"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--skip-registration", action="store_true", help="only the model (to compare models fast)")
    args = parser.parse_args()
    model = load_model(args.model or bundled_model_path())
    atlas, atlas_afids, schema, _ = sample_case()
    atlas = resample_isotropic(atlas, 2.0)  # 2 mm: the resolution of the test templates
    model_errors, registration_errors, model_s, registration_s = [], [], [], []
    for name, (volume_file, afids_file) in TEMPLATES.items():
        image = read_volume(Path(args.data) / volume_file)
        truth0 = read_landmarks(Path(args.data) / afids_file, schema)
        for n in range(args.motions):
            motion = random_head_position(image, np.random.default_rng([2024, n, len(name)]))
            scan = acquire(move_image(image, motion))
            truth = apply_matrix(motion, truth0)
            start = time.perf_counter()
            predicted = detect_image(model, scan, "cpu")
            model_s.append(time.perf_counter() - start)
            model_errors.append(radial_errors(predicted, truth))
            line = f"{name} motion {n}: model {model_errors[-1].mean():.2f} mm ({model_s[-1]:.2f} s)"
            if not args.skip_registration:
                start = time.perf_counter()
                fixed_to_atlas = register(scan, atlas)
                carried, _ = invert_points(fixed_to_atlas, atlas_afids)
                registration_s.append(time.perf_counter() - start)
                registration_errors.append(radial_errors(carried, truth))
                line += f", registration {registration_errors[-1].mean():.2f} mm ({registration_s[-1]:.1f} s)"
            print(line, flush=True)
    model_summary = summarize(np.array(model_errors))
    if args.skip_registration:
        print(json.dumps({"cases": len(model_errors), "model": str(args.model or bundled_model_path()),
                          **{f"model_{k}": v for k, v in model_summary.items()}}))
        return
    registration_summary = summarize(np.array(registration_errors))
    result = {"cases": len(model_errors), "templates": list(TEMPLATES), "model": str(args.model or bundled_model_path()),
              "model_mre_mm": model_summary["mre_mm"], "model_sd_mm": model_summary["sd_mm"],
              "model_sdr_2mm": model_summary["sdr_2mm"], "model_sdr_4mm": model_summary["sdr_4mm"],
              "registration_mre_mm": registration_summary["mre_mm"], "registration_sd_mm": registration_summary["sd_mm"],
              "registration_sdr_2mm": registration_summary["sdr_2mm"],
              "registration_sdr_4mm": registration_summary["sdr_4mm"],
              "model_s_per_case": float(np.mean(model_s)), "registration_s_per_case": float(np.mean(registration_s))}
    result["speedup"] = result["registration_s_per_case"] / result["model_s_per_case"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
