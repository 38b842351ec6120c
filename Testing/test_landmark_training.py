"""The LandmarkTraining module's logic (LandmarkTrainingLib) against the real MRML classes of slicer-core:
the guided session over a schema's sub-anatomies, planes (scan symmetry, placed midline points, the
schema's planes), projection of placed primaries, secondaries at equal arc length along a drawn curve, the
live QA table, the fix and its exact undo (refused once its points moved), model-assisted pre-filling,
dataset versions saved and loaded back, point lists deleted by the user, a closed scene, persistent place
mode given back, and the agreement outputs as tables. Known answers come from synthetic geometry."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from LandmarkDetectionLib import datasets
from LandmarkDetectionLib.annotation import COLUMNS, arc_fractions, plane_angle
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, write_markups_json
from LandmarkDetectionLib.geometry import rigid_matrix
from LandmarkDetectionLib.uncertainty import Uncertainty, write_uncertainty
from test_planes import head_image  # a head mirror-symmetric about a known plane

pytest.importorskip("slicer")
sys.path.insert(0, str(REPO / "LandmarkTraining"))  # the module's Qt-free logic, as Slicer would find it
from LandmarkDetectionLib import mrml  # noqa: E402
from LandmarkTrainingLib import store  # noqa: E402
from LandmarkTrainingLib.placing import PersistentPlacing  # noqa: E402
from LandmarkTrainingLib.session import SUB_ANATOMY_ATTRIBUTE, AnnotationSession  # noqa: E402

X, Y, Z = np.eye(3)
FL = ["FL_frontal_pole", "FL_right_lateral", "FL_left_lateral", "FL_right_anterolateral", "FL_left_anterolateral"]


@pytest.fixture
def volume(mrml_scene):
    return mrml.image_to_volume(mrml_scene, head_image()[0], "scan")


@pytest.fixture
def session(mrml_scene, brain88, volume):
    """A brain-88 session whose mid-sagittal plane is x = 0 (as if found from the scan's symmetry)."""
    session = AnnotationSession(mrml_scene, brain88, volume)
    session.set_symmetry_plane((0.0, 0.0, 0.0), X)
    return session


def place(session, name, position):
    """What a click in place mode does: define the landmark's control point."""
    node, n = session._where[session.schema.lookup(name)]
    node.SetNthControlPointPositionWorld(n, *(float(v) for v in position))


def position(session, name):
    return session.coordinates()[session.schema.lookup(name)]


def frontal_curve(session):
    """A linear boundary through the frontal points: (-50,20) -> (-50,70) -> (50,70) -> (50,20) at z = 30."""
    curve = session.add_curve("Frontal Lobe")
    curve.SetCurveTypeToLinear()
    for point in ((-50, 20, 30), (-50, 70, 30), (50, 70, 30), (50, 20, 30)):
        curve.AddControlPoint(*(float(v) for v in point))
    return curve


def place_frontal_primaries(session):
    for name, point in zip(FL, ((0, 70, 30), (50, 20, 30), (-50, 20, 30))):
        place(session, name, point)
    session.update()


# ---------------------------------------------------------------------------------------------- stepping
def test_session_walks_the_sub_anatomies_in_schema_order(session, brain88):
    names = [s.name for s in brain88.sub_anatomies]
    assert [node.GetName() for node in session.nodes] == [f"scan {name}" for name in names]
    assert [node.GetAttribute(SUB_ANATOMY_ATTRIBUTE) for node in session.nodes] == names
    assert all(node.GetFixedNumberOfControlPoints() and not node.GetLocked() for node in session.nodes)
    visited = [session.sub_anatomy.name] + [session.next().name for _ in names[1:]]
    assert visited == names
    assert session.next().name == names[-1]  # the last stays
    assert session.previous().name == names[-2] and session.go_to("Eye").name == "Eye"
    assert session.go_to(0).name == "Frontal Lobe" and session.node() is session.nodes[0]

    text = session.instructions()
    assert brain88.sub_anatomies[0].guideline in text
    assert all(brain88.landmarks[i].definition in text for i in brain88.indices_of("Frontal Lobe"))
    assert text.count("[ ]") == 5
    # place mode fills undefined points in order: the primaries; the secondaries are missing (skipped)
    node = session.node()
    assert session.to_place() == FL[:3]
    assert [node.GetNthControlPointPositionStatus(n) for n in range(5)] == [node.PositionUndefined] * 3 + \
        [node.PositionMissing] * 2
    place(session, FL[0], (0, 70, 30))
    assert session.to_place() == FL[1:3] and session.instructions().count("[x]") == 1


# ------------------------------------------------------------------------------------------------ planes
def test_mid_sagittal_plane_from_scan_symmetry_then_from_placed_midline_points(mrml_scene, brain88):
    image, centre, normal = head_image()
    volume = mrml.image_to_volume(mrml_scene, image, "turned")
    session = AnnotationSession(mrml_scene, brain88, volume)
    found_centre, found_normal = session.estimate_symmetry_plane()
    assert plane_angle(found_normal, normal) < 1.0  # the head is turned 12 deg about S and 6 deg about A
    assert abs((found_centre - centre) @ normal) < 1.0
    assert session.mid_sagittal().source == "scan symmetry"

    # one midline point: the symmetry plane moved through it
    point = centre + 3.0 * normal + 20.0 * Z
    place(session, "CC_genu", point)
    msp = session.mid_sagittal()
    assert np.allclose(msp.normal, found_normal) and np.allclose(msp.centre, point)
    # midline points spanning a plane: their plane, tilted 5 degrees from the scan's
    tilted = rigid_matrix((0, 0, 5), (0, 0, 0))[:3, :3] @ found_normal
    u = np.cross(tilted, Z) / np.linalg.norm(np.cross(tilted, Z))
    v = np.cross(tilted, u)
    for name, (a, b) in zip(["CC_genu", "CC_splenium_posterior", "CC_mid_body", "BS_obex"],
                            [(30, 10), (-35, 12), (0, 30), (-20, -40)]):
        place(session, name, centre + a * u + b * v)
    msp = session.mid_sagittal()
    assert plane_angle(msp.normal, tilted) < 1e-6 and msp.normal @ X > 0 and "4 placed midline" in msp.source


def test_placed_primaries_are_projected_onto_their_plane(mrml_scene, brain88, volume):
    session = AnnotationSession(mrml_scene, brain88, volume)
    normal = rigid_matrix((0, 0, 10), (0, 0, 0))[:3, :3] @ X
    centre = np.array([2.0, 0.0, 0.0])
    session.set_symmetry_plane(centre, normal)
    in_plane = centre + 10.0 * np.cross(normal, Z) - 25.0 * Z
    place(session, "BS_obex", in_plane + 3.0 * normal)  # 3 mm off the mid-sagittal plane
    report = session.update()
    assert report.projected == [("BS_obex", pytest.approx(3.0))]
    assert np.allclose(position(session, "BS_obex"), in_plane, atol=1e-9)

    # an axial sub-anatomy: its first point sets the level, the next ones come onto it
    place(session, FL[0], (0, 70, 30))
    place(session, FL[1], (50, 20, 34))
    place(session, FL[2], (-50, 20, 26))
    report = session.update()
    assert np.allclose(session.coordinates()[:3], [(0, 70, 30), (50, 20, 30), (-50, 20, 30)], atol=1e-9)
    assert [name for name, _ in report.projected] == FL[1:3]  # the pole, placed first, is not moved
    assert [mm for _, mm in report.projected] == pytest.approx([4.0, 4.0])
    # a dragged point is the annotator's: not projected again
    place(session, FL[1], (50, 20, 31))
    assert session.update().projected == [] and position(session, FL[1])[2] == 31

    # the slice view shows the plane as Slicer shows an axial view (patient right on screen left, anterior
    # up), turned with the head (its right is the mid-sagittal normal), centred on the points
    slice_node = mrml_scene.AddNewNodeByClass("vtkMRMLSliceNode")
    plane = session.reformat(slice_node, "Frontal Lobe")
    matrix = slicer_matrix(slice_node.GetSliceToRAS())
    assert np.allclose(matrix[:3, :3], np.stack([*plane.axes, plane.normal], axis=1))
    turn = rigid_matrix((0, 0, 10), (0, 0, 0))[:3, :3]
    assert np.allclose(matrix[:3, :3], turn @ np.diag([-1, 1, 1]), atol=0.02) and "best fit" in plane.how
    assert np.allclose(matrix[:3, 3], plane.centre) and np.allclose(plane.centre, (0, 110 / 3, 91 / 3))
    assert np.allclose(matrix[:3, 3], plane.centre) and "best fit" in plane.how


def slicer_matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_points_of_a_loaded_annotation_are_never_moved(mrml_scene, brain88, volume):
    coords = np.full((len(brain88), 3), np.nan)
    coords[:3] = [(0, 70, 30), (50, 20, 34), (-50, 20, 26)]  # off one axial plane, as saved
    session = AnnotationSession(mrml_scene, brain88, volume, coords)
    session.set_symmetry_plane((0, 0, 0), X)
    report = session.update()
    assert report.projected == [] and np.allclose(session.coordinates()[:3], coords[:3])


# ----------------------------------------------------------------------------------------- secondaries
def test_secondaries_at_equal_arc_length_along_the_drawn_curve_and_editable(session):
    place_frontal_primaries(session)
    curve = frontal_curve(session)
    report = session.update()
    assert sorted(report.placed) == sorted(FL[3:])
    # half the arc length from the pole (0,70) to each lateral point (+-50,20): the corners (+-50,70)
    assert np.allclose(position(session, FL[3]), (50, 70, 30), atol=1e-6)
    assert np.allclose(position(session, FL[4]), (-50, 70, 30), atol=1e-6)
    points = mrml.curve_points(curve)
    assert arc_fractions(points, position(session, FL[0]), position(session, FL[1]),
                         position(session, FL[3])) == pytest.approx([0.5])

    # they follow a primary the annotator drags: pole at (20,70): 30 + 50 mm to the right, 70 + 50 to the left
    place(session, FL[0], (20, 70, 30))
    assert sorted(session.update().placed) == sorted(FL[3:])
    assert np.allclose(position(session, FL[3]), (50, 60, 30), atol=1e-6)
    assert np.allclose(position(session, FL[4]), (-40, 70, 30), atol=1e-6)
    # one the annotator moves stays theirs
    place(session, FL[4], (-45, 72, 31))
    session.update()
    assert np.array_equal(position(session, FL[4]), [-45, 72, 31])
    # 'Re-place secondaries' puts it back on the curve, undoably
    edit = session.place_secondaries("Frontal Lobe")
    assert [m.landmark for m in edit.moves] == [FL[4]] and edit.moves[0].distance_mm == pytest.approx(np.sqrt(30))
    assert np.allclose(position(session, FL[4]), (-40, 70, 30), atol=1e-6)
    session.undo()
    assert np.array_equal(position(session, FL[4]), [-45, 72, 31])
    with pytest.raises(LandmarkError, match="draw the boundary curve"):
        session.place_secondaries("Eye")


# ---------------------------------------------------------------------------------------------------- QA
def test_qa_table_shows_the_checks_of_each_sub_anatomy(mrml_scene, brain88, volume):
    tilt = rigid_matrix((15, 0, 0), (0, 0, 0))[:3, :3]  # the frontal plane turned 15 degrees about R
    pole, right, left = (tilt @ np.array(p, float) + (0, 0, 30) for p in ((0, 70, 0), (50, 20, 0), (-50, 20, 0)))
    coords = np.full((len(brain88), 3), np.nan)
    coords[:5] = [pole, right, left, (pole + right) / 2, (pole + left) / 2]
    session = AnnotationSession(mrml_scene, brain88, volume, coords)
    session.set_symmetry_plane((0, 0, 0), X)
    session.update()
    table = session.qa_table
    assert table.GetNumberOfRows() == len(brain88.sub_anatomies) and table.GetNumberOfColumns() == len(COLUMNS)
    assert [table.GetColumnName(k) for k in range(len(COLUMNS))] == list(COLUMNS)
    cell = {name: table.GetCellText(0, k) for k, name in enumerate(COLUMNS)}
    # planar and equally spaced, but 15 degrees from axial: the angle warns (schema: warn 10, fail 20)
    assert cell == {**cell, "sub-anatomy": "Frontal Lobe", "status": "warn", "points": "5", "missing": "0",
                    "rms mm": "0.00", "max mm": "0.00", "angle deg": "15.0", "expected plane": "axial (MSP)",
                    "spacing CV": "0.000", "order": "ok", "duplicates": "0"}
    assert [table.GetCellText(1, k) for k in (0, 1, 3)] == ["Brain Stem", "warn", "8"]  # nothing placed yet
    # the QA is live: two points on top of each other fail at once
    place(session, FL[2], right + (0.1, 0, 0))
    result = session.update().qa
    assert table.GetCellText(0, COLUMNS.index("duplicates")) == "1" and table.GetCellText(0, 1) == "fail"
    assert result.row("Frontal Lobe").status["duplicates"] == "fail"


# ------------------------------------------------------------------------------------------- fix and undo
def test_fix_is_shown_first_applied_as_shown_and_undone_exactly(mrml_scene, brain88, volume):
    coords = np.full((len(brain88), 3), np.nan)
    coords[:5] = [(0, 70, 30), (50, 20, 30), (-50, 20, 30), (40, 55, 30), (-35, 60, 30)]
    coords[:5] += np.random.default_rng(3).normal(0, 1.5, (5, 3))  # off their plane and unevenly spaced
    coords[brain88.lookup("BS_obex")] = (1.0, -40.0, -30.0)
    session = AnnotationSession(mrml_scene, brain88, volume, coords)
    session.update()
    before = session.coordinates()
    fix = session.fix(["Frontal Lobe"])
    assert np.array_equal(session.coordinates(), before, equal_nan=True)  # computed, not applied
    assert {m.landmark for m in fix.moves} == set(FL) and "FL_frontal_pole" in fix.text()

    session.apply_fix(fix)
    after = session.coordinates()
    assert np.allclose(after[:5], fix.positions[:5], atol=1e-9)
    assert np.array_equal(after[5:], before[5:], equal_nan=True)  # nothing else moved
    assert session.qa().row("Frontal Lobe").rms_mm < 1e-6
    edit = session.undo()
    assert edit.description == "fix" and session.undo_stack == []
    assert np.array_equal(session.coordinates(), before, equal_nan=True)  # exactly, bit for bit

    stale = session.fix(["Frontal Lobe"])
    place(session, FL[0], (0, 71, 30))  # the annotator drags a point after looking at the fix
    moved = session.coordinates()
    with pytest.raises(LandmarkError, match="compute the fix again"):
        session.apply_fix(stale)
    assert np.array_equal(session.coordinates(), moved, equal_nan=True)


def test_undo_is_refused_naming_the_points_moved_since_the_edit(mrml_scene, brain88, volume):
    coords = np.full((len(brain88), 3), np.nan)
    coords[:5] = [(0, 70, 30), (50, 20, 30), (-50, 20, 30), (40, 55, 30), (-35, 60, 30)]
    coords[:5] += np.random.default_rng(3).normal(0, 1.5, (5, 3))  # off their plane and unevenly spaced
    session = AnnotationSession(mrml_scene, brain88, volume, coords)
    session.update()
    before = session.coordinates()
    edit = session.apply_fix(session.fix(["Frontal Lobe"]))
    assert {m.landmark for m in edit.moves} == set(FL)
    fixed = session.coordinates()
    assert np.array_equal(edit.written, fixed, equal_nan=True)

    place(session, FL[1], fixed[1] + (0.0, 2.0, 0.0))  # the annotator corrects a point after the fix
    node, n = session._where[brain88.lookup(FL[3])]
    node.UnsetNthControlPointPosition(n)  # and removes another
    corrected = session.coordinates()
    with pytest.raises(LandmarkError, match=f"the fix was not undone: {FL[1]}, {FL[3]} moved since it was applied"):
        session.undo()
    assert np.array_equal(session.coordinates(), corrected, equal_nan=True)  # nothing changed
    assert session.undo_stack == [edit]

    place(session, FL[1], fixed[1])  # put back where the fix left it: the fix can be undone again
    node.SetNthControlPointPositionWorld(n, *fixed[3])
    assert session.undo() is edit and session.undo_stack == []
    assert np.array_equal(session.coordinates(), before, equal_nan=True)


# -------------------------------------------------------------------------------------- model assistance
def test_prefill_keeps_placed_points_reviews_most_uncertain_first_and_records_what_changed(session, brain88):
    place(session, FL[0], (0, 70, 30))  # placed by the annotator before the model ran
    suggested = np.full((len(brain88), 3), np.nan)
    semi = np.full(len(brain88), np.nan)
    for k, i in enumerate(brain88.indices_of("Frontal Lobe")):
        suggested[i] = (10.0 * k, 50.0, 30.0)
        semi[i] = [9.0, 2.0, 7.0, 1.0, 4.0][k]
    assert session.prefill(suggested, semi, "tiny") == 4
    assert np.array_equal(position(session, FL[0]), [0, 70, 30])  # the annotator's point stays
    assert session.provenance == "model-assisted:tiny"
    session.go_to("Eye")
    item = session.next_suggestion()
    assert (item.landmark, item.max_semi_axis_mm, session.sub_anatomy.name) == (FL[2], 7.0, "Frontal Lobe")
    assert [brain88.names[i] for i in session.review] == [FL[4], FL[1], FL[3]]

    place(session, FL[1], suggested[1] + (3.0, 4.0, 0.0))  # moved by 5 mm
    node, n = session._where[4]
    node.UnsetNthControlPointPosition(n)  # the annotator removed a suggestion
    records = {r["landmark"]: r for r in session.assistance()}
    assert [records[name]["action"] for name in FL] == ["added", "moved", "accepted", "accepted", "removed"]
    assert records[FL[1]]["moved_mm"] == pytest.approx(5.0) and records[FL[2]]["moved_mm"] == 0.0
    assert records["BS_obex"]["action"] == "missing"


def test_next_suggestion_skips_suggestions_the_annotator_removed(session, brain88):
    suggested = np.full((len(brain88), 3), np.nan)
    semi = np.full(len(brain88), np.nan)
    for k, i in enumerate(brain88.indices_of("Frontal Lobe")):
        suggested[i] = (10.0 * k, 50.0, 30.0)
        semi[i] = 5.0 - k  # the pole is the most uncertain
    assert session.prefill(suggested, semi, "tiny") == 5
    for name in FL[:2]:  # the two most uncertain suggestions removed before they were visited
        node, n = session._where[brain88.lookup(name)]
        node.UnsetNthControlPointPosition(n)
    item = session.next_suggestion()
    assert item.landmark == FL[2] and np.array_equal(item.position, suggested[2])
    assert [brain88.names[i] for i in session.review] == FL[3:]
    node, n = session._where[brain88.lookup(FL[4])]
    node.SetNthControlPointPositionMissing(n)
    assert session.next_suggestion().landmark == FL[3]
    assert session.next_suggestion() is None and session.review == []


def test_detection_output_read_as_suggestions_in_schema_order(tmp_path, afids32, brain88):
    coords = np.random.default_rng(0).uniform(-50, 50, (32, 3))
    covariance = np.tile(np.eye(3), (32, 1, 1)) * np.linspace(0.5, 4.0, 32)[:, None, None]
    write_markups_json(tmp_path / "scan.mrk.json", afids32, coords)
    write_uncertainty(tmp_path / "scan", afids32, Uncertainty(coords, covariance, 0.9), 5.0, 10, "noise", 1.0)
    read, semi = store.read_suggestions(tmp_path, "scan", afids32)
    assert np.allclose(read, coords, atol=1e-6)
    assert np.argmax(semi) == 31 and semi[0] == pytest.approx(np.sqrt(0.5 * 6.2514), rel=1e-3)  # chi2(0.9, 3)
    from LandmarkDetectionLib.resources import bundled_model_path

    store.check_model_schema(bundled_model_path("afids-32"), afids32)
    with pytest.raises(LandmarkError, match="detects schema 'afids-32'"):
        store.check_model_schema(bundled_model_path("afids-32"), brain88)
    assert store.detection_arguments(bundled_model_path(), tmp_path / "in.nrrd", tmp_path / "out", 20)[:2] == \
        ["detect", "--model"]


def test_persistent_placing_gives_slicers_setting_back(mrml_scene):
    """Place mode stays on until every point is placed, and Slicer's persistence setting (the application's)
    is as it was once placement ends, or the session ends or the module is left while placing."""
    interaction = mrml_scene.AddNewNodeByClass("vtkMRMLInteractionNode")
    placing = PersistentPlacing(interaction)
    placing.start()
    assert (interaction.GetCurrentInteractionMode(), interaction.GetPlaceModePersistence()) == (interaction.Place, 1)
    placing.start()  # the next list, still placing: the setting to give back is the one from before
    interaction.SwitchToViewTransformMode()  # every point placed (Slicer switches), Esc, or another mode
    assert interaction.GetPlaceModePersistence() == 0 and not placing.placing

    interaction.SetPlaceModePersistence(1)  # the user's own choice later is left alone
    interaction.SetCurrentInteractionMode(interaction.Place)
    interaction.SwitchToViewTransformMode()
    assert interaction.GetPlaceModePersistence() == 1
    interaction.SetPlaceModePersistence(0)
    placing.start()
    placing.stop()  # the session ends, or the module is left, while placing
    placing.stop()
    assert interaction.GetPlaceModePersistence() == 0 and interaction.GetCurrentInteractionMode() == interaction.Place
    interaction.SetPlaceModePersistence(1)
    interaction.SwitchToViewTransformMode()  # no observer left behind
    assert interaction.GetPlaceModePersistence() == 1


# ------------------------------------------------------------------------------------------------ datasets
def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_saving_twice_makes_two_versions_and_loading_back(mrml_scene, session, brain88, tmp_path):
    folder = datasets.create_dataset(tmp_path / "dataset", "brain-88")
    place_frontal_primaries(session)
    first = store.save_session(session, folder, "alice")
    assert (first.entry.case, first.entry.version, first.assistance) == ("scan", 1, None)
    assert (folder / "images" / "scan.nrrd").is_file() and session.dataset == (folder, "scan")
    v1, v1_digest = session.coordinates(), digest(first.entry.landmarks)

    place(session, FL[0], (0, 72, 30))
    second = store.save_session(session, folder, "alice", status="draft")
    assert second.entry.version == 2 and second.entry.landmarks != first.entry.landmarks
    assert digest(first.entry.landmarks) == v1_digest  # version 1 is never touched
    assert [v.number for v in datasets.list_versions(folder, "scan", "alice")] == [1, 2]
    assert np.allclose(read_landmarks(first.entry.landmarks, brain88), v1, atol=1e-6, equal_nan=True)

    newest = store.load_case(mrml_scene, folder, "scan", "alice")
    assert np.allclose(newest.coordinates(), session.coordinates(), atol=1e-6, equal_nan=True)
    oldest = store.load_case(mrml_scene, folder, "scan", "alice", version=1)
    assert np.allclose(oldest.coordinates(), v1, atol=1e-6, equal_nan=True)
    assert oldest.volume is newest.volume and oldest.dataset == (folder, "scan")  # the case's scan, loaded once
    assert newest.name == "scan alice v2" and newest.node("Frontal Lobe").GetName() == "scan alice v2 Frontal Lobe"

    # a loaded version edited and saved by another annotator: a new annotation of the same case
    oldest.prefill(np.where(np.isfinite(v1), np.nan, 1.0), np.ones(len(brain88)), "tiny")
    saved = store.save_session(oldest, folder, "bob")
    assert (saved.entry.case, saved.entry.annotator, saved.entry.version) == ("scan", "bob", 1)
    assert saved.entry.provenance == "model-assisted:tiny"
    record = json.loads(saved.assistance.read_text(encoding="utf-8"))
    assert saved.assistance.name == "v1.assistance.json" and record["annotation"] == "v1.mrk.json"
    assert record["counts"]["accepted"] == len(brain88) - 3 and record["counts"]["added"] == 3
    with pytest.raises(LandmarkError, match=r"case 'scan' has no version 7 by 'alice' \(versions: 1, 2\)"):
        store.load_case(mrml_scene, folder, "scan", "alice", version=7)


def test_a_saved_version_keeps_its_boundary_curve_and_loads_with_it(mrml_scene, session, tmp_path, capsys):
    """The whole annotation is saved: the curve the secondaries were spaced along comes back with the version,
    exactly, so the QA of the loaded version (in the module, and ``qa`` on the version file) is the QA it was
    saved with; loading moves no point, and the loaded curve places secondaries again."""
    from LandmarkDetectionLib.cli import main

    folder = datasets.create_dataset(tmp_path / "dataset", "brain-88")
    place_frontal_primaries(session)
    frontal_curve(session)
    place(session, FL[3], (48, 66, 30))  # the annotator moves one secondary off its equal spacing
    session.update()
    qa = session.qa().row("Frontal Lobe")
    assert qa.spacing_cv > 0.01
    saved = store.save_session(session, folder, "alice")
    assert [p.name for p in saved.version.curves.iterdir()] == ["Frontal_Lobe-01.mrk.json"]

    loaded = store.load_case(mrml_scene, folder, "scan", "alice")
    (node,) = loaded.curves_of("Frontal Lobe")
    assert node.GetAttribute(SUB_ANATOMY_ATTRIBUTE) == "Frontal Lobe" and node.GetName() == "scan alice v1 Frontal Lobe boundary 1"
    assert np.allclose(mrml.curve_points(node), mrml.curve_points(session.curves_of("Frontal Lobe")[0]), atol=1e-9)
    report = loaded.update()
    assert (report.projected, report.placed) == ([], [])
    assert np.allclose(loaded.coordinates(), session.coordinates(), atol=1e-6, equal_nan=True)
    assert loaded.qa().row("Frontal Lobe").spacing_cv == pytest.approx(qa.spacing_cv, abs=1e-6)
    assert main(["qa", "--landmarks", str(saved.entry.landmarks), "--output", str(tmp_path / "qa.csv")]) == 0
    assert "boundary curves stored with this version" in capsys.readouterr().out
    row = next(r for r in csv.DictReader((tmp_path / "qa.csv").open(encoding="utf-8")) if r["sub_anatomy"] == "Frontal Lobe")
    assert float(row["spacing_cv"]) == pytest.approx(qa.spacing_cv, abs=1e-4)

    edit = loaded.place_secondaries("Frontal Lobe")  # the loaded curve serves as the drawn one did
    assert [m.landmark for m in edit.moves] == [FL[3]] and np.allclose(position(loaded, FL[3]), (50, 70, 30))


def test_a_point_list_deleted_by_the_annotator_is_missing_points_and_comes_back_empty(mrml_scene, session, brain88,
                                                                                     tmp_path):
    place_frontal_primaries(session)
    place(session, "BS_obex", (0, -40, -30))
    deleted = session.node("Frontal Lobe")
    mrml_scene.RemoveNode(deleted)  # in the Data module
    folder = datasets.create_dataset(tmp_path / "dataset", "brain-88")
    stored = read_landmarks(store.save_session(session, folder, "alice").entry.landmarks, brain88)
    assert np.isnan(stored[:5]).all()  # never the deleted list's points
    assert np.allclose(stored[brain88.lookup("BS_obex")], (0, -40, -30))

    node = session.node("Frontal Lobe")  # back, empty, as the session made it
    assert node is not deleted and node.GetScene() is mrml_scene and node.GetName() == "scan Frontal Lobe"
    assert node.GetAttribute(SUB_ANATOMY_ATTRIBUTE) == "Frontal Lobe" and node.GetFixedNumberOfControlPoints()
    assert [node.GetNthControlPointPositionStatus(n) for n in range(5)] == [node.PositionUndefined] * 3 + \
        [node.PositionMissing] * 2
    hierarchy = mrml_scene.GetSubjectHierarchyNode()
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == session.folder
    assert session.update().restored == ["Frontal Lobe"] and session.update().restored == []
    assert session.to_place() == FL[:3]
    place(session, FL[0], (0, 70, 30))
    assert np.allclose(position(session, FL[0]), (0, 70, 30))

    hierarchy.RemoveItem(session.folder)  # the whole annotation folder: its lists come back in a new one
    assert session.update().restored == [sub.name for sub in brain88.sub_anatomies]
    assert mrml.item_exists(mrml_scene, session.folder) and np.isnan(session.coordinates()).all()
    table = session.qa_table  # so does the QA table
    assert table.GetScene() is mrml_scene and table.GetNumberOfRows() == len(brain88.sub_anatomies)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(table)) == session.folder


