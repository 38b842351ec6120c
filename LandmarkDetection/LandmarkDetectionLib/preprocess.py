"""Resampling a volume into the model's input grid, and intensity normalisation.

The input grid is the survey-like geometry the model was trained with (default 224x224x101 voxels at
1 x 1 x 2.2 mm, as in the source paper), axis-aligned in LPS (axial slices), centred on the volume's
centre. Whatever the scan's orientation, the network therefore always sees the same kind of grid, and
predictions map back to world coordinates exactly through the grid's matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .geometry import Grid, centered_grid, physical_center_ras


@dataclass(frozen=True)
class InputGeometry:
    size: tuple[int, int, int] = (224, 224, 101)  # voxels along i, j, k (R-L, A-P, I-S)
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.2)  # mm
    # Intensity normalisation: percentiles of the non-background voxels mapped to 0 and 1.
    percentiles: tuple[float, float] = field(default=(0.5, 99.5))
    # Models that align scans first: the grid's centre in the reference frame (None: the scan's centre).
    center_ras: tuple[float, float, float] | None = None

    def to_dict(self) -> dict:
        data = {"size": list(self.size), "spacing": list(self.spacing), "percentiles": list(self.percentiles)}
        if self.center_ras is not None:
            data["center_ras"] = list(self.center_ras)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "InputGeometry":
        center = data.get("center_ras")
        return cls(tuple(int(n) for n in data["size"]), tuple(float(s) for s in data["spacing"]),
                   tuple(float(p) for p in data.get("percentiles", (0.5, 99.5))),
                   None if center is None else tuple(float(c) for c in center))

    @property
    def shape_dhw(self) -> tuple[int, int, int]:
        """Tensor shape (k, j, i) of the grid."""
        return tuple(reversed(self.size))


def model_grid(image: sitk.Image | None, geometry: InputGeometry, center_ras=None) -> Grid:
    if center_ras is None:
        center_ras = geometry.center_ras if geometry.center_ras is not None else physical_center_ras(image)
    center = np.asarray(center_ras, dtype=float)
    return centered_grid(center, geometry.size, geometry.spacing)


def resample_to_grid(image: sitk.Image, grid: Grid, transform: sitk.Transform | None = None,
                     interpolator=sitk.sitkLinear) -> np.ndarray:
    """Image intensities on ``grid`` as a float32 (k, j, i) array; outside the scan is the scan's minimum.

    ``transform`` (optional) maps grid points (LPS) to image points, as in SimpleITK's Resample.
    """
    background = float(sitk.GetArrayViewFromImage(image).min())
    resampled = sitk.Resample(image, grid.reference_image(), transform or sitk.Transform(), interpolator,
                              background, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def resample_isotropic(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The same field of view (origin and direction kept) at ``spacing_mm`` in every axis, float32."""
    size = [int(round(n * s / spacing_mm)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), [spacing_mm] * 3,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def normalize_intensity(array: np.ndarray, percentiles=(0.5, 99.5)) -> np.ndarray:
    """Robust min-max: the given percentiles of the voxels above the background go to 0 and 1."""
    array = np.asarray(array, dtype=np.float32)
    background = array.min()
    foreground = array[array > background]
    if foreground.size < 16:
        foreground = array.ravel()
    low, high = np.percentile(foreground, percentiles)
    if high <= low:
        high = low + 1.0
    return np.clip((array - low) / (high - low), -0.5, 1.5).astype(np.float32)


def prepare(image: sitk.Image, geometry: InputGeometry, center_ras=None) -> tuple[np.ndarray, Grid]:
    """The network's input (a normalised (k, j, i) float32 array) and the grid it lives on."""
    grid = model_grid(image, geometry, center_ras)
    return normalize_intensity(resample_to_grid(image, grid), geometry.percentiles), grid
