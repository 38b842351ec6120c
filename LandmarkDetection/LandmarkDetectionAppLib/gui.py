"""Qt helpers shared by the modules: connecting the parameter node to the widgets in a way that works in
every Slicer version, polling a BackendJob from the event loop, and reporting a slot's failure."""

from __future__ import annotations

import contextlib
import logging
import traceback

import qt
import slicer

PARAMETER_PROPERTY = "SlicerParameterName"


def connect_parameters(parameter_node, ui) -> int:
    """Connect every widget of ``ui`` that names a parameter (the .ui's SlicerParameterName property).
    ``connectGui`` returns no tag before Slicer 5.10, so ``disconnectGui`` would do nothing there;
    ``connectParametersToGui`` returns it in every version. Before Slicer 5.12 ``disconnectGui`` also leaves
    the wrapper's observer of the node: connect once per parameter node (``same_parameter_node``)."""
    mapping = {}
    for widget in ui.__dict__.values():
        name = widget.property(PARAMETER_PROPERTY) if hasattr(widget, "property") else None
        if name:
            mapping[name] = widget
    return parameter_node.connectParametersToGui(mapping)


def same_parameter_node(a, b) -> bool:
    """Whether two parameter node wrappers (or None) wrap the same MRML node."""
    return (a.parameterNode if a is not None else None) is (b.parameterNode if b is not None else None)


def poll_job(job, interval_ms: int = 100) -> qt.QTimer:
    """Drive ``job.poll()`` from the event loop until the job has finished; returns the timer."""
    timer = qt.QTimer()
    timer.setInterval(interval_ms)

    def tick():
        job.poll()
        if job.finished:
            timer.stop()

    timer.connect("timeout()", tick)
    timer.start()
    return timer


def single_shot_timer(interval_ms: int, slot) -> qt.QTimer:
    """A single-shot timer calling ``slot``: ``start()`` (re)starts it, so a burst of changes (keystrokes, a
    drag) is handled once, when it pauses."""
    timer = qt.QTimer()
    timer.setSingleShot(True)
    timer.setInterval(interval_ms)
    timer.connect("timeout()", slot)
    return timer


@contextlib.contextmanager
def report_errors(what: str):
    """One dialog for any failure of a slot, which then returns normally: a problem the user can fix
    (LandmarkError, ValueError) as its one line, anything else with its traceback in the details (and the
    Python console)."""
    from LandmarkDetectionLib.errors import LandmarkError

    try:
        yield
    except (LandmarkError, ValueError) as error:
        slicer.util.errorDisplay(f"{what}:\n{error}")
    except Exception as error:  # noqa: BLE001 - the GUI must never be left half-done without a word
        logging.exception("%s", what)
        slicer.util.errorDisplay(f"{what}:\n{error}", detailedText=traceback.format_exc())
