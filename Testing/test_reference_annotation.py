"""The shipped brain-88 reference annotation of the sample template (Resources/ReferenceAnnotations), read
as any user's annotation would be: it must be complete, pass the annotation QA along its own boundary
curves, lie on the template's head and agree with the human AFIDs consensus where the definitions are
the same. The generation script is not run here (it takes a while); these tests check what it shipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.annotation import FAIL, annotation_qa, arc_fractions, closest_on_curve, read_curves
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, read_points
from LandmarkDetectionLib.geometry import LPS_TO_RAS
from LandmarkDetectionLib.planes import fit_plane
from LandmarkDetectionLib.schema import load_schema, schema_from_dict

FOLDER = Path(__file__).resolve().parents[1] / "Resources" / "ReferenceAnnotations"
LANDMARKS = FOLDER / "brain88_MNI152NLin2009cAsym.mrk.json"
CURVES = FOLDER / "brain88_curves"
# brain-88 landmarks whose definition is the AFIDs one, and their AFIDs consensus names (mm allowed)
SAME_AS_AFIDS = {"BS_superior_interpeduncular_fossa": ("SIPF", 0.5), "BS_pontomesencephalic_junction": ("PMJ", 0.5),
                 "CC_genu": ("GENU", 2.0), "CC_splenium_inferior": ("SPLE", 2.0)}


@pytest.fixture(scope="module")
def reference(brain88):
    landmarks = read_landmarks(LANDMARKS, brain88)
    curves, _ = read_curves(CURVES, brain88)
    return landmarks, curves


@pytest.fixture(scope="module")
def afids():
    from LandmarkDetectionLib.sample_data import fetch_sample

    files = fetch_sample()
    schema = load_schema("afids-32")
    return files, dict(zip(schema.names, read_landmarks(files.afids, schema)))


def test_the_shipped_file_holds_every_brain88_landmark_by_name(brain88, reference):
    landmarks, curves = reference
    assert landmarks.shape == (88, 3) and np.isfinite(landmarks).all()
    points = read_points(LANDMARKS)
    assert [p.label for p in points] == brain88.names  # labels are the names, in schema order
    assert [p.description for p in points] == [lm.sub_anatomy for lm in brain88.landmarks]
    assert LANDMARKS.stat().st_size < 100_000
    # one boundary curve per sub-anatomy with secondaries (the Eye has none), one per temporal lobe
    assert {name: len(c) for name, c in curves.items()} == {
        "Frontal Lobe": 1, "Brain Stem": 1, "Brain Boundary MSP": 1, "Corpus Callosum": 1,
        "Brain Axial Boundary": 1, "Temporal Lobe": 2}


def test_it_passes_the_annotation_qa_along_its_curves(brain88, reference, afids):
    landmarks, curves = reference
    limits = brain88.qa_thresholds
    midline = ("AC", "PC", "ICS", "PMJ", "SIPF", "CUL", "IMS", "PG", "GENU", "SPLE")
    _, msp_normal = fit_plane(np.array([afids[1][n] for n in midline]))
    for normal in (None, msp_normal):
        result = annotation_qa(brain88, landmarks, curves, normal)
        assert result.status != FAIL, result.text()
        for row in result.rows:
            assert row.overall != FAIL and not row.missing and not row.duplicates and not row.out_of_order
            # every sub-anatomy lies on its plane within the QA's pass limits
            assert row.rms_mm <= limits.planarity_rms_mm[0] and row.max_mm <= limits.planarity_max_mm[0]
            if np.isfinite(row.angle_deg):
                assert row.angle_deg <= limits.plane_angle_deg[0]
            if row.sub_anatomy != "Eye":  # the secondaries are evenly spaced along the boundary
                assert row.spacing_cv <= limits.spacing_cv[0]


def test_secondaries_sit_at_their_fractions_on_the_shipped_curves(brain88, reference):
    landmarks, curves = reference
    for i, lm in enumerate(brain88.landmarks):
        if lm.role != "secondary":
            continue
        a, b = landmarks[brain88.lookup(lm.between[0])], landmarks[brain88.lookup(lm.between[1])]
        curve = min(curves[lm.sub_anatomy], key=lambda c: closest_on_curve(c, np.vstack([a, b]))[1].max())
        assert arc_fractions(curve, a, b, landmarks[i][None])[0] == pytest.approx(lm.fraction, abs=0.01), lm.name


def test_right_and_left_landmarks_are_on_the_patients_right_and_left(brain88, reference, afids):
    """RAS: +x is the patient's right (as the AFIDs consensus, whose R points have x > 0)."""
    landmarks, _ = reference
    assert afids[1]["RLVAC"][0] > 0 > afids[1]["LLVAC"][0]
    for i, lm in enumerate(brain88.landmarks):
        words = lm.name.split("_")
        if "R" in words or "right" in words:
            assert landmarks[i][0] > 5, lm.name
        if "L" in words or "left" in words:
            assert landmarks[i][0] < -5, lm.name
        if lm.mirror is None and lm.sub_anatomy != "Eye":  # midline landmarks
            assert abs(landmarks[i][0]) < 1.5, lm.name


