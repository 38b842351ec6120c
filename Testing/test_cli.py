"""The command line end to end, and every kind of bad input: one line, exit 2, nothing written."""

import csv
import hashlib
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.fileio import read_landmarks, write_landmarks
from LandmarkDetectionLib.train import TrainOptions, train
from conftest import TINY_TRAIN, make_volume


@pytest.fixture(scope="module")
def tiny_model(tiny_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("model")
    return train(TrainOptions(dataset=str(tiny_dataset), output=str(output), epochs=2, **TINY_TRAIN))


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_detect_then_evaluate(tiny_model, tiny_dataset, tmp_path, capsys, afids32):
    before = _snapshot(tiny_dataset)
    assert main(["detect", "--model", str(tiny_model), "--input", str(tiny_dataset), "--output",
                 str(tmp_path / "pred"), "--progress", "none", "--device", "cpu"]) == 0
    assert _snapshot(tiny_dataset) == before  # inputs untouched
    produced = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert produced == sorted([f"case{n:02d}{s}" for n in range(6) for s in (".csv", ".mrk.json")])
    markups = json.loads((tmp_path / "pred" / "case00.mrk.json").read_text())["markups"][0]["controlPoints"]
    assert [cp["label"] for cp in markups] == afids32.names and markups[0]["description"] == "Midline"
    rows = list(csv.DictReader((tmp_path / "pred" / "case00.csv").open()))
    assert rows[0]["name"] == "AC" and float(rows[0]["x"]) == pytest.approx(
        read_landmarks(tmp_path / "pred" / "case00.mrk.json", afids32)[0, 0], abs=1e-3)

    capsys.readouterr()
    report = tmp_path / "report.csv"
    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--truth", str(tiny_dataset),
                 "--output", str(report), "--model", str(tiny_model)]) == 0
    printed = capsys.readouterr().out
    assert "Midline" in printed and "SDR5" in printed
    rows = list(csv.DictReader(report.open()))
    levels = [r["level"] for r in rows]
    assert levels.count("overall") == 1 and levels.count("sub_anatomy") == 5 and levels.count("landmark") == 32
    overall = rows[0]
    assert int(overall["n"]) == 6 * 32
    assert 0 <= float(overall["sdr_1mm"]) <= float(overall["sdr_5mm"]) <= 100

    # Existing outputs are never silently replaced.
    assert main(["detect", "--model", str(tiny_model), "--input", str(tiny_dataset / "case00.nii.gz"),
                 "--output", str(tmp_path / "pred"), "--progress", "none"]) == 2
    assert "already exists; pass --overwrite" in _one_error_line(capsys)


def test_evaluate_per_group_rows_from_a_manifest(tiny_dataset, tmp_path, afids32, capsys):
    truth = read_landmarks(tiny_dataset / "case00.mrk.json", afids32)
    (tmp_path / "pred").mkdir()
    rows = ["image,landmarks,group"]
    for n, group in ((0, "site-a"), (1, "site-b")):
        write_landmarks(tmp_path / "pred" / f"case{n:02d}.mrk.json", afids32, truth + [n + 1.0, 0, 0])
        shutil.copy(tiny_dataset / "case00.mrk.json", tmp_path / f"case{n:02d}.mrk.json")
        rows.append(f"case{n:02d}.nii.gz,case{n:02d}.mrk.json,{group}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows))
    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--truth", str(tmp_path / "manifest.csv"),
                 "--output", str(tmp_path / "r.csv"), "--schema", "afids-32"]) == 0
    groups = {r["name"]: float(r["mre_mm"]) for r in csv.DictReader((tmp_path / "r.csv").open()) if r["level"] == "group"}
    assert groups == {"site-a": pytest.approx(1.0), "site-b": pytest.approx(2.0)}


