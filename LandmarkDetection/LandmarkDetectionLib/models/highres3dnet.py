"""A modified HighRes3DNet (Li et al. 2017) for heatmap landmark detection, as in Patel et al.

Full-resolution dilated residual network: a 3x3x3 stem, three stages of residual blocks with dilation
1, 2, 4 and widening channels, batch norm, dropout before the head, and a plain 1x1x1 convolution head
giving one heatmap logit volume per landmark. Spatial softmax + soft-argmax turn logits into sub-voxel
coordinates.

Residual blocks are numbered through the stages (``blocks.0`` ...); the paper's Grad-CAM layer, the
second convolution of the third residual block, is ``blocks.2.conv2``.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..heatmaps import soft_argmax, spatial_softmax
from ..losses import landmark_loss
from .base import LandmarkNetwork


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (BN, ReLU, dilated conv) x 2 plus a (projected) identity."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__()
        self.bn1 = nn.BatchNorm3d(in_channels)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.project = None if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (x if self.project is None else self.project(x))


class HighRes3DNet(LandmarkNetwork):
    default_options = {"channels": (16, 32, 64), "blocks_per_stage": 3, "dropout": 0.1}
    gradcam_layer, gradcam_logits = "blocks.2.conv2", "head"
    uncertainty_method = "Monte Carlo dropout"

    def __init__(self, num_landmarks: int, channels=(16, 32, 64), blocks_per_stage: int = 3,
                 dilations=(1, 2, 4), dropout: float = 0.1, in_channels: int = 1):
        super().__init__()
        self.num_landmarks = num_landmarks
        self.stem = nn.Sequential(nn.Conv3d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm3d(channels[0]), nn.ReLU(inplace=True))
        blocks, previous = [], channels[0]
        for width, dilation in zip(channels, dilations):
            for _ in range(blocks_per_stage):
                blocks.append(ResidualBlock(previous, width, dilation))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.dropout = dropout
        self.final = nn.Sequential(nn.BatchNorm3d(previous), nn.ReLU(inplace=True))
        self.head = nn.Conv3d(previous, num_landmarks, 1)

    def features(self, x):
        """Trunk features before dropout and the head."""
        return self.final(self.blocks(self.stem(x)))

    def forward(self, x):
        """Heatmap logits (B, K, D, H, W)."""
        return self.head(F.dropout3d(self.features(x), self.dropout, self.training))

    def loss(self, logits, target_ijk, mask, spacing_mm, kind, alpha, sigma_mm, progress=0.0):
        probs = spatial_softmax(logits)
        return landmark_loss(kind, probs, soft_argmax(probs), target_ijk, mask, spacing_mm, sigma_mm, alpha)

    @torch.no_grad()
    def predict_indices(self, x, chunk: int = 8):
        """Soft-argmax voxel indices (B, K, 3) in (i, j, k) order without holding all K logit volumes:
        the 1x1x1 head is applied ``chunk`` landmarks at a time on the shared features."""
        features = self.features(x)
        weight, bias = self.head.weight, self.head.bias
        out = []
        for start in range(0, self.num_landmarks, chunk):
            logits = F.conv3d(features, weight[start:start + chunk], bias[start:start + chunk])
            out.append(soft_argmax(spatial_softmax(logits)))
            del logits
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def sample_indices(self, x, passes: int, generator: torch.Generator | None = None, shift_mm: float = 0.0,
                       chunk: int = 8):
        """Monte Carlo dropout: (N, B, K, 3) indices from ``passes`` dropout masks on the trunk features.
        The trunk runs once; only dropout and the 1x1x1 head (the part that sees the noise) repeat."""
        if self.dropout <= 0:
            raise ValueError("this highres3dnet model has no dropout, so Monte Carlo dropout cannot sample it")
        features = self.features(x)
        b, c = features.shape[:2]
        keep = torch.rand((passes, b, c), generator=generator, device="cpu") >= self.dropout
        masks = (keep.to(features.device, features.dtype) / (1 - self.dropout))
        samples = []
        for n in range(passes):
            # Channel dropout on a 1x1x1 head equals scaling the head's input weights per channel.
            out = []
            for start in range(0, self.num_landmarks, chunk):
                w = self.head.weight[start:start + chunk, :, 0, 0, 0]  # (k, C)
                logits = torch.einsum("bcdhw,bkc->bkdhw", features, w[None] * masks[n][:, None, :]) \
                    + self.head.bias[start:start + chunk, None, None, None]
                out.append(soft_argmax(spatial_softmax(logits)))
            samples.append(torch.cat(out, dim=1))
        return torch.stack(samples)
