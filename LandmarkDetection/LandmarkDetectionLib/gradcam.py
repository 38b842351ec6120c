"""3D Grad-CAM per landmark (Selvaraju et al.; used for landmark heatmap networks by Patel et al.).

For landmark c and layer activations A (channels k), Grad-CAM is ReLU(sum_k alpha_k A_k) with
alpha_k the spatial mean of dy_c/dA_k. The default target y_c is the landmark's heatmap logit at its
argmax (the paper's formula); ``target="coordinate"`` uses the soft-argmax coordinates instead, one
gradient per axis, combined as sum_axes |sum_k alpha_k A_k| (a coordinate can move either way).

The gradient is that of the logits of the stage the layer belongs to (a coarse-to-fine network has one
heatmap per stage). A stage that works on patches holds one patch per landmark; each landmark's map comes
from its own patch and is placed back at the crop's position in the volume. The default layer is the
finest stage's (``LandmarkNetwork.gradcam_layer``).

Memory stays bounded: a forward hook makes the chosen layer's output a leaf, so autograd keeps a graph
only for the part of the network after it; one forward pass serves all landmarks, and gradients come
in chunks of landmarks. CAMs are resampled into the input image's own geometry and are not normalised
unless asked, so landmarks and models can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .errors import LandmarkError
from .geometry import Grid
from .heatmaps import soft_argmax, spatial_softmax
from .fileio import atomic_write_text, check_outputs, safe_name, write_volume
from .align import Alignment
from .detect import model_input
from .modelfile import LandmarkModel

TARGETS = ("argmax", "coordinate")


@dataclass
class CamResult:
    cams: np.ndarray  # (L, d, h, w) float32, each on its own grid (``grids``)
    grids: list[Grid]  # per CAM: the explained layer's grid, in the model's input frame (patch layers: the crop)
    landmarks: list[int]  # schema indices
    predicted_ras: np.ndarray  # (K, 3) the model's prediction on this volume
    layer: str
    target: str
    alignment: Alignment | None = None  # models that align first: ``grids`` lie in the reference frame
    input_grid: Grid | None = None  # the model's input grid (same frame as ``grids``)

    def grid_to_ras(self, n: int, ijk: np.ndarray) -> np.ndarray:
        """Scan RAS of voxel indices of CAM ``n``'s grid."""
        ras = self.grids[n].to_ras(ijk)
        return ras if self.alignment is None else self.alignment.to_scan(ras)

    def volume(self, n: int, reference: sitk.Image, normalize: bool = False) -> sitk.Image:
        """CAM ``n`` resampled into ``reference``'s geometry (origin, spacing, direction kept exactly);
        zero outside the CAM's own grid (a patch layer's map lands at its crop's place)."""
        cam = self.cams[n] / max(float(self.cams[n].max()), 1e-12) if normalize else self.cams[n]
        image = sitk.GetImageFromArray(cam.astype(np.float32))
        image.SetOrigin(self.grids[n].origin)
        image.SetSpacing(self.grids[n].spacing)
        image.SetDirection(self.grids[n].direction)
        # Resample maps output (scan) points to input (CAM) points: the inverse of reference -> scan.
        transform = sitk.Transform() if self.alignment is None else self.alignment.sitk_transform().GetInverse()
        return sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _check_layer(network, layer: str):
    layers = network.gradcam_layers()
    if layer not in layers:
        raise LandmarkError(None, f"--layer {layer}: not a layer Grad-CAM can explain; layers are {', '.join(layers)} "
                                  f"(default {network.gradcam_layer})")
    return dict(network.named_modules())[layer]


