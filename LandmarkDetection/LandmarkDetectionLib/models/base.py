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

    def predict_indices(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, 3) voxel indices (i, j, k) of the landmarks in the input grid."""
        raise NotImplementedError

    def sample_indices(self, x: torch.Tensor, passes: int, generator: torch.Generator,
                       shift_mm: float) -> torch.Tensor:
        """Test-time noise injection: (passes, B, K, 3) voxel indices; ``shift_mm`` is the size of the
        noise where the architecture's noise is a shift."""
        raise NotImplementedError

    # -- Grad-CAM. A layer's output holds either the whole grid (batch row 0) or, in a stage that works on
    # patches, one patch per landmark (batch row = landmark index).
    def gradcam_layers(self) -> list[str]:
        """Layers Grad-CAM can explain: the convolutions (and the default layer), all of whose output
        reaches the heatmap logits of their stage."""
        return [name for name, module in self.named_modules()
                if isinstance(module, nn.Conv3d) or name == self.gradcam_layer]

    def gradcam_forward(self, x: torch.Tensor):
        """The forward pass Grad-CAM explains, the path ``predict_indices`` takes: (the output, the
        predicted voxel indices (B, K, 3))."""
        output = self(x)
        with torch.no_grad():
            return output, self.predict_indices(x)

    def gradcam_logits_of(self, layer: str) -> str:
        """The module whose output holds the heatmap logits ``layer`` feeds (its own stage's)."""
        return self.gradcam_logits

    def gradcam_placement(self, layer: str, output) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the heatmap logits of ``layer``'s stage lie in the input grid, given ``gradcam_forward``'s
        ``output``: the input voxel index (i, j, k) of each landmark's logit voxel 0, (K, 3) or (1, 3) when
        all landmarks share one grid, and the step (3,) in input voxels from one logit voxel to the next.
        The default: logits on the input grid itself."""
        return torch.zeros(1, 3), torch.ones(3)
