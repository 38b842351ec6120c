"""BackendJob: one run of a backend command (``python -m LandmarkDetectionLib ...``) for a Slicer module,
in a separate process so the GUI never freezes.

The job owns everything around the process: a temporary folder, the input volumes exported into it, the
command line, the JSON-lines progress, Cancel, the output names, and cleanup; and a snapshot of the
parameters taken when it starts, so results attach to the volume and model of that run even if the user
changes the selection meanwhile.

No Qt here: the widget calls ``poll()`` from a QTimer, tests call it in a loop. The process is injectable
(``process_factory``), as SlicerNNUnet does, and the default one really stops the whole process tree on
Cancel: PythonSlicer is a launcher whose child (python-real) would survive a kill of the launcher alone,
so the process starts as the leader of its own process group (POSIX) or group of processes (Windows) and
Cancel ends the group.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

_LIB_PARENT = Path(__file__).resolve().parent.parent  # the folder holding LandmarkDetectionLib


def python_executable() -> str:
    """The Python that runs the backend: inside Slicer, ``sys.executable`` is the PythonSlicer launcher,
    which sets up Slicer's Python environment for its child (python-real)."""
    return sys.executable


def backend_command(*arguments: str) -> list[str]:
    return [python_executable(), "-m", "LandmarkDetectionLib", *arguments, "--progress", "json"]


def backend_environment() -> dict[str, str]:
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(_LIB_PARENT), os.environ.get("PYTHONPATH")) if p)
    return environment


class TreeProcess:
    """A subprocess whose whole tree Cancel stops; stdout and stderr lines arrive through a queue, read by
    threads, so ``poll`` never blocks."""

    def __init__(self, command: list[str], environment: dict[str, str] | None = None):
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # leader of a new process group: killpg reaches its children
        self.lines: queue.Queue = queue.Queue()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        encoding="utf-8", errors="replace", env=environment, **kwargs)
        self._readers = [threading.Thread(target=self._read, args=(stream, kind), daemon=True)
                         for stream, kind in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, kind: str) -> None:
        for line in stream:
            self.lines.put((kind, line.rstrip("\n")))

    def exit_code(self) -> int | None:
        """None while running; after exit, only once every line has been read."""
        code = self.process.poll()
        if code is None or any(reader.is_alive() for reader in self._readers):
            return None
        return code

    def kill_tree(self) -> None:
        if self.process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True)
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _ignore(*_) -> None:
    pass


@dataclass
class JobOutcome:
    ok: bool
    message: str  # the backend's one-line error, "Cancelled.", or "" on success
    output_dir: Path | None = None


@dataclass
class BackendJob:
    """``arguments(job)`` builds the backend command's arguments once the job's folder exists; ``on_progress``
    receives each JSON progress record, ``on_finished`` one JobOutcome. ``parameters`` is the snapshot
    the results belong to."""

    arguments: Callable[["BackendJob"], list[str]]
    on_progress: Callable[[dict], None]
    on_finished: Callable[[JobOutcome], None]
    parameters: dict = field(default_factory=dict)
    process_factory: Callable = TreeProcess
    work: Path | None = None
    errors: list[str] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    process: object = None

    @property
    def output_dir(self) -> Path:
        return self.work / "out"

    def input_path(self, name: str, suffix: str = ".nrrd") -> Path:
        """Where an exported input goes: a file name made safe from any node name."""
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "volume"
        return self.work / f"{safe}{suffix}"

    def start(self, export: Callable[["BackendJob"], None] | None = None) -> None:
        """Make the folder, export the inputs (``export(job)``), start the process. A failure before the
        process runs (export, a program that does not start) cleans up and is reported as the outcome."""
        self.work = Path(tempfile.mkdtemp(prefix="LandmarkDetection-"))
        try:
            if export is not None:
                export(self)
            self.process = self.process_factory(backend_command(*self.arguments(self)), backend_environment())
        except Exception as error:  # noqa: BLE001 - any failure to start is reported, never left hanging
            self._finish(JobOutcome(False, f"could not start the backend: {error}"))

    def poll(self) -> None:
        """Deliver pending progress; finish when the process has ended."""
        if self.finished or self.process is None:
            return
        while True:
            try:
                kind, line = self.process.lines.get_nowait()
            except queue.Empty:
                break
            if kind == "stderr":
                if line.strip():
                    self.errors.append(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                self.on_progress(record)
        code = self.process.exit_code()
        if code is None:
            return
        if self.cancelled:
            self._finish(JobOutcome(False, "Cancelled."))
        elif code == 0:
            self._finish(JobOutcome(True, "", self.output_dir))
        else:
            message = next((line[len("error: "):] for line in reversed(self.errors) if line.startswith("error: ")),
                           self.errors[-1] if self.errors else f"the backend stopped with exit code {code}")
            self._finish(JobOutcome(False, message))

    def cancel(self) -> None:
        """Stop the process; the next ``poll`` reports the outcome "Cancelled." and cleans up."""
        self.cancelled = True
        if self.process is not None:
            self.process.kill_tree()

    def abandon(self) -> None:
        """Stop the process and clean up without reporting anything: for a widget going away (a module
        reloaded, Slicer closing), whose callbacks must never run again and which will not poll again."""
        self.on_progress = self.on_finished = _ignore
        self.cancel()
        self.finished = True
        self.cleanup()

    def _finish(self, outcome: JobOutcome) -> None:
        self.finished = True
        try:
            self.on_finished(outcome)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the temporary folder (inputs and outputs): results are in the scene by now."""
        if self.work is not None:
            shutil.rmtree(self.work, ignore_errors=True)