def test_every_point_lies_on_the_templates_head(reference, afids):
    landmarks, _ = reference
    image = sitk.ReadImage(str(afids[0].t1w), sitk.sitkFloat32)
    head = sitk.RelabelComponent(sitk.ConnectedComponent(image > 1000.0), sortByObjectSize=True) == 1
    head = sitk.GetArrayFromImage(sitk.BinaryFillhole(head))
    for p in landmarks:
        index = np.round(image.TransformPhysicalPointToContinuousIndex(tuple(LPS_TO_RAS @ p))).astype(int)
        assert head[index[2], index[1], index[0]]


def test_landmarks_defined_as_in_afids_agree_with_the_human_consensus(brain88, reference, afids):
    landmarks, _ = reference
    for name, (afid, mm) in SAME_AS_AFIDS.items():
        assert np.linalg.norm(landmarks[brain88.lookup(name)] - afids[1][afid]) < mm, name


def test_the_schema_states_how_the_reference_placed_each_sub_anatomy(brain88):
    for sub in brain88.sub_anatomies:
        assert sub.reference_rule.startswith("Reference annotation of the sample template"), sub.name
    assert "judgement" in brain88.sub_anatomy("Temporal Lobe").reference_rule
    assert "objective" in brain88.sub_anatomy("Brain Axial Boundary").reference_rule
    # the field survives a round trip, is optional and must be text
    assert schema_from_dict(brain88.to_dict()).sub_anatomies == brain88.sub_anatomies
    data = brain88.to_dict()
    del data["sub_anatomies"][0]["reference_rule"]
    assert schema_from_dict(data).sub_anatomies[0].reference_rule == ""
    assert "reference_rule" not in schema_from_dict(data).to_dict()["sub_anatomies"][0]
    data["sub_anatomies"][0]["reference_rule"] = ["not", "text"]
    with pytest.raises(LandmarkError, match="reference_rule"):
        schema_from_dict(data)


def test_the_figures_are_shipped_small(brain88):
    figures = sorted((FOLDER / "figures").glob("brain88_*.png"))
    assert len(figures) == len(brain88.sub_anatomies)
    assert all(path.stat().st_size < 200_000 for path in figures)


def test_the_bundled_brain88_model_is_chosen_by_its_schema_and_states_its_recipe():
    """brain-88 ships beside the AFIDs model (each at most 20 MB); the schema picks it, and its metadata
    states data, recipe and the uncertainty calibration with the registration prior."""
    from LandmarkDetectionLib.modelheader import read_header
    from LandmarkDetectionLib.resources import BUNDLED_MODELS, bundled_model_path

    assert list(BUNDLED_MODELS) == ["afids-32", "brain-88"]
    for schema in BUNDLED_MODELS:
        path = bundled_model_path(schema)
        header = read_header(path)
        assert path.stat().st_size <= 20 * 1024 ** 2 and header.schema["name"] == schema
    header = read_header(bundled_model_path("brain-88"))
    assert header.training["recipe"] == "brain-88" and "brain-88 reference annotation" in header.training["training_data"]
    assert "reference" in header.metadata and header.metrics["calibration"]["cases"] == 12
