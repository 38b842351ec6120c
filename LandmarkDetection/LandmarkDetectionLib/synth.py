"""Synthetic training images from few annotated scans, so that a network learns anatomy rather than one
scan's grey values (after SynthSeg / SynthMorph, Billot, Hoffmann et al.).

Each annotated scan is split once into tissue classes (k-means on its T1w, and T2w when there is one:
``tissue_labels``). Every training sample then draws, in the model's input grid (the reference frame of
pose normalisation, see align.py):
- a residual pose (rotation, translation, scale, shear: what affine alignment leaves over), a
  left-right flip that swaps left and right landmarks (the schema's mirror pairs), and smooth
  deformations at two scales (several mm over ~40 mm: differences between people; ~1 mm over ~15 mm);
- an appearance: either random intensities per tissue class (a Gaussian mixture, as SynthSeg), or the
  real scan; then partial-volume blur, thick slices along a random axis (1 to 3.5 mm), a bias field,
  gamma, noise, and sometimes a field-of-view cut (top of the head, or no neck).
Landmarks move with the very same map, solved for exactly (fixed-point iteration to 1e-4 mm).

Written on torch rather than TorchIO/SimpleITK transforms because the whole sample is one resampling of
a displacement field computed at 4 mm: about ten times faster at 1 mm on a CPU, and its inverse for the
landmarks is exact and cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import LandmarkError
from .geometry import Grid, rigid_matrix
from .preprocess import normalize_intensity
from .resources import resources_dir


@dataclass
class SynthesisConfig:
    real_probability: float = 0.25  # the real scan instead of random tissue intensities
    classes: int = 12  # tissue classes of the k-means label map
    rotation_deg: float = 4.0  # residual pose after alignment, uniform +-
    translation_mm: float = 4.0
    scale: float = 0.05
    shear: float = 0.02
    flip_probability: float = 0.5
    deform_mm: float = 4.0  # large-scale displacement SD (drawn up to this), control points every:
    deform_spacing_mm: float = 40.0
    local_mm: float = 1.0  # small-scale displacement SD (drawn up to this), control points every:
    local_spacing_mm: float = 15.0
    blur_mm: tuple[float, float] = (0.3, 3.0)  # partial-volume blur (Gaussian sigma)
    slice_mm: tuple[float, float] = (1.0, 5.0)  # simulated slice thickness along a random axis
    slice_probability: float = 0.7
    bias: float = 0.4  # SD of the log bias field (drawn up to this)
    gamma_sd: float = 0.3  # log-gamma SD
    noise: float = 0.05  # noise SD (drawn up to this), image range 0..1
    crop_probability: float = 0.3  # cut the top of the head or the neck away

    @classmethod
    def load(cls, source: str | Path = "default") -> "SynthesisConfig":
        path = resources_dir() / "Augmentation" / "synthesis.json" if str(source) == "default" else Path(source)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise LandmarkError(path, f"not a readable synthesis configuration ({error})") from None
        if not isinstance(data, dict):
            raise LandmarkError(path, "a synthesis configuration is a JSON object of settings")
        defaults = cls()
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"_doc"}
        if unknown:
            raise LandmarkError(path, f"unknown synthesis settings: {', '.join(sorted(unknown))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        for name, value in values.items():  # same shape as the default, finite, not negative
            default = getattr(defaults, name)
            items = value if isinstance(value, tuple) else (value,)
            if (isinstance(value, tuple) != isinstance(default, tuple) or len(items) != len(np.atleast_1d(default))
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0
                               for v in items)
                    or (name.endswith("probability") and value > 1) or (name == "classes" and not 2 <= value <= 64)):
                raise LandmarkError(path, f"synthesis setting {name} = {value!r}: expected a value like {default!r}")
        return cls(**values)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


# ------------------------------------------------------------------------------------------ tissue labels
def tissue_labels(images: list[sitk.Image], classes: int = 12, seed: int = 0) -> sitk.Image:
    """A label map of ``images[0]``'s grid: 0 for the background, 1..classes-1 by k-means on the (rank-
    normalised) intensities of all images (T1w, and T2w resampled onto it when given)."""
    reference = images[0]
    arrays = [sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(im, sitk.sitkFloat32), reference, sitk.Transform(),
                                                    sitk.sitkLinear, 0.0)) for im in images]
    features = np.stack([_unit_range(a) for a in arrays], -1).reshape(-1, len(arrays))
    foreground = features[:, 0] > 0.08
    if len(arrays) > 1:
        foreground |= features[:, 1] > 0.08
    rng = np.random.default_rng(seed)
    sample = features[foreground][rng.choice(int(foreground.sum()), size=min(200_000, int(foreground.sum())),
                                             replace=False)]
    centres = sample[rng.choice(len(sample), classes - 1, replace=False)]
    for _ in range(30):  # Lloyd's k-means (a few lines; no scikit-learn dependency for this)
        nearest = np.argmin(((sample[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        centres = np.array([sample[nearest == c].mean(0) if (nearest == c).any() else centres[c]
                            for c in range(classes - 1)])
    labels = np.zeros(len(features), np.uint8)
    for start in range(0, len(features), 1_000_000):
        part = features[start:start + 1_000_000]
        labels[start:start + len(part)] = np.argmin(((part[:, None] - centres[None]) ** 2).sum(-1), axis=1) + 1
    labels[~foreground] = 0
    image = sitk.GetImageFromArray(labels.reshape(arrays[0].shape))
    image.CopyInformation(reference)
    return image


def _unit_range(array: np.ndarray) -> np.ndarray:
    low, high = np.percentile(array, (1, 99.5))
    return np.clip((array - low) / max(high - low, 1e-6), 0, 1.2).astype(np.float32)


# ------------------------------------------------------------------------------------------ source cases
@dataclass
class SourceCase:
    """One annotated scan, ready to be drawn from: intensities in 0..1 and labels on the scan's own grid."""

    images: list[torch.Tensor]  # (1, 1, D, H, W) float32 each
    labels: torch.Tensor  # (1, 1, D, H, W) float32 (class numbers)
    grid: Grid  # the scan's grid
    landmarks_ras: np.ndarray  # (K, 3) scan RAS
    to_case: np.ndarray = field(default_factory=lambda: np.eye(4))  # reference RAS -> scan RAS

    @classmethod
    def from_images(cls, images: list[sitk.Image], landmarks_ras: np.ndarray, classes: int,
                    to_case: np.ndarray | None = None) -> "SourceCase":
        reference = images[0]
        labels = tissue_labels(images, classes)
        tensors = []
        for image in images:
            array = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference,
                                                         sitk.Transform(), sitk.sitkLinear, 0.0))
            tensors.append(torch.from_numpy(_unit_range(array))[None, None])
        return cls(tensors, torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.float32))[None, None],
                   Grid.of(reference), np.asarray(landmarks_ras, float),
                   np.eye(4) if to_case is None else np.asarray(to_case, float))


