"""GradCAMViewer's scene logic against real MRML (slicer-core), on real output of the gradcam command."""

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.geometry import Grid
from LandmarkDetectionLib.fileio import read_volume
from LandmarkDetectionLib.train import TrainOptions, train
from conftest import TINY_TRAIN

pytest.importorskip("slicer")
viewer = pytest.importorskip("GradCAMViewerLib")
from LandmarkDetectionLib import mrml  # noqa: E402


@pytest.fixture(scope="module")
def cam_output(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("viewer")
    model = train(TrainOptions(dataset=str(tiny_dataset), output=str(folder / "run"), epochs=1, **TINY_TRAIN))
    assert main(["gradcam", "--compare", str(model), str(model), "--input", str(tiny_dataset / "case02.nii.gz"),
                 "--output", str(folder / "out"), "--landmarks", "AC,R olfactory sulcal fundus",
                 "--progress", "none"]) == 0
    return folder / "out", read_volume(tiny_dataset / "case02.nii.gz")


def test_cache_loads_both_models_and_switching_reuses_nodes(mrml_scene, cam_output, tmp_path):
    out, image = cam_output
    cache = viewer.CamCache(mrml_scene)
    labels, names = ["A", "B"], ["AC", "ROSF"]
    assert cache.missing(labels, names) == names
    with pytest.raises(FileNotFoundError):  # files are named after the landmark's schema name
        cache.load(out, "case02", labels, ["R olfactory sulcal fundus"])
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0  # nothing half-loaded
    nodes = cache.load(out, "case02", labels, names)
    assert len(nodes) == 4 and cache.missing(labels, names) == []
    ac = cache.get("A", "AC")
    assert ac.GetAttribute("GradCAMViewer.Landmark") == "AC"
    assert np.allclose(Grid.of(mrml.volume_to_image(ac)).index_to_ras, Grid.of(image).index_to_ras, atol=1e-6)
    assert cache.get("A", "AC") is ac  # switching landmarks: the same node, nothing recomputed
    cache.load(out, "case02", labels, ["AC"])  # recomputing replaces, never duplicates
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 4
    table = cache.focus_tables["case02"]
    assert table.GetNumberOfRows() == 2 and table.GetCellText(0, 0) == "AC"

    # An empty map has no centre (NaN in the CSV): the table says "empty" there, not "nan".
    focus = next(out.glob("case02*_gradcam_focus.csv"))
    lines = focus.read_text().splitlines()
    header = lines[0].split(",")
    column = next(n for n, name in enumerate(header) if name.startswith("com_distance_mm"))
    cells = lines[1].split(",")
    cells[column] = "nan"
    emptied = tmp_path / "focus.csv"
    emptied.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    table = viewer.focus_table(mrml_scene, emptied)
    assert table.GetCellText(0, column) == "empty"
    assert float(table.GetCellText(1, column)) == pytest.approx(float(lines[2].split(",")[column]), abs=1e-6)


def test_overlay_threshold_and_landmark_marker(mrml_scene, cam_output):
    out, _ = cam_output
    cache = viewer.CamCache(mrml_scene)
    node = cache.load(out, "case02", ["A", "B"], ["AC"])[0]
    viewer.configure_overlay(node, opacity=0.4, threshold=0.25)
    display = node.GetDisplayNode()
    top = float(sitk.GetArrayFromImage(mrml.volume_to_image(node)).max())  # a copy: the image is a temporary
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.25 * top, rel=1e-5)
    assert node.GetAttribute("GradCAMViewer.Opacity") == "0.400"
    # A map Grad-CAM left without positive evidence is told apart (the module then says so in words).
    empty = sitk.Image(mrml.volume_to_image(node))
    empty *= 0
    assert viewer.has_evidence(node) and not viewer.has_evidence(mrml.image_to_volume(mrml_scene, empty, "empty"))
    marker = viewer.landmark_marker(mrml_scene, "AC", [1.0, 2.0, 3.0])
    again = viewer.landmark_marker(mrml_scene, "PC", [4.0, 5.0, 6.0])
    assert marker is again and marker.GetNumberOfControlPoints() == 1 and marker.GetNthControlPointLabel(0) == "PC"