def test_a_closed_scene_ends_the_session_and_nothing_comes_back(mrml_scene, session, brain88):
    """A model's suggestions arriving after the scene was closed change nothing (the module cancels the
    pre-fill at the close; this is the session's own guard)."""
    place_frontal_primaries(session)
    mrml_scene.Clear(0)
    assert session.closed
    with pytest.raises(LandmarkError, match="'scan' is closed: its scan is no longer in the scene"):
        session.prefill(np.zeros((len(brain88), 3)), np.ones(len(brain88)), "tiny")
    assert mrml_scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode").GetNumberOfItems() == 0


def test_a_scan_saved_from_the_scene_keeps_its_voxel_type(mrml_scene, brain88, tmp_path):
    import SimpleITK as sitk

    image = sitk.Cast(head_image()[0] * 10, sitk.sitkInt16)
    volume = mrml.image_to_volume(mrml_scene, image, "int16 scan")
    folder = datasets.create_dataset(tmp_path / "dataset", "brain-88")
    saved = store.save_session(AnnotationSession(mrml_scene, brain88, volume), folder, "alice")
    copied = sitk.ReadImage(str(saved.entry.image))
    assert copied.GetPixelID() == sitk.sitkInt16
    assert np.array_equal(sitk.GetArrayFromImage(copied), sitk.GetArrayFromImage(image))


