"""Guided-annotation geometry, QA and fix (LandmarkDetectionLib.annotation) on synthetic geometry with
known answers, and the ``qa`` command end to end on a synthetic brain-88 file."""

from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest

from LandmarkDetectionLib.annotation import (COLUMNS, CSV_COLUMNS, FAIL, NA, PASS, WARN, Curve, add_qa_command,
                                             annotation_qa, arc_fractions, arc_lengths, closest_on_curve,
                                             equal_fractions, expected_normal, fix_annotation, place_secondaries,
                                             plane_angle, points_between, project_to_plane, read_curves,
                                             resample_polyline)
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, write_curve_json, write_markups_json
from LandmarkDetectionLib.geometry import rigid_matrix
from LandmarkDetectionLib.planes import fit_plane, plane_distances
from LandmarkDetectionLib.schema import QaThresholds, load_schema, schema_from_dict

X, Y, Z = np.eye(3)
TILT = rigid_matrix((25, 0, 0), (0, 0, 0))[:3, :3]  # the temporal plane: axial turned 25 deg about R

# A synthetic brain-88 head. Per sub-anatomy a plane (origin, in-plane axes u, v in RAS) and per primary
# point (centre u, centre v, radius, angle deg) in it: every point lies exactly on its plane, and each
# secondary lies on its primaries' circle at its fraction of the (shorter) angle between them, so
# secondaries are exactly equally spaced along the circle (and in chord).
PLANES = {"Frontal Lobe": ((0, 40, 30), X, Y), "Brain Stem": ((0, -20, -30), Y, Z),
          "Brain Boundary MSP": ((0, -10, 10), Y, Z), "Corpus Callosum": ((0, 0, 15), Y, Z),
          "Eye": ((0, 50, -20), X, Y), "Brain Axial Boundary": ((0, -10, 45), X, Y),
          "Temporal Lobe": ((0, -10, -15), TILT @ X, TILT @ Y)}
RADIUS = {"Frontal Lobe": 40, "Brain Stem": 12, "Brain Boundary MSP": 75, "Corpus Callosum": 30, "Eye": 30,
          "Brain Axial Boundary": 60, "Temporal Lobe": 15}
PRIMARY = {
    "FL_frontal_pole": 90, "FL_right_lateral": 0, "FL_left_lateral": 180,
    "BS_superior_interpeduncular_fossa": 100, "BS_pontomesencephalic_junction": 140, "BS_pontomedullary_junction": 200,
    "BS_medulla_foramen_magnum": 230, "BS_obex": 290, "BS_fastigium": 330, "BS_aqueduct_inlet": 30,
    "MSP_anterior": 0, "MSP_superior": 90, "MSP_posterior": 180, "MSP_inferior_cerebellum": 250,
    "CC_rostrum": 300, "CC_genu": 0, "CC_mid_body": 90, "CC_splenium_posterior": 180, "CC_splenium_inferior": 220,
    "EYE_R_lens": 20, "EYE_R_globe_centre": 60, "EYE_R_optic_nerve_head": 100, "EYE_R_orbital_apex": 140,
    "EYE_L_lens": 200, "EYE_L_globe_centre": 240, "EYE_L_optic_nerve_head": 280, "EYE_L_orbital_apex": 320,
    "AX_anterior": 90, "AX_right_lateral": 0, "AX_posterior": 270, "AX_left_lateral": 180,
    "AX_fissure_anterior": (0, 0, 20, 90), "AX_fissure_posterior": (0, 0, 20, 270),
    "TL_R_pole": (40, 0, 15, 90), "TL_R_lateral": (40, 0, 15, 0), "TL_R_posterior": (40, 0, 15, 270),
    "TL_R_medial": (40, 0, 15, 180), "TL_L_pole": (-40, 0, 15, 90), "TL_L_lateral": (-40, 0, 15, 180),
    "TL_L_posterior": (-40, 0, 15, 270), "TL_L_medial": (-40, 0, 15, 0), "TL_midbrain_anterior": (0, 5, 0, 0)}


def _circle(schema, name):
    """(cu, cv, r, angle) of a landmark on its sub-anatomy's plane."""
    lm = schema.landmarks[schema.lookup(name)]
    if lm.role == "primary":
        spec = PRIMARY[name]
        return spec if isinstance(spec, tuple) else (0, 0, RADIUS[lm.sub_anatomy], spec)
    cu, cv, r, a = _circle(schema, lm.between[0])
    b = _circle(schema, lm.between[1])[3]
    return cu, cv, r, a + lm.fraction * ((b - a + 180) % 360 - 180)


