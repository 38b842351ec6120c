"""The Slicer-application layer shared by the extension's modules (LandmarkDetection, GradCAMViewer):
installing the backend's Python packages on first use (``dependencies``) and running a backend command in
a separate process (``job.BackendJob``).

A package, not a module file, so that Slicer's scripted-module loader does not take it for a module. The
backend, LandmarkDetectionLib, never imports it.
"""