def test_saving_refuses_another_scheme_or_another_scan(mrml_scene, session, tmp_path):
    other = datasets.create_dataset(tmp_path / "afids", "afids-32")
    with pytest.raises(LandmarkError, match="follow schema 'afids-32'; this session annotates schema 'brain-88'"):
        store.save_session(session, other, "alice")
    folder = datasets.create_dataset(tmp_path / "dataset", "brain-88")
    store.save_session(session, folder, "alice")
    image = head_image(turn_deg=(0, 0, 30))[0]  # another scan saved under the same case name
    stranger = AnnotationSession(mrml_scene, session.schema, mrml.image_to_volume(mrml_scene, image, "scan"))
    with pytest.raises(LandmarkError, match="is not the scan of case 'scan'"):
        store.save_session(stranger, folder, "bob")
    assert [e.annotator for e in datasets.read_entries(folder)] == ["alice"]


def test_agreement_outputs_load_as_table_nodes(mrml_scene, session, brain88, tmp_path):
    """The agreement runs as the module runs it: a BackendJob (which adds --progress json) in a separate process,
    whose steps arrive as progress records; its outputs load as table nodes."""
    sys.path.insert(0, str(REPO / "LandmarkDetection"))
    from LandmarkDetectionAppLib.job import BackendJob

    folder = datasets.create_dataset(tmp_path / "dataset", "brain-88")
    place_frontal_primaries(session)
    store.save_session(session, folder, "alice")
    place(session, FL[0], (1, 70, 30))
    place(session, FL[1], (50, 22, 30))
    store.save_session(session, folder, "bob")
    output = store.agreement_output(folder)
    assert output.parent == folder / "agreement"
    records, outcomes = [], []
    job = BackendJob(lambda job: store.agreement_arguments(folder, output), records.append, outcomes.append)
    job.start()
    deadline = time.monotonic() + 300
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert len(outcomes) == 1 and outcomes[0].ok, outcomes or "the agreement job did not finish"
    assert records[-1] == {**records[-1], "stage": "agreement: writing tables and plots", "step": 6, "total": 6}
    results = store.load_agreement(mrml_scene, output)
    assert set(results.tables) == {"agreement.csv", "planarity.csv", "agreement_summary.csv"}
    assert len(results.figures) == 3 and all(path.suffix == ".png" for path in results.figures)
    distances = results.tables["agreement.csv"]
    names = [distances.GetColumnName(k) for k in range(distances.GetNumberOfColumns())]
    rows = [[distances.GetCellText(r, k) for k in range(len(names))] for r in range(distances.GetNumberOfRows())]
    pole = [row for row in rows if "FL_frontal_pole" in row]
    assert len(pole) == 2  # alice and bob, each half a millimetre from their mean
    assert all(float(row[-1]) == pytest.approx(0.5) for row in pole)
    with pytest.raises(LandmarkError, match="not an agreement output folder"):
        store.load_agreement(mrml_scene, tmp_path)
