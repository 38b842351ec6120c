"""Scan-plane prescription and AC-PC alignment from detected landmarks.

The schema's ``planes`` object (see schema.SchemaPlanes) says which landmarks define which plane. From
them this module computes

- the mid-sagittal plane (MSP): a least-squares plane through the midline landmarks that leaves out one
  gross outlier (leave-one-out: the fit without the point that lowers the residual most, when that
  point lies clearly off the plane of the others);
- the AC-PC frame, as neuroimaging uses it: origin at AC, +y (anterior) along PC -> AC, +x (right) the
  MSP normal made orthogonal to y, +z = x cross y (superior); its 4x4 RAS matrix maps subject RAS to
  AC-PC RAS, and ``acpc-axial`` / ``acpc-coronal`` planes through AC;
- the schema's axial plane (brain-88: the Brain Axial Boundary points) and each listed sub-anatomy's
  own best-fit plane;
- per plane: its uncertainty from the landmarks' covariances (seeded Monte Carlo), a suggested field
  of view, and the files a scanner console or Slicer can take;
- without landmarks, the MSP from the scan's left-right symmetry (symmetry_plane; ``planes --image``):
  where a guided annotation starts, before any midline point is placed.

Conventions
- World coordinates are RAS mm. A plane is a centre (the centroid of the landmarks it was fitted to,
  or AC for the AC-PC planes) and a unit normal.
- Left-right: the MSP normal points to the subject's right, decided by the schema's mirror pairs (the
  normal points from each pair's left landmark to its right one; the majority of pairs decides, never
  the arbitrary sign of the SVD). Pairs on the wrong side are reported; when the subject's right found
  this way points toward RAS -x, a left-right swap warning says the image header or the labels may be
  flipped (a RAS image always has the patient's right toward +x, whatever the head's tilt).
- The head's own axes: the AC-PC frame's x, y, z where the schema names AC and PC; otherwise right =
  MSP normal, anterior = the schema's ``anterior`` pair (else scanner +A) made orthogonal to right,
  superior = right x anterior (no MSP: scanner axes, with a warning). Every other normal points
  along the head axis nearest to it (axial planes superior, coronal anterior, sagittal right), and a
  plane's in-plane axes (u, v) are the next head axes in cyclic order (R, A, S) projected onto the plane,
  with u x v = normal: a sagittal plane has u ~ anterior, v ~ superior; an axial plane u ~ right,
  v ~ anterior; a coronal plane u ~ superior, v ~ right. All of it is computed from the landmarks only,
  so it turns exactly with the head.
- ITK transform file ``acpc.tfm``: ITK stores the resampling transform (fixed/output -> moving/input),
  in LPS. We write the transform that maps AC-PC-space points (LPS) to subject points (LPS), so
  ``sitk.Resample(scan, acpc_grid, sitk.ReadTransform("acpc.tfm"))`` gives the scan in AC-PC space, and
  Slicer, which reads ITK files as "from parent", applies it to the scan as subject -> AC-PC.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LandmarkError
from .geometry import LPS_TO_RAS, Grid, centered_grid
from .fileio import atomic_path, atomic_write_text, check_outputs
from .schema import Schema, SchemaPlanes

LEVEL = 0.9  # the quantile plane uncertainties are reported at
MAX_ANGLE_DEG = 3.0  # a plane whose normal is this uncertain (90%) is not trustworthy
MAX_OFFSET_MM = 2.0  # nor one whose position along its normal is this uncertain
OUTLIER_MM = 3.0  # the MSP fit leaves out a midline landmark at least this far off the others' plane
_RIGHT, _LEFT = {"right", "r"}, {"left", "l"}


# ------------------------------------------------------------------------------------------ plane fitting
def fit_plane(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane through points (..., M, 3), M >= 3: (centre, unit normal), each (..., 3).

    The centre is the centroid; the normal the right singular vector of the smallest singular value of
    the centred points, signed so that its largest component is positive (callers orient it further).
    Leading dimensions are batched.
    """
    points = np.asarray(points, dtype=float)
    if points.shape[-2] < 3:
        raise ValueError(f"a plane needs at least 3 points, got {points.shape[-2]}")
    centre = points.mean(axis=-2)
    _, _, vt = np.linalg.svd(points - centre[..., None, :], full_matrices=False)
    normal = vt[..., -1, :]
    largest = np.take_along_axis(normal, np.abs(normal).argmax(axis=-1)[..., None], axis=-1)
    return centre, normal * np.where(largest < 0, -1.0, 1.0)