def compute_gradcam(model: LandmarkModel, image: sitk.Image, landmarks: list[int] | None = None,
                    layer: str | None = None, target: str = "argmax", device="cpu", chunk: int = 4) -> CamResult:
    """Grad-CAM of ``layer`` (default: the architecture's, the finest stage) for each landmark: the gradient
    of the heatmap logits of the stage the layer belongs to, w.r.t. the layer's output."""
    if target not in TARGETS:
        raise LandmarkError(None, f"--target {target}: expected one of {', '.join(TARGETS)}")
    network = model.network.to(device).eval()
    layer = layer or network.gradcam_layer
    layer_module = _check_layer(network, layer)
    landmarks = list(range(len(model.schema))) if landmarks is None else list(dict.fromkeys(landmarks))
    prepared = model_input(model, image)
    x = prepared.tensor(device)
    grid = prepared.grid.grid if prepared.alignment is not None else prepared.grid  # the network's frame
    captured = {"calls": 0}

    # The hooks act only where gradients are on: a forward pass without them (a prediction) is not explained.
    def make_leaf(_module, _inputs, output):  # the graph starts here: nothing before is kept
        if not torch.is_grad_enabled():
            return None
        captured["calls"] += 1
        leaf = output.detach().requires_grad_(True)
        captured["activation"] = leaf
        return leaf

    def keep_logits(_module, _inputs, output):
        if torch.is_grad_enabled():
            captured["logits"] = output

    # make_leaf first: where the layer is the logits module itself, keep_logits then sees the leaf.
    hooks = [layer_module.register_forward_hook(make_leaf),
             dict(network.named_modules())[network.gradcam_logits_of(layer)].register_forward_hook(keep_logits)]
    requires = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            output, indices = network.gradcam_forward(x)
        if captured["calls"] != 1:
            raise LandmarkError(None, f"--layer {layer}: runs {captured['calls']} times in one forward pass; "
                                      "Grad-CAM needs a layer that runs once")
        activation, logits = captured["activation"], captured["logits"]
        per_landmark = activation.shape[0] > 1  # a patch stage: batch row = landmark
        cams = []
        for begin in range(0, len(landmarks), chunk):
            chosen = landmarks[begin:begin + chunk]
            if target == "argmax":
                outputs = [logits[0, chosen].flatten(1).max(dim=1).values]
            else:
                coordinates = soft_argmax(spatial_softmax(logits[:, chosen]))[0]  # (m, 3)
                outputs = [coordinates[:, axis] for axis in range(3)]
            rows = chosen if per_landmark else [0] * len(chosen)
            features = activation.detach()[rows]  # (m, C, d, h, w)
            combined = 0
            for y in outputs:
                if per_landmark:  # y[n] depends on its own patch only: one backward pass gives every row
                    grads = torch.autograd.grad(y.sum(), activation, retain_graph=True)[0][rows]
                else:  # one backward pass per landmark, batched
                    eye = torch.eye(len(chosen), device=y.device, dtype=y.dtype)
                    grads = torch.autograd.grad(y, activation, grad_outputs=eye, is_grads_batched=True,
                                                retain_graph=True)[0][:, 0]
                alpha = grads.mean(dim=(2, 3, 4))  # (m, C)
                weighted = torch.einsum("mc,mcdhw->mdhw", alpha, features)
                combined = combined + (F.relu(weighted) if target == "argmax" else weighted.abs())
            cams.append(combined.detach().float().cpu())
        first, step = network.gradcam_placement(layer, output)
    finally:
        for hook in hooks:
            hook.remove()
        for p, r in zip(network.parameters(), requires):
            p.requires_grad_(r)
    predicted = prepared.grid.to_ras(indices[0].double().cpu().numpy())
    layer_size = tuple(reversed(activation.shape[2:]))  # (i, j, k)
    logit_size = tuple(reversed(logits.shape[2:]))
    first, step = first.double().numpy(), step.double().numpy()
    grids = [_layer_grid(grid, first[c if len(first) > 1 else 0], step, logit_size, layer_size) for c in landmarks]
    return CamResult(torch.cat(cams).numpy().astype(np.float32), grids, landmarks, predicted, layer, target,
                     prepared.alignment, grid)


