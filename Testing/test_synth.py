"""Synthetic training images: landmarks move exactly with the image (also through left-right flips,
which swap left and right labels), tissue classes, configuration files."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.geometry import Grid, centered_grid
from LandmarkDetectionLib.synth import SourceCase, SynthesisConfig, reference_geometry, synthesize, tissue_labels

# Three landmarks: a left-right pair (0 on the left, 1 on the right) and a midline one (2).
LANDMARKS = np.array([[-18.0, 6.0, 4.0], [18.0, 6.0, 4.0], [0.0, -14.0, -10.0]])
MIRROR = [1, 0, 2]


def dot_case() -> SourceCase:
    """A 2 mm scan, oblique, empty but for a Gaussian dot of a distinct brightness at each landmark."""
    grid = centered_grid((0, 0, 0), (40, 36, 32), (2.0, 2.0, 2.0),
                         direction_lps=np.array(sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix()))
    k, j, i = np.indices(tuple(reversed(grid.size)))
    ras = grid.to_ras(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*k.shape, 3)
    volume = np.zeros(k.shape, np.float32)
    for point in LANDMARKS:
        volume += np.exp(-((ras - point) ** 2).sum(-1) / (2 * 2.0 ** 2)).astype(np.float32)
    return SourceCase([torch.from_numpy(volume)[None, None]], torch.zeros(1, 1, *k.shape), grid, LANDMARKS)


PLAIN = dict(real_probability=1.0, blur_mm=(0.0, 0.0), slice_probability=0.0, bias=0.0, gamma_sd=0.0, noise=0.0,
             crop_probability=0.0, local_mm=0.0)


def peak_near(array, target_ijk, radius=3):
    i, j, k = np.round(target_ijk).astype(int)
    window = array[k - radius:k + radius + 1, j - radius:j + radius + 1, i - radius:i + radius + 1]
    weights = np.clip(window - 0.5 * window.max(), 0, None)
    kk, jj, ii = np.indices(window.shape)
    centre = np.array([(ii * weights).sum(), (jj * weights).sum(), (kk * weights).sum()]) / weights.sum()
    return centre + np.array([i, j, k]) - radius, window.max()


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_landmarks_move_exactly_with_the_image(flip):
    """Each target sits on a dot of the synthetic image; through a flip, the left landmark's label stays on
    the left (the image's left structure is now the mirrored right one), which only relabelling gives."""
    case = dot_case()
    config = SynthesisConfig(**PLAIN, flip_probability=flip, deform_mm=3.0, rotation_deg=10, translation_mm=6)
    grid = centered_grid((0, 0, 0), (40, 36, 32), (1.5, 1.5, 1.5))
    for seed in range(3):
        array, target, usable = synthesize(case, grid, MIRROR, config, np.random.default_rng(seed))
        assert usable.all()
        for k in range(3):
            centre, _ = peak_near(array, target[k])
            assert np.linalg.norm((centre - target[k]) * 1.5) < 0.75, (seed, k, centre, target[k])
        x = grid.to_ras(target)[:, 0]
        assert x[0] < -8 and x[1] > 8  # left stays left, right stays right


def test_synthetic_appearance_differs_between_samples_but_keeps_the_anatomy():
    case = dot_case()
    case.labels = (case.images[0] > 0.2).float() + (case.images[0] > 0.6).float()
    grid = centered_grid((0, 0, 0), (40, 36, 32), (1.5, 1.5, 1.5))
    config = SynthesisConfig(real_probability=0.0, rotation_deg=0, translation_mm=0, scale=0, shear=0,
                             flip_probability=0, deform_mm=0, local_mm=0, crop_probability=0)
    first, t1, _ = synthesize(case, grid, MIRROR, config, np.random.default_rng(1))
    second, t2, _ = synthesize(case, grid, MIRROR, config, np.random.default_rng(2))
    assert np.allclose(t1, t2, atol=1e-6)  # same pose, same landmarks
    assert not np.allclose(first, second, atol=0.05)  # different tissue intensities


def test_tissue_labels_separate_intensity_classes():
    array = np.zeros((20, 20, 20), np.float32)
    array[5:15, 5:15, 5:15] = 50
    array[8:12, 8:12, 8:12] = 100
    image = sitk.GetImageFromArray(array)
    labels = sitk.GetArrayFromImage(tissue_labels([image], classes=3))
    assert labels[0, 0, 0] == 0
    assert labels[6, 6, 6] != labels[10, 10, 10] and labels[6, 6, 6] > 0 and labels[10, 10, 10] > 0


def test_reference_geometry_covers_the_landmarks_in_multiples_of_16():
    geometry = reference_geometry(LANDMARKS, (1.0, 1.0, 1.0), margin_mm=10)
    assert all(n % 16 == 0 for n in geometry.size)
    grid = centered_grid(geometry.center_ras, geometry.size, geometry.spacing)
    assert Grid.contains(grid, LANDMARKS, margin_voxels=9).all()


def test_synthesis_config_files_are_validated(tmp_path):
    assert SynthesisConfig.load("default").classes >= 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"clases": 4}))
    with pytest.raises(LandmarkError, match="unknown synthesis settings: clases"):
        SynthesisConfig.load(bad)
    bad.write_text("{")
    with pytest.raises(LandmarkError, match="not a readable synthesis configuration"):
        SynthesisConfig.load(bad)
