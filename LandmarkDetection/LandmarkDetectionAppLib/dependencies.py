"""Installing the backend's Python packages into Slicer's Python on first use, asking first.

torch comes from the PyTorch extension (PyTorchUtils); the rest from Resources/requirements.txt, with
constraints that keep Slicer's own numpy, SimpleITK and VTK. Slicer 5.12 and later: ``slicer.packaging``
(imported explicitly: ``slicer/__init__.py`` does not); before: ``slicer.util.pip_install`` with a *list*
of arguments (a string is ``shlex.split`` in POSIX mode, which strips Windows backslashes). Every failure
ends in one dialog; the temporary constraints file is always removed.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from pathlib import Path

REQUIREMENTS_IMPORTS = ("torchio", "safetensors", "scipy", "tqdm", "matplotlib")


def dependencies_missing() -> list[str]:
    importlib.invalidate_caches()  # packages installed a moment ago must be seen
    return [name for name in ("torch", *REQUIREMENTS_IMPORTS) if importlib.util.find_spec(name) is None]


def requirements_file() -> Path:
    from LandmarkDetectionLib.resources import resources_dir

    return resources_dir() / "requirements.txt"


def pip_arguments(requirements: Path, constraints: Path) -> list[str]:
    """The pip arguments for Slicer before 5.12, as a list (paths with backslashes survive)."""
    return ["-r", str(requirements), "-c", str(constraints)]


def _install_torch() -> None:
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError("Landmark detection needs the PyTorch extension: install 'PyTorch' from the Extensions "
                           "Manager, restart Slicer, and try again.") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    if not logic.torchInstalled() and logic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1") is None:
        raise RuntimeError("PyTorch was not installed.")


def _install_requirements(requirements: Path, constraints: Path) -> None:
    import slicer

    try:
        import slicer.packaging as packaging  # Slicer >= 5.12
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(packaging.load_requirements(requirements), constraints=constraints,
                             prompt_install=False, requester="LandmarkDetection")
    else:
        slicer.util.pip_install(pip_arguments(requirements, constraints))


def ensure_dependencies() -> bool:
    """True when the backend's packages are there (installing them after the user agreed); otherwise one
    dialog says why, and False."""
    import slicer

    missing = dependencies_missing()
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            "Landmark detection needs these Python packages, which will now be installed: "
            f"{', '.join(missing)}. This can take several minutes.", "Install dependencies"):
        return False
    constraints = None
    try:
        with slicer.util.WaitCursor():
            if "torch" in missing:
                _install_torch()
            import numpy
            import SimpleITK
            import vtk

            handle, name = tempfile.mkstemp(suffix="-constraints.txt")
            constraints = Path(name)
            with os.fdopen(handle, "w") as file:
                file.write(f"numpy=={numpy.__version__}\nSimpleITK=={SimpleITK.Version_VersionString()}\n"
                           f"vtk=={vtk.vtkVersion.GetVTKVersion()}\n")
            _install_requirements(requirements_file(), constraints)
    except Exception as error:  # noqa: BLE001 - pip, PyTorchUtils and the user declining all end here
        logging.exception("LandmarkDetection: installing dependencies failed")
        slicer.util.errorDisplay(f"Could not install the Python packages landmark detection needs:\n{error}\n\n"
                                 "See the Python console for details.")
        return False
    finally:
        if constraints is not None:
            constraints.unlink(missing_ok=True)
    still = dependencies_missing()
    if still:
        slicer.util.errorDisplay(f"Could not install: {', '.join(still)}. See the Python console for details.")
    return not still
