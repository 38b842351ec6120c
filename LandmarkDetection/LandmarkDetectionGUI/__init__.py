"""Slicer-side helpers shared by the extension's modules: installing Python dependencies on first use,
and running the backend in a separate process whose JSON-lines progress drives the GUI.

A package (not a module file) so that Slicer's scripted-module loader does not take it for a module.
It needs the Slicer application (qt); the backend, LandmarkDetectionLib, never imports it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import qt
import slicer

REQUIREMENTS_IMPORTS = ("torchio", "safetensors", "scipy", "tqdm", "matplotlib")
_LIB_PARENT = Path(__file__).resolve().parent.parent  # the folder holding LandmarkDetectionLib


def _resources() -> Path:
    from LandmarkDetectionLib.resources import resources_dir

    return resources_dir()


def dependencies_missing() -> list[str]:
    return [name for name in ("torch", *REQUIREMENTS_IMPORTS) if importlib.util.find_spec(name) is None]


def ensure_dependencies() -> bool:
    """Install what the backend needs, once, asking first. torch comes from the PyTorch extension; the
    rest from Resources/requirements.txt, constrained so Slicer's numpy, SimpleITK and VTK stay as they are."""
    missing = dependencies_missing()
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            "Landmark detection needs these Python packages, which will now be installed: "
            f"{', '.join(missing)}. This can take several minutes.", "Install dependencies"):
        return False
    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay("Landmark detection needs the PyTorch extension. Install 'PyTorch' from the "
                                     "Extensions Manager, restart Slicer, and try again.")
            return False
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled() and torch_logic.installTorch(askConfirmation=False) is None:
            slicer.util.errorDisplay("PyTorch could not be installed; see the Python console for details.")
            return False
    requirements = _resources() / "requirements.txt"
    with tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False) as constraints:
        import numpy
        import SimpleITK
        import vtk

        constraints.write(f"numpy=={numpy.__version__}\nSimpleITK=={SimpleITK.Version_VersionString()}\n"
                          f"vtk=={vtk.vtkVersion.GetVTKVersion()}\n")
    with slicer.util.WaitCursor():
        packaging = getattr(slicer, "pydeps", None) or getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.11
            packaging.pip_ensure(packaging.load_requirements(str(requirements)), constraints=constraints.name,
                                 requester="LandmarkDetection")
        else:
            slicer.util.pip_install(f"-r {requirements} -c {constraints.name}")
    os.unlink(constraints.name)
    still = dependencies_missing()
    if still:
        slicer.util.errorDisplay(f"Could not install: {', '.join(still)}. See the Python console for details.")
    return not still


def python_executable() -> str:
    """PythonSlicer: Slicer's Python, with Slicer's environment, for the backend process."""
    home = Path(slicer.app.slicerHome) if hasattr(slicer, "app") else None
    candidates = [Path(sys.executable)]
    if home is not None:
        candidates += [home / "bin" / "PythonSlicer", home / "bin" / "PythonSlicer.exe"]
    for candidate in candidates:
        if candidate.name.lower().startswith("pythonslicer") and candidate.exists():
            return str(candidate)
    return sys.executable


def backend_command(*arguments: str) -> list[str]:
    return [python_executable(), "-m", "LandmarkDetectionLib", *arguments, "--progress", "json"]


class BackendProcess:
    """Runs ``python -m LandmarkDetectionLib ...`` in a QProcess: the GUI stays responsive, each JSON
    progress line reaches ``on_progress(record)``, ``on_finished(ok, message)`` ends it, and ``cancel()``
    stops it."""

    def __init__(self, arguments: list[str], on_progress, on_finished):
        self.command = backend_command(*arguments)
        self.on_progress, self.on_finished = on_progress, on_finished
        self.errors: list[str] = []
        self.cancelled = False
        self._buffer = ""
        self.process = qt.QProcess()
        environment = qt.QProcessEnvironment.systemEnvironment()
        path = environment.value("PYTHONPATH")
        environment.insert("PYTHONPATH", os.pathsep.join(p for p in (str(_LIB_PARENT), path) if p))
        environment.insert("PYTHONUNBUFFERED", "1")
        self.process.setProcessEnvironment(environment)
        self.process.connect("readyReadStandardOutput()", self._read_output)
        self.process.connect("readyReadStandardError()", self._read_errors)
        self.process.connect("finished(int,QProcess::ExitStatus)", self._finished)

    def start(self) -> None:
        logging.info("LandmarkDetection: running %s", " ".join(self.command))
        self.process.start(self.command[0], self.command[1:])

    def cancel(self) -> None:
        self.cancelled = True
        self.process.kill()

    def _read_output(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput().data()).decode("utf-8", "replace")
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            try:
                self.on_progress(json.loads(line))
            except json.JSONDecodeError:
                logging.info(line)

    def _read_errors(self) -> None:
        text = bytes(self.process.readAllStandardError().data()).decode("utf-8", "replace")
        self.errors.extend(line for line in text.splitlines() if line.strip())

    def _finished(self, exit_code, _status) -> None:
        self._read_output()
        if self.cancelled:
            self.on_finished(False, "Cancelled.")
            return
        message = next((line[len("error: "):] for line in reversed(self.errors) if line.startswith("error: ")),
                       self.errors[-1] if self.errors else f"exit code {exit_code}")
        self.on_finished(exit_code == 0, "" if exit_code == 0 else message)
