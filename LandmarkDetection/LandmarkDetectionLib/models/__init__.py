"""Network architectures, selected by name in a model's configuration; each implements the contract
of ``base.LandmarkNetwork``."""

from __future__ import annotations

from .base import LandmarkNetwork
from .highres3dnet import HighRes3DNet
from .locnet import LocNet

ARCHITECTURES = {"highres3dnet": HighRes3DNet, "locnet": LocNet}


def architecture_class(architecture: str) -> type[LandmarkNetwork]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}") from None


def build_network(architecture: str, num_landmarks: int, geometry=None, **options) -> LandmarkNetwork:
    cls = architecture_class(architecture)
    if cls.needs_geometry:
        options = {"input_size": geometry.size, "input_spacing": geometry.spacing, **options}
    return cls(num_landmarks=num_landmarks, **options)