def _layer_grid(grid: Grid, first: np.ndarray, step: np.ndarray, logit_size, layer_size) -> Grid:
    """The grid of a layer of ``layer_size`` voxels (i, j, k) inside ``grid`` (the model's input grid).
    Its stage's logit voxel n sits at input index ``first + n * step``; a layer smaller than the logits by a
    factor f (pooling inside the stage) has voxel v at logit index (v + 1/2) f - 1/2 (pooling keeps
    voxel centres, it does not align corners)."""
    factor = np.asarray(logit_size, dtype=float) / np.asarray(layer_size, dtype=float)
    start_index = first + step * (factor - 1) / 2  # input index of the layer's voxel 0
    spacing = np.asarray(grid.spacing, dtype=float)
    direction = np.asarray(grid.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(grid.origin, dtype=float) + direction @ (start_index * spacing)
    return Grid(tuple(int(m) for m in layer_size), tuple(float(v) for v in step * factor * spacing),
                tuple(float(v) for v in origin), grid.direction)


# ------------------------------------------------------------------------------------------ focus metrics
def _resample_mass(mass: np.ndarray, source: Grid, target: Grid) -> np.ndarray:
    """A (d, h, w) mass distribution on ``source`` carried onto ``target`` (trilinear in density, zero
    outside ``source``), as mass per ``target`` voxel."""
    from scipy.ndimage import map_coordinates

    k, j, i = np.indices(tuple(reversed(target.size)))
    ijk = source.to_index(target.to_ras(np.stack([i, j, k], -1).reshape(-1, 3)))
    density = map_coordinates(mass, ijk[:, ::-1].T, order=1, mode="constant", cval=0.0)
    return density.reshape(k.shape) * np.prod(target.spacing) / np.prod(source.spacing)


def _overlaps(result: CamResult, normalised: np.ndarray, n: int) -> np.ndarray:
    """Histogram intersection of CAM ``n`` with every other CAM (each normalised to a total of 1)."""
    others = [m for m in range(len(result.landmarks)) if m != n]
    grids = result.grids
    if all(g == grids[n] for g in grids):  # one shared grid: compare voxel by voxel
        return np.minimum(normalised[n][None], normalised[others]).sum(1)
    shape = tuple(reversed(grids[n].size))
    here = normalised[n].reshape(shape)
    values = []
    for m in others:
        # Skip maps whose grids cannot meet (the usual case for patches of landmarks far apart).
        reach = sum(np.linalg.norm(np.asarray(g.size) * g.spacing) / 2 for g in (grids[n], grids[m]))
        if np.linalg.norm(grids[n].center_ras() - grids[m].center_ras()) > reach:
            values.append(0.0)
            continue
        moved = _resample_mass(normalised[m].reshape(tuple(reversed(grids[m].size))), grids[m], grids[n])
        values.append(float(np.minimum(here, moved).sum()))
    return np.asarray(values)


def focus_metrics(result: CamResult, radius_mm: float = 10.0) -> list[dict]:
    """Per landmark: the fraction of CAM mass within ``radius_mm`` of the predicted landmark (and, for
    reference, the fraction of the model's input volume there), the distance from the CAM's centre of
    mass to the landmark, and the largest overlap (histogram intersection of normalised CAMs) with
    another landmark."""
    masses = result.cams.reshape(len(result.landmarks), -1).astype(np.float64)
    totals = masses.sum(1, keepdims=True)
    normalised = np.divide(masses, totals, out=np.zeros_like(masses), where=totals > 0)
    # The sphere's share of the input volume (an upper bound for landmarks near the edge): a patch CAM's
    # own grid is too small to compare against.
    reference = result.input_grid or result.grids[0]
    volume_share = min(1.0, 4 / 3 * np.pi * radius_mm ** 3 / np.prod(np.asarray(reference.size) * reference.spacing))
    rows, ras_cache = [], {}
    for n, landmark in enumerate(result.landmarks):
        key = result.grids[n]
        if key not in ras_cache:
            k, j, i = np.indices(result.cams.shape[1:])
            ras_cache[key] = result.grid_to_ras(n, np.stack([i, j, k], -1).reshape(-1, 3))
        ras = ras_cache[key]
        target = result.predicted_ras[landmark]
        near = np.linalg.norm(ras - target, axis=-1) <= radius_mm
        weights = normalised[n]
        com = (ras * weights[:, None]).sum(0) if weights.sum() > 0 else np.full(3, np.nan)
        overlaps = _overlaps(result, normalised, n) if len(masses) > 1 else []
        best = int(np.argmax(overlaps)) if len(overlaps) else None
        others = [m for m in range(len(result.landmarks)) if m != n]
        rows.append({"landmark": landmark, "mass_within_r": float(weights[near].sum()),
                     "volume_within_r": float(volume_share), "com_distance_mm": float(np.linalg.norm(com - target)),
                     "max_overlap": float(overlaps[best]) if best is not None else float("nan"),
                     "max_overlap_with": result.landmarks[others[best]] if best is not None else None})
    return rows


def write_cams(result: CamResult, model: LandmarkModel, reference: sitk.Image, output: Path, stem: str,
               fmt: str = "nii.gz", single_file: bool = False, normalize: bool = False, overwrite: bool = False,
               inputs=()) -> list[Path]:
    """One file per landmark (``STEM_gradcam_NAME.nii.gz``) or one multi-component file."""
    names = [model.schema.landmarks[i].name for i in result.landmarks]
    if single_file:
        paths = [output / f"{safe_name(stem)}_gradcam.{fmt}"]
    else:
        paths = [output / f"{safe_name(stem)}_gradcam_{safe_name(name)}.{fmt}" for name in names]
    check_outputs(paths, inputs, overwrite)
    volumes = [result.volume(n, reference, normalize) for n in range(len(result.landmarks))]
    if single_file:
        write_volume(sitk.Compose(volumes) if len(volumes) > 1 else volumes[0], paths[0])
    else:
        for path, volume in zip(paths, volumes):
            write_volume(volume, path)
    return paths


# --------------------------------------------------------------------------------------------- focus table
def cam_prefix(stem: str, model_index: int, models: int) -> str:
    """File-name prefix of one model's CAMs: the volume's stem, with _modelA / _modelB when comparing."""
    return stem if models == 1 else f"{stem}_model{'AB'[model_index]}"


def write_focus_table(output: Path, stem: str, schema, predicted_ras: np.ndarray, tables: list[list[dict]],
                      radius_mm: float, overwrite: bool = False) -> Path:
    """``STEM_gradcam_focus.csv``: per landmark, each model's focus metrics (columns suffixed A, B)."""
    header = ["landmark", "sub_anatomy", "x", "y", "z"]
    for label in "AB"[: len(tables)]:
        header += [f"mass_within_{radius_mm:g}mm_{label}", f"com_distance_mm_{label}", f"max_overlap_{label}",
                   f"max_overlap_with_{label}"]
    lines = [",".join(header)]
    for n, row in enumerate(tables[0]):
        lm = schema.landmarks[row["landmark"]]
        cells = [lm.name, lm.sub_anatomy, *(f"{v:.3f}" for v in predicted_ras[row["landmark"]])]
        for rows in tables:
            r = rows[n]
            other = schema.landmarks[r["max_overlap_with"]].name if r["max_overlap_with"] is not None else ""
            cells += [f"{r['mass_within_r']:.4f}", f"{r['com_distance_mm']:.2f}", f"{r['max_overlap']:.4f}", other]
        lines.append(",".join(cells))
    path = output / f"{safe_name(stem)}_gradcam_focus.csv"
    check_outputs([path], overwrite=overwrite)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def format_focus_table(schema, tables: list[list[dict]]) -> str:
    """The printed focus table: CAM mass near the landmark and centre-of-mass distance, per model."""
    labels = "AB"[: len(tables)]
    lines = [f"{'':<28}" + "".join(f"{'mass<r ' + label:>12}{'COM mm ' + label:>12}" for label in labels)]

    def centre(row):  # an empty map (no positive evidence) has no centre of mass
        return f"{'empty':>12}" if np.isnan(row["com_distance_mm"]) else f"{row['com_distance_mm']:>12.1f}"

    for n, row in enumerate(tables[0]):
        cells = "".join(f"{rows[n]['mass_within_r']:>12.3f}{centre(rows[n])}" for rows in tables)
        lines.append(f"{schema.landmarks[row['landmark']].name[:27]:<28}{cells}")
    distances = [[r["com_distance_mm"] for r in rows if not np.isnan(r["com_distance_mm"])] for rows in tables]
    means = "".join(f"{np.mean([r['mass_within_r'] for r in rows]):>12.3f}"
                    f"{np.mean(d) if d else float('nan'):>12.1f}" for rows, d in zip(tables, distances))
    lines.append(f"{'mean':<28}{means}")
    if any(np.isnan(r["com_distance_mm"]) for rows in tables for r in rows):
        lines.append("empty: no positive evidence at this layer (Grad-CAM keeps only what raises the landmark's "
                     "heatmap peak); --target coordinate shows what moves the landmark either way")
    return "\n".join(lines)