# -------------------------------------------------------------------------------------------- sampling
def _random_field(size_dhw, control_mm, extent_mm, amplitude, rng, channels: int = 3) -> torch.Tensor:
    """(1, channels, D, H, W) smooth random field (a displacement in mm with 3 channels) on a grid of
    ``size_dhw`` spanning ``extent_mm``: normal values on control points every ``control_mm``, trilinearly
    upsampled."""
    nodes = [max(2, int(round(e / control_mm)) + 1) for e in extent_mm]  # (i, j, k) order
    values = torch.from_numpy(rng.normal(0.0, amplitude, (1, channels, nodes[2], nodes[1], nodes[0])).astype(np.float32))
    return F.interpolate(values, size=tuple(size_dhw), mode="trilinear", align_corners=True)


def _residual_pose(config: SynthesisConfig, center_ras, flip: bool, rng) -> np.ndarray:
    """4x4 RAS map from output points to reference points, about ``center_ras``."""
    rigid = rigid_matrix(rng.uniform(-config.rotation_deg, config.rotation_deg, 3),
                         rng.uniform(-config.translation_mm, config.translation_mm, 3), center_ras)
    linear = np.diag(1.0 + rng.uniform(-config.scale, config.scale, 3))
    linear += np.triu(rng.uniform(-config.shear, config.shear, (3, 3)), 1)
    if flip:
        linear = np.diag([-1.0, 1.0, 1.0]) @ linear
    around = np.eye(4)
    around[:3, :3] = linear
    around[:3, 3] = center_ras - linear @ center_ras
    return rigid @ around


def _gaussian_blur(volume: torch.Tensor, sigma_vox) -> torch.Tensor:
    """Separable Gaussian blur of a (1, 1, D, H, W) volume; ``sigma_vox`` per axis (k, j, i)."""
    for axis, sigma in enumerate(sigma_vox):
        if sigma < 0.2:
            continue
        radius = int(np.ceil(3 * sigma))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        taps = taps / taps.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(taps)
        padding = [0, 0, 0]
        padding[axis] = radius
        volume = F.conv3d(F.pad(volume, [p for p in reversed(padding) for _ in (0, 1)], mode="replicate"),
                          taps.reshape(shape))
    return volume


