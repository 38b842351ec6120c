"""Exact voxel <-> world mapping for images of any orientation.

Inside the code world coordinates are RAS millimetres. SimpleITK's physical space is LPS, so a voxel
index (i, j, k) (SimpleITK order, i fastest) maps to RAS as ``LPS_TO_RAS @ (origin + D @ diag(s) @ ijk)``.
Numpy arrays from SimpleITK and torch tensors are indexed (k, j, i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """A voxel grid in world space: size (i, j, k), spacing (mm), origin (LPS mm), direction (LPS)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(int(n) for n in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @property
    def index_to_ras(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (i, j, k, 1) to RAS mm."""
        matrix = np.eye(4)
        direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(self.spacing)
        matrix[:3, 3] = LPS_TO_RAS @ np.asarray(self.origin, dtype=float)
        return matrix

    @property
    def ras_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_ras)

    def to_ras(self, ijk: np.ndarray) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.index_to_ras[:3, :3].T + self.index_to_ras[:3, 3]

    def to_index(self, ras: np.ndarray) -> np.ndarray:
        ras = np.asarray(ras, dtype=float)
        return ras @ self.ras_to_index[:3, :3].T + self.ras_to_index[:3, 3]

    def center_ras(self) -> np.ndarray:
        return self.to_ras((np.asarray(self.size, dtype=float) - 1.0) / 2.0)

    def contains(self, ras: np.ndarray, margin_voxels: float = 0.0) -> np.ndarray:
        """Which points lie inside the grid (voxel centres span 0..size-1), per point."""
        ijk = self.to_index(ras)
        size = np.asarray(self.size, dtype=float)
        return np.all((ijk >= -0.5 + margin_voxels) & (ijk <= size - 0.5 - margin_voxels), axis=-1)

    def reference_image(self) -> sitk.Image:
        image = sitk.Image([int(n) for n in self.size], sitk.sitkFloat32)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}


def centered_grid(center_ras: np.ndarray, size, spacing, direction_lps=None) -> Grid:
    """A grid of the given size and spacing whose centre lies at ``center_ras``.

    The default direction is the identity in LPS: slices stacked along S, as in an axial survey scan.
    """
    direction = np.eye(3) if direction_lps is None else np.asarray(direction_lps, dtype=float).reshape(3, 3)
    size = np.asarray(size, dtype=float)
    spacing = np.asarray(spacing, dtype=float)
    center_lps = LPS_TO_RAS @ np.asarray(center_ras, dtype=float)
    origin = center_lps - direction @ (spacing * (size - 1.0) / 2.0)
    return Grid(tuple(int(n) for n in size), tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                tuple(float(d) for d in direction.ravel()))


def physical_center_ras(image: sitk.Image) -> np.ndarray:
    return Grid.of(image).center_ras()


def rigid_matrix(rotation_deg, translation_mm, center_ras=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 RAS matrix: rotate by (rx, ry, rz) degrees about ``center_ras`` (x then y then z), then translate."""
    rx, ry, rz = np.deg2rad(np.asarray(rotation_deg, dtype=float))
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rotation = rot_z @ rot_y @ rot_x
    center = np.asarray(center_ras, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = center - rotation @ center + np.asarray(translation_mm, dtype=float)
    return matrix


def apply_matrix(matrix: np.ndarray, points_ras: np.ndarray) -> np.ndarray:
    points = np.asarray(points_ras, dtype=float)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def move_image(image: sitk.Image, matrix_ras: np.ndarray) -> sitk.Image:
    """The same image placed in the world after the RAS transform ``matrix_ras``: the header changes,
    no voxel is resampled, so landmarks move exactly by ``apply_matrix(matrix_ras, ...)``."""
    grid = Grid.of(image)
    new_index_to_ras = matrix_ras @ grid.index_to_ras
    linear = LPS_TO_RAS @ new_index_to_ras[:3, :3]  # direction @ diag(spacing), in LPS
    spacing = np.asarray(grid.spacing)
    moved = sitk.Image(image)
    moved.SetDirection(tuple((linear / spacing).ravel()))
    moved.SetOrigin(tuple(LPS_TO_RAS @ new_index_to_ras[:3, 3]))
    return moved
