"""Annotation datasets (datasets.py): versioning, untouched user files, several annotators, and the
manifest that train reads through data.discover_cases."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from LandmarkDetectionLib import datasets
from LandmarkDetectionLib.data import discover_cases
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, write_landmarks, write_markups_json


# ------------------------------------------------------------------------------------------------ helpers
def synthetic_annotation(schema, seed=0) -> np.ndarray:
    """(K, 3) RAS points: each sub-anatomy's points on its own plane (planarity exactly 0)."""
    rng = np.random.default_rng(seed)
    points = np.zeros((len(schema), 3))
    for sub in schema.sub_anatomies:
        indices = schema.indices_of(sub.name)
        frame, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        centre = rng.uniform(-40, 40, 3)
        angles = np.linspace(0, 2 * np.pi, len(indices), endpoint=False)
        radius = rng.uniform(10, 40, len(indices))
        points[indices] = centre + (radius * np.cos(angles))[:, None] * frame[:, 0] + \
            (radius * np.sin(angles))[:, None] * frame[:, 1]
    return points


def tiny_scan(path: Path, seed=0) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(seed).normal(100, 20, (6, 7, 8)).astype(np.float32))
    image.SetSpacing((2.0, 2.0, 2.5))
    sitk.WriteImage(image, str(path))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest_rows(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def cli_main(argv) -> int:
    """``landmark-detection ...`` in this process."""
    from LandmarkDetectionLib import cli

    return cli.main(argv)


@pytest.fixture
def user_files(tmp_path, brain88):
    """A user's scan and two annotators' landmark files, outside any dataset."""
    user = tmp_path / "user"
    user.mkdir()
    scan = tiny_scan(user / "sub-01_T1w.nii.gz")
    base = synthetic_annotation(brain88)
    alice, bob = user / "alice.mrk.json", user / "bob.fcsv"
    write_markups_json(alice, brain88, base)
    write_landmarks(bob, brain88, base + [1.0, 0.0, 0.0])
    return scan, alice, bob, base


# -------------------------------------------------------------------------------------------------- tests
def test_new_version_never_overwrites_earlier(tmp_path, brain88, user_files):
    scan, alice, _, base = user_files
    folder = datasets.create_dataset(tmp_path / "ds", "brain-88")
    first = datasets.add_case(folder, scan, alice, "alice", status="draft")
    assert first.case == "sub-01_T1w" and first.version == 1
    v1 = folder / "annotations" / "sub-01_T1w" / "alice" / "v1.mrk.json"
    assert first.landmarks == v1
    v1_bytes = v1.read_bytes()

    second = datasets.save_annotation(folder, "sub-01_T1w", "alice", base + 2.0, status="complete")
    third = datasets.add_case(folder, None, alice, "alice", case="sub-01_T1w", status="reviewed")
    assert (second.version, third.version) == (2, 3)
    assert v1.read_bytes() == v1_bytes  # earlier versions keep their bytes
    assert sorted(p.name for p in v1.parent.glob("v*.mrk.json")) == ["v1.mrk.json", "v2.mrk.json", "v3.mrk.json"]
    np.testing.assert_allclose(read_landmarks(v1, brain88), base, atol=1e-9)
    np.testing.assert_allclose(read_landmarks(v1.parent / "v2.mrk.json", brain88), base + 2.0, atol=1e-9)

    rows = manifest_rows(folder)
    assert len(rows) == 1  # one row per (case, annotator), pointing to the newest version
    assert rows[0]["landmarks"] == "annotations/sub-01_T1w/alice/v3.mrk.json"
    assert (rows[0]["version"], rows[0]["status"], rows[0]["annotator"]) == ("3", "reviewed", "alice")
    assert rows[0]["created"].endswith("Z") and rows[0]["image"] == "images/sub-01_T1w.nii.gz"
    versions = datasets.list_versions(folder, "sub-01_T1w", "alice")
    assert [(v.number, v.status) for v in versions] == [(1, "draft"), (2, "complete"), (3, "reviewed")]
    assert versions[0].source == str(alice.resolve()) and versions[1].source == ""
    assert not (folder / datasets.LOCK).exists()


def test_user_files_are_never_modified(tmp_path, user_files):
    scan, alice, bob, _ = user_files
    before = {p: (sha(p), p.stat().st_mtime_ns) for p in (scan, alice, bob)}
    folder = datasets.create_dataset(tmp_path / "ds")
    datasets.add_case(folder, scan, alice, "alice")
    datasets.add_case(folder, scan, bob, "bob")  # the same scan again: checked, not copied
    datasets.add_case(folder, scan, alice, "alice", status="reviewed")
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in (scan, alice, bob)} == before
    copy = folder / "images" / "sub-01_T1w.nii.gz"
    assert sha(copy) == sha(scan)  # copied byte for byte, once
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["sub-01_T1w.nii.gz"]


