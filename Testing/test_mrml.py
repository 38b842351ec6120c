"""The MRML layer against the real MRML classes of the slicer-core wheel."""

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.geometry import Grid, rigid_matrix
from LandmarkDetectionLib.uncertainty import summarize_samples
from conftest import make_volume

slicer = pytest.importorskip("slicer")
mrml = pytest.importorskip("LandmarkDetectionLib.mrml")


def test_volume_node_round_trip_keeps_voxels_and_geometry(mrml_scene):
    image = make_volume()
    node = mrml.image_to_volume(mrml_scene, image, "oblique")
    back = mrml.volume_to_image(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert np.allclose(Grid.of(back).index_to_ras, Grid.of(image).index_to_ras, atol=1e-9)


def test_volume_node_exported_as_float32_or_in_its_own_voxel_type(mrml_scene):
    image = sitk.Cast(make_volume() * 10, sitk.sitkInt16)
    node = mrml.image_to_volume(mrml_scene, image, "int16")
    as_float, as_is = mrml.volume_to_image(node), mrml.volume_to_image(node, keep_type=True)
    assert (as_float.GetPixelID(), as_is.GetPixelID()) == (sitk.sitkFloat32, sitk.sitkInt16)
    assert np.array_equal(sitk.GetArrayFromImage(as_is), sitk.GetArrayFromImage(image))
    assert np.array_equal(sitk.GetArrayFromImage(as_float), sitk.GetArrayFromImage(image))
    assert np.allclose(Grid.of(as_is).index_to_ras, Grid.of(image).index_to_ras, atol=1e-9)


def test_the_first_scan_is_a_plain_scalar_volume(mrml_scene):
    """Label maps, vector, DWI and tensor volumes are scalar volume nodes too (subclasses): not scans."""
    assert mrml.first_scalar_volume(mrml_scene) is None
    for node_class in ("vtkMRMLLabelMapVolumeNode", "vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode",
                       "vtkMRMLDiffusionTensorVolumeNode"):
        mrml_scene.AddNewNodeByClass(node_class)
    assert mrml_scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode").GetClassName() == "vtkMRMLLabelMapVolumeNode"
    assert mrml.first_scalar_volume(mrml_scene) is None
    scan = mrml.image_to_volume(mrml_scene, make_volume(), "scan")
    mrml.image_to_volume(mrml_scene, make_volume(), "another")
    assert mrml.first_scalar_volume(mrml_scene) is scan


def test_volume_under_a_linear_transform_is_read_in_world_coordinates(mrml_scene):
    image = make_volume()
    node = mrml.image_to_volume(mrml_scene, image, "moved")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = [10.0, -5.0, 2.5]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = mrml.volume_to_image(node)
    assert np.allclose(Grid.of(world).to_ras([0, 0, 0]), Grid.of(image).to_ras([0, 0, 0]) + [10.0, -5.0, 2.5])


def test_markups_per_sub_anatomy_and_storage_round_trip(mrml_scene, brain88, tmp_path):
    coords = np.random.default_rng(0).uniform(-80, 80, (88, 3))
    coords[7] = np.nan  # a landmark the model could not place stays missing
    nodes = mrml.add_landmarks(mrml_scene, brain88, coords, prefix="case ")
    assert [n.GetName() for n in nodes] == [f"case {s.name}" for s in brain88.sub_anatomies]
    frontal = nodes[0]
    assert frontal.GetNumberOfControlPoints() == 5 and frontal.GetLocked()
    assert frontal.GetNthControlPointLabel(0) == "FL_frontal_pole"
    assert frontal.GetNthControlPointDescription(0) == "Frontal Lobe"
    assert np.allclose(frontal.GetDisplayNode().GetSelectedColor(), brain88.sub_anatomies[0].rgb)
    back = mrml.landmarks_from_markups(nodes, brain88)
    assert np.isnan(back[7]).all()
    assert np.allclose(np.delete(back, 7, 0), np.delete(coords, 7, 0))
    # Through Slicer's own storage node and back: identical.
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    storage.SetFileName(str(tmp_path / "stem.mrk.json"))
    assert storage.WriteData(nodes[1])
    reread = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage.ReadData(reread)
    assert np.allclose(mrml.landmarks_from_markups([reread], brain88)[brain88.indices_of("Brain Stem")],
                       coords[brain88.indices_of("Brain Stem")], atol=1e-9, equal_nan=True)


def test_ellipsoid_model_vertices_satisfy_the_quadric(mrml_scene, afids32):
    rng = np.random.default_rng(1)
    truth_cov = np.array([[9.0, 2.0, 0.5], [2.0, 4.0, -1.0], [0.5, -1.0, 2.0]])
    samples = rng.multivariate_normal([5.0, -10.0, 20.0], truth_cov, size=(400, 32))
    uncertainty = summarize_samples(samples, level=0.9)
    models = mrml.add_ellipsoids(mrml_scene, afids32, uncertainty, flag_mm=5.0)
    assert len(models) == 32
    semi, axes = uncertainty.ellipsoids()[0]
    points = slicer.util.arrayFromModelPoints(models[0])
    # x^T Q x = 1 with Q = axes diag(1/semi^2) axes^T, for every vertex.
    q = axes @ np.diag(1.0 / semi ** 2) @ axes.T
    d = points - uncertainty.mean[0]
    assert np.allclose(np.einsum("ni,ij,nj->n", d, q, d), 1.0, atol=1e-5)
    assert float(models[0].GetAttribute("LandmarkDetection.MaxSemiAxisMm")) == pytest.approx(semi[0], abs=1e-3)
    assert models[0].GetDisplayNode().GetColor()[0] == pytest.approx(1.0)  # beyond the flag: red
    mrml.set_visibility(models, False)
    assert not models[5].GetDisplayNode().GetVisibility()


def test_results_table_lists_flagged_landmarks_first(mrml_scene, afids32):
    rng = np.random.default_rng(2)
    spread = np.full(32, 0.2)
    spread[[3, 17]] = 4.0  # two uncertain landmarks
    samples = rng.normal(size=(200, 32, 3)) * spread[None, :, None]
    uncertainty = summarize_samples(samples)
    table = mrml.add_results_table(mrml_scene, afids32, uncertainty.mean, uncertainty, flag_mm=2.0)
    assert table.GetNumberOfColumns() == len(mrml.TABLE_COLUMNS) and table.GetNumberOfRows() == 32
    first = {mrml.table_row_landmark(table, 0), mrml.table_row_landmark(table, 1)}
    assert first == {afids32.names[3], afids32.names[17]}
    assert table.GetCellText(0, 6) == "1" and table.GetCellText(2, 6) == "0"
    row = [mrml.table_row_landmark(table, r) for r in range(32)].index("AC")
    assert float(table.GetCellText(row, 2)) == pytest.approx(uncertainty.mean[0, 0], abs=1e-6)


def test_results_go_into_a_folder_under_the_volume_study(mrml_scene, afids32):
    hierarchy = mrml_scene.GetSubjectHierarchyNode()
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "Study")
    volume = mrml.image_to_volume(mrml_scene, make_volume(), "scan")
    hierarchy.CreateItem(study, volume)  # what Slicer's subject-hierarchy logic does when a volume is loaded
    folder = mrml.results_folder(mrml_scene, volume, "scan landmarks")
    assert hierarchy.GetItemParent(folder) == study
    nodes = mrml.add_landmarks(mrml_scene, afids32, np.zeros((32, 3)), folder)
    table = mrml.add_results_table(mrml_scene, afids32, np.zeros((32, 3)), folder=folder)
    for node in (*nodes, table):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == folder
    assert mrml.item_exists(mrml_scene, folder) and mrml.item_exists(mrml_scene, study)
    hierarchy.RemoveItem(folder)  # deleted in the Data module, with its nodes
    assert not mrml.item_exists(mrml_scene, folder) and nodes[0].GetScene() is None


