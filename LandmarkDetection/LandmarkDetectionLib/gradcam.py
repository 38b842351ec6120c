"""3D Grad-CAM per landmark (Selvaraju et al.; used for landmark heatmap networks by Patel et al.).

For landmark c and layer activations A (channels k), Grad-CAM is ReLU(sum_k alpha_k A_k) with
alpha_k the spatial mean of dy_c/dA_k. The default target y_c is the landmark's heatmap logit at its
argmax (the paper's formula); ``target="coordinate"`` uses the soft-argmax coordinates instead, one
gradient per axis, combined as sum_axes |sum_k alpha_k A_k| (a coordinate can move either way).

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
    cams: np.ndarray  # (L, d, h, w) float32, on the explained layer's own grid
    grid: Grid  # that grid: the model's input grid, or a coarser one sharing its corners
    landmarks: list[int]  # schema indices
    predicted_ras: np.ndarray  # (K, 3) the model's prediction on this volume
    layer: str
    target: str
    alignment: Alignment | None = None  # models that align first: ``grid`` lies in the reference frame

    def grid_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """Scan RAS of voxel indices of the CAM grid."""
        ras = self.grid.to_ras(ijk)
        return ras if self.alignment is None else self.alignment.to_scan(ras)

    def volume(self, n: int, reference: sitk.Image, normalize: bool = False) -> sitk.Image:
        """CAM ``n`` resampled into ``reference``'s geometry (origin, spacing, direction kept exactly)."""
        cam = self.cams[n] / max(float(self.cams[n].max()), 1e-12) if normalize else self.cams[n]
        image = sitk.GetImageFromArray(cam.astype(np.float32))
        image.SetOrigin(self.grid.origin)
        image.SetSpacing(self.grid.spacing)
        image.SetDirection(self.grid.direction)
        # Resample maps output (scan) points to input (CAM) points: the inverse of reference -> scan.
        transform = sitk.Transform() if self.alignment is None else self.alignment.sitk_transform().GetInverse()
        return sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _module(network, name: str):
    modules = dict(network.named_modules())
    if name not in modules:
        candidates = ", ".join(n for n, m in network.named_modules() if isinstance(m, torch.nn.Conv3d))
        raise LandmarkError(None, f"--layer {name}: no such layer; convolution layers are {candidates}")
    return modules[name]


def compute_gradcam(model: LandmarkModel, image: sitk.Image, landmarks: list[int] | None = None,
                    layer: str | None = None, target: str = "argmax", device="cpu", chunk: int = 4) -> CamResult:
    if target not in TARGETS:
        raise LandmarkError(None, f"--target {target}: expected one of {', '.join(TARGETS)}")
    network = model.network.to(device).eval()
    layer, logits_name = layer or network.gradcam_layer, network.gradcam_logits
    landmarks = list(range(len(model.schema))) if landmarks is None else list(landmarks)
    prepared = model_input(model, image)
    x = prepared.tensor(device)
    predicted = prepared.grid.to_ras(network.predict_indices(x, prepared.start_tensor(device))[0].double().cpu().numpy())
    grid = prepared.grid.grid if prepared.alignment is not None else prepared.grid
    captured = {}

    def make_leaf(_module, _inputs, output):  # the graph starts here: nothing before is kept
        leaf = output.detach().requires_grad_(True)
        captured["activation"] = leaf
        return leaf

    def keep_logits(_module, _inputs, output):
        captured["logits"] = output

    hooks = [_module(network, layer).register_forward_hook(make_leaf),
             _module(network, logits_name).register_forward_hook(keep_logits)]
    requires = [p.requires_grad for p in network.parameters()]
    for p in network.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            network(x)
        activation, logits = captured["activation"], captured["logits"]
        cams = []
        for start in range(0, len(landmarks), chunk):
            chosen = landmarks[start:start + chunk]
            if target == "argmax":
                flat = logits[0, chosen].flatten(1)
                outputs = [flat.max(dim=1).values]
            else:
                coordinates = soft_argmax(spatial_softmax(logits[:, chosen]))[0]  # (m, 3)
                outputs = [coordinates[:, axis] for axis in range(3)]
            combined = 0
            for y in outputs:
                eye = torch.eye(len(chosen), device=y.device, dtype=y.dtype)
                grads = torch.autograd.grad(y, activation, grad_outputs=eye, is_grads_batched=True,
                                            retain_graph=True)[0][:, 0]  # (m, C, d, h, w)
                alpha = grads.mean(dim=(2, 3, 4))
                weighted = torch.einsum("mc,cdhw->mdhw", alpha, activation[0].detach())
                combined = combined + (F.relu(weighted) if target == "argmax" else weighted.abs())
            cams.append(combined.detach().cpu())
    finally:
        for hook in hooks:
            hook.remove()
        for p, r in zip(network.parameters(), requires):
            p.requires_grad_(r)
    layer_grid = _layer_grid(grid, tuple(reversed(activation.shape[2:])))
    return CamResult(torch.cat(cams).numpy().astype(np.float32), layer_grid, landmarks, predicted, layer, target,
                     prepared.alignment)


