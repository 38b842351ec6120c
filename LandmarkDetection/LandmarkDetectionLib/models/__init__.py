"""Network architectures, selected by name in a model's configuration.

Each network has ``forward(x)`` (its native output), ``loss(output, target_ijk, mask, spacing_mm, kind,
alpha, sigma_mm, progress)``, ``predict_indices(x)`` (B, K, 3) and ``sample_indices(x, ...)`` for
test-time uncertainty.
"""

from __future__ import annotations

from .highres3dnet import HighRes3DNet
from .locnet import LocNet

ARCHITECTURES = {"highres3dnet": HighRes3DNet, "locnet": LocNet}


def build_network(architecture: str, num_landmarks: int, geometry=None, **options):
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}") from None
    if getattr(cls, "needs_geometry", False):
        options = {"input_size": geometry.size, "input_spacing": geometry.spacing, **options}
    return cls(num_landmarks=num_landmarks, **options)