def _on_plane(sub, cu, cv, r, angle):
    origin, u, v = PLANES[sub]
    t = np.radians(angle)
    return np.asarray(origin, float) + (cu + r * np.cos(t)) * u + (cv + r * np.sin(t)) * v


def head(schema):
    """(88, 3) RAS: every sub-anatomy exactly planar and equally spaced."""
    return np.array([_on_plane(lm.sub_anatomy, *_circle(schema, lm.name)) for lm in schema.landmarks])


def boundary(schema, sub, centre=(0, 0), radius=None, n=721):
    """The circle a sub-anatomy's points lie on, as a closed polyline (n points)."""
    t = np.linspace(0, 360, n, endpoint=False)
    return _on_plane(sub, centre[0], centre[1], radius or RADIUS[sub], t[:, None])


def names_of(schema, sub):
    return [schema.names[i] for i in schema.indices_of(sub)]


@pytest.fixture(scope="module")
def b88():
    return load_schema("brain-88")


# ------------------------------------------------------------------------------------------- geometry
def test_plane_fit_distances_and_projection_on_a_tilted_plane():
    normal = rigid_matrix((20, -35, 10), (0, 0, 0))[:3, :3] @ Z
    u = np.cross(normal, X)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    grid = np.array([(a, b) for a in range(-2, 3) for b in range(-2, 3)], dtype=float)
    offsets = 0.5 * grid[:, 0] * grid[:, 1]  # zero mean and uncorrelated with u, v: the plane stays
    centre = np.array([10.0, -4.0, 7.0])
    points = centre + 6 * grid[:, :1] * u + 6 * grid[:, 1:] * v + offsets[:, None] * normal
    fitted_centre, fitted_normal = fit_plane(points)
    assert np.allclose(fitted_centre, centre) and plane_angle(fitted_normal, normal) < 1e-6
    distances = plane_distances(points, fitted_centre, fitted_normal) * np.sign(fitted_normal @ normal)
    assert np.allclose(distances, offsets)
    assert np.sqrt((distances ** 2).mean()) == pytest.approx(1.0)  # 0.5 * sqrt(mean(a^2 b^2)) = 0.5 * 2
    projected = project_to_plane(points, fitted_centre, fitted_normal)
    assert np.allclose(plane_distances(projected, fitted_centre, fitted_normal), 0, atol=1e-12)
    assert np.allclose(np.linalg.norm(projected - points, axis=1), np.abs(offsets))


def test_expected_plane_and_angle_follow_the_scanner_or_the_msp():
    assert np.allclose(expected_normal("axial"), Z) and np.allclose(expected_normal("mid-sagittal"), X)
    assert np.allclose(expected_normal("coronal"), Y) and expected_normal("oblique") is None
    turned = rigid_matrix((0, 0, 12), (0, 0, 0))[:3, :3]  # the head turned 12 deg about S
    msp = turned @ X
    assert plane_angle(msp, expected_normal("sagittal")) == pytest.approx(12)
    assert plane_angle(msp, expected_normal("sagittal", msp)) == pytest.approx(0, abs=1e-6)
    assert plane_angle(turned @ Y, expected_normal("coronal", msp)) == pytest.approx(0, abs=1e-6)
    assert plane_angle(turned @ Z, expected_normal("axial", msp)) == pytest.approx(0, abs=1e-6)
    assert plane_angle(-Z, Z) == 0 and plane_angle(X, Y) == pytest.approx(90)


def test_equal_arc_length_resampling_of_a_circle_arc_gives_equal_chords():
    t = np.radians(np.linspace(10, 170, 4001))
    arc = np.stack([50 * np.cos(t), 50 * np.sin(t), np.zeros_like(t)], axis=1)
    assert arc_lengths(arc)[-1] == pytest.approx(50 * np.radians(160), rel=1e-6)
    points = resample_polyline(arc, 9)
    chords = np.linalg.norm(np.diff(points, axis=0), axis=1)
    assert np.allclose(points[[0, -1]], arc[[0, -1]])
    assert np.ptp(chords) / chords.mean() < 1e-6
    assert chords.mean() == pytest.approx(2 * 50 * np.sin(np.radians(10)), rel=1e-5)  # 20 deg apart
    assert np.allclose(np.linalg.norm(points[:, :2], axis=1), 50, atol=1e-3)  # on the circle


