"""Inter-annotator agreement (agreement.py): distances to the mean and planarity on synthetic annotators
with known answers, the CSV and PNG outputs, and the command line."""

from __future__ import annotations

import csv
import io
import json

import matplotlib.image
import numpy as np
import pytest
from LandmarkDetectionLib import agreement, datasets
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import write_markups_json
from LandmarkDetectionLib.geometry import rigid_matrix
from test_datasets import cli_main, synthetic_annotation, tiny_scan


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_two_annotators_one_millimetre_apart_are_each_half_a_millimetre_from_the_mean(brain88):
    a = synthetic_annotation(brain88)
    result = agreement.compute_agreement(brain88, {"c1": {"A": a, "B": a + [1.0, 0.0, 0.0]}})
    (case,) = result.cases
    assert case.annotators == ["A", "B"] and case.distances.shape == (2, 88)
    np.testing.assert_allclose(case.distances, 0.5, atol=1e-12)
    np.testing.assert_allclose(case.mean, a + [0.5, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(case.planarity, 0.0, atol=1e-9)  # every sub-anatomy lies on its plane
    rows = rows_of(agreement.distances_csv(result))
    assert len(rows) == 88 * 2 and {r["distance_to_mean_mm"] for r in rows} == {"0.5000"}
    assert rows[0] == {"case": "c1", "number": "1", "landmark": "FL_frontal_pole", "sub_anatomy": "Frontal Lobe",
                       "annotator": "A", "distance_to_mean_mm": "0.5000"}


def test_three_annotators_and_missing_points(brain88):
    a = synthetic_annotation(brain88)
    b, c = a + [3.0, 0.0, 0.0], a + [0.0, 3.0, 0.0]
    a[0] = np.nan  # A left landmark 0 out: B and C are each 3/sqrt(2) from their mean
    b[1] = c[1] = np.nan  # only A placed landmark 1: no agreement to measure
    result = agreement.compute_agreement(brain88, {"c1": {"A": a, "B": b, "C": c}, "solo": {"A": a}})
    assert result.single == ["solo"] and [c.case for c in result.cases] == ["c1"]
    d = result.cases[0].distances
    np.testing.assert_allclose(d[:, 2:], np.array([[np.sqrt(2)], [np.sqrt(5)], [np.sqrt(5)]]) * np.ones((1, 86)))
    assert np.isnan(d[0, 0]) and np.allclose(d[1:, 0], 3 / np.sqrt(2))
    assert np.isnan(d[:, 1]).all()
    frontal = brain88.indices_of("Frontal Lobe")
    assert result.distances_of(frontal).size == 3 * 5 - 1 - 3  # one missing, one landmark unmeasurable
    assert result.distances_of(frontal, "B").size == 4


def test_planarity_is_the_rms_distance_to_the_best_fit_plane(brain88):
    h = 0.7
    points = synthetic_annotation(brain88, seed=3)
    stem = brain88.indices_of("Brain Stem")  # 8 points: the corners of a flat box, turned obliquely
    corners = np.array([[x, y, z] for x in (-20, 20) for y in (-10, 10) for z in (-h, h)], dtype=float)
    matrix = rigid_matrix((25.0, -40.0, 10.0), (5.0, -3.0, 12.0))
    points[stem] = corners @ matrix[:3, :3].T + matrix[:3, 3]
    rms = agreement.planarity(brain88, points)
    names = [s.name for s in brain88.sub_anatomies]
    assert rms[names.index("Brain Stem")] == pytest.approx(h, abs=1e-9)
    np.testing.assert_allclose(np.delete(rms, names.index("Brain Stem")), 0.0, atol=1e-9)
    points[stem[:6]] = np.nan  # two points left: no plane
    assert np.isnan(agreement.planarity(brain88, points)[names.index("Brain Stem")])


@pytest.fixture
def dataset(tmp_path, brain88):
    """c1 by alice (a draft v1, then v2 = base - 1 mm x) and bob (base + 1 mm x); c2 by alice only."""
    base = synthetic_annotation(brain88)
    folder = datasets.create_dataset(tmp_path / "ds")
    write_markups_json(tmp_path / "base.mrk.json", brain88, base)
    datasets.add_case(folder, tiny_scan(tmp_path / "c1.nii.gz"), tmp_path / "base.mrk.json", "alice", status="draft")
    datasets.save_annotation(folder, "c1", "alice", base - [1.0, 0.0, 0.0])
    datasets.save_annotation(folder, "c1", "bob", base + [1.0, 0.0, 0.0], provenance="model-assisted:locnet")
    datasets.add_case(folder, tiny_scan(tmp_path / "c2.nii.gz", 1), tmp_path / "base.mrk.json", "alice")
    return folder


def test_dataset_agreement_uses_each_annotators_newest_version(dataset, brain88):
    result = agreement.agreement_of(dataset)
    assert result.schema.name == "brain-88" and result.single == ["c2"] and result.annotators == ["alice", "bob"]
    np.testing.assert_allclose(result.cases[0].distances, 1.0, atol=1e-9)  # v1 would give 0.5
    summary = rows_of(agreement.summary_csv(result))
    assert [r["sub_anatomy"] for r in summary] == [s.name for s in brain88.sub_anatomies] + ["all"]
    assert summary[-1]["distances"] == str(88 * 2) and summary[-1]["mean_mm"] == "1.0000"
    assert summary[0]["landmarks"] == "5" and summary[0]["cases"] == "1" and summary[0]["annotators"] == "2"
    planarity = rows_of(agreement.planarity_csv(result))
    assert len(planarity) == 7 * 2 and planarity[0]["points"] == "5"
    assert all(float(r["planarity_rms_mm"]) < 1e-6 for r in planarity)
    with pytest.raises(LandmarkError, match="unknown annotator"):
        agreement.agreement_of(dataset, annotators=["alice", "zed"])
    with pytest.raises(LandmarkError, match="no case is annotated by 2 or more annotators"):
        agreement.agreement_of(dataset, annotators=["alice"])


def test_manifest_with_annotator_column(tmp_path, brain88):
    base = synthetic_annotation(brain88)
    for name, offset in (("a1", 0.0), ("a2", -2.0), ("b1", 2.0)):
        write_markups_json(tmp_path / f"{name}.mrk.json", brain88, base + [0.0, 0.0, offset])
    (tmp_path / "m.csv").write_text("name,landmarks,annotator,version\ncase,a2.mrk.json,A,2\ncase,a1.mrk.json,A,1\n"
                                    "case,b1.mrk.json,B,\n")
    result = agreement.agreement_of(tmp_path / "m.csv")  # schema found from the labels; A's version 2 wins
    assert result.schema.name == "brain-88"
    np.testing.assert_allclose(result.cases[0].distances, 2.0, atol=1e-9)
    (tmp_path / "twice.csv").write_text("name,landmarks,annotator\ncase,a1.mrk.json,A\ncase,a2.mrk.json,A\n")
    with pytest.raises(LandmarkError, match="two rows by annotator 'A'"):
        agreement.agreement_of(tmp_path / "twice.csv")
    (tmp_path / "plain.csv").write_text("image,landmarks\nx.nii.gz,a1.mrk.json\n")
    with pytest.raises(LandmarkError, match="needs 'landmarks', 'annotator'"):
        agreement.agreement_of(tmp_path / "plain.csv")


def test_agreement_cli_writes_csvs_and_plots(dataset, tmp_path, capsys, brain88):
    out = tmp_path / "agreement"
    assert cli_main(["agreement", str(dataset), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 case(s) with 2+ annotators; annotators: alice, bob" in printed and "left out 1 case(s)" in printed
    assert sorted(p.name for p in out.iterdir()) == sorted(agreement.FILES.values())
    rows = rows_of((out / "agreement.csv").read_text())
    assert len(rows) == 88 * 2 and {r["case"] for r in rows} == {"c1"}
    assert len(rows_of((out / "agreement_summary.csv").read_text())) == 8
    assert len(rows_of((out / "planarity.csv").read_text())) == 14
    for name in ("agreement_sub_anatomy.png", "agreement_landmarks.png", "planarity.png"):
        picture = matplotlib.image.imread(out / name)
        assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 600
        assert picture[..., :3].std() > 0.05  # something is drawn
    landmarks_png = matplotlib.image.imread(out / "agreement_landmarks.png")
    assert landmarks_png.shape[1] >= 1200  # wide enough for 88 readable landmark names

    # refused runs: one line on stderr, exit code 2, nothing written
    before = {p: p.read_bytes() for p in out.iterdir()}
    single = datasets.create_dataset(tmp_path / "single")
    datasets.add_case(single, tiny_scan(tmp_path / "s.nii.gz"), dataset / "annotations/c1/bob/v1.mrk.json", "alice")
    for argv, message in ((["agreement", str(dataset), "--output", str(out)], "already exists; pass --overwrite"),
                          (["agreement", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")],
                           "dataset does not exist"),
                          (["agreement", str(dataset), "--annotators", "alice,zed", "--output", str(tmp_path / "o2")],
                           "unknown annotator(s) zed"),
                          (["agreement", str(single), "--output", str(tmp_path / "o3")],
                           "no case is annotated by 2 or more annotators")):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_agreement_reports_its_steps_as_json_lines_for_the_slicer_gui(dataset, tmp_path, capsys):
    """BackendJob runs every command with --progress json: agreement reports the cases it reads (c1 and c2)
    and the six files it writes, one JSON object per line, then its summary."""
    assert cli_main(["agreement", str(dataset), "--output", str(tmp_path / "out"), "--progress", "json"]) == 0
    out = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in out if line.startswith("{")]
    steps = [(r["stage"], r["step"], r["total"]) for r in records]
    assert steps == [("agreement: reading annotations", k, 2) for k in range(3)] + \
        [("agreement: writing tables and plots", k, 6) for k in range(7)]
    assert any("annotators: alice, bob" in line for line in out if not line.startswith("{"))