def plane_distances(points: np.ndarray, centre: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Signed distances (mm) of points (N, 3) from the plane, positive on the normal's side."""
    return (np.asarray(points, dtype=float) - centre) @ normal


def fit_plane_robust(points: np.ndarray, outlier_mm: float = OUTLIER_MM):
    """A least-squares plane that tolerates one gross outlier: (centre, normal, inlier mask (M,)).

    With M >= 5 points each point is left out in turn; the fit with the smallest RMS residual wins when
    the point it left out lies more than max(outlier_mm, 4 x that RMS) from it, otherwise all points are
    kept. (With 4 points any 3 fit exactly, so nothing can be called an outlier.)
    """
    points = np.asarray(points, dtype=float)
    centre, normal = fit_plane(points)
    inliers = np.ones(len(points), dtype=bool)
    if len(points) < 5:
        return centre, normal, inliers
    others = np.stack([np.delete(points, i, axis=0) for i in range(len(points))])  # (M, M-1, 3)
    centres, normals = fit_plane(others)
    residuals = np.einsum("mkj,mj->mk", others - centres[:, None], normals)
    rms = np.sqrt((residuals ** 2).mean(axis=1))
    left_out = np.abs(np.einsum("mj,mj->m", points - centres, normals))
    best = int(rms.argmin())
    if left_out[best] > max(outlier_mm, 4.0 * rms[best]):
        inliers[best] = False
        centre, normal = centres[best], normals[best]
    return centre, normal, inliers


def _is_planar(points: np.ndarray) -> bool:
    """False where the points are (nearly) collinear, so that they define no plane."""
    centred = points - points.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    return bool(singular[0] > 0 and singular[1] > 1e-6 * singular[0])


# ------------------------------------------------------------------------------------------- left/right
def _side(landmark) -> str | None:
    """'right', 'left' or None, from the words of a landmark's name and aliases (then its definition)."""
    for texts in ((landmark.name, *landmark.aliases), (landmark.definition,)):
        words = set()
        for text in texts:
            words |= set(re.split(r"[^a-z0-9]+", text.lower()))
        right, left = bool(words & _RIGHT), bool(words & _LEFT)
        if right != left:
            return "right" if right else "left"
    return None


def mirror_pairs(schema: Schema) -> list[tuple[int, int]]:
    """(right index, left index) for every mirror pair of the schema whose sides its names tell."""
    pairs = []
    for i, j in enumerate(schema.mirror_indices()):
        if j <= i:
            continue
        a, b = _side(schema.landmarks[i]), _side(schema.landmarks[j])
        if a == "right" or b == "left":
            if a != "left" and b != "right":
                pairs.append((i, j))
        elif a == "left" or b == "right":
            pairs.append((j, i))
    return pairs


def orient_right(normal: np.ndarray, landmarks: np.ndarray, pairs, names) -> tuple[np.ndarray, list[str]]:
    """The normal signed to point from left landmarks to right ones (the majority of mirror pairs
    decides), and warnings: pairs on the wrong side, and a left-right swap when the subject's right
    points toward RAS -x."""
    normal = np.asarray(normal, dtype=float)
    landmarks = np.asarray(landmarks, dtype=float)
    usable = [(r, l) for r, l in pairs if np.isfinite(landmarks[[r, l]]).all()]
    if not usable:
        oriented = normal if normal[0] >= 0 else -normal
        return oriented, [("mid-sagittal: no left/right landmark pair to tell the subject's right; the normal "
                           "points toward RAS +x")]
    d = np.array([(landmarks[r] - landmarks[l]) @ normal for r, l in usable])
    if (d < 0).sum() > (d > 0).sum() or ((d < 0).sum() == (d > 0).sum() and d.sum() < 0):
        normal, d = -normal, -d
    warnings = []
    wrong = [f"{names[r]}/{names[l]}" for (r, l), v in zip(usable, d) if v < 0]
    if wrong:
        warnings.append(f"mid-sagittal: {len(wrong)} of {len(usable)} mirror pair(s) lie on the wrong side of the "
                        f"plane (their left and right labels look swapped): {', '.join(wrong)}")
    if normal[0] < 0:
        warnings.append(f"left-right swap: the right landmarks of {int((d > 0).sum())} of {len(usable)} mirror "
                        "pairs lie toward RAS left (-x) of the mid-sagittal plane; the image header or the labels "
                        "may be left-right flipped. The normal follows the labels.")
    return normal, warnings


# ------------------------------------------------------------------------------------------ data classes
@dataclass
class PlaneUncertainty:
    """How far a plane moves when its landmarks move within their covariances (Monte Carlo)."""

    angle_deg: float  # LEVEL quantile of the angle between sampled and nominal normals
    offset_mm: float  # LEVEL quantile of |shift| of the plane at its centre, along the nominal normal
    samples: int
    trustworthy: bool
    reason: str
    level: float = LEVEL

    def to_dict(self) -> dict:
        return {"level": self.level, "samples": self.samples, "angle_deg": self.angle_deg,
                "offset_mm": self.offset_mm, "trustworthy": self.trustworthy, "reason": self.reason}


@dataclass
class Plane:
    name: str
    kind: str  # mid-sagittal, axial, coronal, sagittal or oblique
    centre: np.ndarray  # (3,) RAS
    normal: np.ndarray  # (3,) unit, RAS, signed by the head's axes (see the module's conventions)
    axes: np.ndarray  # (2, 3): in-plane unit vectors u, v with u x v = normal
    landmarks: tuple[str, ...]  # the landmarks that define it
    excluded: tuple[str, ...] = ()  # left out of the fit as outliers
    rms_mm: float | None = None  # RMS distance of its (fitted) landmarks from it
    max_residual_mm: float | None = None
    fov_centre: np.ndarray | None = None  # (3,) RAS, on the plane
    fov_mm: np.ndarray | None = None  # (2,) extent along u and v
    uncertainty: PlaneUncertainty | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def offset_mm(self) -> float:
        """d of the plane equation normal . x = d (RAS mm)."""
        return float(self.normal @ self.centre)

    def distances(self, points_ras: np.ndarray) -> np.ndarray:
        return plane_distances(points_ras, self.centre, self.normal)

    def to_dict(self) -> dict:
        return {"format": "LandmarkDetectionLib.plane", "version": 1, "name": self.name, "kind": self.kind,
                "coordinate_system": "RAS", "centre_ras": _floats(self.centre), "normal_ras": _floats(self.normal),
                "offset_mm": self.offset_mm, "axes_ras": [_floats(a) for a in self.axes],
                "fov_centre_ras": _floats(self.fov_centre) if self.fov_centre is not None else None,
                "fov_mm": _floats(self.fov_mm) if self.fov_mm is not None else None,  # along axes_ras u, v
                "landmarks": list(self.landmarks), "excluded_landmarks": list(self.excluded),
                "rms_mm": self.rms_mm, "max_residual_mm": self.max_residual_mm,
                "uncertainty": self.uncertainty.to_dict() if self.uncertainty else None,
                "warnings": list(self.warnings)}


@dataclass
class AcpcFrame:
    """The AC-PC aligned frame: origin AC, +y along PC -> AC, +x right (MSP normal), +z superior."""

    ac: np.ndarray  # (3,) subject RAS
    pc: np.ndarray
    rotation: np.ndarray  # (3, 3): columns x, y, z (unit, RAS, right-handed)
    uncertainty: dict | None = None

    @property
    def matrix(self) -> np.ndarray:
        """4x4 RAS: subject -> AC-PC."""
        m = np.eye(4)
        m[:3, :3] = self.rotation.T
        m[:3, 3] = -self.rotation.T @ self.ac
        return m

    @property
    def inverse(self) -> np.ndarray:
        """4x4 RAS: AC-PC -> subject."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.ac
        return m

    @property
    def distance_mm(self) -> float:
        return float(np.linalg.norm(self.ac - self.pc))

    def to_acpc(self, points_ras: np.ndarray) -> np.ndarray:
        return (np.asarray(points_ras, dtype=float) - self.ac) @ self.rotation

    def itk_transform(self) -> sitk.AffineTransform:
        """The ITK (resampling-convention, LPS) transform: AC-PC-space points -> subject points."""
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(tuple((LPS_TO_RAS @ self.rotation @ LPS_TO_RAS).ravel()))
        transform.SetTranslation(tuple(LPS_TO_RAS @ self.ac))
        return transform

    def to_dict(self) -> dict:
        return {"format": "LandmarkDetectionLib.acpc", "version": 1, "coordinate_system": "RAS",
                "subject_to_acpc": self.matrix.tolist(), "acpc_to_subject": self.inverse.tolist(),
                "ac_ras": _floats(self.ac), "pc_ras": _floats(self.pc), "ac_pc_distance_mm": self.distance_mm,
                "axes_ras": {"x_right": _floats(self.rotation[:, 0]), "y_anterior": _floats(self.rotation[:, 1]),
                             "z_superior": _floats(self.rotation[:, 2])},
                "itk_transform": "acpc.tfm",
                "itk_transform_maps": "AC-PC space (LPS) -> subject (LPS), the ITK resampling convention: "
                                      "resample the scan with it onto an AC-PC grid; Slicer applies it to the "
                                      "scan as subject -> AC-PC",
                "uncertainty": self.uncertainty}


@dataclass
class PlaneSet:
    """Everything computed from one landmark set."""

    schema: str
    planes: dict[str, Plane]
    acpc: AcpcFrame | None
    warnings: list[str]
    head_axes: np.ndarray  # (3, 3): rows right, anterior, superior (RAS unit vectors)

    def to_dict(self) -> dict:
        return {"format": "LandmarkDetectionLib.planes", "version": 1, "schema": self.schema,
                "coordinate_system": "RAS", "planes": {name: f"{name}.plane.json" for name in self.planes},
                "acpc": None if self.acpc is None else {"json": "acpc.json", "matrix": "acpc_matrix.txt",
                                                        "itk_transform": "acpc.tfm"},
                "head_axes_ras": {"right": _floats(self.head_axes[0]), "anterior": _floats(self.head_axes[1]),
                                  "superior": _floats(self.head_axes[2])},
                "warnings": list(self.warnings)}


def _floats(values) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=float).ravel()]


# --------------------------------------------------------------------------------------- head axes, FOV
def head_axes(right, anterior) -> np.ndarray:
    """Rows right, anterior, superior: ``anterior`` made orthogonal to ``right``; superior = right x anterior."""
    right = np.asarray(right, dtype=float) / np.linalg.norm(right)
    anterior = np.asarray(anterior, dtype=float)
    anterior = anterior - (anterior @ right) * right
    anterior = anterior / np.linalg.norm(anterior)
    return np.stack([right, anterior, np.cross(right, anterior)])


def orient_plane(normal: np.ndarray, axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normal signed along the head axis nearest to it, and the in-plane axes (u, v): u the next head
    axis in cyclic order (R, A, S) projected onto the plane, v = normal x u."""
    normal = np.asarray(normal, dtype=float)
    dots = axes @ normal
    k = int(np.abs(dots).argmax())
    if dots[k] < 0:
        normal = -normal
    u = axes[(k + 1) % 3] - (axes[(k + 1) % 3] @ normal) * normal
    u = u / np.linalg.norm(u)
    return normal, np.stack([u, np.cross(normal, u)])


def field_of_view(centre, normal, axes, points, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The in-plane rectangle (along axes u, v) that holds the projections of ``points`` plus a margin:
    its centre (on the plane) and its size (mm, 2)."""
    points = np.asarray(points, dtype=float)
    points = points[np.isfinite(points).all(axis=1)]
    projected = (points - centre) @ np.asarray(axes).T  # (N, 2)
    low, high = projected.min(axis=0), projected.max(axis=0)
    fov_centre = np.asarray(centre, dtype=float) + ((low + high) / 2) @ np.asarray(axes)
    return fov_centre, high - low + 2 * margin_mm


def _foreground(image: sitk.Image, max_points: int) -> np.ndarray:
    """(k, j, i) indices of the scan's foreground voxels (Otsu threshold) on a regular sub-grid, at most
    about ``max_points`` of them (possibly none)."""
    # a copy, not GetArrayViewFromImage: the thresholded image is a temporary, freed once this line ends
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1))
    stride = max(1, math.ceil((int(mask.sum()) / max_points) ** (1 / 3)))
    return np.argwhere(mask[::stride, ::stride, ::stride]) * stride


def head_points_from_image(image: sitk.Image, max_points: int = 200_000) -> np.ndarray:
    """RAS positions of the head: the scan's foreground voxels (Otsu threshold), evenly thinned to at most
    about ``max_points``; all eight corners of the volume when there is no foreground."""
    kji = _foreground(image, max_points)
    grid = Grid.of(image)
    if len(kji) == 0:
        size = np.asarray(grid.size) - 1
        corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])])
        return grid.to_ras(corners)
    return grid.to_ras(kji[:, ::-1])


# ------------------------------------------------------------------------------ the MSP from the scan alone
SYMMETRY_GRID_MM = 4.0  # the symmetry is measured on this grid: fast, and the MSP is a large-scale feature
SYMMETRY_POINTS = 20_000  # head voxels compared with their mirror images, at most about
SYMMETRY_TURNS_DEG = np.arange(-30.0, 31.0, 10.0)  # head turns about S and A tried before refining


def _turned_right(yaw_deg: float, roll_deg: float) -> np.ndarray:
    """RAS +x turned by ``yaw`` about S, then by ``roll`` about A (degrees)."""
    yaw, roll = np.radians(yaw_deg), np.radians(roll_deg)
    return np.array([np.cos(yaw) * np.cos(roll), np.sin(yaw) * np.cos(roll), -np.sin(roll)])


def symmetry_plane(image: sitk.Image, grid_mm: float = SYMMETRY_GRID_MM, source=None) -> Plane:
    """The mid-sagittal plane of a head scan from its left-right symmetry, before any landmark is placed.

    The plane n . x = d is the one that best maps the head onto itself: the correlation between the scan's
    intensities at head voxels p and at their mirror images p - 2 (n . p - d) n is largest. The scan is
    resampled to a ``grid_mm`` isotropic grid and the head is its Otsu foreground. The search starts from
    the scanner's sagittal plane through the head's centroid, tries head turns of up to 30 degrees about
    S and A on a coarse grid, and refines the best with Nelder-Mead.

    Returns the Plane "mid-sagittal-symmetry": centre the head's centroid projected onto it, normal toward
    RAS +x (the subject's right when the header is right: the scan alone cannot tell a flipped header), in-plane
    axes anterior and superior, field of view the head plus 10 mm. ``source`` names the scan in errors.
    """
    from scipy.ndimage import map_coordinates
    from scipy.optimize import minimize

    from .preprocess import resample_isotropic

    small = resample_isotropic(image, grid_mm)
    volume = sitk.GetArrayFromImage(small)  # (k, j, i)
    grid = Grid.of(small)
    kji = _foreground(small, SYMMETRY_POINTS)
    if len(kji) < 10:
        raise LandmarkError(source, "has no head (foreground) to find its mid-sagittal plane by symmetry")
    head = grid.to_ras(kji[:, ::-1])
    centroid = head.mean(axis=0)
    values = volume[tuple(kji.T)]
    values = (values - values.mean()) / max(float(values.std()), 1e-6)
    background = float(volume.min())

    def cost(parameters) -> float:  # minus the correlation of the head with its mirror image
        normal = _turned_right(parameters[0], parameters[1])
        offset = normal @ centroid + parameters[2]
        mirrored = head - 2.0 * (head @ normal - offset)[:, None] * normal
        other = map_coordinates(volume, grid.to_index(mirrored)[:, ::-1].T, order=1, mode="constant",
                                cval=background)
        spread = float(other.std())
        return 1.0 if spread == 0 else -float(np.mean(values * (other - other.mean()) / spread))

    start = min(([yaw, roll, 0.0] for yaw in SYMMETRY_TURNS_DEG for roll in SYMMETRY_TURNS_DEG), key=cost)
    simplex = np.array(start) + np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0], [0, 0, grid_mm]])
    best = minimize(cost, start, method="Nelder-Mead",
                    options={"initial_simplex": simplex, "xatol": 0.05, "fatol": 1e-5, "maxiter": 400})
    normal = _turned_right(best.x[0], best.x[1])
    centre = centroid + best.x[2] * normal  # the centroid projected onto n . x = n . centroid + offset
    normal, in_plane = orient_plane(normal, head_axes(normal, (0.0, 1.0, 0.0)))
    fov_centre, fov_mm = field_of_view(centre, normal, in_plane, head, 10.0)
    return Plane("mid-sagittal-symmetry", "mid-sagittal", centre, normal, in_plane, (), fov_centre=fov_centre,
                 fov_mm=fov_mm)


# ------------------------------------------------------------------------------------------ uncertainty
def _sqrt_psd(covariance: np.ndarray) -> np.ndarray:
    """Per landmark, L with L L^T = C (C symmetric positive semi-definite)."""
    values, vectors = np.linalg.eigh((covariance + np.swapaxes(covariance, -1, -2)) / 2)
    return vectors * np.sqrt(np.clip(values, 0, None))[..., None, :]


def sample_landmarks(landmarks: np.ndarray, covariance: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """(samples, K, 3) landmark sets drawn from N(landmark, covariance) (seeded)."""
    landmarks = np.asarray(landmarks, dtype=float)
    covariance = np.asarray(covariance, dtype=float)
    ok = np.isfinite(covariance).all(axis=(1, 2))
    roots = np.zeros_like(covariance)
    roots[ok] = _sqrt_psd(covariance[ok])
    noise = np.random.default_rng(seed).standard_normal((samples, *landmarks.shape))
    return landmarks + np.einsum("kij,nkj->nki", roots, noise)


def plane_uncertainty(centre, normal, sampled_centres, sampled_normals, max_angle_deg: float = MAX_ANGLE_DEG,
                      max_offset_mm: float = MAX_OFFSET_MM, level: float = LEVEL) -> PlaneUncertainty:
    """Quantiles of the angle between sampled and nominal normals, and of the shift of the sampled plane
    at the nominal centre along the nominal normal; trustworthy when both stay within the thresholds."""
    sampled_normals = np.asarray(sampled_normals, dtype=float)
    cosine = sampled_normals @ normal
    angle = np.degrees(np.arccos(np.clip(np.abs(cosine), 0.0, 1.0)))
    with np.errstate(divide="ignore", invalid="ignore"):
        offset = np.abs(np.einsum("nj,nj->n", sampled_normals, sampled_centres - centre) / cosine)
    angle_q, offset_q = float(np.quantile(angle, level)), float(np.quantile(offset, level))
    problems = []
    if not angle_q <= max_angle_deg:
        problems.append(f"its normal may be off by {angle_q:.1f} deg ({level:.0%} quantile > {max_angle_deg:g} deg)")
    if not offset_q <= max_offset_mm:
        problems.append(f"its position may be off by {offset_q:.1f} mm along the normal "
                        f"({level:.0%} quantile > {max_offset_mm:g} mm)")
    reason = "; ".join(problems) if problems else (
        f"{level:.0%} of sampled planes lie within {angle_q:.2f} deg and {offset_q:.2f} mm of it")
    return PlaneUncertainty(angle_q, offset_q, len(sampled_normals), not problems, reason, level)


# -------------------------------------------------------------------------------------------- the planes
def plane_spec(schema: Schema) -> SchemaPlanes:
    """The schema's "planes" declaration; without one: the MSP from its mid-sagittal sub-anatomies, and a
    plane for each sub-anatomy whose plane is not oblique."""
    if schema.planes is not None:
        spec = schema.planes
        if spec.sub_anatomies is None:
            spec = SchemaPlanes(spec.mid_sagittal, spec.axial, spec.ac, spec.pc, spec.anterior,
                                tuple(s.name for s in schema.sub_anatomies if s.plane != "oblique"), spec.note)
        return spec
    midline = tuple(lm.name for lm in schema.landmarks if schema.sub_anatomy(lm.sub_anatomy).plane == "mid-sagittal")
    return SchemaPlanes(midline if len(midline) >= 3 else (), (), None, None, None,
                        tuple(s.name for s in schema.sub_anatomies if s.plane != "oblique"))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _aligned(normals: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return normals * np.where(normals @ reference < 0, -1.0, 1.0)[..., None]


def compute_planes(schema: Schema, landmarks: np.ndarray, covariance: np.ndarray | None = None,
                   head_points: np.ndarray | None = None, *, samples: int = 1000, seed: int = 0,
                   outlier_mm: float = OUTLIER_MM, max_angle_deg: float = MAX_ANGLE_DEG,
                   max_offset_mm: float = MAX_OFFSET_MM, margin_mm: float | None = None, source=None) -> PlaneSet:
    """Every plane the schema declares, the AC-PC frame where it names AC and PC, their uncertainties
    (with ``covariance``, (K, 3, 3) RAS mm^2 in schema order) and fields of view.

    ``head_points`` (N, 3) RAS, e.g. head_points_from_image(scan), size the fields of view (margin 10 mm
    by default); without them the landmarks' extent plus 30 mm is used. Missing (NaN) landmarks are left
    out of the fits, with a warning. ``source`` names the landmark file in errors.
    """
    points = np.asarray(landmarks, dtype=float)
    if points.shape != (len(schema), 3):
        raise LandmarkError(source, f"expected {len(schema)} landmarks of schema '{schema.name}' as a "
                                    f"({len(schema)}, 3) array, got shape {points.shape}")
    if covariance is not None:
        covariance = np.asarray(covariance, dtype=float)
        if covariance.shape != (len(schema), 3, 3):
            raise LandmarkError(source, f"expected ({len(schema)}, 3, 3) landmark covariances, got shape "
                                        f"{covariance.shape}")
    spec = plane_spec(schema)
    names = schema.names
    index = {name: i for i, name in enumerate(names)}
    finite = np.isfinite(points).all(axis=1)
    warnings: list[str] = []
    definitions = {}  # plane name -> (kind, landmark indices, batched define(points) -> (centre, normal))

    def usable(what, wanted):
        missing = [names[i] for i in wanted if not finite[i]]
        kept = [i for i in wanted if finite[i]]
        if missing:
            warnings.append(f"{what}: {len(missing)} landmark(s) missing ({', '.join(missing)}); fitted without them")
        if len(kept) < 3 or not _is_planar(points[kept]):
            warnings.append(f"{what}: the landmarks left ({len(kept)}) define no plane; skipped")
            return None
        return kept

    def fitted(kept):
        return lambda p: fit_plane(p[..., kept, :])

    # the mid-sagittal plane, oriented toward the subject's right by the mirror pairs
    msp_normal, excluded, msp_define = None, [], None
    kept = usable("mid-sagittal", [index[n] for n in spec.mid_sagittal]) if spec.mid_sagittal else None
    if kept:
        _, normal, inliers = fit_plane_robust(points[kept], outlier_mm)
        inlier_idx = [i for i, ok in zip(kept, inliers) if ok]
        excluded = [i for i, ok in zip(kept, inliers) if not ok]
        msp_normal, msp_warnings = orient_right(normal, points, mirror_pairs(schema), names)
        warnings += msp_warnings
        msp_define = fitted(inlier_idx)
        definitions["mid-sagittal"] = ("mid-sagittal", inlier_idx, msp_define)
    elif not spec.mid_sagittal:
        warnings.append(f"schema '{schema.name}' declares no mid-sagittal landmarks; normals are oriented in "
                        "scanner axes (not with the head)")

    # the AC-PC frame
    ac = index[spec.ac] if spec.ac else None
    pc = index[spec.pc] if spec.pc else None
    frame, frame_define = None, None
    if ac is not None:
        if not finite[[ac, pc]].all():
            warnings.append(f"AC-PC: {spec.ac} or {spec.pc} is missing; no AC-PC frame")
        elif msp_define is None:
            warnings.append("AC-PC: no mid-sagittal plane to give the frame its right axis; no AC-PC frame")
        elif np.linalg.norm(points[ac] - points[pc]) < 1e-6:
            warnings.append(f"AC-PC: {spec.ac} and {spec.pc} coincide; no AC-PC frame")
        else:
            def frame_define(p):
                _, n = msp_define(p)
                n = _aligned(n, msp_normal)
                y = p[..., ac, :] - p[..., pc, :]
                y = y / np.linalg.norm(y, axis=-1, keepdims=True)
                x = n - np.sum(n * y, axis=-1, keepdims=True) * y
                x = x / np.linalg.norm(x, axis=-1, keepdims=True)
                return p[..., ac, :], np.stack([x, y, np.cross(x, y)], axis=-1)

            def frame_plane(column):
                def define(p):
                    origin, rotation = frame_define(p)
                    return origin, rotation[..., column]
                return define

            frame = AcpcFrame(points[ac].copy(), points[pc].copy(), frame_define(points)[1])
            frame_landmarks = sorted({ac, pc, *definitions["mid-sagittal"][1]})
            definitions["acpc-axial"] = ("axial", frame_landmarks, frame_plane(2))
            definitions["acpc-coronal"] = ("coronal", frame_landmarks, frame_plane(1))

    # the head's axes: the AC-PC frame's where there is one; else right = the MSP normal (scanner +R
    # without one) and anterior from the schema's anterior pair (scanner +A without one)
    if frame is not None:
        axes3 = frame.rotation.T.copy()
    else:
        right = msp_normal if msp_normal is not None else np.array([1.0, 0.0, 0.0])
        anterior = np.array([0.0, 1.0, 0.0])
        if spec.anterior and finite[[index[n] for n in spec.anterior]].all():
            anterior = points[index[spec.anterior[1]]] - points[index[spec.anterior[0]]]
        if abs(anterior @ right) > 0.95 * np.linalg.norm(anterior):
            warnings.append("the anterior direction runs along the mid-sagittal normal; using scanner +A instead")
            anterior = np.array([0.0, 1.0, 0.0])
        axes3 = head_axes(right, anterior)

    # the schema's axial plane and the sub-anatomy planes
    if spec.axial:
        kept = usable("axial", [index[n] for n in spec.axial])
        if kept:
            definitions["axial"] = ("axial", kept, fitted(kept))
    for sub_name in spec.sub_anatomies or ():
        name = f"sub-anatomy-{_slug(sub_name)}"
        kept = usable(f"sub-anatomy {sub_name}", schema.indices_of(sub_name))
        if kept:
            definitions[name] = (schema.sub_anatomy(sub_name).plane, kept, fitted(kept))

    # nominal planes, residuals, fields of view
    fov_points = head_points if head_points is not None else points[finite]
    margin = margin_mm if margin_mm is not None else (10.0 if head_points is not None else 30.0)
    planes = {}
    for name, (kind, used, define) in definitions.items():
        centre, normal = define(points)
        if name == "mid-sagittal":
            normal = _aligned(normal, msp_normal)
        normal, in_plane = orient_plane(normal, axes3)
        plane = Plane(name, kind, centre, normal, in_plane, tuple(names[i] for i in used))
        if not name.startswith("acpc-"):
            residuals = np.abs(plane.distances(points[used]))
            plane.rms_mm = float(np.sqrt((residuals ** 2).mean()))
            plane.max_residual_mm = float(residuals.max())
        if name == "mid-sagittal" and excluded:
            plane.excluded = tuple(names[i] for i in excluded)
            for i in excluded:
                message = (f"mid-sagittal: {names[i]} lies {abs(plane.distances(points[i])):.1f} mm off the plane of "
                           "the other midline landmarks and was left out of the fit")
                plane.warnings.append(message)
                warnings.append(message)
        plane.fov_centre, plane.fov_mm = field_of_view(centre, normal, in_plane, fov_points, margin)
        planes[name] = plane

    # uncertainty: one set of Monte Carlo samples for every plane
    if covariance is not None and definitions:
        sampled = sample_landmarks(np.where(finite[:, None], points, 0.0), covariance, samples, seed)
        bad_covariance = ~np.isfinite(covariance).all(axis=(1, 2))
        for name, (_, used, define) in definitions.items():
            plane = planes[name]
            if bad_covariance[used].any():
                message = f"{name}: no uncertainty (a landmark's covariance is not finite)"
                plane.warnings.append(message)
                warnings.append(message)
                continue
            centres, normals = define(sampled)
            plane.uncertainty = plane_uncertainty(plane.centre, plane.normal, centres, normals, max_angle_deg,
                                                  max_offset_mm)
        if frame is not None and not bad_covariance[definitions["acpc-axial"][1]].any():
            origins, rotations = frame_define(sampled)
            frame.uncertainty = _frame_uncertainty(frame, origins, rotations, max_angle_deg, max_offset_mm)
    return PlaneSet(schema.name, planes, frame, warnings, axes3)


def _frame_uncertainty(frame: AcpcFrame, origins, rotations, max_angle_deg, max_offset_mm) -> dict:
    line = np.degrees(np.arccos(np.clip(rotations[:, :, 1] @ frame.rotation[:, 1], -1.0, 1.0)))
    relative = np.einsum("nji,jk->nik", rotations, frame.rotation)  # R_sample^T R
    rotation = np.degrees(np.arccos(np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)))
    ac = np.linalg.norm(origins - frame.ac, axis=1)
    q = {"line_angle_deg": float(np.quantile(line, LEVEL)), "rotation_angle_deg": float(np.quantile(rotation, LEVEL)),
         "ac_offset_mm": float(np.quantile(ac, LEVEL))}
    problems = []
    if not q["rotation_angle_deg"] <= max_angle_deg:
        problems.append(f"the frame may be turned by {q['rotation_angle_deg']:.1f} deg ({LEVEL:.0%} quantile > "
                        f"{max_angle_deg:g} deg)")
    if not q["ac_offset_mm"] <= max_offset_mm:
        problems.append(f"AC may be off by {q['ac_offset_mm']:.1f} mm ({LEVEL:.0%} quantile > {max_offset_mm:g} mm)")
    reason = "; ".join(problems) if problems else (
        f"{LEVEL:.0%} of sampled frames lie within {q['rotation_angle_deg']:.2f} deg and {q['ac_offset_mm']:.2f} mm")
    return {"level": LEVEL, "samples": len(origins), **q, "trustworthy": not problems, "reason": reason}


# ----------------------------------------------------------------------------------------------- outputs
def output_paths(output_dir: str | Path, planes: PlaneSet) -> dict[str, Path]:
    """Every file write_planes writes, by key."""
    output_dir = Path(output_dir)
    paths = {"index": output_dir / "planes.json"}
    for name in planes.planes:
        paths[name] = output_dir / f"{name}.plane.json"
    if planes.acpc is not None:
        paths.update(acpc_json=output_dir / "acpc.json", acpc_matrix=output_dir / "acpc_matrix.txt",
                     acpc_tfm=output_dir / "acpc.tfm")
    return paths


def _matrix_text(matrix: np.ndarray) -> str:
    header = "# 4x4 RAS matrix: subject RAS mm -> AC-PC RAS mm (origin AC, +y along PC->AC, +x right, +z superior)\n"
    return header + "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in matrix)


def write_planes(output_dir: str | Path, planes: PlaneSet, overwrite: bool = False, inputs=()) -> dict[str, Path]:
    """Write ``<plane>.plane.json`` per plane, ``planes.json`` (the index, with warnings) and, with an AC-PC
    frame, ``acpc.json``, ``acpc_matrix.txt`` (4x4 RAS, subject -> AC-PC) and ``acpc.tfm`` (ITK: AC-PC
    LPS -> subject LPS). Each file is written atomically; inputs and (without ``overwrite``) existing
    files are refused before anything is written."""
    paths = output_paths(output_dir, planes)
    check_outputs(paths.values(), inputs, overwrite)
    for name, plane in planes.planes.items():
        atomic_write_text(paths[name], json.dumps(plane.to_dict(), indent=1) + "\n")
    if planes.acpc is not None:
        atomic_write_text(paths["acpc_json"], json.dumps(planes.acpc.to_dict(), indent=1) + "\n")
        atomic_write_text(paths["acpc_matrix"], _matrix_text(planes.acpc.matrix))
        with atomic_path(paths["acpc_tfm"], suffix=".tfm") as tmp:
            sitk.WriteTransform(planes.acpc.itk_transform(), str(tmp))
    atomic_write_text(paths["index"], json.dumps(planes.to_dict(), indent=1) + "\n")
    return paths


# ---------------------------------------------------------------------------------------------- resample
def _subject_to_acpc(transform) -> np.ndarray:
    """4x4 RAS subject -> AC-PC from an AcpcFrame, such a matrix, or an ITK transform (AC-PC LPS -> subject LPS)."""
    if isinstance(transform, AcpcFrame):
        return transform.matrix
    if isinstance(transform, sitk.Transform):
        b = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
        a = np.stack([np.asarray(transform.TransformPoint(tuple(e))) - b for e in np.eye(3)], axis=1)
        acpc_to_subject = np.eye(4)
        acpc_to_subject[:3, :3] = LPS_TO_RAS @ a @ LPS_TO_RAS
        acpc_to_subject[:3, 3] = LPS_TO_RAS @ b
        return np.linalg.inv(acpc_to_subject)
    matrix = np.asarray(transform, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError("transform must be an AcpcFrame, a 4x4 subject -> AC-PC RAS matrix or an ITK transform")
    return matrix


def resample_acpc(image: sitk.Image, transform, spacing: float = 1.0, margin_mm: float = 10.0,
                  interpolator=sitk.sitkLinear) -> sitk.Image:
    """The scan resampled into AC-PC space: an axis-aligned grid (identity direction) of ``spacing`` mm
    whose centre voxel lies exactly at AC (the AC-PC origin), covering the head (the scan's foreground,
    head_points_from_image, plus ``margin_mm``) symmetrically about AC.

    ``transform``: an AcpcFrame, its 4x4 RAS subject -> AC-PC matrix, or the ITK transform read from
    acpc.tfm. Voxels outside the scan get its minimum value.
    """
    matrix = _subject_to_acpc(transform)
    head = head_points_from_image(image)
    head_acpc = head @ matrix[:3, :3].T + matrix[:3, 3]
    half = np.abs(head_acpc).max(axis=0) + margin_mm
    n = np.ceil(half / spacing - 1e-9).astype(int)
    grid = centered_grid(np.zeros(3), 2 * n + 1, (spacing,) * 3)
    acpc_to_subject = np.linalg.inv(matrix)
    itk = sitk.AffineTransform(3)
    itk.SetMatrix(tuple((LPS_TO_RAS @ acpc_to_subject[:3, :3] @ LPS_TO_RAS).ravel()))
    itk.SetTranslation(tuple(LPS_TO_RAS @ acpc_to_subject[:3, 3]))
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, grid.reference_image(), itk, interpolator, background, image.GetPixelID())


# --------------------------------------------------------------------------------------------------- CLI
def read_covariance(path: str | Path, schema: Schema) -> np.ndarray:
    """(K, 3, 3) covariances in schema order from a NAME.uncertainty.json, matched by landmark name."""
    from .uncertainty import read_uncertainty

    result, records = read_uncertainty(path)
    covariance = np.full((len(schema), 3, 3), np.nan)
    for record, matrix in zip(records, result.covariance):
        k = schema.lookup(str(record.get("name", "")))
        if k is None:
            raise LandmarkError(path, f"landmark {record.get('name')!r} is not in schema '{schema.name}'")
        covariance[k] = matrix
    missing = [lm.name for lm, c in zip(schema.landmarks, covariance) if not np.isfinite(c).all()]
    if missing:
        raise LandmarkError(path, f"no covariance for {len(missing)} landmark(s) of schema '{schema.name}': "
                                  f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    return covariance


def add_planes_command(subparsers) -> argparse.ArgumentParser:
    """Define ``planes`` on an argparse subparsers object; its handler is ``args.handler(args)``."""
    from .cli import number  # the CLI's bounded-number option type (cli.py builds this parser)

    p = subparsers.add_parser("planes", help="mid-sagittal plane, AC-PC frame and scan planes from landmarks, or the "
                                             "mid-sagittal plane from a scan's symmetry",
                              description="Scan-plane prescription and AC-PC alignment from (detected) landmarks; "
                                          "with --image, the mid-sagittal plane from the scan's left-right symmetry "
                                          "(no landmarks needed), compared with the landmarks' when both are given.")
    p.add_argument("--landmarks", default=None, help="landmark file (.mrk.json, .fcsv or .csv)")
    p.add_argument("--image", default=None, metavar="SCAN",
                   help="the mid-sagittal plane from this scan's left-right symmetry: "
                        "mid-sagittal-symmetry.plane.json (what Landmark Training starts an annotation from); "
                        "with --landmarks, how far their mid-sagittal plane lies from it, and the scan's head "
                        "sizes the fields of view")
    p.add_argument("--uncertainty", default=None, help="NAME.uncertainty.json from detect --uncertainty: plane "
                                                       "uncertainties and trustworthiness")
    p.add_argument("--output", default=None, help="folder for <plane>.plane.json, planes.json, acpc.tfm, ... "
                                                  "(without it the planes are only printed)")
    p.add_argument("--resample", default=None, metavar="SCAN",
                   help="also write SCAN resampled into AC-PC space (NAME_acpc.nii.gz); its head sizes the FOVs")
    p.add_argument("--spacing", type=number(float, 0.1, 10), default=1.0, help="voxel size (mm) of the AC-PC resampled scan")
    p.add_argument("--schema", default=None, help="schema name or JSON file (default: the built-in schema whose "
                                                   "landmarks the file holds)")
    p.add_argument("--samples", type=number(int, 10, 1_000_000), default=1000, help="Monte Carlo samples of the plane uncertainty")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seed of the Monte Carlo samples")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=run_planes)
    return p


def run_planes(args) -> int:
    """The ``planes`` command: read, compute, refuse unsafe outputs, write (all files together), print a summary."""
    from .fileio import check_writable_dir, read_landmarks, read_volume, stem, write_volume, written_together
    from .schema import load_schema, schema_of_labels

    if not args.landmarks and not args.image:
        raise LandmarkError(None, "planes needs --landmarks, --image SCAN or both")
    for option, value in (("--uncertainty", args.uncertainty), ("--resample", args.resample)):
        if value and not args.landmarks:
            raise LandmarkError(value, f"{option} needs --landmarks")
    if args.resample and not args.output:
        raise LandmarkError(args.resample, "--resample needs --output (the folder the resampled scan goes into)")
    image = read_volume(args.image) if args.image else None
    symmetry = symmetry_plane(image, source=args.image) if image is not None else None
    planes, schema, scan = None, None, None
    if args.landmarks:
        schema = load_schema(args.schema) if args.schema else schema_of_labels(args.landmarks)
        landmarks = read_landmarks(args.landmarks, schema)
        covariance = read_covariance(args.uncertainty, schema) if args.uncertainty else None
        if args.resample and not plane_spec(schema).ac:
            raise LandmarkError(schema.source or schema.name, f"schema '{schema.name}' names no AC and PC in its "
                                                              "'planes', so there is no AC-PC frame to --resample into")
        scan = read_volume(args.resample) if args.resample else image  # its head sizes the fields of view
        head = head_points_from_image(scan) if scan is not None else None
        planes = compute_planes(schema, landmarks, covariance, head, samples=args.samples, seed=args.seed,
                                source=args.landmarks)
        if args.resample and planes.acpc is None:
            raise LandmarkError(args.landmarks, "no AC-PC frame could be computed (see the warnings); nothing "
                                                "written: " + "; ".join(planes.warnings))

    output = Path(args.output) if args.output else None
    paths, resampled_path = {}, None
    if output is not None:
        inputs = [args.landmarks, args.image, args.uncertainty, args.resample,
                  schema.source if schema is not None and args.schema and Path(schema.source).exists() else None]
        if output.resolve() in {Path(p).resolve() for p in inputs if p}:
            raise LandmarkError(output, "--output is an input file; choose a folder")
        paths = output_paths(output, planes) if planes is not None else {}
        if symmetry is not None:
            paths[symmetry.name] = output / f"{symmetry.name}.plane.json"
        resampled_path = output / f"{stem(args.resample)}_acpc.nii.gz" if args.resample else None
        check_outputs([*paths.values(), *([resampled_path] if resampled_path else [])], inputs, args.overwrite)
        check_writable_dir(output)
        resampled = resample_acpc(scan, planes.acpc, args.spacing) if resampled_path else None
        with written_together():  # every file lands, or none
            if planes is not None:
                write_planes(output, planes, overwrite=True, inputs=inputs)  # outputs checked above
            if symmetry is not None:
                atomic_write_text(paths[symmetry.name], json.dumps(symmetry.to_dict(), indent=1) + "\n")
            if resampled is not None:
                write_volume(resampled, resampled_path)
    if planes is not None:
        print(summary_text(planes, schema, args.landmarks))
    if symmetry is not None:
        print(symmetry_text(symmetry, args.image, None if planes is None else planes.planes.get("mid-sagittal")))
    if resampled_path:
        print(f"AC-PC resampled scan: {resampled_path} ({'x'.join(map(str, resampled.GetSize()))} at {args.spacing:g} mm)")
    if output is not None:
        print(f"outputs: {output}")
    return 0


def symmetry_text(plane: Plane, source="", msp: Plane | None = None) -> str:
    """The symmetry plane in one line, and how far the landmarks' mid-sagittal plane lies from it."""
    line = (f"{source}: mid-sagittal plane by symmetry: normal ({', '.join(f'{x:+.3f}' for x in plane.normal)}) "
            f"through ({', '.join(f'{x:.1f}' for x in plane.centre)}), n . x = {plane.offset_mm:.2f} mm")
    if msp is not None:
        angle = math.degrees(math.acos(min(1.0, abs(float(plane.normal @ msp.normal)))))
        line += (f"\n  the landmarks' mid-sagittal plane lies {angle:.1f} deg and "
                 f"{abs(plane.distances(msp.centre[None])[0]):.1f} mm (at its centre) from it")
    return line


def summary_text(planes: PlaneSet, schema: Schema, source="") -> str:
    """A readable summary: one line per plane, the AC-PC frame, then warnings."""
    def vec(v):
        return "(" + ", ".join(f"{x:+.3f}" for x in v) + ")"

    lines = [f"{source}: schema {schema.name}, {len(planes.planes)} plane(s)"]
    for plane in planes.planes.values():
        line = f"  {plane.name:<34} normal {vec(plane.normal)} through ({', '.join(f'{x:.1f}' for x in plane.centre)})"
        if plane.rms_mm is not None:
            line += f", rms {plane.rms_mm:.2f} mm over {len(plane.landmarks)}"
        line += f", FOV {plane.fov_mm[0]:.0f} x {plane.fov_mm[1]:.0f} mm"
        if plane.uncertainty:
            u = plane.uncertainty
            line += f"; 90%: {u.angle_deg:.2f} deg, {u.offset_mm:.2f} mm ({'trustworthy' if u.trustworthy else 'NOT trustworthy'})"
        lines.append(line)
    if planes.acpc is not None:
        frame = planes.acpc
        tilt = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(frame.rotation) - 1) / 2))))
        line = f"  AC-PC frame: AC-PC distance {frame.distance_mm:.1f} mm, head turned {tilt:.1f} deg from scanner axes"
        if frame.uncertainty:
            u = frame.uncertainty
            line += (f"; 90%: {u['rotation_angle_deg']:.2f} deg, AC {u['ac_offset_mm']:.2f} mm "
                     f"({'trustworthy' if u['trustworthy'] else 'NOT trustworthy'})")
        lines.append(line)
    elif schema.planes is None or not schema.planes.ac:
        lines.append(f"  no AC-PC frame: schema '{schema.name}' names no AC and PC")
    lines += [f"warning: {w}" for w in planes.warnings]
    return "\n".join(lines)