def _bad_image(kind, path):
    if kind == "2d":
        image = sitk.GetImageFromArray(np.random.rand(8, 9).astype(np.float32))
    elif kind == "4d":
        image = sitk.JoinSeries([make_volume()] * 2)
    elif kind == "nan":
        array = np.random.rand(6, 7, 8).astype(np.float32)
        array[2, 3, 4] = np.nan
        image = sitk.GetImageFromArray(array)
    else:
        image = sitk.GetImageFromArray(np.zeros((6, 7, 8), np.float32))
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("kind, message", [("2d", "is 2D"), ("4d", "is 4D"), ("nan", "NaN"), ("empty", "is empty")])
def test_detect_refuses_bad_volumes(tiny_model, tmp_path, capsys, kind, message):
    volume = tmp_path / f"{kind}.nii.gz"
    _bad_image(kind, volume)
    before = volume.read_bytes()
    assert main(["detect", "--model", str(tiny_model), "--input", str(volume), "--output", str(tmp_path / "out"),
                 "--progress", "none"]) == 2
    line = _one_error_line(capsys)
    assert str(volume) in line and message in line
    assert volume.read_bytes() == before
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_a_bad_volume_in_a_folder_does_not_stop_the_others(tiny_model, tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(tiny_dataset / "case00.nii.gz", folder / "good.nii.gz")
    _bad_image("nan", folder / "bad.nii.gz")
    assert main(["detect", "--model", str(tiny_model), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "bad.nii.gz: contains NaN" in err and "1 of 2 volume(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.csv", "good.mrk.json"]


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: b"PK\x03\x04 a zip file, not a model", "not a readable model file"),
])
def test_detect_refuses_damaged_models(tiny_model, tiny_dataset, tmp_path, capsys, damage, message):
    model = tmp_path / "m.safetensors"
    model.write_bytes(damage(tiny_model.read_bytes()))
    assert main(["detect", "--model", str(model), "--input", str(tiny_dataset / "case00.nii.gz"),
                 "--output", str(tmp_path / "out"), "--progress", "none"]) == 2
    line = _one_error_line(capsys)
    assert str(model) in line and message in line
    assert not (tmp_path / "out").exists()


def test_unwritable_output_folder(tiny_model, tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["detect", "--model", str(tiny_model), "--input", str(tiny_dataset / "case00.nii.gz"),
                 "--output", str(blocker / "out"), "--progress", "none"]) == 2
    assert "output folder is not writable" in _one_error_line(capsys)


def test_training_refuses_bad_annotations_before_training(tiny_dataset, tmp_path, capsys, afids32):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    truth = read_landmarks(data / "case03.mrk.json", afids32)
    (data / "case03.mrk.json").unlink()
    (data / "case03.csv").write_text("name,x,y,z\n" + "\n".join(
        f"{n},{x},{y},{z}" for n, (x, y, z) in zip(afids32.names[:-1], truth[:-1])))
    before = _snapshot(data)
    args = ["train", "--dataset", str(data), "--output", str(tmp_path / "run"), "--schema", "afids-32",
            "--epochs", "1", "--progress", "none"]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "case03.csv" in line and "missing: LOSF" in line
    assert _snapshot(data) == before
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_training_refuses_a_dataset_of_another_schema(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "run"), "--schema", "brain-88",
                 "--epochs", "1", "--progress", "none"]) == 2
    assert "not in schema 'brain-88'" in _one_error_line(capsys)


def test_device_override_and_missing_cuda(tiny_model, tiny_dataset, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["detect", "--model", str(tiny_model), "--input", str(tiny_dataset / "case00.nii.gz"),
                 "--output", str(tmp_path / "out"), "--device", "cuda", "--progress", "none"]) == 2
    assert "CUDA is not available" in _one_error_line(capsys)


def test_progress_json_lines(tiny_model, tiny_dataset, tmp_path, capsys):
    assert main(["detect", "--model", str(tiny_model), "--input", str(tiny_dataset / "case01.nii.gz"),
                 "--output", str(tmp_path / "out"), "--progress", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0]["stage"] == "detect" and records[0]["total"] == 1
    assert {"step", "total", "loss", "metric", "eta"} <= set(records[-1]) or "message" in records[-1]


def _commands(parser, path=()):
    """(command words, parser) of every command and sub-command the parser runs (dataset create, ...)."""
    import argparse

    nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not nested:
        yield path, parser
    for action in nested:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*path, name))