def test_secondaries_sit_at_their_arc_fraction_between_the_primaries_closest_curve_points():
    t = np.radians(np.linspace(0, 360, 3600, endpoint=False))
    circle = np.stack([20 * np.cos(t), 20 * np.sin(t), np.zeros_like(t)], axis=1)
    a = np.array([26.0, 0.0, 1.0])  # off the curve: its closest curve point is at 0 deg
    b = np.array([0.0, 25.0, -2.0])  # at 90 deg (outside the polygon, so at its vertex)
    placed = points_between(circle, a, b, equal_fractions(3), closed=True)
    angles = np.degrees(np.arctan2(placed[:, 1], placed[:, 0]))
    assert np.allclose(angles, [22.5, 45, 67.5], atol=1e-3)
    assert np.allclose(arc_fractions(circle, a, b, placed, closed=True), [0.25, 0.5, 0.75], atol=1e-6)
    # a closed curve takes the shorter way round: from 350 to 10 deg through 0
    p, q = 20 * np.array([np.cos(np.radians(350)), np.sin(np.radians(350)), 0]), 20 * np.array(
        [np.cos(np.radians(10)), np.sin(np.radians(10)), 0])
    middle = points_between(circle, p, q, [0.5], closed=True)[0]
    assert np.allclose(middle, (20, 0, 0), atol=1e-6)
    # an open curve runs from A to B in whichever direction that is
    s, gap = closest_on_curve(circle[:1800], [b, a])
    assert np.allclose(gap, [np.sqrt(29), np.sqrt(37)]) and s[0] > s[1]
    back = points_between(circle[:1800], b, a, [0.25])[0]
    assert np.degrees(np.arctan2(back[1], back[0])) == pytest.approx(67.5, abs=1e-3)


# ------------------------------------------------------------------------------------------------- QA
def test_a_clean_synthetic_brain88_passes_every_check(b88):
    result = annotation_qa(b88, head(b88))
    assert result.status == PASS and [r.sub_anatomy for r in result.rows] == [s.name for s in b88.sub_anatomies]
    for row in result.rows:
        assert row.rms_mm < 1e-9 and row.overall == PASS
        assert row.spacing_cv < 1e-9 or row.sub_anatomy == "Eye"  # the eye has no secondaries
        assert row.status["duplicates"] == PASS and row.status["missing"] == PASS
    assert result.row("Temporal Lobe").status["plane_angle"] == NA  # oblique: no expected plane
    assert result.row("Eye").status["spacing"] == NA and result.row("Eye").status["order"] == NA
    assert result.row("Corpus Callosum").angle_deg < 1e-6
    assert len(result.table()) == 7 and all(len(cells) == len(COLUMNS) for cells in result.table())
    assert all(len(r.cell_statuses()) == len(COLUMNS) for r in result.rows)
    assert np.allclose(result.distances, 0, atol=1e-9)


def test_known_offsets_and_tilt_give_the_known_rms_max_and_angle(b88):
    points = head(b88)
    eye = b88.indices_of("Eye")
    tilt = rigid_matrix((15, 0, 0), (0, 0, 0))[:3, :3]  # the eye plane tipped 15 deg about R
    u, v, n = tilt @ X, tilt @ Y, tilt @ Z
    uv = np.array([(1, 1), (1, -1), (-1, -1), (-1, 1), (2, 2), (2, -2), (-2, -2), (-2, 2)], dtype=float)
    k = 0.3
    offsets = k * uv[:, 0] * uv[:, 1]  # +-k on the small square, +-4k on the big one: the plane stays
    points[eye] = np.array([0, 50, -20]) + 10 * uv[:, :1] * u + 10 * uv[:, 1:] * v + offsets[:, None] * n
    row = annotation_qa(b88, points).row("Eye")
    assert row.rms_mm == pytest.approx(k * np.sqrt(8.5))
    assert row.max_mm == pytest.approx(4 * k) and row.farthest in {b88.names[i] for i in eye[4:]}  # a 4-way tie
    assert row.angle_deg == pytest.approx(15)
    assert row.status == {**row.status, "planarity_rms": PASS, "planarity_max": PASS, "plane_angle": WARN}
    assert row.overall == WARN
    stricter = QaThresholds(planarity_rms_mm=(0.5, 0.8), planarity_max_mm=(1.0, 1.1), plane_angle_deg=(5, 14))
    row = annotation_qa(b88, points, thresholds=stricter).row("Eye")
    assert (row.status["planarity_rms"], row.status["planarity_max"], row.status["plane_angle"]) == (FAIL, FAIL, FAIL)


