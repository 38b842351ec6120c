"""Where the extension-wide Resources/ folder is, in a source checkout, a pip install or Slicer."""

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resources_dir() -> Path:
    # pip install maps the top-level Resources/ to LandmarkDetectionLib/Resources (pyproject.toml) and
    # Slicer installs it there too (CMakeLists.txt); a source checkout has it two levels up.
    for candidate in (_HERE / "Resources", _HERE.parent.parent / "Resources"):
        if (candidate / "Schemas").is_dir():
            return candidate
    raise FileNotFoundError(f"Resources/Schemas not found beside {_HERE}")
