"""Training losses of the source paper: MSE on coordinates and the Mixed loss.

Mixed = alpha * L_heatmap + (1 - alpha) * L_coordinate (paper: alpha = 0.4). L_coordinate is the mean
squared radial error in mm^2; L_heatmap is the dimensionless relative heatmap error of
``heatmaps.heatmap_squared_error``. Landmarks marked missing (mask False) do not contribute.
"""

from __future__ import annotations

import torch

from .heatmaps import heatmap_squared_error

LOSSES = ("mse", "mixed")


def coordinate_mse(pred_ijk, target_ijk, spacing_mm, mask):
    """Mean squared radial error in mm^2 over the present landmarks."""
    spacing = torch.as_tensor(spacing_mm, dtype=pred_ijk.dtype, device=pred_ijk.device)
    squared = (((pred_ijk - target_ijk) * spacing) ** 2).sum(-1)
    return _masked_mean(squared, mask)


def _masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def landmark_loss(kind: str, probs, pred_ijk, target_ijk, mask, spacing_mm, sigma_mm: float, alpha: float = 0.4):
    coordinate = coordinate_mse(pred_ijk, target_ijk, spacing_mm, mask)
    if kind == "mse":
        return coordinate
    if kind != "mixed":
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
    sigma_vox = [sigma_mm / s for s in spacing_mm]
    safe_target = torch.where(mask.unsqueeze(-1), target_ijk, torch.zeros_like(target_ijk))
    heatmap = _masked_mean(heatmap_squared_error(probs, safe_target, sigma_vox), mask)
    return alpha * heatmap + (1.0 - alpha) * coordinate
