"""The README's promises on user input: landmark labels, coordinate columns, devices, schema hints."""

from __future__ import annotations

import numpy as np
import pytest

from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, write_markups_json
from LandmarkDetectionLib.runtime import pick_device
from LandmarkDetectionLib.schema import load_schema, schema_of_labels


def test_labels_that_are_landmark_numbers_match(tmp_path, afids32):
    rows = "".join(f"{n},{n}.0,{-n}.5,{2 * n}\n" for n in range(32, 0, -1))  # numbers, in another order
    (tmp_path / "numbers.csv").write_text("label,x,y,z\n" + rows)
    coords = read_landmarks(tmp_path / "numbers.csv", afids32)
    assert coords[0].tolist() == [1.0, -1.5, 2.0] and coords[31].tolist() == [32.0, -32.5, 64.0]


def test_a_csv_with_both_ras_and_lps_columns_is_refused(tmp_path, afids32):
    path = tmp_path / "both.csv"
    path.write_text("name,x,y,z,l,p,s\n" + "".join(f"{lm.name},1,2,3,-1,-2,3\n" for lm in afids32.landmarks))
    with pytest.raises(LandmarkError, match="both LPS .* and RAS"):
        read_landmarks(path, afids32)


def test_labels_of_another_schema_name_the_schema_that_fits(tmp_path, afids32, brain88):
    path = tmp_path / "afids.mrk.json"
    write_markups_json(path, afids32, np.zeros((32, 3)))
    with pytest.raises(LandmarkError, match="fit schema 'afids-32' \\(pass --schema afids-32\\)"):
        read_landmarks(path, brain88)
    assert schema_of_labels(path).name == "afids-32"


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu:0", "cuda:7"])
def test_an_unknown_or_absent_device_is_one_line(device, capsys, tmp_path):
    with pytest.raises(ValueError, match=f"--device {device}"):
        pick_device(device)
    assert main(["detect", "--model", "none.safetensors", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--device", device]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --device {device}") and error.count("\n") == 1


def test_builtin_schemas_number_their_landmarks_in_order():
    for name in ("afids-32", "brain-88"):
        schema = load_schema(name)
        assert [schema.lookup(str(n)) for n in range(1, len(schema) + 1)] == list(range(len(schema)))


def _subcommands():
    import argparse

    from LandmarkDetectionLib.cli import build_parser

    def nested(parser, name):  # every (sub)command, e.g. "dataset add"
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child, sub in action.choices.items():
                    yield from nested(sub, f"{name} {child}".strip())

    return dict(nested(build_parser(), ""))


def test_every_option_has_help_and_help_shows_every_default():
    import argparse

    for name, parser in _subcommands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.required:
                continue
            if action.default is not None and action.default is not argparse.SUPPRESS:
                assert "default" in formatter._get_help_string(action), f"{name} {action.dest}: default not shown"


@pytest.mark.parametrize("argv,problem", [
    (["detect", "--uncertainty", "1"], "1 pass gives no spread"),
    (["detect", "--uncertainty", "5000"], "out of range"),
    (["detect", "--shift-mm", "-3"], "out of range"),
    (["detect", "--level", "1"], "out of range"),
    (["detect", "--seed", "-1"], "out of range"),
    (["augment", "--copies", "0"], "out of range"),
    (["gradcam", "--chunk", "0"], "out of range"),
    (["gradcam", "--radius-mm", "nan"], "out of range"),
    (["planes", "--spacing", "0"], "out of range"),
])
def test_numeric_options_have_bounds_and_a_bad_value_is_one_line(argv, problem, capsys):
    required = {"detect": ["--model", "m", "--input", "i", "--output", "o"], "augment": ["--input", "i"],
                "gradcam": ["--input", "i", "--output", "o"], "planes": ["--landmarks", "l", "--output", "o"]}
    with pytest.raises(SystemExit) as stop:
        main([argv[0], *required[argv[0]], *argv[1:]])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and problem in error and error.startswith("error: ")


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory, afids32):
    """A small untrained network (its answers do not matter here, only what gets written)."""
    import torch

    from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
    from LandmarkDetectionLib.preprocess import InputGeometry

    torch.manual_seed(0)
    config = ModelConfig("highres3dnet", {"channels": [4, 4, 8], "blocks_per_stage": 1},
                         InputGeometry((12, 10, 8), (16.0, 16.0, 20.0)), 6.0)
    path = tmp_path_factory.mktemp("untrained") / "model.safetensors"
    LandmarkModel.create(config, afids32).save(path)
    return path


