"""The LandmarkTraining module's logic, free of Qt so that it is tested against real MRML (slicer-core):
the guided annotation session (session.py), datasets, model suggestions and agreement outputs (store.py),
table nodes of text (tables.py), and persistent place mode that gives Slicer's setting back (placing.py).
It imports only the backend, LandmarkDetectionLib, and the MRML API.

A package, not a module file, so that Slicer's scripted-module loader does not take it for a module.
"""