def test_several_annotators_and_train_reads_one_row_per_case(tmp_path, brain88, user_files):
    scan, alice, bob, base = user_files
    folder = datasets.create_dataset(tmp_path / "ds")
    datasets.add_case(folder, scan, alice, "alice", case="c1", split="train", group="site-a")
    datasets.add_case(folder, scan, bob, "bob", case="c1", status="reviewed")  # reviewed: train reads bob's
    datasets.add_case(folder, tiny_scan(tmp_path / "s2.nii.gz", 1), alice, "alice", case="c2", status="draft")
    datasets.add_case(folder, None, bob, "bob", case="c2", provenance="model-assisted:locnet-v1")
    datasets.add_case(folder, tiny_scan(tmp_path / "s3.nii.gz", 2), alice, "alice", case="c3", status="draft")
    datasets.save_annotation(folder, "c2", "carol", base, status="complete")  # newest complete: train reads carol's

    assert datasets.list_cases(folder) == ["c1", "c2", "c3"]
    assert datasets.list_annotators(folder, "c2") == ["alice", "bob", "carol"]
    assert datasets.list_annotators(folder) == ["alice", "bob", "carol"]
    entries = {(e.case, e.annotator): e for e in datasets.read_entries(folder)}
    assert len(entries) == 6
    assert [key for key, e in entries.items() if e.training] == [("c1", "bob"), ("c2", "carol")]
    assert entries[("c1", "alice")].split == "train" and entries[("c1", "bob")].group == "site-a"
    assert entries[("c2", "bob")].provenance == "model-assisted:locnet-v1"

    cases = discover_cases(folder / "manifest.csv")  # exactly what train reads
    assert [c.name for c in cases] == ["c1", "c2"]  # unique names; c3 (drafts only) is not trained on
    assert cases[0].landmarks == entries[("c1", "bob")].landmarks.resolve()
    assert cases[0].image == (folder / "images" / "c1.nii.gz").resolve()
    assert (cases[0].split, cases[0].group) == ("train", "site-a")
    np.testing.assert_allclose(read_landmarks(cases[1].landmarks, brain88), base, atol=1e-9)

    text = datasets.listing_text(folder)
    assert "3 case(s), 3 annotator(s), 2 case(s) train reads" in text
    assert "bob" in text and "<- train reads this" in text


def test_training_row_rule(tmp_path, user_files):
    """Reviewed beats a newer complete; among equals the newest; drafts never."""
    entry = datasets.Entry("c", "x", Path("i"), Path("l"), 1, "complete", "manual", "2024-01-01T00:00:00Z")
    rows = [entry, datasets.replace(entry, annotator="y", created="2024-02-01T00:00:00Z"),
            datasets.replace(entry, annotator="z", status="draft", created="2024-03-01T00:00:00Z")]
    assert [e.training for e in datasets.choose_training(rows)] == [False, True, False]
    rows[0] = datasets.replace(rows[0], status="reviewed")
    assert [e.training for e in datasets.choose_training(rows)] == [True, False, False]
    tie = [entry, datasets.replace(entry, annotator="a")]
    assert [e.training for e in datasets.choose_training(tie)] == [False, True]  # same time: first name


def test_manifest_reader_keeps_old_manifests_and_skips_training_no(tmp_path, brain88):
    """data.py reads manifests without the new columns as before, ignores unknown columns, skips
    training=no rows."""
    points = synthetic_annotation(brain88)
    for name in ("a", "b"):
        tiny_scan(tmp_path / f"{name}.nii.gz")
        write_markups_json(tmp_path / f"{name}.mrk.json", brain88, points)
    (tmp_path / "old.csv").write_text("image,landmarks,split,colour\na.nii.gz,a.mrk.json,val,red\n"
                                      "b.nii.gz,b.mrk.json,,blue\n")
    assert [(c.name, c.split) for c in discover_cases(tmp_path / "old.csv")] == [("a", "val"), ("b", "")]
    (tmp_path / "new.csv").write_text("image,landmarks,name,training\na.nii.gz,a.mrk.json,case,yes\n"
                                      "b.nii.gz,b.mrk.json,case,no\n")
    cases = discover_cases(tmp_path / "new.csv")
    assert [(c.name, c.image.name) for c in cases] == [("case", "a.nii.gz")]