def test_spacing_cv_order_missing_and_duplicates_have_their_known_values(b88):
    points = head(b88)
    index = b88.names.index
    # the right frontal secondary moved from 45 to 60 deg: chords 2r sin(15), 2r sin(30)
    points[index("FL_right_anterolateral")] = _on_plane("Frontal Lobe", 0, 0, 40, 60)
    row = annotation_qa(b88, points).row("Frontal Lobe")
    s15, s30 = np.sin(np.radians(15)), np.sin(np.radians(30))
    assert row.spacing_cv == pytest.approx((s30 - s15) / (s30 + s15))
    assert row.status["spacing"] == FAIL and row.status["order"] == PASS
    # two corpus callosum secondaries swapped: out of order
    points = head(b88)
    a, b = index("CC_anterior_body_1"), index("CC_anterior_body_2")
    points[[a, b]] = points[[b, a]]
    row = annotation_qa(b88, points).row("Corpus Callosum")
    assert row.status["order"] == FAIL and set(row.out_of_order) == {f"CC_anterior_body_{i}" for i in range(1, 5)}
    # a missing point warns; a point on top of another fails, in both rows
    points = head(b88)
    points[index("EYE_L_lens")] = np.nan
    points[index("MSP_superior")] = points[index("CC_mid_body")] + (0, 0.3, 0)
    result = annotation_qa(b88, points)
    eye = result.row("Eye")
    assert eye.missing == ["EYE_L_lens"] and eye.status["missing"] == WARN and eye.overall == WARN
    assert eye.rms_mm < 1e-9  # fitted without it
    assert result.row("Brain Boundary MSP").status["duplicates"] == FAIL
    assert result.row("Corpus Callosum").duplicates == ["MSP_superior = CC_mid_body (0.30 mm)"]
    assert result.status == FAIL


def test_spacing_along_a_drawn_curve_uses_arc_length_fractions(b88):
    points = head(b88)
    # the four anterior-body secondaries at arc fractions 0.1, 0.4, 0.6, 0.8 of genu (0) -> mid-body (90 deg)
    for k, f in enumerate((0.1, 0.4, 0.6, 0.8), start=1):
        points[b88.names.index(f"CC_anterior_body_{k}")] = _on_plane("Corpus Callosum", 0, 0, 30, 90 * f)
    curve = Curve(boundary(b88, "Corpus Callosum"), closed=True)
    row = annotation_qa(b88, points, curves={"Corpus Callosum": curve}).row("Corpus Callosum")
    gaps = np.array([0.5, 1.5, 1, 1, 1])  # (0.1, 0.3, 0.2, 0.2, 0.2) / 0.2
    assert row.spacing_cv == pytest.approx(gaps.std() / gaps.mean(), abs=1e-4)
    assert row.status["spacing"] == FAIL and row.status["order"] == PASS


def test_each_pair_uses_the_nearest_curve_within_reach(b88):
    points = head(b88)
    curves = {"Temporal Lobe": [Curve(boundary(b88, "Temporal Lobe", (40, 0)), True),
                                Curve(boundary(b88, "Temporal Lobe", (-40, 0)), True)]}
    row = annotation_qa(b88, points, curves=curves).row("Temporal Lobe")
    assert row.spacing_cv < 1e-4 and row.status["order"] == PASS
    # only the right lobe drawn: the left pairs are measured in straight lines, and say so
    row = annotation_qa(b88, points, curves={"Temporal Lobe": curves["Temporal Lobe"][:1]}).row("Temporal Lobe")
    assert row.spacing_cv < 1e-4 and row.status["order"] == PASS
    assert len([n for n in row.notes if "no drawn curve" in n]) == 4 and all("TL_L" in n for n in row.notes)


