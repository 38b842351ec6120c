"""The plausibility benchmark's own checks (benchmarks/plausibility.py) on real anatomy: the head mask,
inside-the-head, and the per-sub-anatomy summary of the annotation QA. The benchmark's run (detection and
registration on the held-out templates) is not run here."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.annotation import FAIL, annotation_qa
from LandmarkDetectionLib.fileio import read_landmarks, read_volume
from LandmarkDetectionLib.geometry import LPS_TO_RAS, apply_matrix, move_image, physical_center_ras, rigid_matrix
from LandmarkDetectionLib.planes import fit_plane
from LandmarkDetectionLib.preprocess import resample_isotropic
from LandmarkDetectionLib.schema import load_schema
from LandmarkDetectionLib.testscans import sample_case

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import plausibility  # a benchmark script, found on the path set above

HELDOUT = REPO.parent / "shared" / "data" / "afids-templates"


@pytest.fixture(scope="module")
def template():
    """The training template at 2 mm (as the benchmark registers it), its head mask and its brain-88
    reference annotation."""
    image, reference, schema, _ = sample_case("brain-88")
    image = resample_isotropic(image, 2.0)
    return image, plausibility.head_mask(image), reference, schema


def test_the_reference_annotation_lies_inside_the_templates_head_and_passes(template):
    _, mask, reference, schema = template
    assert plausibility.inside_head(mask, reference).all()
    # the mask is the head, not the brain or the whole volume
    fraction = sitk.GetArrayViewFromImage(mask).mean()
    assert 0.3 < fraction < 0.7
    summary = plausibility.summarize([plausibility.case_checks(schema, reference, mask)])
    assert set(summary) == {s.name for s in schema.sub_anatomies}
    for sub, row in summary.items():
        assert row["in_view"] == row["inside"] == row["qa_pass"] == 1.0, sub
        assert row["plane_max_mm"] < 0.01, sub  # the reference was projected onto its planes
        assert row["order_violations"] == (None if sub == "Eye" else 0.0), sub  # the Eye has no secondaries
        assert (row["spacing_cv"] is None) == (sub == "Eye") and (sub == "Eye" or row["spacing_cv"] < 0.15)


def test_points_in_the_air_are_outside_the_head_and_beyond_the_field_of_view_not_in_view(template):
    _, mask, reference, schema = template
    top, front = schema.lookup("MSP_superior"), schema.lookup("MSP_anterior")
    # 30 mm above the top of the brain is air above the scalp, in the scan; 30 mm in front of the brain
    # is beyond the template's grid
    points = np.vstack([reference[top], reference[top] + [0, 0, 30], reference[front] + [0, 30, 0], [np.nan] * 3])
    assert plausibility.inside_head(mask, points).tolist() == [True, False, False, False]
    assert plausibility.in_view(mask, points).tolist() == [True, True, False, False]
    moved = reference.copy()
    moved[top] += [0, 0, 30]
    moved[front] += [0, 30, 0]
    summary = plausibility.summarize([plausibility.case_checks(schema, moved, mask)])
    # of the 11 points, 10 are in view and 9 of those inside the head
    assert summary["Brain Boundary MSP"]["in_view"] == pytest.approx(10 / 11)
    assert summary["Brain Boundary MSP"]["inside"] == pytest.approx(9 / 10)
    others = [row for sub, row in summary.items() if sub != "Brain Boundary MSP"]
    assert all(row["inside"] == 1.0 and row["in_view"] == 1.0 for row in others)


def test_shuffled_or_off_plane_points_are_reported_for_their_sub_anatomy_only(template):
    _, mask, reference, schema = template
    shuffled = reference.copy()
    a, b = schema.lookup("CC_anterior_body_1"), schema.lookup("CC_anterior_body_3")
    shuffled[[a, b]] = shuffled[[b, a]]
    off_plane = reference.copy()
    _, normal = fit_plane(reference[schema.indices_of("Frontal Lobe")])
    off_plane[schema.lookup("FL_frontal_pole")] += 8 * normal  # 8 mm off the plane of the other four
    cases = [plausibility.case_checks(schema, landmarks, mask) for landmarks in (reference, shuffled, off_plane)]
    summary = plausibility.summarize(cases)
    callosum, frontal = summary["Corpus Callosum"], summary["Frontal Lobe"]
    assert callosum["order_violations"] == pytest.approx(1 / 3) and callosum["qa_pass"] == pytest.approx(2 / 3)
    assert callosum["spacing_cv"] > 0.15  # the swapped points also break the even spacing
    # five points, one moved 8 mm: the best-fit plane splits the offset, the farthest point stays > 4 mm off
    assert frontal["plane_max_mm"] > 4 and frontal["qa_pass"] == pytest.approx(2 / 3)
    assert frontal["order_violations"] == 0.0
    for sub in set(summary) - {"Corpus Callosum", "Frontal Lobe"}:
        assert summary[sub]["qa_pass"] == 1.0 and summary[sub]["order_violations"] in (0.0, None), sub
    assert plausibility.qa_pass_rate(cases) == pytest.approx(1 - 2 / (3 * len(schema.sub_anatomies)))
    distances = plausibility.distances_by_sub_anatomy(schema, reference, off_plane)
    assert distances["Frontal Lobe"] == pytest.approx(8 / 5) and distances["Eye"] == 0.0


def test_a_tilted_head_does_not_fail_the_plausibility_checks(template):
    """The head lies at a random angle in the benchmark's scans: the plane-angle check is not graded."""
    image, _, reference, schema = template
    motion = rigid_matrix((-25.0, 0.0, 10.0), (5.0, -8.0, 3.0), physical_center_ras(image))
    tilted_image, tilted = move_image(image, motion), apply_matrix(motion, reference)
    assert annotation_qa(schema, tilted).status == FAIL  # a nod and a turn: the frontal lobe plane is 30 degrees off axial
    summary = plausibility.summarize([plausibility.case_checks(schema, tilted, plausibility.head_mask(tilted_image))])
    assert all(row["qa_pass"] == 1.0 and row["inside"] == 1.0 for row in summary.values())


@pytest.mark.skipif(not HELDOUT.is_dir(), reason=f"held-out templates not present ({HELDOUT})")
def test_the_head_mask_of_a_held_out_scan_holds_its_human_afids():
    """A benchmark scan (random head position, 2.2 mm slices, field-of-view cut) of a held-out template:
    every human AFIDs point is inside the mask, the scan's corners are air."""
    volume, afids_file = plausibility.TEMPLATES["MNI152Lin"]
    image = read_volume(HELDOUT / volume)
    afids = read_landmarks(HELDOUT / afids_file, load_schema("afids-32"))
    scan, motion = plausibility.test_scan(image, np.random.default_rng([2024, 0, len("MNI152Lin")]))
    mask = plausibility.head_mask(scan)
    assert plausibility.inside_head(mask, apply_matrix(motion, afids)).all()
    size = np.array(scan.GetSize()) - 1
    corners = [scan.TransformContinuousIndexToPhysicalPoint([float(c) for c in size * np.array(k)])
               for k in ((0, 0, 0), (1, 1, 0), (0, 1, 1), (1, 0, 1))]
    assert not plausibility.inside_head(mask, np.array(corners) @ LPS_TO_RAS).any()