def test_gradcam_volume_node_has_the_input_geometry(mrml_scene):
    image = make_volume()
    node = mrml.add_gradcam_volume(mrml_scene, image, "AC Grad-CAM")
    assert np.allclose(Grid.of(mrml.volume_to_image(node)).index_to_ras, Grid.of(image).index_to_ras)
    assert node.GetDisplayNode().GetWindowLevelMax() == pytest.approx(float(sitk.GetArrayViewFromImage(image).max()))


@pytest.fixture
def acpc_planes(afids32, sample):
    from LandmarkDetectionLib.geometry import apply_matrix, rigid_matrix
    from LandmarkDetectionLib.planes import compute_planes

    _, landmarks, _ = sample
    motion = rigid_matrix((12, -20, 25), (5, -3, 8))
    return compute_planes(afids32, apply_matrix(motion, landmarks)), motion


def test_plane_nodes_lie_on_the_computed_planes(mrml_scene, acpc_planes):
    planes, _ = acpc_planes
    nodes = mrml.add_planes(mrml_scene, planes, prefix="case ")
    assert len(nodes) == len(planes.planes)
    for node, plane in zip(nodes, planes.planes.values()):
        normal = np.zeros(3)
        node.GetNormalWorld(normal)
        centre = np.zeros(3)
        node.GetCenterWorld(centre)
        assert np.allclose(normal, plane.normal, atol=1e-6)
        assert abs(plane.distances(centre[None])[0]) < 1e-6
        assert node.GetLocked() and node.GetName() == f"case {plane.name} plane"


