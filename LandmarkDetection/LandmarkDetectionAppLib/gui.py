"""Qt helpers shared by the modules: connecting the parameter node to the widgets in a way that works in
every Slicer version, polling a BackendJob from the event loop, and reading a ctkPathLineEdit."""

from __future__ import annotations

import qt

PARAMETER_PROPERTY = "SlicerParameterName"


def connect_parameters(parameter_node, ui) -> int:
    """Connect every widget of ``ui`` that names a parameter (the .ui's SlicerParameterName property).
    ``connectGui`` returns no tag before Slicer 5.10, so ``disconnectGui`` would do nothing there;
    ``connectParametersToGui`` returns it in every version."""
    mapping = {}
    for widget in ui.__dict__.values():
        name = widget.property(PARAMETER_PROPERTY) if hasattr(widget, "property") else None
        if name:
            mapping[name] = widget
    return parameter_node.connectParametersToGui(mapping)


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