def _layer_grid(grid: Grid, size) -> Grid:
    """The grid of a layer of ``size`` voxels (i, j, k) whose corner voxels sit on the input grid's corners
    (as trilinear resizing with aligned corners makes them)."""
    spacing = tuple(s * (n - 1) / max(m - 1, 1) for s, n, m in zip(grid.spacing, grid.size, size))
    return Grid(tuple(int(m) for m in size), spacing, grid.origin, grid.direction)


# ------------------------------------------------------------------------------------------ focus metrics
def focus_metrics(result: CamResult, radius_mm: float = 10.0) -> list[dict]:
    """Per landmark: the fraction of CAM mass within ``radius_mm`` of the predicted landmark (and, for
    reference, the fraction of the volume there), the distance from the CAM's centre of mass to the
    landmark, and the largest overlap (histogram intersection of normalised CAMs) with another landmark."""
    k, j, i = np.indices(result.cams.shape[1:])
    ras = result.grid_to_ras(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*result.cams.shape[1:], 3)
    masses = result.cams.reshape(len(result.landmarks), -1).astype(np.float64)
    totals = masses.sum(1, keepdims=True)
    normalised = np.divide(masses, totals, out=np.zeros_like(masses), where=totals > 0)
    rows = []
    for n, landmark in enumerate(result.landmarks):
        target = result.predicted_ras[landmark]
        distance = np.linalg.norm(ras - target, axis=-1).ravel()
        near = distance <= radius_mm
        weights = normalised[n]
        com = (ras.reshape(-1, 3) * weights[:, None]).sum(0) if weights.sum() > 0 else np.full(3, np.nan)
        overlaps = np.minimum(normalised[n][None], np.delete(normalised, n, axis=0)).sum(1) if len(masses) > 1 else []
        best = int(np.argmax(overlaps)) if len(overlaps) else None
        others = [m for m in range(len(result.landmarks)) if m != n]
        rows.append({"landmark": landmark, "mass_within_r": float(weights[near].sum()),
                     "volume_within_r": float(near.mean()), "com_distance_mm": float(np.linalg.norm(com - target)),
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
    for n, row in enumerate(tables[0]):
        cells = "".join(f"{rows[n]['mass_within_r']:>12.3f}{rows[n]['com_distance_mm']:>12.1f}" for rows in tables)
        lines.append(f"{schema.landmarks[row['landmark']].name[:27]:<28}{cells}")
    means = "".join(f"{np.mean([r['mass_within_r'] for r in rows]):>12.3f}"
                    f"{np.nanmean([r['com_distance_mm'] for r in rows]):>12.1f}" for rows in tables)
    lines.append(f"{'mean':<28}{means}")
    return "\n".join(lines)
