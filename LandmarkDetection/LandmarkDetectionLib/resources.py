"""Where the extension-wide Resources/ folder is, in a source checkout, a pip install or Slicer, and the
models bundled in it."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The model bundled for each schema (Resources/Models); the first is the default.
BUNDLED_MODELS = {"afids-32": "Models/afids32.safetensors", "brain-88": "Models/brain88.safetensors"}


def resources_dir() -> Path:
    # pip install maps the top-level Resources/ to LandmarkDetectionLib/Resources (pyproject.toml) and
    # Slicer installs it there too (CMakeLists.txt); a source checkout has it two levels up.
    for candidate in (_HERE / "Resources", _HERE.parent.parent / "Resources"):
        if (candidate / "Schemas").is_dir():
            return candidate
    raise FileNotFoundError(f"Resources/Schemas not found beside {_HERE}")


def bundled_model_path(schema: str | None = None) -> Path:
    """The bundled model for ``schema`` (default: the first bundled model)."""
    name = schema or next(iter(BUNDLED_MODELS))
    if name not in BUNDLED_MODELS:
        from .errors import LandmarkError

        raise LandmarkError(name, f"no bundled model for this schema; bundled: {', '.join(BUNDLED_MODELS)}")
    return resources_dir() / BUNDLED_MODELS[name]
