"""Network architectures, selected by name in a model's configuration."""

from __future__ import annotations

from .highres3dnet import HighRes3DNet

ARCHITECTURES = {"highres3dnet": HighRes3DNet}


def build_network(architecture: str, num_landmarks: int, **options):
    try:
        cls = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {', '.join(ARCHITECTURES)}") from None
    return cls(num_landmarks=num_landmarks, **options)
