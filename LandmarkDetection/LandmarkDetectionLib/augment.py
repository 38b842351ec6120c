"""Realistic MRI augmentation (policies DA1-DA4 of Patel et al.) with exact landmark transport.

Images are transformed by TorchIO. Spatial transforms are TorchIO's deterministic ``Affine`` and
``ElasticDeformation`` with parameters drawn here from a seeded numpy generator; landmarks then move
through the very SimpleITK transform TorchIO resampled with. That transform maps output points to input
points, so a landmark x moves to the y solving T(y) = x, found by Newton's method to 1e-6 mm (exact
for the affine, sub-micrometre for the B-spline). Intensity transforms (machine-side artifacts) and
anisotropy keep the world geometry, so they leave landmarks where they are.

The faux-volume method of the source paper (one volume per landmark, transformed like the image) is
kept only as ``faux_volume_transport``, a test oracle and benchmark baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio

from .errors import LandmarkError
from .geometry import LPS_TO_RAS, Grid
from .resources import resources_dir

POLICIES = ("DA1", "DA2", "DA3", "DA4")
MACHINE_TRANSFORMS = ("RandomGhosting", "RandomSpike", "RandomBiasField", "RandomNoise", "RandomMotion", "RandomBlur",
                      "RandomGamma")


# ----------------------------------------------------------------------------------------- configuration
def load_config(source: str | Path = "default") -> dict:
    path = resources_dir() / "Augmentation" / "default.json" if str(source) == "default" else Path(source)
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LandmarkError(path, f"not a readable augmentation policy file ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("policies", {}), dict) \
            or not isinstance(config.get("machine", {}), dict):
        raise LandmarkError(path, "an augmentation policy file is a JSON object with 'policies' and 'machine' objects")
    probabilities = config.get("policies", {})
    if set(probabilities) - set(POLICIES) or not probabilities or not all(
            isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in probabilities.values()):
        raise LandmarkError(path, f"'policies' must give probabilities for some of {', '.join(POLICIES)}")
    if sum(probabilities.values()) <= 0:
        raise LandmarkError(path, "'policies': at least one probability must be above 0")
    unknown = set(config.get("machine", {})) - set(MACHINE_TRANSFORMS) - {"_doc"}
    if unknown:
        raise LandmarkError(path, f"unknown machine-side transforms: {', '.join(sorted(unknown))}")
    for name, settings in config.get("machine", {}).items():
        if name == "_doc":
            continue
        try:  # made here once, so that bad settings fail now and not in the middle of a dataset
            getattr(tio, name)(**settings)
        except (TypeError, ValueError, AttributeError) as error:
            raise LandmarkError(path, f"machine-side transform {name}: bad settings ({error})") from None
    for key, low, high in (("machine_probability", 0, 1), ("max_redraws", 0, 1000)):
        value = config.get(key, low)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise LandmarkError(path, f"'{key}' must be a number from {low} to {high}")
    if config.get("out_of_view", "redraw") not in ("redraw", "flag"):
        raise LandmarkError(path, "'out_of_view' must be 'redraw' or 'flag'")
    return config


def load_policies(source: str | Path = "default") -> "Augmenter":
    return Augmenter(load_config(source))


# ------------------------------------------------------------------------------------------ conversions
def to_torchio(image: sitk.Image) -> tio.ScalarImage:
    array, affine = tio.io.sitk_to_nib(image)
    return tio.ScalarImage(tensor=torch.as_tensor(array, dtype=torch.float32), affine=affine)


def from_torchio(image: tio.ScalarImage) -> sitk.Image:
    return sitk.Cast(tio.io.nib_to_sitk(image.data, image.affine), sitk.sitkFloat32)


# ------------------------------------------------------------------------------------ exact transport
def invert_points(transform: sitk.Transform, points_ras: np.ndarray, tolerance_mm: float = 1e-6,
                  max_iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """For each x, the y with transform(y) = x (RAS in and out), and the final residual |T(y) - x| in mm.

    Newton's method with a central-difference Jacobian; starts at x. NaN points stay NaN.
    """
    targets = np.asarray(points_ras, dtype=float) @ LPS_TO_RAS  # to LPS (LPS_TO_RAS is its own inverse)
    solutions = targets.copy()
    residuals = np.zeros(len(targets))
    step = 0.25  # mm, for the Jacobian
    for n, x in enumerate(targets):
        if not np.isfinite(x).all():
            residuals[n] = np.nan
            continue
        y = x.copy()
        for _ in range(max_iterations):
            r = np.asarray(transform.TransformPoint(tuple(y))) - x
            if np.abs(r).max() < tolerance_mm:
                break
            jacobian = np.empty((3, 3))
            for axis in range(3):
                delta = np.zeros(3)
                delta[axis] = step
                jacobian[:, axis] = (np.asarray(transform.TransformPoint(tuple(y + delta)))
                                     - np.asarray(transform.TransformPoint(tuple(y - delta)))) / (2 * step)
            y = y - np.linalg.solve(jacobian, r)
        solutions[n] = y
        residuals[n] = np.linalg.norm(np.asarray(transform.TransformPoint(tuple(y))) - x)
    return solutions @ LPS_TO_RAS, residuals


# ------------------------------------------------------------------------------------------- policies
@dataclass
class Applied:
    """What one augmentation did: the policy, the transforms in order, and the spatial ones for transport."""

    policy: str
    steps: list = field(default_factory=list)  # (name, parameters) for the manifest
    spatial: list = field(default_factory=list)  # TorchIO deterministic spatial transforms, in order
    residual_mm: float = 0.0
    flagged: list = field(default_factory=list)  # indices of landmarks flagged missing (out of view)


class Augmenter:
    """Callable (image, landmarks RAS, numpy Generator) -> (image, landmarks RAS), for the training data."""

    def __init__(self, config: dict):
        self.config = config
        names = [p for p in POLICIES if config["policies"].get(p, 0) > 0]
        weights = np.array([config["policies"][p] for p in names], dtype=float)
        self.policy_names, self.policy_weights = names, weights / weights.sum()
        self.machine = {k: v for k, v in config.get("machine", {}).items() if k != "_doc"}

    def __call__(self, image: sitk.Image, landmarks_ras: np.ndarray, rng: np.random.Generator):
        image, landmarks, _ = self.augment(image, landmarks_ras, rng)
        return image, landmarks

    def augment(self, image: sitk.Image, landmarks_ras: np.ndarray, rng: np.random.Generator,
                policy: str | None = None):
        """The augmented image, the transported landmarks and a record of what was applied."""
        grid = Grid.of(image)
        redraws = int(self.config.get("max_redraws", 10)) if self.config.get("out_of_view", "redraw") == "redraw" else 0
        for _ in range(redraws + 1):
            chosen = policy or str(rng.choice(self.policy_names, p=self.policy_weights))
            applied = self.draw(chosen, rng)
            moved, residuals = self.transport(applied, image, landmarks_ras)
            inside = grid.contains(moved) | ~np.isfinite(moved).all(-1)
            if inside.all():
                break
        applied.residual_mm = float(np.nanmax(residuals)) if np.isfinite(residuals).any() else 0.0
        if not inside.all():  # flag, never clip: the landmark becomes missing for the loss
            applied.flagged = [int(i) for i in np.flatnonzero(~inside)]
            moved[~inside] = np.nan
        return self.apply(applied, image, rng), moved, applied

    # -- drawing parameters
    def draw(self, policy: str, rng: np.random.Generator) -> Applied:
        applied = Applied(policy)
        machine = list(self.machine)
        if policy == "DA1":
            self._draw_patient(applied, rng, single=True)
            applied.steps.append((machine[rng.integers(len(machine))], {}))
        elif policy == "DA2":
            chosen = [m for m in machine if rng.random() < self.config.get("machine_probability", 0.5)]
            chosen = chosen or [machine[rng.integers(len(machine))]]
            applied.steps.extend((m, {}) for m in chosen)
        elif policy == "DA3":
            self._draw_patient(applied, rng, single=False)
        elif policy == "DA4":
            self._draw_elastic(applied, rng)
        else:
            raise ValueError(f"unknown policy {policy!r}")
        return applied

    def _draw_patient(self, applied: Applied, rng, single: bool) -> None:
        patient = self.config["patient"]
        use_affine, use_anisotropy = True, rng.random() < patient["anisotropy"].get("probability", 0.5)
        if single:  # DA1: exactly one patient-side variation
            use_affine = rng.random() < 0.5
            use_anisotropy = not use_affine
        if use_affine:
            a = patient["affine"]
            degrees = rng.uniform(-a["degrees"], a["degrees"], 3)
            translation = rng.uniform(-a["translation_mm"], a["translation_mm"], 3)
            scales = rng.uniform(*a["scales"], 1 if a.get("isotropic", True) else 3) * np.ones(3)
            transform = tio.Affine(scales=tuple(scales), degrees=tuple(degrees), translation=tuple(translation),
                                   default_pad_value="minimum")
            applied.spatial.append(transform)
            applied.steps.append(("Affine", {"degrees": degrees.round(3).tolist(),
                                             "translation_mm": translation.round(3).tolist(),
                                             "scales": scales.round(4).tolist()}))
        if use_anisotropy:
            factor = float(rng.uniform(*patient["anisotropy"]["downsampling"]))
            axis = int(rng.integers(3))
            applied.steps.append(("Anisotropy", {"axis": axis, "downsampling": round(factor, 3)}))

    def _draw_elastic(self, applied: Applied, rng) -> None:
        e = self.config["elastic"]
        n, limit, locked = int(e["num_control_points"]), float(e["max_displacement_mm"]), int(e["locked_borders"])
        field_ = rng.uniform(-limit, limit, (n, n, n, 3))
        for i in range(locked):  # no displacement at the borders, as TorchIO's RandomElasticDeformation does
            field_[i], field_[-1 - i] = 0, 0
            field_[:, i], field_[:, -1 - i] = 0, 0
            field_[:, :, i], field_[:, :, -1 - i] = 0, 0
        transform = tio.ElasticDeformation(control_points=field_, max_displacement=(limit,) * 3)
        applied.spatial.append(transform)
        applied.steps.append(("ElasticDeformation", {"num_control_points": n, "max_displacement_mm": limit,
                                                     "rms_displacement_mm": round(float(np.sqrt((field_ ** 2).mean())), 3)}))

    # -- applying
    @staticmethod
    def spatial_sitk_transform(transform, image: tio.ScalarImage | sitk.Image) -> sitk.Transform:
        """The SimpleITK transform (output point -> input point) TorchIO resamples with."""
        if isinstance(transform, tio.Affine):
            return transform.get_affine_transform(image if isinstance(image, tio.ScalarImage) else to_torchio(image))
        return transform.get_bspline_transform(image if isinstance(image, sitk.Image) else from_torchio(image))

    def transport(self, applied: Applied, image: sitk.Image, landmarks_ras: np.ndarray):
        points = np.asarray(landmarks_ras, dtype=float)
        residuals = np.zeros(len(points))
        for transform in applied.spatial:  # geometry never changes, so every step sees the same grid
            points, r = invert_points(self.spatial_sitk_transform(transform, image), points)
            residuals = np.maximum(residuals, np.nan_to_num(r))
        return points, residuals

    def apply(self, applied: Applied, image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
        subject = tio.Subject(image=to_torchio(image))
        seed = int(rng.integers(2 ** 31))
        with torch.random.fork_rng(devices=[]):  # TorchIO's random transforms draw from torch's RNG
            torch.manual_seed(seed)
            spatial = iter(applied.spatial)
            for name, params in applied.steps:
                if name in ("Affine", "ElasticDeformation"):
                    transform = next(spatial)
                elif name == "Anisotropy":
                    f = params["downsampling"]
                    transform = tio.RandomAnisotropy(axes=(params["axis"],), downsampling=(f, f))
                else:
                    transform = getattr(tio, name)(**self.machine[name])
                subject = transform(subject)
        out = from_torchio(subject["image"])
        out.CopyInformation(image)  # no step changes the grid; keep its geometry bit for bit
        return out


# ------------------------------------------------------------------------------------- faux-volume oracle
def faux_volume_transport(applied: Applied, image: sitk.Image, landmarks_ras: np.ndarray) -> np.ndarray:
    """The source paper's method: a volume per landmark with one bright voxel at its nearest voxel,
    transformed with the image's spatial transforms, read back as the intensity centroid. Rounding to the
    voxel grid and interpolation blur make it approximate and slow; it exists to check and time the exact
    method against it."""
    grid = Grid.of(image)
    out = np.full((len(landmarks_ras), 3), np.nan)
    for n, point in enumerate(np.asarray(landmarks_ras, dtype=float)):
        ijk = np.rint(grid.to_index(point)).astype(int)
        if not np.isfinite(point).all() or (ijk < 0).any() or (ijk >= np.asarray(grid.size)).any():
            continue
        array = np.zeros(tuple(reversed(grid.size)), dtype=np.float32)
        array[ijk[2], ijk[1], ijk[0]] = 1.0
        faux = sitk.GetImageFromArray(array)
        faux.CopyInformation(image)
        subject = tio.Subject(image=to_torchio(faux))
        for transform in applied.spatial:
            subject = transform(subject)
        moved = sitk.GetArrayFromImage(from_torchio(subject["image"])).astype(np.float64)
        moved = np.clip(moved, 0, None)
        if moved.sum() <= 0:
            continue
        k, j, i = np.indices(moved.shape)
        centroid = np.array([(moved * i).sum(), (moved * j).sum(), (moved * k).sum()]) / moved.sum()
        out[n] = grid.to_ras(centroid)
    return out


# ------------------------------------------------------------------------------------ offline and preview
def augment_dataset(source, output, copies: int, seed: int, schema, config_source="default", progress=None,
                    overwrite: bool = False) -> Path:
    """Write ``copies`` augmented copies of every case (volume + .mrk.json) and a manifest.csv naming the
    policy and steps drawn per copy. The input is only read; an output inside it is refused; file names
    come from case names made safe (a manifest's names cannot reach outside ``output``)."""
    import csv as _csv
    import io as _io

    from .data import discover_cases, read_case
    from .fileio import (atomic_write_text, check_outputs, check_writable_dir, safe_name,
                         write_markups_json, write_volume)

    cases = discover_cases(source)
    source_dir = Path(source).resolve() if Path(source).is_dir() else Path(source).resolve().parent
    output = Path(output)
    if output.resolve() == source_dir or source_dir in output.resolve().parents:
        raise LandmarkError(output, "output must not be inside the input dataset (inputs are never touched)")
    names = [f"{safe_name(case.name)}_aug{copy:03d}" for case in cases for copy in range(copies)]
    if len(set(names)) != len(names):
        raise LandmarkError(source, "two cases have the same name once made safe for files; rename one")
    inputs = [source, *(c.image for c in cases), *(c.landmarks for c in cases)]
    check_outputs([output / "manifest.csv", *(output / f"{n}{suffix}" for n in names for suffix in (".nii.gz", ".mrk.json"))],
                  inputs, overwrite)
    check_writable_dir(output)
    augmenter = load_policies(config_source)
    rows = []
    if progress:
        progress.start("augment", len(cases) * copies)
    for n, case in enumerate(cases):
        image, landmarks = read_case(case, schema)
        for copy in range(copies):
            rng = np.random.default_rng([seed, n, copy])
            out, moved, applied = augmenter.augment(image, landmarks, rng)
            name = f"{safe_name(case.name)}_aug{copy:03d}"
            write_volume(out, output / f"{name}.nii.gz")
            write_markups_json(output / f"{name}.mrk.json", schema, moved, name=name)
            rows.append({"image": f"{name}.nii.gz", "landmarks": f"{name}.mrk.json", "source": str(case.image),
                         "policy": applied.policy, "steps": json.dumps(applied.steps),
                         "flagged_missing": ";".join(schema.names[i] for i in applied.flagged),
                         "max_transport_residual_mm": f"{applied.residual_mm:.2e}"})
            if progress:
                progress.update(n * copies + copy + 1)
    text = _io.StringIO()
    writer = _csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output / "manifest.csv", text.getvalue())
    return output / "manifest.csv"