def test_existing_case_checks_its_scan(tmp_path, user_files):
    scan, alice, bob, _ = user_files
    folder = datasets.create_dataset(tmp_path / "ds")
    datasets.add_case(folder, scan, alice, "alice", case="c1")
    same = tmp_path / "same.nii.gz"
    same.write_bytes(scan.read_bytes())
    assert datasets.add_case(folder, same, bob, "bob", case="c1").version == 1
    other = tiny_scan(tmp_path / "other.nii.gz", seed=5)
    with pytest.raises(LandmarkError, match="is not the scan of case 'c1'"):
        datasets.add_case(folder, other, bob, "bob", case="c1")
    assert datasets.list_versions(folder, "c1", "bob")[-1].number == 1  # nothing saved by the refused add


def test_multi_file_volume_is_converted_with_its_geometry(tmp_path, user_files):
    _, alice, _, _ = user_files
    image = sitk.GetImageFromArray(np.random.default_rng(3).integers(0, 400, (5, 6, 7)).astype(np.int16))
    image.SetOrigin((1.0, 2.0, 3.0))
    image.SetSpacing((0.9, 1.1, 2.0))
    sitk.WriteImage(image, str(tmp_path / "scan.mhd"))
    folder = datasets.create_dataset(tmp_path / "ds")
    entry = datasets.add_case(folder, tmp_path / "scan.mhd", alice, "alice")
    assert entry.image == folder / "images" / "scan.nrrd"
    copy = sitk.ReadImage(str(entry.image))
    assert copy.GetPixelID() == sitk.sitkInt16 and copy.GetOrigin() == image.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(copy), sitk.GetArrayFromImage(image))


def test_bad_requests_are_refused_with_one_line(tmp_path, brain88, user_files):
    scan, alice, _, base = user_files
    with pytest.raises(LandmarkError, match="dataset does not exist"):
        datasets.add_case(tmp_path / "missing", scan, alice, "alice")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LandmarkError, match="not a dataset"):
        datasets.read_entries(tmp_path / "plain")
    folder = datasets.create_dataset(tmp_path / "ds")
    with pytest.raises(LandmarkError, match="already holds a dataset"):
        datasets.create_dataset(folder)
    with pytest.raises(LandmarkError, match="no such schema"):
        datasets.create_dataset(tmp_path / "ds2", "brain-99")
    for kwargs, message in (({"annotator": "Dr Smith"}, "letters, digits"),
                            ({"annotator": "x", "status": "done"}, "status 'done'"),
                            ({"annotator": "x", "provenance": "model-assisted:"}, "provenance"),
                            ({"annotator": "x", "case": "../up"}, "case name")):
        with pytest.raises(LandmarkError, match=message):
            datasets.add_case(folder, scan, alice, **kwargs)
    with pytest.raises(LandmarkError, match="no case 'nope'"):
        datasets.save_annotation(folder, "nope", "alice", base)
    datasets.add_case(folder, scan, alice, "alice", case="c1")
    with pytest.raises(LandmarkError, match="only in letter case"):
        datasets.save_annotation(folder, "c1", "ALICE", base)
    with pytest.raises(LandmarkError, match=r"shape \(3, 3\)"):
        datasets.save_annotation(folder, "c1", "alice", base[:3])
    with pytest.raises(LandmarkError, match="no annotation by 'zed'"):
        datasets.list_versions(folder, "c1", "zed")
    json.loads((folder / "dataset.json").read_text())  # still intact
    assert len(manifest_rows(folder)) == 1 and not (folder / datasets.LOCK).exists()


def test_user_schema_is_copied_into_the_dataset(tmp_path, afids32):
    schema_file = tmp_path / "mine.json"
    schema_file.write_text(json.dumps(afids32.to_dict()))
    folder = datasets.create_dataset(tmp_path / "ds", schema_file)
    schema_file.unlink()  # the dataset does not depend on the user's file
    assert datasets.dataset_schema(folder).names == afids32.names