def test_secondaries_are_placed_along_the_curve_the_qa_measures(b88):
    """place_secondaries (what the module places) puts each pair's secondaries on the curve nearest both
    primaries, the one the QA measures: where the clean head has them, so the spacing is exactly equal; a
    pair no drawn curve reaches gets none, as the QA measures it without a curve."""
    truth = head(b88)
    secondary = np.array([lm.role == "secondary" for lm in b88.landmarks])
    points = np.where(secondary[:, None], np.nan, truth)
    lobes = [Curve(boundary(b88, "Temporal Lobe", (40, 0)), True), Curve(boundary(b88, "Temporal Lobe", (-40, 0)), True)]
    targets = place_secondaries(b88, points, {"Temporal Lobe": lobes, "Frontal Lobe": boundary(b88, "Frontal Lobe")})
    temporal = [i for i in b88.indices_of("Temporal Lobe") if secondary[i]]
    frontal = [i for i in b88.indices_of("Frontal Lobe") if secondary[i]]
    assert sorted(targets) == sorted(temporal + frontal) and len(temporal) > 4
    for i in targets:
        assert np.linalg.norm(targets[i] - truth[i]) < 0.01  # the 721-point polygon of the circle
        points[i] = targets[i]
    assert annotation_qa(b88, points, {"Temporal Lobe": lobes}).row("Temporal Lobe").spacing_cv < 1e-3

    only_right = place_secondaries(b88, points, {"Temporal Lobe": lobes[:1]})
    assert sorted(only_right) == [i for i in temporal if b88.landmarks[i].between[0].startswith("TL_R")]
    assert place_secondaries(b88, points, {"Temporal Lobe": lobes}, ["Frontal Lobe"]) == {}
    missing_pole = points.copy()
    missing_pole[b88.lookup("TL_R_pole")] = np.nan
    assert not any(b88.landmarks[i].between[0] == "TL_R_pole" or b88.landmarks[i].between[1] == "TL_R_pole"
                   for i in place_secondaries(b88, missing_pole, {"Temporal Lobe": lobes}))


# ------------------------------------------------------------------------------------------------ fix
def _messy(b88, seed=3):
    """The clean head with every point pushed off its plane and the secondaries slid along their circle."""
    rng = np.random.default_rng(seed)
    points = head(b88)
    for lm in b88.landmarks:
        i = b88.lookup(lm.name)
        cu, cv, r, angle = _circle(b88, lm.name)
        if lm.role == "secondary":
            angle += rng.uniform(-6, 6)
        _, u, v = PLANES[lm.sub_anatomy]
        points[i] = _on_plane(lm.sub_anatomy, cu, cv, r, angle) + rng.normal(0, 1.5) * np.cross(u, v)
    return points


def test_the_fix_makes_the_qa_pass_and_does_not_modify_its_input(b88):
    messy = _messy(b88)
    before = messy.copy()
    assert annotation_qa(b88, messy).status == FAIL
    fixed = fix_annotation(b88, messy)
    assert np.array_equal(messy, before) and np.array_equal(fixed.previous, before)
    assert fixed.positions is not messy
    after = annotation_qa(b88, fixed.positions)
    assert after.status == PASS, after.text()
    assert max(r.rms_mm for r in after.rows) < 1e-9
    assert {m.landmark for m in fixed.moves} == set(b88.names)  # every point was off its plane
    for move in fixed.moves:
        assert move.distance_mm == pytest.approx(np.linalg.norm(fixed.positions[move.index] - before[move.index]))
        assert np.array_equal(move.old, before[move.index])
    assert "re-spaced" in next(m for m in fixed.moves if m.landmark == "CC_anterior_body_2").reason
    assert "fix:" in fixed.text()


