"""Exact landmark transport vs the faux-volume method, 88 landmarks on a 224x224x101 volume.

For each spatial policy (DA3: affine, DA4: elastic) the same drawn transform is applied to the
landmarks both ways. Prints per-sample times, their ratio, the exact method's inverse-solve residual
(transported point mapped forward vs the original, in voxels) and the faux method's deviation from the
exact result (voxels). Last line: one JSON object.

    python benchmarks/augment.py [--samples 2]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LandmarkDetection"))
from LandmarkDetectionLib.augment import Augmenter, faux_volume_transport, load_config  # noqa: E402
from LandmarkDetectionLib.geometry import Grid, LPS_TO_RAS  # noqa: E402
from LandmarkDetectionLib.preprocess import InputGeometry, model_grid, resample_to_grid  # noqa: E402
from LandmarkDetectionLib.sample_data import fetch_sample  # noqa: E402


def survey_volume():
    """The sample T1w resampled into the paper's survey geometry (224x224x101, 1x1x2.2 mm)."""
    template = sitk.ReadImage(str(fetch_sample().t1w), sitk.sitkFloat32)
    grid = model_grid(template, InputGeometry())
    image = sitk.GetImageFromArray(resample_to_grid(template, grid))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=2, help="draws per policy")
    args = parser.parse_args()
    image = survey_volume()
    grid = Grid.of(image)
    rng = np.random.default_rng(0)
    landmarks = grid.to_ras(rng.uniform([60, 60, 25], [164, 164, 75], (88, 3)))
    augmenter = Augmenter(load_config())
    exact_s, faux_s, residual_vox, deviation_vox = [], [], [], []
    for policy in ("DA3", "DA4"):
        for sample in range(args.samples):
            applied = None
            while applied is None or not applied.spatial:
                applied = augmenter.draw(policy, np.random.default_rng([sample, len(exact_s), 7]))
            start = time.perf_counter()
            moved, _ = augmenter.transport(applied, image, landmarks)
            exact_s.append(time.perf_counter() - start)
            # Residual: map the transported points forward through the resampling transforms (output ->
            # input, last step first) and compare with the originals, in voxels.
            forward = moved @ LPS_TO_RAS
            for transform in reversed(applied.spatial):
                sitk_transform = augmenter.spatial_sitk_transform(transform, image)
                forward = np.array([sitk_transform.TransformPoint(tuple(p)) for p in forward])
            residual_vox.append(np.max(np.abs(grid.to_index(forward @ LPS_TO_RAS) - grid.to_index(landmarks))))
            start = time.perf_counter()
            faux = faux_volume_transport(applied, image, landmarks)
            faux_s.append(time.perf_counter() - start)
            deviation_vox.append(np.linalg.norm(grid.to_index(faux) - grid.to_index(moved), axis=-1))
            print(f"{policy} sample {sample}: exact {exact_s[-1] * 1000:.1f} ms, faux {faux_s[-1]:.1f} s, "
                  f"residual {residual_vox[-1]:.2e} vox, faux deviation mean {np.nanmean(deviation_vox[-1]):.3f} "
                  f"max {np.nanmax(deviation_vox[-1]):.3f} vox", flush=True)
    deviations = np.concatenate(deviation_vox)
    result = {"landmarks": 88, "volume": "224x224x101 at 1x1x2.2 mm", "samples": len(exact_s),
              "exact_s_per_sample": float(np.mean(exact_s)), "faux_s_per_sample": float(np.mean(faux_s)),
              "speedup_vs_faux": float(np.mean(faux_s) / np.mean(exact_s)),
              "exact_residual_vox_max": float(np.max(residual_vox)),
              "faux_dev_vox_mean": float(np.nanmean(deviations)), "faux_dev_vox_max": float(np.nanmax(deviations))}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
