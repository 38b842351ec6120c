"""The mid-sagittal plane of a head scan from its left-right symmetry, before any landmark is placed.

The plane n . x = d is the one that best maps the head onto itself: the correlation between the scan's
intensities at head voxels p and at their mirror images p - 2 (n . p - d) n is largest. The scan is
resampled to a coarse isotropic grid and the head is its Otsu foreground. The search starts from the
scanner's sagittal plane through the head's centroid, tries head turns of up to 30 degrees about the
superior and anterior axes on a coarse grid, and refines the best with Nelder-Mead. RAS mm throughout;
the normal points toward +x (the scan's right when the header is right).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates
from scipy.optimize import minimize

from LandmarkDetectionLib.geometry import Grid
from LandmarkDetectionLib.preprocess import resample_isotropic

COARSE_MM = 4.0  # grid the symmetry is measured on: fast, and the plane is a large-scale feature
MAX_POINTS = 20_000
TURNS_DEG = np.arange(-30.0, 31.0, 10.0)


def _normal(yaw_deg: float, roll_deg: float) -> np.ndarray:
    """+x turned by ``yaw`` about S, then by ``roll`` about A (degrees)."""
    yaw, roll = np.radians(yaw_deg), np.radians(roll_deg)
    return np.array([np.cos(yaw) * np.cos(roll), np.sin(yaw) * np.cos(roll), -np.sin(roll)])


def _head_points(image: sitk.Image) -> np.ndarray:
    """RAS positions of the scan's Otsu foreground voxels, evenly thinned to about MAX_POINTS. (A copy of
    the mask: planes.head_points_from_image keeps a view of a temporary image, which can be freed.)"""
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1))
    kji = np.argwhere(mask)
    if len(kji) < 10:
        raise ValueError("the scan has no foreground to find its mid-sagittal plane by symmetry")
    kji = kji[:: max(1, len(kji) // MAX_POINTS)]
    return Grid.of(image).to_ras(kji[:, ::-1])


def symmetry_plane(image: sitk.Image, coarse_mm: float = COARSE_MM) -> tuple[np.ndarray, np.ndarray]:
    """(centre, unit normal) in RAS of the scan's mid-sagittal plane by left-right symmetry; the centre is
    the head's centroid projected onto the plane."""
    small = resample_isotropic(image, coarse_mm)
    volume = sitk.GetArrayFromImage(small).astype(np.float32)  # (k, j, i)
    grid = Grid.of(small)
    head = _head_points(small)
    centroid = head.mean(axis=0)
    values = map_coordinates(volume, grid.to_index(head)[:, ::-1].T, order=1, mode="nearest")
    values = (values - values.mean()) / max(float(values.std()), 1e-6)
    background = float(volume.min())

    def cost(parameters) -> float:
        normal = _normal(parameters[0], parameters[1])
        offset = normal @ centroid + parameters[2]
        mirrored = head - 2.0 * (head @ normal - offset)[:, None] * normal
        other = map_coordinates(volume, grid.to_index(mirrored)[:, ::-1].T, order=1, mode="constant",
                                cval=background)
        spread = float(other.std())
        return 1.0 if spread == 0 else -float(np.mean(values * (other - other.mean()) / spread))

    start = min(([yaw, roll, 0.0] for yaw in TURNS_DEG for roll in TURNS_DEG), key=cost)
    best = minimize(cost, start, method="Nelder-Mead",
                    options={"initial_simplex": np.array(start) + np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0],
                                                                            [0, 0, coarse_mm]]),
                             "xatol": 0.05, "fatol": 1e-5, "maxiter": 400})
    normal = _normal(best.x[0], best.x[1])
    offset = normal @ centroid + best.x[2]
    return centroid - (centroid @ normal - offset) * normal, normal