def test_dataset_cli(tmp_path, capsys, user_files):
    scan, alice, bob, _ = user_files
    folder = tmp_path / "ds"
    assert cli_main(["dataset", "create", str(folder), "--schema", "brain-88"]) == 0
    assert cli_main(["dataset", "add", str(folder), "--image", str(scan), "--landmarks", str(alice),
                     "--annotator", "alice", "--case", "c1", "--split", "val"]) == 0
    assert cli_main(["dataset", "add", str(folder), "--landmarks", str(bob), "--annotator", "bob", "--case", "c1",
                     "--status", "reviewed", "--provenance", "imported"]) == 0
    out = capsys.readouterr().out
    assert "annotations/c1/bob/v1.mrk.json" in out and "train reads it" in out
    assert cli_main(["dataset", "list", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "c1: images/c1.nii.gz, split val" in listing and "imported" in listing

    for argv, message in ((["dataset", "list", str(tmp_path / "nope")], "dataset does not exist"),
                          (["dataset", "add", str(folder), "--landmarks", str(alice), "--annotator", "carol",
                            "--case", "c9"], "a new case needs an image"),
                          (["dataset", "add", str(folder), "--landmarks", str(tmp_path / "missing.mrk.json"),
                            "--annotator", "carol", "--case", "c1"], "missing.mrk.json: does not exist")):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["dataset", "add", str(folder), "--landmarks", str(alice), "--annotator", "a", "--status", "done"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------- the whole annotation
def corpus_callosum_case(b88):
    """The synthetic brain-88 head of test_annotation with the corpus callosum's anterior-body secondaries
    at arc fractions 0.1, 0.4, 0.6, 0.8 of their circle (known spacing CV along it), and its boundary."""
    from test_annotation import _on_plane, boundary, head

    points = head(b88)
    for k, f in enumerate((0.1, 0.4, 0.6, 0.8), start=1):
        points[b88.names.index(f"CC_anterior_body_{k}")] = _on_plane("Corpus Callosum", 0, 0, 30, 90 * f)
    gaps = np.array([0.5, 1.5, 1, 1, 1])  # arc gaps over their expected fraction gaps
    return points, boundary(b88, "Corpus Callosum", n=360), float(gaps.std() / gaps.mean())


def test_a_version_stores_its_curves_and_assistance_and_gives_them_back(tmp_path, brain88, user_files):
    from LandmarkDetectionLib.annotation import Curve, annotation_qa, assistance_document

    scan = user_files[0]
    points, circle, expected_cv = corpus_callosum_case(brain88)
    curves = {"Corpus Callosum": Curve(circle, closed=True),
              "Temporal Lobe": [np.array([[0.0, 0, 0], [10, 0, 0]]), np.array([[0.0, 5, 0], [0, 9, 3], [2, 9, 3]])]}
    assistance = assistance_document("tiny", [{"landmark": "FL_frontal_pole", "action": "moved", "moved_mm": 2.5}])
    folder = datasets.create_dataset(tmp_path / "ds", "brain-88")
    entry = datasets.add_case(folder, scan, points, "alice", curves=curves, assistance=assistance)
    annotator_dir = entry.landmarks.parent
    assert sorted(p.name for p in (annotator_dir / "v1.curves").iterdir()) == \
        ["Corpus_Callosum-01.mrk.json", "Temporal_Lobe-01.mrk.json", "Temporal_Lobe-02.mrk.json"]
    stored = json.loads((annotator_dir / "v1.assistance.json").read_text())
    assert stored == {**assistance, "annotation": "v1.mrk.json"}
    record = json.loads((annotator_dir / "versions.json").read_text())["versions"][0]
    assert (record["curves"], record["assistance"]) == ("v1.curves", "v1.assistance.json")

    loaded = datasets.load_annotation(folder, entry.case, "alice")
    np.testing.assert_allclose(loaded.landmarks, points, atol=1e-9)
    assert {sub: len(c) for sub, c in loaded.curves.items()} == {"Corpus Callosum": 1, "Temporal Lobe": 2}
    cc = loaded.curves["Corpus Callosum"][0]
    assert cc.closed and np.allclose(cc.points, circle, atol=1e-9) and cc.name == "Corpus Callosum boundary 1"
    assert np.allclose(loaded.curves["Temporal Lobe"][1].points, curves["Temporal Lobe"][1])
    assert loaded.assistance == stored and loaded.version.number == 1
    # the curves feed the QA: the spacing measured along the stored boundary
    cv = annotation_qa(brain88, loaded.landmarks, loaded.curves).row("Corpus Callosum").spacing_cv
    assert cv == pytest.approx(expected_cv, abs=2e-3)

    # a version without extras has none; the earlier version's stay as they were
    before = {p: sha(p) for p in annotator_dir.rglob("*") if p.is_file() and p.name != "versions.json"}
    second = datasets.save_annotation(folder, entry.case, "alice", points + 1.0)
    assert second.version == 2 and not (annotator_dir / "v2.curves").exists()
    assert not (annotator_dir / "v2.assistance.json").exists()
    newest = datasets.load_annotation(folder, entry.case, "alice")
    assert (newest.version.number, newest.curves, newest.assistance) == (2, {}, None)
    assert {p: sha(p) for p in before} == before
    assert datasets.load_annotation(folder, entry.case, "alice", 1).curves.keys() == loaded.curves.keys()
    with pytest.raises(LandmarkError, match=r"has no version 7 by 'alice' \(versions: 1, 2\)"):
        datasets.load_annotation(folder, entry.case, "alice", 7)


def test_bad_extras_are_refused_before_anything_is_written(tmp_path, brain88, user_files):
    scan, alice, _, base = user_files
    folder = datasets.create_dataset(tmp_path / "ds", "brain-88")
    entry = datasets.add_case(folder, scan, alice, "alice")
    annotator_dir = entry.landmarks.parent
    listing = sorted(p.name for p in folder.rglob("*"))
    manifest = (folder / "manifest.csv").read_text()
    for kwargs, message in (({"curves": {"Hippocampus": np.zeros((2, 3))}}, "'Hippocampus' is not a sub-anatomy"),
                            ({"curves": {"Eye": np.ones((2, 3))}}, "two distinct points"),
                            ({"curves": {"Eye": np.full((3, 3), np.nan)}}, "finite points"),
                            ({"assistance": ["not", "an", "object"]}, "must be a JSON object"),
                            ({"assistance": {"model": object()}}, "not JSON")):
        with pytest.raises(LandmarkError, match=message):
            datasets.save_annotation(folder, entry.case, "alice", base, **kwargs)
        with pytest.raises(LandmarkError, match=message):  # a new case: its scan is not copied in either
            datasets.add_case(folder, scan, base, "bob", case="c2", **kwargs)
    assert sorted(p.name for p in folder.rglob("*")) == listing and (folder / "manifest.csv").read_text() == manifest

    # what a save that died half-way may leave (an empty curves folder) is never reused or overwritten
    (annotator_dir / "v2.curves").mkdir()
    third = datasets.save_annotation(folder, entry.case, "alice", base, curves={"Eye": np.eye(3)})
    assert third.version == 3 and list((annotator_dir / "v2.curves").iterdir()) == []
    assert [v.number for v in datasets.list_versions(folder, entry.case, "alice")] == [1, 3]


def test_qa_of_a_dataset_version_measures_along_its_stored_curves(tmp_path, capsys, brain88, user_files):
    """``dataset add --curves`` stores the boundaries; ``qa`` on that version's file uses them without being
    told (and says so), --curves still wins; ``dataset list`` shows which versions have them."""
    from LandmarkDetectionLib.fileio import write_curve_json

    scan = user_files[0]
    points, circle, expected_cv = corpus_callosum_case(brain88)
    landmarks, curve_file = tmp_path / "cc.mrk.json", tmp_path / "cc_curve.mrk.json"
    write_markups_json(landmarks, brain88, points)
    write_curve_json(curve_file, circle, "Corpus Callosum boundary", closed=True)
    folder = tmp_path / "ds"
    assert cli_main(["dataset", "create", str(folder), "--schema", "brain-88"]) == 0
    assert cli_main(["dataset", "add", str(folder), "--image", str(scan), "--landmarks", str(landmarks),
                     "--annotator", "alice", "--case", "c1", "--curves", str(curve_file)]) == 0
    assert cli_main(["dataset", "list", str(folder)]) == 0
    assert "+curves" in capsys.readouterr().out
    version = folder / "annotations" / "c1" / "alice" / "v1.mrk.json"
    assert datasets.version_curves(version) == version.parent / "v1.curves"
    assert datasets.version_curves(landmarks) is None

    def spacing_cv(*extra):
        output = tmp_path / f"qa{len(list(tmp_path.glob('qa*.csv')))}.csv"
        cli_main(["qa", "--landmarks", str(version), "--output", str(output), *extra])
        rows = {r["sub_anatomy"]: r for r in csv.DictReader(output.open(encoding="utf-8"))}
        return float(rows["Corpus Callosum"]["spacing_cv"])

    assert spacing_cv() == pytest.approx(expected_cv, abs=2e-3)
    assert "boundary curves stored with this version: " in capsys.readouterr().out
    straight = tmp_path / "straight.mrk.json"  # another boundary given explicitly: the straight chain of points
    write_curve_json(straight, points[[brain88.lookup(n) for n in ("CC_genu", "CC_anterior_body_1", "CC_anterior_body_2",
                                                                   "CC_anterior_body_3", "CC_anterior_body_4",
                                                                   "CC_mid_body")]], "Corpus Callosum line")
    chords = np.sin(np.radians([9, 27, 18, 18, 18]) / 2)  # genu (0 deg), 9, 36, 54, 72, mid-body (90 deg)
    assert spacing_cv("--curves", str(straight)) == pytest.approx(chords.std() / chords.mean(), abs=1e-3)
