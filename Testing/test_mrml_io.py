"""Our readers and writers agree with Slicer's own MRML storage nodes (slicer-core wheel) to 1e-6 mm."""

import numpy as np
import pytest
import vtk

from LandmarkDetectionLib.geometry import Grid
from LandmarkDetectionLib.fileio import read_landmarks, write_landmarks, write_volume
from conftest import make_volume

slicer = pytest.importorskip("slicer")


def _mrml_points(node):
    points = np.zeros((node.GetNumberOfControlPoints(), 3))
    for i in range(len(points)):
        node.GetNthControlPointPosition(i, points[i])
    return points


@pytest.mark.parametrize("writer_suffix", [".mrk.json", ".fcsv"])
def test_our_files_read_by_mrml_storage_nodes(mrml_scene, brain88, tmp_path, writer_suffix):
    coords = np.random.default_rng(3).uniform(-90, 90, (88, 3))
    path = tmp_path / f"ours{writer_suffix}"
    write_landmarks(path, brain88, coords)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage_class = "vtkMRMLMarkupsJsonStorageNode" if writer_suffix == ".mrk.json" else "vtkMRMLMarkupsFiducialStorageNode"
    storage = mrml_scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    assert np.abs(_mrml_points(node) - coords).max() < 1e-6
    assert [node.GetNthControlPointLabel(i) for i in range(88)] == brain88.names
    assert node.GetNthControlPointDescription(0) == "Frontal Lobe"


@pytest.mark.parametrize("storage_class, suffix", [("vtkMRMLMarkupsJsonStorageNode", ".mrk.json"),
                                                   ("vtkMRMLMarkupsFiducialStorageNode", ".fcsv")])
def test_mrml_written_files_read_by_us(mrml_scene, afids32, tmp_path, storage_class, suffix):
    coords = np.random.default_rng(4).uniform(-90, 90, (32, 3))
    node = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    for name, xyz in zip(afids32.names, coords):
        node.AddControlPoint(*xyz, name)
    storage = mrml_scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(tmp_path / f"mrml{suffix}"))
    assert storage.WriteData(node)
    assert np.abs(read_landmarks(tmp_path / f"mrml{suffix}", afids32) - coords).max() < 1e-6


def test_volume_geometry_agrees_with_mrml(mrml_scene, tmp_path):
    image = make_volume()
    path = tmp_path / "v.nrrd"
    write_volume(image, path)
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.abs(ijk_to_ras - Grid.of(image).index_to_ras).max() < 1e-5
