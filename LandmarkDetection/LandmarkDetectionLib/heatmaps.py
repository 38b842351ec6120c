"""Spatial softmax, soft-argmax and separable Gaussian heatmap targets.

Coordinates are continuous voxel indices in (i, j, k) order for tensors laid out (..., k, j, i).
Nothing here builds a dense K x volume target: the Gaussian target is a product of three 1D
Gaussians, so every sum over it factorises into 1D sums.
"""

from __future__ import annotations

import torch


def _axis_grids(shape_dhw, device, dtype):
    depth, height, width = shape_dhw
    return (torch.arange(width, device=device, dtype=dtype), torch.arange(height, device=device, dtype=dtype),
            torch.arange(depth, device=device, dtype=dtype))


def spatial_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the three spatial axes of (B, K, D, H, W) logits, in float32."""
    b, k = logits.shape[:2]
    return torch.softmax(logits.float().reshape(b, k, -1), dim=-1).reshape(logits.shape)


def soft_argmax(probs: torch.Tensor) -> torch.Tensor:
    """Expected voxel index (B, K, 3) in (i, j, k) order of a (B, K, D, H, W) probability volume."""
    xi, yj, zk = _axis_grids(probs.shape[2:], probs.device, probs.dtype)
    i = (probs.sum(dim=(2, 3)) * xi).sum(-1)
    j = (probs.sum(dim=(2, 4)) * yj).sum(-1)
    k = (probs.sum(dim=(3, 4)) * zk).sum(-1)
    return torch.stack((i, j, k), dim=-1)


def gaussian_1d(centers: torch.Tensor, sigma: float, length: int) -> torch.Tensor:
    """Normalised 1D Gaussians (…, length) centred at ``centers`` (…) with ``sigma`` voxels."""
    axis = torch.arange(length, device=centers.device, dtype=torch.float32)
    g = torch.exp(-0.5 * ((axis - centers.unsqueeze(-1).float()) / sigma) ** 2)
    return g / g.sum(-1, keepdim=True).clamp_min(1e-12)


def heatmap_squared_error(probs: torch.Tensor, target_ijk: torch.Tensor, sigma_vox) -> torch.Tensor:
    """Per-landmark relative squared error sum((p - t)^2) / sum(t^2), shape (B, K).

    ``t`` is the normalised Gaussian at the target (a probability volume like ``p``), ``sigma_vox`` its
    width per axis (i, j, k). Expanding the square, sum(p t) and sum(t^2) factorise over the axes, so
    the dense target is never built. Dividing by sum(t^2) makes the loss dimensionless: 0 for a perfect
    heatmap, about 1 for a heatmap that puts no mass near the target. A target outside the volume (a
    patch that missed its landmark) is moved to the nearest border voxel for this term, where the best
    heatmap then is; the coordinate loss still sees the true distance.
    """
    depth, height, width = probs.shape[2:]
    upper = torch.tensor([width - 1, height - 1, depth - 1], device=target_ijk.device, dtype=target_ijk.dtype)
    target_ijk = torch.minimum(torch.clamp(target_ijk, min=0), upper)
    gi = gaussian_1d(target_ijk[..., 0], float(sigma_vox[0]), width)  # (B, K, W)
    gj = gaussian_1d(target_ijk[..., 1], float(sigma_vox[1]), height)
    gk = gaussian_1d(target_ijk[..., 2], float(sigma_vox[2]), depth)
    p_dot_t = torch.einsum("bkdhw,bkw,bkh,bkd->bk", probs, gi, gj, gk)
    t_dot_t = (gi * gi).sum(-1) * (gj * gj).sum(-1) * (gk * gk).sum(-1)
    p_dot_p = (probs * probs).sum(dim=(2, 3, 4))
    return (p_dot_p - 2.0 * p_dot_t + t_dot_t) / t_dot_t