def test_acpc_transform_node_maps_ac_to_the_origin(mrml_scene, acpc_planes):
    planes, _ = acpc_planes
    node = mrml.add_acpc_transform(mrml_scene, planes.acpc)
    matrix = slicer.util.arrayFromTransformMatrix(node)
    ac = np.append(planes.acpc.ac, 1.0)
    assert np.allclose((matrix @ ac)[:3], 0.0, atol=1e-6)
    pc = np.append(planes.acpc.pc, 1.0)
    assert (matrix @ pc)[1] < 0 and abs((matrix @ pc)[0]) < 1e-6  # PC lies behind AC on the midline


def _slicer_preset(name: str) -> np.ndarray:
    """Slicer's own slice-to-RAS orientation of a preset view (patient right on the screen's left)."""
    import vtk

    matrix = vtk.vtkMatrix3x3()
    getattr(slicer.vtkMRMLSliceNode, f"Get{name}SliceToRASMatrix")(matrix, True)
    return np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])


@pytest.mark.parametrize("name, normal", [("Axial", (0, 0, 1)), ("Sagittal", (1, 0, 0)), ("Coronal", (0, 1, 0))])
def test_reformatted_scanner_planes_are_slicers_own_views(mrml_scene, name, normal):
    """Reformatting onto a scanner plane gives exactly Slicer's preset, whichever sign the normal has, and Slicer
    names the view after it."""
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(mrml_scene)
    slice_node = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    for sign in (1, -1):
        frame = mrml.reformat_slice(slice_node, (10.0, -20.0, 30.0), sign * np.array(normal, float))
        slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
        assert np.array_equal(frame, _slicer_preset(name)) and np.array_equal(slice_to_ras[:3, :3], frame)
        assert np.array_equal(slice_to_ras[:3, 3], [10.0, -20.0, 30.0]) and slice_node.GetOrientation() == name


def test_slice_views_turn_with_the_head():
    """A turned head's planes are shown as Slicer shows the presets, turned with it."""
    turn = rigid_matrix((5, -8, 20), (0, 0, 0))[:3, :3]
    head = turn.T  # rows: the head's right, anterior and superior
    for name, axis in (("Sagittal", 0), ("Coronal", 1), ("Axial", 2)):
        assert np.allclose(mrml.slice_frame(turn[:, axis], head), turn @ _slicer_preset(name))
        assert np.allclose(mrml.slice_frame(-turn[:, axis], head), turn @ _slicer_preset(name))


def test_slice_view_reformats_onto_a_plane_of_detected_landmarks(mrml_scene, acpc_planes):
    """As Landmark Detection's Reformat does it: the mid-sagittal plane shown as a sagittal view (the face to
    the left, superior up), the AC-PC axial plane as an axial view (the patient's right on the left, anterior
    up), both turned with the head and centred on the plane's field of view."""
    planes, _ = acpc_planes
    right, anterior, superior = planes.head_axes
    slice_node = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    msp = planes.planes["mid-sagittal"]
    mrml.reformat_slice(slice_node, msp.fov_centre, msp.normal, planes.head_axes)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    assert np.allclose(slice_to_ras[:3, 2], -msp.normal)  # looking along the normal, from the left as Slicer does
    assert slice_to_ras[:3, 0] @ -anterior > 0.999 and slice_to_ras[:3, 1] @ superior > 0.999
    assert np.allclose(slice_to_ras[:3, 3], msp.fov_centre) and abs(msp.distances(slice_to_ras[:3, 3][None])[0]) < 1e-6
    axial = planes.planes["acpc-axial"]
    mrml.reformat_slice(slice_node, axial.centre, axial.normal, planes.head_axes)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetSliceToRAS())
    assert np.allclose(slice_to_ras[:3, :3], np.stack([-right, anterior, superior], axis=1))
    assert np.allclose(slice_to_ras[:3, 3], planes.acpc.ac)