def test_the_fix_re_spaces_along_drawn_curves_exactly_and_keeps_missing_points_missing(b88):
    messy = _messy(b88, seed=5)
    messy[b88.names.index("CC_posterior_body_3")] = np.nan
    curves = {"Corpus Callosum": Curve(boundary(b88, "Corpus Callosum"), True),
              "Brain Boundary MSP": Curve(boundary(b88, "Brain Boundary MSP"), True)}
    fixed = fix_annotation(b88, messy, curves, sub_anatomies=["Corpus Callosum", "Brain Boundary MSP"])
    assert np.isnan(fixed.positions[b88.names.index("CC_posterior_body_3")]).all()
    untouched = [i for i, lm in enumerate(b88.landmarks) if lm.sub_anatomy not in curves]
    assert np.array_equal(fixed.positions[untouched], messy[untouched])
    result = annotation_qa(b88, fixed.positions, curves)
    for sub in curves:
        row = result.row(sub)
        assert row.spacing_cv < 1e-3 and row.rms_mm < 1e-9 and row.status["order"] == PASS, row
    # secondaries land exactly at their fractions along the (projected) curve
    genu, mid = (fixed.positions[b88.names.index(n)] for n in ("CC_genu", "CC_mid_body"))
    body = fixed.positions[[b88.names.index(f"CC_anterior_body_{k}") for k in range(1, 5)]]
    plane = fit_plane(fixed.positions[b88.indices_of("Corpus Callosum")][np.isfinite(
        fixed.positions[b88.indices_of("Corpus Callosum")]).all(axis=1)])
    projected = project_to_plane(boundary(b88, "Corpus Callosum"), *plane)
    assert np.allclose(arc_fractions(projected, genu, mid, body, closed=True), [0.2, 0.4, 0.6, 0.8], atol=1e-6)


# ------------------------------------------------------------------------------------ thresholds in schema
def _tiny_schema(**extra):
    return schema_from_dict({"name": "tiny", "sub_anatomies": [{"name": "S", "plane": "axial"}],
                             "landmarks": [{"number": k + 1, "name": f"p{k}", "sub_anatomy": "S"} for k in range(3)],
                             **extra}, source="tiny.json")


def test_schema_qa_thresholds_override_the_defaults_and_are_validated():
    assert _tiny_schema().qa_thresholds == QaThresholds() and "qa_thresholds" not in _tiny_schema().to_dict()
    schema = _tiny_schema(qa_thresholds={"plane_angle_deg": [3, 6], "duplicate_mm": 1})
    assert schema.qa_thresholds.plane_angle_deg == (3.0, 6.0) and schema.qa_thresholds.duplicate_mm == 1.0
    assert schema.qa_thresholds.spacing_cv == QaThresholds().spacing_cv
    assert schema_from_dict(schema.to_dict()).qa_thresholds == schema.qa_thresholds
    for bad, message in (({"angle": [1, 2]}, "unknown key"), ({"spacing_cv": [0.3, 0.1]}, "warn <= fail"),
                         ({"planarity_rms_mm": 1}, r"\[warn, fail\]"), ({"duplicate_mm": -1}, "duplicate_mm"),
                         ([1], "must be an object")):
        with pytest.raises(LandmarkError, match=message):
            _tiny_schema(qa_thresholds=bad)


# ------------------------------------------------------------------------------------------------ CLI
def _qa(argv, capsys=None):
    """The qa command as cli.main runs it: a LandmarkError is one line and exit code 2."""
    parser = argparse.ArgumentParser(prog="landmark-detection")
    add_qa_command(parser.add_subparsers())
    args = parser.parse_args(["qa", *argv])
    try:
        return args.handler(args)
    except LandmarkError as error:
        print(f"error: {error}")
        return 2


def _curve_file(path, name, points, closed=True):
    control = [{"label": f"c{k}", "position": list(map(float, p * (-1, -1, 1)))} for k, p in enumerate(points)]
    path.write_text(json.dumps({"markups": [{"type": "ClosedCurve" if closed else "Curve", "name": name,
                                             "coordinateSystem": "LPS", "controlPoints": control}]}))
    return path