def _detect_with_file_size_limit(model, volume, output, limit_bytes):
    """The CLI in a process whose files may not grow beyond ``limit_bytes``: writes fail part-way as on a
    full disk (EFBIG instead of ENOSPC; SIGXFSZ ignored so the write returns the error)."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    from conftest import REPO

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=str(REPO / "LandmarkDetection"))
    return subprocess.run([sys.executable, "-m", "LandmarkDetectionLib", "detect", "--model", str(model),
                           "--input", str(volume), "--output", str(output), "--uncertainty", "2", "--device", "cpu",
                           "--progress", "none"], preexec_fn=limit, capture_output=True, text=True, env=env,
                          timeout=300)


def test_results_appear_together_or_not_at_all_when_the_disk_fills(tmp_path, untrained_model, afids_small):
    from LandmarkDetectionLib.fileio import write_volume

    volume = tmp_path / "scan.nii.gz"
    write_volume(afids_small[0], volume)
    complete = _detect_with_file_size_limit(untrained_model, volume, tmp_path / "roomy", 10**9)
    assert complete.returncode == 0, complete.stderr
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "roomy").iterdir()}
    assert set(sizes) == {"scan.csv", "scan.mrk.json", "scan.uncertainty.json", "scan.uncertainty.csv"}
    # Room for the CSV (written first) but not for the markups file: nothing may appear.
    limit = (sizes["scan.csv"] + sizes["scan.mrk.json"]) // 2
    assert sizes["scan.csv"] < limit < sizes["scan.mrk.json"]
    full = _detect_with_file_size_limit(untrained_model, volume, tmp_path / "full", limit)
    assert full.returncode == 2
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be written" in lines[0] and "scan.mrk.json" in lines[0], full.stderr
    assert not (tmp_path / "full").exists()  # no result, no temporary file, no empty folder


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path, untrained_model, capsys):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a volume")
    assert main(["detect", "--model", str(untrained_model), "--input", str(tmp_path / "broken.nii.gz"),
                 "--output", str(tmp_path / "new" / "out"), "--device", "cpu", "--progress", "none"]) == 2
    assert "broken.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "new" / "out").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert main(["detect", "--model", str(untrained_model), "--input", str(tmp_path / "broken.nii.gz"),
                 "--output", str(existing), "--device", "cpu", "--progress", "none"]) == 2
    assert existing.is_dir()  # a folder the user made stays


def test_landmarks_far_outside_their_image_are_warned_about_once(tmp_path, afids_small, afids32, capsys):
    from LandmarkDetectionLib.data import Case, read_case
    from LandmarkDetectionLib.fileio import write_volume

    image, landmarks = afids_small
    write_volume(image, tmp_path / "scan.nii.gz")
    write_markups_json(tmp_path / "good.mrk.json", afids32, landmarks)
    shifted = landmarks.copy()
    shifted[:3] += [0.0, 0.0, 300.0]  # three points of another scan's file
    write_markups_json(tmp_path / "far.mrk.json", afids32, shifted)
    read_case(Case("good", tmp_path / "scan.nii.gz", tmp_path / "good.mrk.json"), afids32)
    assert capsys.readouterr().err == ""
    far = Case("far", tmp_path / "scan.nii.gz", tmp_path / "far.mrk.json")
    _, read = read_case(far, afids32)
    read_case(far, afids32)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "far.mrk.json: 3 landmark(s) lie more than 20 mm outside scan.nii.gz" in lines[0]
    np.testing.assert_allclose(read, shifted)  # warned, not changed


@pytest.mark.parametrize("option,value,problem", [
    ("--size", "100000,100000,100000", "input size"), ("--spacing", "0,1,1", "input spacing"),
    ("--channels", "4,0,8", "option channels"), ("--lr", "-1", "--lr -1.0"), ("--val-fraction", "1.5", "--val-fraction"),
])
def test_training_options_out_of_bounds_are_one_line_before_anything_is_written(option, value, problem, tmp_path,
                                                                                  capsys):
    assert main(["train", "--dataset", str(tmp_path), "--output", str(tmp_path / "run"), "--schema", "afids-32",
                 option, value]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and problem in error, error
    assert not (tmp_path / "run").exists()


def test_train_takes_the_schema_the_labels_name(tiny_dataset, tmp_path):
    """The tiny dataset holds AFIDs (afids-32) files; no --schema is given."""
    from conftest import TINY_TRAIN

    settings = {k: v for k, v in TINY_TRAIN.items() if k not in ("schema", "progress")}
    argv = ["train", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "run"), "--epochs", "1",
            "--progress", "none"]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    assert main(argv) == 0
    from LandmarkDetectionLib.modelfile import load_model

    assert load_model(tmp_path / "run" / "model.safetensors").schema.name == "afids-32"


def test_uncertainty_with_other_passes_than_the_calibration_is_warned_about(tmp_path, untrained_model, afids_small,
                                                                            capsys):
    from LandmarkDetectionLib.fileio import write_volume
    from LandmarkDetectionLib.modelfile import load_model

    model = load_model(untrained_model)
    model.metrics["calibration"] = {"scale": 1.3, "passes": 50, "shift_mm": 5.0}
    model.save(tmp_path / "calibrated.safetensors")
    write_volume(afids_small[0], tmp_path / "scan.nii.gz")
    common = ["detect", "--model", str(tmp_path / "calibrated.safetensors"), "--input", str(tmp_path / "scan.nii.gz"),
              "--device", "cpu", "--progress", "none"]
    assert main([*common, "--output", str(tmp_path / "a"), "--uncertainty", "4"]) == 0
    warning = capsys.readouterr().err
    assert "warning:" in warning and "passes 4 (calibrated with 50)" in warning and "--uncertainty 50" in warning
    assert main([*common, "--output", str(tmp_path / "b"), "--uncertainty", "50"]) == 0
    assert "calibrated" not in capsys.readouterr().err
