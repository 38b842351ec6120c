"""Pose and field-of-view normalisation before the network (as autoafids / afids-CNN do before their
patch networks): the scan is aligned to the model's reference, a small image of the training anatomy
carried inside the model file, by a fast multi-resolution affine registration (SimpleITK, Mattes mutual
information, so T1w and T2w scans align to a T1w reference alike).

The network then always sees the head in the reference's frame, whatever the head position (a coarse
multi-start covers tilts beyond 30 degrees), the field of view (with or without neck, top of the head
cut) or the slice thickness; its predictions map back into the scan through the same affine, exactly.

After alignment, the normalised mutual information between scan and reference inside the reference's
head says whether the input looks like a head MRI at all: the out-of-distribution score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .geometry import LPS_TO_RAS, Grid

REFERENCE_SPACING_MM = 2.0  # the model file's reference; alignment ends at this resolution
PYRAMID_MM = (12.0, 6.0, 3.0)  # multi-start, then refinement levels (see _register)
# Below this normalised mutual information (0 = unrelated, 1 = identical) after alignment the scan is
# reported as out of distribution. Aligned T1w/T2w heads of other people score 0.25-0.6, noise, CT and
# body scans below 0.12 (benchmarks/heldout.py and Testing/test_align.py print the values).
OOD_SIMILARITY = 0.15


@dataclass
class Alignment:
    """An affine map between the model's reference frame and a scan, both in RAS mm."""

    matrix: np.ndarray  # 4x4: reference RAS -> scan RAS
    similarity: float = float("nan")  # normalised mutual information after alignment, 0..1

    @classmethod
    def identity(cls) -> "Alignment":
        return cls(np.eye(4), 1.0)

    def to_scan(self, points_ras: np.ndarray) -> np.ndarray:
        points = np.asarray(points_ras, dtype=float)
        return points @ self.matrix[:3, :3].T + self.matrix[:3, 3]

    def to_reference(self, points_ras: np.ndarray) -> np.ndarray:
        inverse = np.linalg.inv(self.matrix)
        return np.asarray(points_ras, dtype=float) @ inverse[:3, :3].T + inverse[:3, 3]

    def sitk_transform(self) -> sitk.AffineTransform:
        """The reference -> scan map in SimpleITK's LPS convention: what ``sitk.Resample`` needs to bring
        the scan onto a grid in the reference frame."""
        return _affine_from_ras(self.matrix)

    @property
    def out_of_distribution(self) -> bool:
        return bool(self.similarity < OOD_SIMILARITY)


class AlignedGrid:
    """A model input grid in the reference frame, seen from the scan: ``to_ras`` gives scan RAS."""

    def __init__(self, grid: Grid, alignment: Alignment):
        self.grid, self.alignment = grid, alignment

    def to_ras(self, ijk: np.ndarray) -> np.ndarray:
        return self.alignment.to_scan(self.grid.to_ras(ijk))

    def to_index(self, ras: np.ndarray) -> np.ndarray:
        return self.grid.to_index(self.alignment.to_reference(ras))


def _affine_from_ras(matrix_ras: np.ndarray) -> sitk.AffineTransform:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix_ras @ np.diag([-1.0, -1.0, 1.0, 1.0])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(lps[:3, :3].ravel()))
    transform.SetTranslation(tuple(lps[:3, 3]))
    return transform


def _ras_from_transform(transform: sitk.Transform) -> np.ndarray:
    """4x4 RAS matrix of a SimpleITK matrix-offset transform (which maps LPS points)."""
    matrix = np.array(transform.GetMatrix()).reshape(3, 3)
    center = np.array(transform.GetCenter())
    translation = np.array(transform.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def make_reference(image: sitk.Image, spacing_mm: float = REFERENCE_SPACING_MM) -> sitk.Image:
    """A small float32 copy of a training image at ``spacing_mm`` (the model file's reference)."""
    from .preprocess import resample_isotropic

    smoothed = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), spacing_mm / 2.0)
    return resample_isotropic(smoothed, spacing_mm)