def synthesize(case: SourceCase, grid: Grid, mirror: list[int], config: SynthesisConfig,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample on ``grid`` (the model's input grid in the reference frame): the normalised
    image (D, H, W) float32, the landmarks' voxel indices (K, 3) and which of them are usable (K,)."""
    size = np.asarray(grid.size)  # (i, j, k)
    extent = (size - 1) * np.asarray(grid.spacing)
    field_size = [max(2, int(np.ceil(e / 4.0)) + 1) for e in extent]  # displacement computed every ~4 mm
    flip = rng.random() < config.flip_probability
    pose = _residual_pose(config, grid.center_ras(), flip, rng)
    displacement = _random_field(field_size[::-1], config.deform_spacing_mm, extent,
                                 rng.uniform(0, config.deform_mm), rng)
    displacement += _random_field(field_size[::-1], config.local_spacing_mm, extent,
                                  rng.uniform(0, config.local_mm), rng)
    # Field-grid points in output RAS -> reference RAS -> the scan's voxel index, normalised for grid_sample.
    field_grid = Grid(tuple(field_size), tuple(extent / (np.asarray(field_size) - 1)), grid.origin, grid.direction)
    k, j, i = np.indices(field_size[::-1])
    points = field_grid.to_ras(np.stack([i, j, k], -1).reshape(-1, 3))
    source = points @ pose[:3, :3].T + pose[:3, 3] + displacement[0].permute(1, 2, 3, 0).reshape(-1, 3).numpy()
    index = case.grid.to_index(source @ case.to_case[:3, :3].T + case.to_case[:3, 3])
    normalised = 2 * index / (np.asarray(case.grid.size) - 1) - 1
    coarse = torch.from_numpy(normalised.reshape(*field_size[::-1], 3).astype(np.float32)).permute(3, 0, 1, 2)
    sampling = F.interpolate(coarse[None], size=tuple(size[::-1]), mode="trilinear",
                             align_corners=True).permute(0, 2, 3, 4, 1)

    if rng.random() < config.real_probability:
        image = F.grid_sample(case.images[rng.integers(len(case.images))], sampling, mode="bilinear",
                              padding_mode="zeros", align_corners=True)
    else:
        labels = F.grid_sample(case.labels, sampling, mode="nearest", padding_mode="zeros",
                               align_corners=True).long()
        classes = int(case.labels.max()) + 1
        means = torch.from_numpy(rng.uniform(0, 1, classes).astype(np.float32))
        means[0] = float(rng.uniform(0, 0.1))  # the background stays darker than most tissue
        spreads = torch.from_numpy(rng.uniform(0, 0.08, classes).astype(np.float32))
        noise = torch.from_numpy(rng.standard_normal(labels.shape, dtype=np.float32))
        image = means[labels] + spreads[labels] * noise
    spacing = np.asarray(grid.spacing)[::-1]  # (k, j, i)
    sigma = np.full(3, rng.uniform(*config.blur_mm))  # partial volume, then thick slices along one axis:
    if rng.random() < config.slice_probability:  # Gaussians compose by adding variances, so one blur
        axis = rng.choice(3, p=[0.6, 0.2, 0.2])
        sigma[axis] = np.hypot(sigma[axis], rng.uniform(*config.slice_mm) / 2.355)  # FWHM -> sigma
    image = _gaussian_blur(image, sigma / spacing)
    bias = _random_field(size[::-1], 60.0, extent, rng.uniform(0, config.bias), rng, channels=1)
    image = image * torch.exp(bias)
    low, high = float(image.min()), float(image.max())
    image = ((image - low) / max(high - low, 1e-6)).clamp(0, 1) ** float(np.exp(rng.normal(0, config.gamma_sd)))
    image = image + float(rng.uniform(0, config.noise)) * torch.from_numpy(
        rng.standard_normal(image.shape, dtype=np.float32))

    # Landmarks: the output point y with pose(y) + displacement(y) = the landmark in the reference frame.
    reference_points = _inverse_affine(case.to_case, case.landmarks_ras)
    positions = _solve_positions(pose, displacement, grid, reference_points)
    if flip:  # the left structure now lies on the right: relabel
        positions = positions[mirror]
    array = image[0, 0].numpy()
    if rng.random() < config.crop_probability:
        array = _cut_field_of_view(array, grid, positions, rng)
    target = grid.to_index(positions)
    usable = np.isfinite(target).all(1) & grid.contains(positions)
    return normalize_intensity(array), np.nan_to_num(target), usable


def _inverse_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    inverse = np.linalg.inv(matrix)
    return np.asarray(points, float) @ inverse[:3, :3].T + inverse[:3, 3]


def _solve_positions(pose, displacement, grid: Grid, targets_ras: np.ndarray, iterations: int = 60) -> np.ndarray:
    """Fixed-point iteration y <- y - pose_linear^-1 (pose(y) + d(y) - x): converges because the
    displacement is smooth (its gradient is far below 1)."""
    linear_inverse = np.linalg.inv(pose[:3, :3])
    y = (targets_ras - pose[:3, 3]) @ linear_inverse.T
    size = np.asarray(grid.size, float)
    for _ in range(iterations):
        normalised = 2 * grid.to_index(y) / (size - 1) - 1
        sample = torch.from_numpy(normalised.astype(np.float32))[None, :, None, None]  # (1, K, 1, 1, 3)
        d = F.grid_sample(displacement, sample, mode="bilinear", padding_mode="border",
                          align_corners=True)[0, :, :, 0, 0].T.double().numpy()
        residual = y @ pose[:3, :3].T + pose[:3, 3] + d - targets_ras
        y = y - residual @ linear_inverse.T
        if np.abs(residual).max() < 1e-4:
            break
    return y


def _cut_field_of_view(array: np.ndarray, grid: Grid, landmarks_ras: np.ndarray, rng) -> np.ndarray:
    """Blank the top of the head or the part below the landmarks (no neck), never a landmark."""
    index = grid.to_index(landmarks_ras)[:, 2]
    index = index[np.isfinite(index)]
    if not len(index):
        return array
    margin = 10.0 / grid.spacing[2]
    array = array.copy()
    if rng.random() < 0.5:
        level = int(rng.uniform(index.max() + margin, array.shape[0]))
        array[level:] = array.min()
    else:
        level = int(rng.uniform(0, max(1, index.min() - margin)))
        array[:level] = array.min()
    return array


# ---------------------------------------------------------------------------------------- training data
def reference_geometry(landmarks_ras: np.ndarray, spacing, margin_mm: float = 32.0, multiple: int = 16):
    """The model's input grid in the reference frame: the landmarks' bounding box grown by ``margin_mm``,
    a multiple of ``multiple`` voxels per axis (for the networks' pooling)."""
    from .preprocess import InputGeometry

    points = np.asarray(landmarks_ras, float)
    points = points[np.isfinite(points).all(1)]
    low, high = points.min(0), points.max(0)
    spacing = np.asarray(spacing, float)
    size = [int(np.ceil((h - l + 2 * margin_mm) / s / multiple) * multiple) for l, h, s in zip(low, high, spacing)]
    return InputGeometry(tuple(size), tuple(float(s) for s in spacing), center_ras=tuple(float(c) for c in (low + high) / 2))


class SynthesisDataset(torch.utils.data.Dataset):
    """Synthetic samples drawn from the source cases, ``length`` per epoch, each from a generator seeded by
    (seed, epoch, index): reproducible whatever the number of DataLoader workers, and a resumed run draws
    what the killed run would have drawn. Items as LandmarkDataset's: image (1, D, H, W), target indices
    (K, 3), mask (K,), index-to-RAS matrix (of the reference frame)."""

    def __init__(self, sources: list[SourceCase], geometry, mirror: list[int], config: SynthesisConfig,
                 seed: int, length: int, cache: bool = False):
        from .preprocess import model_grid

        self.sources, self.mirror, self.config, self.seed, self.length = sources, mirror, config, seed, length
        self.grid = model_grid(None, geometry)
        self.epoch, self.cache = 0, {} if cache else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        rng = np.random.default_rng([self.seed, 0 if self.cache is not None else self.epoch, index])
        source = self.sources[index % len(self.sources)]
        array, target, usable = synthesize(source, self.grid, self.mirror, self.config, rng)
        item = (torch.from_numpy(array)[None], torch.from_numpy(target).float(), torch.from_numpy(usable),
                torch.from_numpy(self.grid.index_to_ras).float())
        if self.cache is not None:
            self.cache[index] = item
        return item