def test_every_command_accepts_progress_json():
    """The Slicer modules' BackendJob ends every command line with --progress json: each command of the real
    parser takes it (its required arguments given placeholder values) and rejects another mode."""
    from LandmarkDetectionLib.cli import build_parser

    commands = list(_commands(build_parser()))
    assert {" ".join(path) for path, _ in commands} >= {"train", "detect", "calibrate", "evaluate", "schema", "augment",
                                                        "demo", "gradcam", "info", "planes", "qa", "dataset create",
                                                        "dataset add", "dataset list", "agreement"}
    for path, parser in commands:
        required = []
        for action in parser._actions:
            value = str(action.choices[0] if action.choices else 1) if action.nargs != 0 else None
            if not action.option_strings and action.nargs not in ("?", "*"):
                required.append(value)
            elif action.required:
                required += [action.option_strings[0], value]
        args = build_parser().parse_args([*path, *required, "--progress", "json"])
        assert args.progress == "json", path
        with pytest.raises(SystemExit):
            build_parser().parse_args([*path, *required, "--progress", "xml"])


def test_outputs_never_replace_inputs_or_earlier_outputs(tiny_model, tiny_dataset, tmp_path, capsys):
    """One check for every command: an output that is an input is refused; an existing output needs
    --overwrite; nothing is written when refused."""
    before = _snapshot(tiny_dataset)
    pred = tmp_path / "pred"
    assert main(["detect", "--model", str(tiny_model), "--input", str(tiny_dataset / "case00.nii.gz"), "--output",
                 str(pred), "--progress", "none"]) == 0
    truth = tiny_dataset / "case00.mrk.json"
    assert main(["evaluate", "--predictions", str(pred), "--truth", str(tiny_dataset), "--output", str(truth),
                 "--schema", "afids-32"]) == 2
    assert "would overwrite an input" in _one_error_line(capsys)
    report = tmp_path / "report.csv"
    report.write_text("mine")
    assert main(["evaluate", "--predictions", str(pred), "--truth", str(tiny_dataset), "--output", str(report),
                 "--schema", "afids-32"]) == 2
    assert "pass --overwrite" in _one_error_line(capsys) and report.read_text() == "mine"
    assert main(["evaluate", "--predictions", str(pred), "--truth", str(tiny_dataset), "--output", str(report),
                 "--schema", "afids-32", "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--model", str(tiny_model), "--dataset", str(tiny_dataset), "--output",
                 str(tiny_dataset / "case01.nii.gz"), "--progress", "none"]) == 2
    assert "would overwrite an input" in _one_error_line(capsys)
    assert main(["augment", "--input", str(tiny_dataset), "--preview", str(tiny_dataset / "case00.nii.gz")]) == 2
    assert "would overwrite an input" in _one_error_line(capsys)
    assert _snapshot(tiny_dataset) == before
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.html").write_text("an earlier demo")
    assert main(["demo", "--output", str(demo), "--progress", "none"]) == 2  # refused before any work
    assert "report.html: already exists; pass --overwrite" in _one_error_line(capsys)