def test_results_table_is_locked_and_view_rows_map_to_table_rows(mrml_scene, afids32):
    coords = np.arange(96, dtype=float).reshape(32, 3)
    table = mrml.add_results_table(mrml_scene, afids32, coords)
    assert table.GetLocked()
    assert mrml.table_row(table, 0) == 0 and mrml.table_row_landmark(table, mrml.table_row(table, 5)) == "RSLMS"
    (getattr(table, "SetUseColumnTitleAsColumnHeader", None) or table.SetUseColumnNameAsColumnHeader)(False)
    assert mrml.table_row(table, 1) == 0  # the header row of names comes first in the view


def test_guided_annotation_nodes_place_in_order_and_a_fix_is_undoable(mrml_scene, afids32):
    """Points still to place are undefined (Slicer's place mode fills them in schema order), a fix moves
    only the named landmarks, and restoring the previous positions undoes it; curves give their points."""
    from LandmarkDetectionLib.mrml import add_landmarks, curve_points, landmarks_from_markups, set_landmark_positions

    coords = np.full((32, 3), np.nan)
    coords[0] = [1.0, 2.0, 3.0]
    nodes = add_landmarks(mrml_scene, afids32, coords, locked=False, to_place=True)
    first = nodes[0]
    assert first.GetNthControlPointPositionStatus(0) == first.PositionDefined
    undefined = [node.GetNthControlPointPositionStatus(n) == node.PositionUndefined
                 for node in nodes for n in range(node.GetNumberOfControlPoints())]
    assert sum(undefined) == 31
    placed = np.arange(96, dtype=float).reshape(32, 3)
    set_landmark_positions(nodes, afids32, placed, range(32))
    previous = landmarks_from_markups(nodes, afids32)
    np.testing.assert_allclose(previous, placed)
    fixed = placed.copy()
    fixed[[3, 7]] += 2.0
    set_landmark_positions(nodes, afids32, fixed, [3, 7])
    np.testing.assert_allclose(landmarks_from_markups(nodes, afids32), fixed)
    set_landmark_positions(nodes, afids32, previous, [3, 7])  # undo
    np.testing.assert_allclose(landmarks_from_markups(nodes, afids32), placed)

    curve = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "boundary")
    for point in ([0.0, 0.0, 0.0], [10.0, 5.0, 0.0], [20.0, 0.0, 0.0]):
        curve.AddControlPoint(*point)
    points = curve_points(curve)
    assert len(points) > 3 and np.allclose(points[0], 0.0) and np.allclose(points[-1], [20.0, 0.0, 0.0])


@pytest.mark.parametrize("node_class", ["vtkMRMLMarkupsCurveNode", "vtkMRMLMarkupsClosedCurveNode"])
def test_a_saved_boundary_comes_back_as_exactly_its_polyline(mrml_scene, node_class):
    """set_curve_points is curve_points' inverse: a saved (dense) boundary loaded into a curve node gives the
    same points back, so the QA of a loaded version measures the curve it was saved with (a closed curve
    ends back at its first point)."""
    from LandmarkDetectionLib.mrml import curve_points, set_curve_points

    points = np.array([[0.0, 0.0, 0.0], [10.0, 5.0, 0.0], [20.0, 0.0, 1.0], [30.0, 10.0, 2.0], [31.0, 25.0, 2.0]])
    node = mrml_scene.AddNewNodeByClass(node_class)
    set_curve_points(node, points)
    closed = node_class.endswith("ClosedCurveNode")
    assert node.GetNumberOfControlPoints() == len(points)
    assert np.allclose(curve_points(node), np.vstack([points, points[:1]]) if closed else points)
