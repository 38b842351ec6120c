"""LandmarkDetectionLib: the shared backend of the landmark detection extension for 3D Slicer.

Plain Python on torch, TorchIO, SimpleITK and numpy; no Qt and no Slicer application. The MRML
adapter (``LandmarkDetectionLib.mrml``) is the only module that imports ``slicer``.
"""

__version__ = "0.1.0"
