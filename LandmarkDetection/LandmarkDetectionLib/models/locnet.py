"""Multi-scale coarse-to-fine Loc-Net (after Ma, Gupta and Sabuncu): a chain of small U-Net blocks,
each ending in a centre-of-mass (soft-argmax) layer, linked by differentiable crop-and-resample.

Stage 0 sees the whole input grid resampled to the coarsest scale (default 4 mm) and gives every
landmark a first estimate. Each later stage crops, for every landmark, a small patch (default 24 and
16 voxels) at its own scale (2 mm, then 1 mm) centred on the previous estimate with ``grid_sample`` -
differentiable in the centre, so the chain trains end to end - and refines the estimate. Patch stages
share one U-Net per stage; a per-landmark 1x1x1 head picks out the landmark the patch is for, so 88
landmarks never need 88 full-resolution heatmaps.

Coordinates inside are "grid millimetres": input voxel index (i, j, k) times the input spacing.
Test-time noise injection shifts the centres of the finest crops; only that stage is repeated.

Patch stages cost in proportion to the number of landmarks, so a schema as large as brain-88 trains on a
random subset of landmarks per step (``train_patch_landmarks``): the shared U-Nets see as many patches
per step as with a small schema, and every landmark's head is still trained, on a share of the steps.

Batch normalisation (``input_statistics``): in training, every batch is one scan (the coarse stage) or one
scan's landmark patches (a patch stage), and is normalised by its own statistics. With synthetic appearance
(synth.py) no two scans share their intensities, so the running averages torch keeps for inference describe
no real input; a model with ``input_statistics`` normalises at inference as in training, by the statistics
of the input it is given (the scan; its patches, one uncertainty pass at a time). With the same weights
this took the earlier bundled AFIDs network from 2.61 to 2.24 mm on its calibration scans, and from 2.09 to 1.29 mm
on the training template at a new head position. Model files written before the option existed use the
running averages they were calibrated with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..heatmaps import soft_argmax, spatial_softmax
from ..losses import landmark_loss
from .base import LandmarkNetwork


class InputStatisticsBatchNorm3d(nn.BatchNorm3d):
    """Batch normalisation by the statistics of the batch it is given, in evaluation too. It keeps torch's
    running averages in training, unused, so that its weights are the plain BatchNorm3d's: a model file
    either way holds the same tensors, and only its ``input_statistics`` option says which is used."""

    def forward(self, x):
        if self.training:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _conv(in_channels, out_channels, norm=nn.BatchNorm3d):
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
                         norm(out_channels), nn.ReLU(inplace=True))


class UNetBlock(nn.Module):
    """Two-level 3D U-Net: (conv, conv), pool, (conv, conv), upsample, concat, (conv, conv)."""

    def __init__(self, in_channels: int, channels: int, norm=nn.BatchNorm3d):
        super().__init__()
        self.encode = nn.Sequential(_conv(in_channels, channels, norm), _conv(channels, channels, norm))
        self.bottom = nn.Sequential(_conv(channels, 2 * channels, norm), _conv(2 * channels, 2 * channels, norm))
        self.decode = nn.Sequential(_conv(3 * channels, channels, norm), _conv(channels, channels, norm))

    def forward(self, x):
        skip = self.encode(x)
        deep = self.bottom(F.max_pool3d(skip, 2))
        up = F.interpolate(deep, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return self.decode(torch.cat([skip, up], dim=1))


class LocNet(LandmarkNetwork):
    default_options = {"channels": (16, 16, 12), "scales_mm": (4.0, 2.0, 1.0), "patch_sizes": (24, 16),
                       "input_statistics": True}
    needs_geometry = True
    gradcam_logits = "coarse_head"
    uncertainty_method = "finest-crop shifts"
    inference_chunk = 128  # patches per batch at inference

    def __init__(self, num_landmarks: int, input_size, input_spacing, scales_mm=(4.0, 2.0, 1.0),
                 patch_sizes=(24, 16), channels=(16, 16, 8), jitter: bool = True,
                 stage_weights_start=(1.0, 0.3, 0.1), stage_weights_end=(0.1, 0.3, 1.0),
                 input_statistics: bool = False):  # False: model files from before the option (see above)
        super().__init__()
        if len(scales_mm) != len(patch_sizes) + 1 or len(channels) != len(scales_mm):
            raise ValueError("locnet needs one scale and channel count per stage and a patch size per patch stage")
        self.num_landmarks = num_landmarks
        self.input_size = tuple(int(n) for n in input_size)  # (i, j, k)
        self.register_buffer("spacing", torch.tensor([float(s) for s in input_spacing]), persistent=False)
        self.scales_mm, self.patch_sizes, self.jitter = tuple(scales_mm), tuple(patch_sizes), jitter
        # A training setting (train.py sets it), not part of the model file: 0 trains every landmark's patches.
        self.train_patch_landmarks = 0
        self.weights_start, self.weights_end = tuple(stage_weights_start), tuple(stage_weights_end)
        extent = torch.tensor([(n - 1) * s for n, s in zip(self.input_size, input_spacing)])
        # Coarse grid: an even number of voxels per axis (for the U-Net's pooling) spanning the input.
        self.coarse_size = tuple(int(2 * max(2, round(float(e) / scales_mm[0] / 2)) ) for e in extent)
        norm = InputStatisticsBatchNorm3d if input_statistics else nn.BatchNorm3d
        self.coarse = UNetBlock(1, channels[0], norm)
        self.coarse_head = nn.Conv3d(channels[0], num_landmarks, 1)
        self.refiners = nn.ModuleList(UNetBlock(1, c, norm) for c in channels[1:])
        self.head_weight = nn.ParameterList(nn.Parameter(torch.randn(num_landmarks, c) * 0.1) for c in channels[1:])
        self.head_bias = nn.ParameterList(nn.Parameter(torch.zeros(num_landmarks)) for _ in channels[1:])
        # Parameter-free taps on each patch stage's heatmap logits, so Grad-CAM can hook them.
        self.refine_logits = nn.ModuleList(nn.Identity() for _ in channels[1:])

    # -- the chain
    def coarse_stage(self, x):
        """Stage 0 on the whole volume: (probs (B,K,d,h,w), estimate in grid mm (B,K,3))."""
        coarse = F.interpolate(x, size=tuple(reversed(self.coarse_size)), mode="trilinear", align_corners=True)
        probs = spatial_softmax(self.coarse_head(self.coarse(coarse)))
        index = soft_argmax(probs)  # coarse voxel index (i, j, k), corners aligned with the input's
        scale = torch.tensor([(n - 1) / (m - 1) for n, m in zip(self.input_size, self.coarse_size)],
                             device=x.device, dtype=index.dtype)
        return probs, index * scale * self.spacing.to(index.dtype)

    def crop(self, x, centers_mm, stage: int):
        """Patches (B, K', P, P, P) of ``x`` centred at ``centers_mm`` (B, K', 3), at the stage's scale."""
        size, scale = self.patch_sizes[stage - 1], self.scales_mm[stage]
        offsets = (torch.arange(size, device=x.device, dtype=centers_mm.dtype) - (size - 1) / 2) * scale
        b, k = centers_mm.shape[:2]
        # Sample points in grid mm for axes (i, j, k); grid_sample wants (x, y, z) = (i, j, k) normalised.
        zz, yy, xx = torch.meshgrid(offsets, offsets, offsets, indexing="ij")
        points = centers_mm[:, :, None, None, None, :] + torch.stack((xx, yy, zz), -1)  # (B,K,P,P,P,3)
        index = points / self.spacing.to(points.dtype)
        normalised = 2 * index / (torch.tensor(self.input_size, device=x.device, dtype=index.dtype) - 1) - 1
        grid = normalised.reshape(b, k * size, size, size, 3).to(x.dtype)
        patches = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return patches.reshape(b, k, size, size, size)

    def refine(self, x, centers_mm, stage: int, landmarks=None):
        """One patch stage: (probs (B,K',P,P,P), refined estimate in grid mm (B,K',3)).
        ``landmarks`` (K',) selects whose head each patch uses (default: all, in order)."""
        k = centers_mm.shape[1]
        landmarks = torch.arange(k, device=x.device) if landmarks is None else landmarks
        if not torch.is_grad_enabled() and k > self.inference_chunk:  # bound memory at inference
            parts = [self.refine(x, centers_mm[:, s:s + self.inference_chunk], stage,
                                 landmarks[s:s + self.inference_chunk]) for s in range(0, k, self.inference_chunk)]
            return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
        b = centers_mm.shape[0]
        size, scale = self.patch_sizes[stage - 1], self.scales_mm[stage]
        patches = self.crop(x, centers_mm, stage).reshape(b * k, 1, size, size, size)
        features = self.refiners[stage - 1](patches).reshape(b, k, -1, size, size, size)
        weight, bias = self.head_weight[stage - 1][landmarks], self.head_bias[stage - 1][landmarks]
        logits = torch.einsum("bkcdhw,kc->bkdhw", features, weight) + bias[None, :, None, None, None]
        logits = self.refine_logits[stage - 1](logits)
        probs = spatial_softmax(logits)
        offset = (soft_argmax(probs) - (size - 1) / 2) * scale
        return probs, centers_mm + offset

    def forward(self, x):
        """All stages from coarse to fine: a list of (probs, estimate mm, crop centre mm or None, landmarks),
        ``landmarks`` the indices the patch stages ran for (None: all; see ``train_patch_landmarks``)."""
        probs, estimate = self.coarse_stage(x)
        stages = [(probs, estimate, None, None)]
        landmarks = None
        if self.training and 0 < self.train_patch_landmarks < self.num_landmarks:
            landmarks = torch.randperm(self.num_landmarks, device=x.device)[:self.train_patch_landmarks]
            estimate = estimate[:, landmarks]
        for stage in range(1, len(self.scales_mm)):
            centers = estimate
            if self.training and self.jitter:  # learn to recover from the previous stage's errors
                centers = centers + (torch.rand_like(centers) * 2 - 1) * self.scales_mm[stage - 1]
            probs, estimate = self.refine(x, centers, stage, landmarks)
            stages.append((probs, estimate, centers, landmarks))
        return stages

    # -- Grad-CAM
    @property
    def gradcam_layer(self) -> str:
        """The finest stage's first decoder convolution, where the patch's fine and coarse features meet.
        Not the decoder's output: a 1x1x1 head follows that, so its Grad-CAM is only the landmark's logit
        map less the head's bias, all zero after the ReLU wherever the bias outweighs it."""
        block = f"refiners.{len(self.refiners) - 1}" if len(self.refiners) else "coarse"
        return f"{block}.decode.0.0"

    def gradcam_layers(self) -> list[str]:
        """Every convolution, and each stage's decoder output (the features its heatmap head reads)."""
        decoders = {"coarse.decode", *(f"refiners.{s}.decode" for s in range(len(self.refiners)))}
        return [name for name, module in self.named_modules() if isinstance(module, nn.Conv3d) or name in decoders]

    def _stage_of(self, layer: str) -> int:
        parts = layer.split(".")
        return int(parts[1]) + 1 if parts[0] == "refiners" else 0

    def gradcam_forward(self, x):
        """The chain as ``predict_indices`` runs it, in ``forward``'s output format. Crop centres are
        detached: a stage's logits depend on its own layers only, and no graph is kept through later stages."""
        probs, estimate = self.coarse_stage(x)
        stages = [(probs, estimate, None)]
        for stage in range(1, len(self.scales_mm)):
            centers = estimate.detach()
            probs, estimate = self.refine(x, centers, stage)
            stages.append((probs, estimate, centers))
        return stages, estimate.detach() / self.spacing

    def gradcam_logits_of(self, layer):
        stage = self._stage_of(layer)
        return "coarse_head" if stage == 0 else f"refine_logits.{stage - 1}"

    def gradcam_placement(self, layer, stages):
        stage = self._stage_of(layer)
        spacing = self.spacing.detach().double().cpu()
        if stage == 0:  # the coarse grid's corners sit on the input grid's corners
            step = torch.tensor([(n - 1) / (m - 1) for n, m in zip(self.input_size, self.coarse_size)],
                                dtype=torch.float64)
            return torch.zeros(1, 3, dtype=torch.float64), step
        # A patch: P voxels of the stage's scale centred on the crop centre (as ``crop`` samples it).
        centers = stages[stage][2][0].detach().double().cpu()  # (K, 3) grid mm
        step = self.scales_mm[stage] / spacing
        return centers / spacing - (self.patch_sizes[stage - 1] - 1) / 2 * step, step

    # -- training
    def stage_weights(self, progress: float):
        """Per-stage loss weights, moved linearly from coarse-heavy to fine-heavy over training."""
        p = min(max(progress, 0.0), 1.0)
        return [a + (b - a) * p for a, b in zip(self.weights_start, self.weights_end)]

    def loss(self, stages, target_ijk, mask, spacing_mm, kind, alpha, sigma_mm, progress=0.0):
        spacing = self.spacing.to(target_ijk.dtype)
        target_mm = target_ijk * spacing
        total = 0.0
        for n, ((probs, estimate, centers, landmarks), weight) in enumerate(zip(stages, self.stage_weights(progress))):
            scale = self.scales_mm[n]
            truth, known = (target_mm, mask) if landmarks is None else (target_mm[:, landmarks], mask[:, landmarks])
            if centers is None:  # coarse: positions in coarse voxels
                unit = spacing * torch.tensor([(a - 1) / (c - 1) for a, c in zip(self.input_size, self.coarse_size)],
                                              device=spacing.device, dtype=spacing.dtype)
                pred_vox, target_vox = estimate / unit, truth / unit
            else:  # patch: positions in patch voxels around the crop centre
                half = (self.patch_sizes[n - 1] - 1) / 2
                unit = torch.full((3,), scale, device=spacing.device, dtype=spacing.dtype)
                pred_vox, target_vox = (estimate - centers) / scale + half, (truth - centers) / scale + half
            total = total + weight * landmark_loss(kind, probs, pred_vox, target_vox, known, unit.tolist(),
                                                   max(sigma_mm, scale), alpha)
        return total

    # -- inference
    @torch.no_grad()
    def predict_indices(self, x):
        return self.forward(x)[-1][1] / self.spacing  # eval mode: every landmark

    def sample_indices(self, x, passes, generator, shift_mm):
        """Test-time noise injection (Ma et al.): each pass shifts the finest crops by a uniform random
        offset of up to ``shift_mm`` per axis."""
        shifts = (torch.rand((passes, 3), generator=generator, dtype=torch.float64) * 2 - 1) * shift_mm
        return self.shifted_indices(x, shifts.float())

    @torch.no_grad()
    def shifted_indices(self, x, shifts_mm):
        """(N, B, K, 3) indices, pass n shifting the finest crops by ``shifts_mm[n]`` ((N, K, 3) or (N, 3)
        mm). Earlier stages run once; the finest stage runs once per pass on that pass's K patches, the
        batch a training step normalises together (see ``input_statistics``)."""
        estimate = self.coarse_stage(x)[1]
        last = len(self.scales_mm) - 1
        for stage in range(1, last):
            estimate = self.refine(x, estimate, stage)[1]
        shifts = shifts_mm.to(estimate).reshape(shifts_mm.shape[0], -1, 3)
        refined = torch.stack([self.refine(x, estimate + shift, last)[1] for shift in shifts])
        return refined / self.spacing