def test_qa_command_passes_fails_and_writes_the_csv_and_the_fix(b88, tmp_path, capsys):
    clean = tmp_path / "clean.mrk.json"
    write_markups_json(clean, b88, head(b88))
    assert _qa(["--landmarks", str(clean), "--output", str(tmp_path / "clean.csv")]) == 0
    printed = capsys.readouterr().out
    assert "overall: PASS" in printed and "schema brain-88" in printed and "Corpus Callosum" in printed
    rows = list(csv.DictReader(io.StringIO((tmp_path / "clean.csv").read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["sub_anatomy"] for r in rows] == [s.name for s in b88.sub_anatomies]
    assert {r["status"] for r in rows} == {"pass"} and float(rows[3]["planarity_rms_mm"]) < 1e-6
    assert rows[6]["plane_angle_status"] == "n/a" and rows[6]["plane_angle_deg"] == ""

    messy = tmp_path / "messy.mrk.json"
    write_markups_json(messy, b88, _messy(b88))
    original = messy.read_bytes()
    fixed, report = tmp_path / "fixed.mrk.json", tmp_path / "messy.csv"
    assert _qa(["--landmarks", str(messy), "--output", str(report), "--fix", str(fixed)]) == 1
    printed = capsys.readouterr().out
    assert "overall: FAIL" in printed and "after the fix: PASS" in printed
    assert messy.read_bytes() == original
    assert "fail" in {r["status"] for r in csv.DictReader(io.StringIO(report.read_text()))}
    assert _qa(["--landmarks", str(fixed), "--schema", "brain-88"]) == 0
    assert np.allclose(read_landmarks(fixed, b88), fix_annotation(b88, read_landmarks(messy, b88)).positions,
                       atol=1e-9)

    # a warning alone (a missing point) still exits 0
    missing = head(b88)
    missing[0] = np.nan
    warned = tmp_path / "warned.mrk.json"
    write_markups_json(warned, b88, missing)
    assert _qa(["--landmarks", str(warned)]) == 0 and "overall: WARN" in capsys.readouterr().out


def test_qa_command_reads_a_folder_of_curves(b88, tmp_path, capsys):
    points = head(b88)
    for k, f in enumerate((0.1, 0.4, 0.6, 0.8), start=1):
        points[b88.names.index(f"CC_anterior_body_{k}")] = _on_plane("Corpus Callosum", 0, 0, 30, 90 * f)
    landmarks = tmp_path / "case.mrk.json"
    write_markups_json(landmarks, b88, points)
    folder = tmp_path / "curves"
    folder.mkdir()
    _curve_file(folder / "corpus-callosum.mrk.json", "C", boundary(b88, "Corpus Callosum", n=360))
    _curve_file(folder / "tl.mrk.json", "Temporal Lobe R", boundary(b88, "Temporal Lobe", (40, 0)))
    _curve_file(folder / "tl2.mrk.json", "temporal_lobe_left", boundary(b88, "Temporal Lobe", (-40, 0)))
    curves, files = read_curves(folder, b88)
    assert {k: len(v) for k, v in curves.items()} == {"Corpus Callosum": 1, "Temporal Lobe": 2} and len(files) == 3
    assert np.allclose(curves["Corpus Callosum"][0].points[0], boundary(b88, "Corpus Callosum", n=360)[0])
    assert _qa(["--landmarks", str(landmarks), "--curves", str(folder), "--output", str(tmp_path / "qa.csv")]) == 1
    rows = {r["sub_anatomy"]: r for r in csv.DictReader(io.StringIO((tmp_path / "qa.csv").read_text()))}
    gaps = np.array([0.5, 1.5, 1, 1, 1])
    assert float(rows["Corpus Callosum"]["spacing_cv"]) == pytest.approx(gaps.std() / gaps.mean(), abs=2e-3)
    assert rows["Temporal Lobe"]["spacing_status"] == "pass"


@pytest.mark.parametrize("closed", [False, True])
def test_curve_files_written_for_slicer_are_read_back_exactly(b88, tmp_path, closed):
    points = boundary(b88, "Eye", n=40)
    write_curve_json(tmp_path / "eye.mrk.json", np.vstack([points, points[:1]]) if closed else points,
                     "Eye boundary 1", closed)
    markup = json.loads((tmp_path / "eye.mrk.json").read_text())["markups"][0]
    assert markup["type"] == ("ClosedCurve" if closed else "Curve") and markup["coordinateSystem"] == "LPS"
    assert len(markup["controlPoints"]) == 40  # a closed curve's repeated first point is left out
    curves, _ = read_curves(tmp_path / "eye.mrk.json", b88)
    curve = curves["Eye"][0]
    assert curve.closed == closed and curve.name == "Eye boundary 1" and np.allclose(curve.points, points, atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        write_curve_json(tmp_path / "bad.mrk.json", points[:1], "Eye boundary 2")
    assert not (tmp_path / "bad.mrk.json").exists()


def test_qa_command_bad_input_exits_2_and_writes_nothing(b88, tmp_path, capsys):
    landmarks = tmp_path / "case.mrk.json"
    write_markups_json(landmarks, b88, head(b88))
    original = landmarks.read_bytes()
    assert _qa(["--landmarks", str(tmp_path / "nope.mrk.json"), "--schema", "brain-88"]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert _qa(["--landmarks", str(landmarks), "--fix", str(landmarks)]) == 2  # never the input
    assert "input" in capsys.readouterr().out and landmarks.read_bytes() == original
    assert _qa(["--landmarks", str(landmarks), "--output", str(tmp_path / "qa.txt")]) == 2
    bad = _curve_file(tmp_path / "bad.mrk.json", "Hippocampus", boundary(b88, "Eye"))
    assert _qa(["--landmarks", str(landmarks), "--curves", str(bad), "--output", str(tmp_path / "qa.csv")]) == 2
    assert "Hippocampus" in capsys.readouterr().out and not (tmp_path / "qa.csv").exists()
    (tmp_path / "qa.csv").write_text("keep")
    assert _qa(["--landmarks", str(landmarks), "--output", str(tmp_path / "qa.csv")]) == 2
    assert "already exists" in capsys.readouterr().out and (tmp_path / "qa.csv").read_text() == "keep"
    assert _qa(["--landmarks", str(landmarks), "--output", str(tmp_path / "qa.csv"), "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # usage errors: argparse's exit code 2
        _qa([])
    assert exit_info.value.code == 2


def test_qa_command_compares_with_the_scans_mid_sagittal_plane(b88, tmp_path, capsys):
    from LandmarkDetectionLib.geometry import apply_matrix
    from LandmarkDetectionLib.planes import compute_planes

    turned = apply_matrix(rigid_matrix((0, 0, 25), (3, -4, 5)), head(b88))  # the head turned 25 deg about S
    landmarks = tmp_path / "turned.mrk.json"
    write_markups_json(landmarks, b88, turned)
    assert _qa(["--landmarks", str(landmarks), "--output", str(tmp_path / "scanner.csv")]) == 1
    rows = {r["sub_anatomy"]: r for r in csv.DictReader(io.StringIO((tmp_path / "scanner.csv").read_text()))}
    assert float(rows["Corpus Callosum"]["plane_angle_deg"]) == pytest.approx(25)
    assert float(rows["Eye"]["plane_angle_deg"]) == pytest.approx(0, abs=1e-6)  # turning about S keeps axial
    msp = tmp_path / "mid-sagittal.plane.json"
    msp.write_text(json.dumps(compute_planes(b88, turned).planes["mid-sagittal"].to_dict()))
    assert _qa(["--landmarks", str(landmarks), "--msp", str(msp), "--output", str(tmp_path / "msp.csv")]) == 0
    rows = {r["sub_anatomy"]: r for r in csv.DictReader(io.StringIO((tmp_path / "msp.csv").read_text()))}
    assert float(rows["Corpus Callosum"]["plane_angle_deg"]) == pytest.approx(0, abs=1e-6)
    assert rows["Corpus Callosum"]["expected_plane"] == "mid-sagittal (MSP)"
    msp.write_text(json.dumps({"normal_ras": [0, 0, 0]}))
    assert _qa(["--landmarks", str(landmarks), "--msp", str(msp)]) == 2
    assert "normal_ras" in capsys.readouterr().out


def test_model_assisted_record_and_review_order():
    from LandmarkDetectionLib.annotation import assistance_document, assistance_record, suggestion_order
    from LandmarkDetectionLib.schema import load_schema

    schema = load_schema("afids-32")
    suggested = np.arange(96, dtype=float).reshape(32, 3)
    final = suggested.copy()
    final[1] += [0.3, 0.0, 0.0]  # kept (under 0.5 mm)
    final[2] += [3.0, 4.0, 0.0]  # moved 5 mm
    final[3] = np.nan  # removed by the annotator
    suggested[4] = np.nan  # placed by hand
    records = assistance_record(schema, suggested, final)
    assert [r["action"] for r in records[:6]] == ["accepted", "accepted", "moved", "removed", "added", "accepted"]
    assert records[2]["moved_mm"] == 5.0 and records[3]["moved_mm"] is None
    document = assistance_document("tiny", records)
    assert document["counts"] == {"accepted": 29, "moved": 1, "removed": 1, "added": 1, "missing": 0}
    assert document["model"] == "tiny" and document["landmarks"] == records
    assert suggestion_order(np.array([1.0, np.nan, 7.0, 3.0])).tolist() == [2, 3, 0, 1]