def preview(image: sitk.Image, landmarks_ras: np.ndarray, path, seed: int = 0, config_source="default") -> None:
    """A grid: the original and one draw of each policy (rows) in three orthogonal slices (columns), the
    transported landmarks in red and the original positions as small cyan crosses."""
    from . import figures

    augmenter = load_policies(config_source)
    rng = np.random.default_rng(seed)
    center = np.nanmean(landmarks_ras, axis=0)
    half = 0.5 * max(np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())) * 0.8
    figure, axes = figures.plt.subplots(5, 3, figsize=(9, 15))
    rows = [("original", image, landmarks_ras, "no transform")]
    for policy in POLICIES:
        out, moved, applied = augmenter.augment(image, landmarks_ras, rng, policy=policy)
        rows.append((policy, out, moved, ", ".join(name for name, _ in applied.steps)))
    for axes_row, (label, volume, points, steps) in zip(axes, rows):
        overlays = [(landmarks_ras, {"marker": "+", "s": 14, "c": "cyan", "linewidths": 0.8}),
                    (points, {"marker": "o", "s": 10, "facecolors": "none", "edgecolors": "red", "linewidths": 0.9})]
        figures.draw_slices(axes_row, volume, center, overlays, half_width_mm=half)
        axes_row[0].set_ylabel(f"{label}\n{steps}", fontsize=7)
    for ax, view in zip(axes[0], figures.VIEWS):
        ax.set_title(view, fontsize=9)
    figure.suptitle("Augmentation policies: red = transported landmarks, cyan + = original positions", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figures.save(figure, path)