def test_manifest_names_cannot_write_outside_the_output(tiny_dataset, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.write_text(f"image,landmarks,name\n{tiny_dataset / 'case00.nii.gz'},{tiny_dataset / 'case00.mrk.json'},"
                        "../../escaped\n")
    output = tmp_path / "deep" / "out"
    assert main(["augment", "--input", str(manifest), "--output", str(output), "--copies", "1", "--schema",
                 "afids-32", "--progress", "none"]) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(w.startswith("deep/out/") or w == "m/manifest.csv" for w in written), written
    assert (output / "_.._escaped_aug000.nii.gz").exists()


def test_info_prints_a_card_or_pure_json(tiny_model, capsys):
    assert main(["info", str(tiny_model)]) == 0
    card = capsys.readouterr().out
    assert "schema:       afids-32 (32 landmarks)" in card and "architecture: highres3dnet" in card
    assert main(["info", "--json", str(tiny_model)]) == 0
    document = json.loads(capsys.readouterr().out)  # the whole output is one JSON object
    assert document["schema"]["name"] == "afids-32" and document["config"]["architecture"] == "highres3dnet"
    assert "/" not in document["training"]["dataset"]  # no local folders recorded in a model file


def test_evaluate_prints_table_iv_for_brain88(tmp_path, brain88, capsys):
    """brain-88 data: one row per sub-anatomy with its MAE and RMSE (the paper's Table IV). Two cases of the
    reference annotation, each sub-anatomy shifted by its own known amounts."""
    from LandmarkDetectionLib.sample_data import REFERENCE_ANNOTATIONS
    from LandmarkDetectionLib.resources import resources_dir

    truth = read_landmarks(resources_dir() / REFERENCE_ANNOTATIONS["brain-88"], brain88)
    (tmp_path / "pred").mkdir()
    (tmp_path / "truth").mkdir()
    expected = {}
    for n in range(2):
        shifted = truth.copy()
        for s, sub in enumerate(brain88.sub_anatomies):
            shifted[brain88.indices_of(sub.name), 2] += (s + 1) * (n + 1)  # case n: (s+1)(n+1) mm along S
            expected[sub.name] = ((s + 1) * 1.5, (s + 1) * np.sqrt((1 + 4) / 2))  # MAE, RMSE over the two cases
        write_landmarks(tmp_path / "pred" / f"case{n}.mrk.json", brain88, shifted)
        write_landmarks(tmp_path / "truth" / f"case{n}.mrk.json", brain88, truth)
    assert main(["evaluate", "--predictions", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"),
                 "--output", str(tmp_path / "report.csv"), "--schema", "brain-88"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "RMSE" in line)
    assert "Table IV" in out and header.split()[:4] == ["n", "MAE", "SD", "RMSE"]
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines() if line.startswith("  ") and line.strip()[0].isalpha() and "RMSE" not in line}
    assert list(rows) == [sub.name for sub in brain88.sub_anatomies]
    for name, (mae, rmse) in expected.items():
        n, mean, _, root = rows[name][:4]
        assert int(n) == 2 * len(brain88.indices_of(name))
        assert float(mean) == pytest.approx(mae, abs=0.006) and float(root) == pytest.approx(rmse, abs=0.006)


def test_detect_picks_the_bundled_model_of_a_schema(tiny_model, tiny_dataset, tmp_path, capsys):
    scan = str(tiny_dataset / "case00.nii.gz")
    # Without --model the schema's bundled model detects: the AFIDs file it writes has all 32 landmarks.
    # It fuses its network with its registration prior, so without --uncertainty it runs its calibrated
    # passes (and writes their ellipsoids); --uncertainty 0 gives the network alone, with a warning.
    assert main(["detect", "--schema", "afids-32", "--input", scan, "--output", str(tmp_path / "a"),
                 "--progress", "none"]) == 0
    assert json.loads((tmp_path / "a" / "case00.mrk.json").read_text())["markups"][0]["controlPoints"].__len__() == 32
    assert json.loads((tmp_path / "a" / "case00.uncertainty.json").read_text())["passes"] == 50
    assert "warning" not in capsys.readouterr().err
    assert main(["detect", "--schema", "afids-32", "--input", scan, "--output", str(tmp_path / "a0"),
                 "--uncertainty", "0", "--progress", "none"]) == 0
    assert not (tmp_path / "a0" / "case00.uncertainty.json").exists()
    assert "without uncertainty passes this model gives its network's estimate alone" in capsys.readouterr().err
    # A model of another schema than --schema asks for is refused, naming the model; nothing is written.
    assert main(["detect", "--model", str(tiny_model), "--schema", "brain-88", "--input", scan,
                 "--output", str(tmp_path / "b"), "--progress", "none"]) == 2
    assert f"{tiny_model}: detects schema 'afids-32', not --schema brain-88" in _one_error_line(capsys)
    assert not (tmp_path / "b").exists()


def test_detect_without_passes_warns_that_a_fusing_model_gives_its_network_alone(tmp_path, capsys):
    from LandmarkDetectionLib.detect import UncertaintyOptions, calibration_mismatch
    from LandmarkDetectionLib.modelfile import load_model
    from LandmarkDetectionLib.resources import bundled_model_path

    fusing, plain = load_model(bundled_model_path("brain-88")), load_model(bundled_model_path("brain-88"))
    plain.prior_covariance = None  # the same network without its calibrated prior
    assert fusing.prior_covariance is not None
    warning = calibration_mismatch(fusing, UncertaintyOptions(passes=0))
    assert "network's estimate alone, not fused with its registration prior (pass --uncertainty 50)" in warning
    assert calibration_mismatch(fusing, UncertaintyOptions(passes=50)) is None
    assert calibration_mismatch(plain, UncertaintyOptions(passes=0)) is None