def landmark_region(reference: sitk.Image, landmarks_ras: np.ndarray, margin_mm: float = 30.0) -> sitk.Image:
    """The part of the reference that alignment weighs (a uint8 mask): the landmarks' convex hull grown
    by ``margin_mm``. Alignment then fits the anatomy the landmarks live in, not the neck, the scalp or
    the edge of another scan's field of view."""
    from scipy.ndimage import distance_transform_edt
    from scipy.spatial import Delaunay

    grid = Grid.of(reference)
    k, j, i = np.indices(tuple(reversed(grid.size)))
    ras = grid.to_ras(np.stack([i, j, k], -1).reshape(-1, 3))
    points = np.asarray(landmarks_ras, dtype=float)
    points = points[np.isfinite(points).all(1)]
    inside = Delaunay(points).find_simplex(ras) >= 0 if len(points) >= 4 else np.zeros(len(ras), bool)
    inside = inside.reshape(k.shape)
    distance = distance_transform_edt(~inside, sampling=tuple(reversed(grid.spacing)))
    mask = sitk.GetImageFromArray((distance <= margin_mm).astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


def _registration(iterations, seed, region=None, sampling=0.06):
    """Mattes mutual information on one level (the caller makes the pyramid once: smoothing and shrinking
    inside every Execute of a multi-start would cost more than the optimisation)."""
    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)  # small images: one thread beats the per-iteration synchronisation
    if region is not None:
        method.SetMetricFixedMask(region)
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(sampling, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, iterations, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    return method


def _head_center_lps(image: sitk.Image) -> np.ndarray:
    """Centre of the upper part of the bright foreground: the head's centre whether or not the field of
    view includes the neck (a plain centre of mass would sit low on scans with a neck)."""
    small = make_reference(image, PYRAMID_MM[1])
    array = sitk.GetArrayFromImage(small)
    k, j, i = np.nonzero(array > np.percentile(array, 60))
    if len(i) < 8:
        return Grid.of(image).center_ras() @ LPS_TO_RAS
    points = Grid.of(small).to_ras(np.stack([i, j, k], -1).astype(float)) @ LPS_TO_RAS
    superior = points[:, 2] >= np.percentile(points[:, 2], 35)  # LPS z is superior
    return points[superior].mean(0)


def align(scan: sitk.Image, reference: sitk.Image, region: sitk.Image | None = None, seed: int = 1) -> Alignment:
    """Affine alignment of ``scan`` to ``reference`` (reference -> scan), robust to tilts, missing neck or
    cut-off skull: a coarse multi-start over translations and rotations, then rigid, then affine. The
    metric is taken inside ``region`` (see landmark_region) when given. An input registration cannot work
    on (nearly empty, constant) gets the head-centre translation and a similarity of 0."""
    fixed = sitk.Cast(reference, sitk.sitkFloat32)
    reference_center = _head_center_lps(fixed)
    offset = _head_center_lps(scan) - reference_center
    try:
        transform = _register(fixed, scan, region, reference_center, offset, seed)
    except RuntimeError:  # SimpleITK: too few samples inside the scan, a constant image, ...
        translation = np.eye(4)
        translation[:3, 3] = offset
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return Alignment(flip @ translation @ flip, 0.0)
    alignment = Alignment(_ras_from_transform(transform))
    alignment.similarity = similarity(scan, reference, alignment, region)
    return alignment


def _register(reference, scan, region, reference_center, offset, seed) -> sitk.AffineTransform:
    """Multi-start similarity transforms at 12 mm on the whole head (the top may be cut or the neck present:
    vertical offsets; the head pitched), the best refined at 6 then 3 mm, then affine at 3 mm inside the
    landmark region, and last, for a reference finer than 3 mm, affine at the reference's own spacing
    (on calibration scans of the training data a 2 mm last level put the landmarks 0.2-0.3 mm closer)."""
    coarsest, coarse, fine = ((make_reference(reference, mm), make_reference(scan, mm)) for mm in PYRAMID_MM)
    best = None
    for dz, pitch in ((0.0, 0.0), (0.0, -25.0), (0.0, 25.0), (-20.0, 0.0), (20.0, 0.0)):
        start = sitk.Similarity3DTransform()
        start.SetCenter(tuple(reference_center))
        start.SetRotation((1.0, 0.0, 0.0), np.deg2rad(pitch))
        start.SetTranslation(tuple(offset + (0.0, 0.0, dz)))
        method = _registration(30, seed, sampling=0.5)
        method.SetInitialTransform(start, inPlace=True)
        method.Execute(*coarsest)
        if best is None or method.GetMetricValue() < best[0]:
            best = (method.GetMetricValue(), start)
    similar = best[1]
    for level, sampling in ((coarse, 0.15), (fine, 0.06)):
        method = _registration(60, seed, sampling=sampling)
        method.SetInitialTransform(similar, inPlace=True)
        method.Execute(*level)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similar.GetCenter())
    affine.SetMatrix(similar.GetMatrix())
    affine.SetTranslation(similar.GetTranslation())
    levels = [(fine, _on_grid(region, fine[0]), 80, 0.06)]
    if min(reference.GetSpacing()) < PYRAMID_MM[-1] - 1e-3:
        levels.append(((reference, make_reference(scan, min(reference.GetSpacing()))), region, 50, 0.1))
    for level, mask, iterations, sampling in levels:
        method = _registration(iterations, seed, mask, sampling)
        method.SetInitialTransform(affine, inPlace=True)
        method.Execute(*level)
    return affine


def _on_grid(mask: sitk.Image | None, grid: sitk.Image) -> sitk.Image | None:
    if mask is None or Grid.of(mask) == Grid.of(grid):
        return mask
    return sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def similarity(scan: sitk.Image, reference: sitk.Image, alignment: Alignment, region: sitk.Image | None = None,
               bins: int = 24) -> float:
    """Normalised mutual information 2 I(a, b) / (H(a) + H(b)) of the aligned scan and the reference over
    the reference's head: 0 for unrelated images, 1 for identical ones."""
    resampled = sitk.Resample(sitk.Cast(scan, sitk.sitkFloat32), reference, alignment.sitk_transform(),
                              sitk.sitkLinear, float("nan"), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(resampled).ravel()
    b = sitk.GetArrayFromImage(reference).ravel()
    head = np.isfinite(a) & (b > np.percentile(b, 50) * 0.5)
    if region is not None:
        head &= sitk.GetArrayViewFromImage(region).ravel() > 0
    if head.sum() < 100:
        return 0.0
    a, b = a[head], b[head]
    if np.ptp(a) <= 0:
        return 0.0
    joint, _, _ = np.histogram2d(_ranks(a), _ranks(b), bins=bins)
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_a, h_b = entropy(p.sum(1)), entropy(p.sum(0))
    return max(0.0, 2.0 * (h_a + h_b - entropy(p.ravel())) / max(h_a + h_b, 1e-12))  # symmetric uncertainty


def _ranks(values: np.ndarray) -> np.ndarray:
    """Values mapped to their quantile (0..1): histogram bins then hold equal counts, so the score does not
    depend on the scan's intensity scale or contrast."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values)) / max(1, len(values) - 1)
    return ranks
