"""Pose normalisation: alignment of moved, cropped scans to a reference, the exact geometry of the map,
and the out-of-distribution score."""

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.align import OOD_SIMILARITY, AlignedGrid, Alignment, align, landmark_region, make_reference
from LandmarkDetectionLib.geometry import LPS_TO_RAS, Grid, apply_matrix, centered_grid, move_image, rigid_matrix
from LandmarkDetectionLib.testscans import acquire


def test_alignment_matrix_and_sitk_transform_agree_exactly():
    matrix = rigid_matrix((20, -10, 35), (5, -7, 12), (1, 2, 3))
    matrix[:3, :3] *= np.array([1.1, 0.9, 1.05])
    alignment = Alignment(matrix)
    points = np.random.default_rng(0).normal(0, 50, (10, 3))
    transform = alignment.sitk_transform()
    through_sitk = np.array([transform.TransformPoint(tuple(p @ LPS_TO_RAS)) for p in points]) @ LPS_TO_RAS
    assert np.allclose(through_sitk, alignment.to_scan(points), atol=1e-9)
    assert np.allclose(alignment.to_reference(alignment.to_scan(points)), points, atol=1e-9)


def test_aligned_grid_maps_indices_into_the_scan_and_back():
    grid = centered_grid((0, -20, 5), (10, 12, 8), (2.0, 2.0, 2.0))
    aligned = AlignedGrid(grid, Alignment(rigid_matrix((0, 30, 0), (10, 0, 0))))
    ijk = np.array([[0.0, 0, 0], [9, 11, 7], [4.5, 3.25, 6]])
    assert np.allclose(aligned.to_index(aligned.to_ras(ijk)), ijk, atol=1e-9)
    assert np.allclose(aligned.to_ras(ijk), aligned.alignment.to_scan(grid.to_ras(ijk)))


@pytest.fixture(scope="module")
def reference(sample):
    image, landmarks, _ = sample
    reference = make_reference(image)
    return reference, landmark_region(reference, landmarks), landmarks


def test_landmark_region_covers_every_landmark_with_its_margin(reference):
    image, region, landmarks = reference
    grid = Grid.of(region)
    mask = np.asarray(sitk.GetArrayFromImage(region), bool)
    for point in landmarks:
        i, j, k = np.round(grid.to_index(point)).astype(int)
        assert mask[k, j, i]
    assert 0.05 < mask.mean() < 0.7  # a region, not the whole field of view


@pytest.mark.parametrize("seed", [3, 11])
def test_tilted_and_cropped_scans_align_to_the_reference(sample, reference, seed):
    """30-degree tilts, 20 mm shifts, 2.2 mm slices and the top of the head cut off."""
    image, landmarks, _ = sample
    ref, region, _ = reference
    rng = np.random.default_rng(seed)
    motion = rigid_matrix(rng.choice([-1, 1], 3) * rng.uniform(20, 30, 3), rng.uniform(-20, 20, 3),
                          Grid.of(image).center_ras())
    scan = acquire(move_image(image, motion), size=(192, 224, 70))  # 154 mm of slices: the vertex is cut
    alignment = align(scan, ref, region)
    error = np.linalg.norm(alignment.to_scan(landmarks) - apply_matrix(motion, landmarks), axis=1)
    assert error.max() < 2.0, error
    assert alignment.similarity > 2 * OOD_SIMILARITY and not alignment.out_of_distribution


def _body_scan() -> sitk.Image:
    """A torso-like phantom: an elliptic cylinder of soft tissue with a spine and two lungs."""
    k, j, i = np.indices((80, 120, 160)).astype(float)
    body = ((i - 80) / 75) ** 2 + ((j - 60) / 45) ** 2 < 1
    lungs = (((np.abs(i - 80) - 35) / 22) ** 2 + ((j - 55) / 25) ** 2 < 1) & (k > 20)
    spine = ((i - 80) / 8) ** 2 + ((j - 95) / 8) ** 2 < 1
    array = np.where(body, 60.0, 0.0) - 50 * lungs + 120 * spine
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((2.5, 2.5, 4.0))
    return image


@pytest.mark.parametrize("make", [
    lambda: sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 30, (60, 120, 100)).astype(np.float32)),
    lambda: _body_scan(),
    lambda: sitk.GetImageFromArray(np.pad(np.ones((2, 2, 2), np.float32), 30)),  # almost empty
], ids=["noise", "body", "almost-empty"])
def test_inputs_that_are_not_head_mri_are_out_of_distribution(reference, make):
    ref, region, _ = reference
    alignment = align(make(), ref, region)
    assert alignment.out_of_distribution and alignment.similarity < OOD_SIMILARITY
