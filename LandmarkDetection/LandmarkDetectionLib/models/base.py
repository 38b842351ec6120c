"""The contract every network architecture implements, so that training, detection, uncertainty and
Grad-CAM never switch on an architecture's name. A new architecture is one file with a subclass of
``LandmarkNetwork`` plus one line in ``ARCHITECTURES`` (models/__init__.py)."""

from __future__ import annotations

import torch
from torch import nn


class LandmarkNetwork(nn.Module):
    # Training options (TrainOptions / CLI names) the architecture takes, with its defaults.
    default_options: dict = {}
    # Whether the constructor needs the input grid (input_size, input_spacing).
    needs_geometry: bool = False
    # Grad-CAM: the layer explained by default, and the module whose output holds heatmap logits.
    gradcam_layer: str = ""
    gradcam_logits: str = ""
    # How test-time noise injection works, in words (written into uncertainty files).
    uncertainty_method: str = ""

    def loss(self, output, target_ijk, mask, spacing_mm, kind, alpha, sigma_mm, progress=0.0) -> torch.Tensor:
        """Training loss of ``forward``'s output against target voxel indices (B, K, 3)."""
        raise NotImplementedError

    def predict_indices(self, x: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, 3) voxel indices (i, j, k) of the landmarks in the input grid. ``start`` (B, K, 3) voxel
        indices, where known (the aligned reference's landmarks), is where a coarse-to-fine network begins
        instead of its coarse stage; architectures without such a chain ignore it."""
        raise NotImplementedError

    def sample_indices(self, x: torch.Tensor, passes: int, generator: torch.Generator,
                       shift_mm: float, start: torch.Tensor | None = None) -> torch.Tensor:
        """Test-time noise injection: (passes, B, K, 3) voxel indices; ``shift_mm`` is the size of the
        noise where the architecture's noise is a shift; ``start`` as in predict_indices."""
        raise NotImplementedError

    def gradcam_layers(self) -> list[str]:
        """Layers Grad-CAM can explain: the convolutions whose output reaches the heatmap logits."""
        return [name for name, module in self.named_modules() if isinstance(module, nn.Conv3d)]
