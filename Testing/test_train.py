import argparse
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open

from LandmarkDetectionLib.checkpoint import read_checkpoint
from LandmarkDetectionLib.cli import build_parser, main
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, write_markups_json
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.train import TrainOptions, train
from conftest import REPO, TINY_TRAIN


def _cli_args(options: dict) -> list[str]:
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        args += [flag, str(value)]
    return args


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "LandmarkDetection"), env.get("PYTHONPATH", "")])
    return env


def _weights(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(("model/", "ema/"))}


def _parameters(model_path):
    """A model file's trained parameters (not BatchNorm's running statistics, which every training-mode
    pass updates, whatever the learning rate)."""
    return {k: v.detach().clone() for k, v in load_model(model_path).network.named_parameters()}


def _log(folder):
    """log.csv rows without the wall-clock column."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((folder / "log.csv").open())]


def _train_command(*args):
    return [sys.executable, "-m", "LandmarkDetectionLib", "train", *map(str, args)]


def _start_and_wait_for(command, message_start):
    """A training process (--progress json) once it has said a message starting with ``message_start``."""
    process = subprocess.Popen([*command, "--progress", "json"], stdout=subprocess.PIPE, text=True, env=_env())
    for line in process.stdout:
        if json.loads(line).get("message", "").startswith(message_start):
            return process
    process.wait()
    raise AssertionError(f"the run ended (exit {process.returncode}) before saying {message_start!r}")


def test_training_writes_model_checkpoint_logs_and_test_metrics(tiny_dataset, tmp_path):
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=3,
                           **{**TINY_TRAIN, "val_fraction": 0.2, "test_fraction": 0.2})
    best = train(options)
    for name in ("model.safetensors", "checkpoint.safetensors", "log.csv", "splits.json"):
        assert (tmp_path / "run" / name).exists(), name
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (4, 1, 1)
    model = load_model(best)
    assert model.training["cases"] == {"train": 4, "val": 1, "test": 1}
    assert model.metrics["test"]["n"] == 32 and model.metrics["validation"]["mre_mm"] > 0
    with pytest.raises(Exception, match="pass --resume"):
        train(options)  # never silently overwrites a previous run


def test_early_stopping(tiny_dataset, tmp_path, capsys):
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=10, patience=2,
                           **{**TINY_TRAIN, "lr": 0.0, "dropout": 0.0})
    train(options)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    errors = [float(r["val_mre_mm"]) for r in rows]
    best_epoch = errors.index(min(errors)) + 1
    assert len(rows) == best_epoch + 2 < 10  # two epochs without improvement stop the run
    options.resume = True  # nothing left to do: one line, and the best model
    assert train(options) == tmp_path / "run" / "model.safetensors"
    assert capsys.readouterr().err.splitlines() == [
        f"{tmp_path / 'run'}: already stopped early after {len(rows)} epochs (2 without improvement); "
        "raise --patience to continue"]


def test_resume_after_a_kill_continues_exactly(tiny_dataset, tmp_path):
    """Killed at the worst moment (its next log row written, the checkpoint write cut short), a run resumed
    with nothing but --output --resume ends with the weights, log rows and files of an uninterrupted run."""
    settings = {**TINY_TRAIN, "epochs": 5, "seed": 7, "ema_decay": 0.9}
    cli_settings = _cli_args({k: v for k, v in settings.items() if k != "progress"})
    def command_for(output):
        return _train_command("--dataset", tiny_dataset, "--output", output, *cli_settings)

    # The uninterrupted run in a process of its own too: same thread count, so the same floating point.
    straight = subprocess.run([*command_for(tmp_path / "straight"), "--progress", "none"], capture_output=True,
                              text=True, env=_env())
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    process = _start_and_wait_for(command_for(killed), "epoch 2:")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = read_checkpoint(killed / "checkpoint.safetensors")["state"]["epoch"] + 1
    assert 2 <= done < 5 and done <= len(_log(killed)) <= done + 1
    if len(_log(killed)) == done:  # the kill came earlier in the epoch: write what the next epoch writes first
        with (killed / "log.csv").open("a", newline="") as handle:
            csv.writer(handle).writerow([done + 1, 0.5, 9.0, 0.1, 0.2, 0.001, 1.0])
    (killed / ".checkpoint.safetensors.k1ll3d.part").write_bytes(b"a checkpoint write cut short")

    resumed = subprocess.run(_train_command("--output", killed, "--resume", "--progress", "none"),
                             capture_output=True, text=True, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    straight = _weights(tmp_path / "straight" / "checkpoint.safetensors")
    again = _weights(killed / "checkpoint.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.allclose(straight[key], again[key], atol=1e-6), key
    assert _log(killed) == _log(tmp_path / "straight")
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in (tmp_path / "straight").iterdir())


def test_ema_weights_are_validated_saved_and_resumed(tiny_dataset, tmp_path):
    """--ema-decay: the saved model is the moving average of the weights, not the last step's weights,
    and a --resume carries the average on (the checkpoint stores it)."""
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), **{**TINY_TRAIN, "epochs": 1},
                           ema_decay=0.9)
    best = train(options)
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    saved = load_model(best).network.state_dict()
    for name, value in saved.items():
        if value.is_floating_point():
            assert torch.equal(value, tensors[f"ema/module.{name}"]), name
    # The average lags the last step: at least one trained parameter differs from the live weights.
    assert any(not torch.equal(tensors[f"ema/module.{n}"], tensors[f"model/{n}"])
               for n, _ in load_model(best).network.named_parameters())
    steps = len(json.loads((tmp_path / "run" / "splits.json").read_text())["train"])  # batch size 1
    assert int(tensors["ema/n_averaged"]) == steps  # one update per step
    assert load_model(best).training["ema_decay"] == 0.9

    train(TrainOptions(**{**options.__dict__, "epochs": 2, "resume": True}))
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert int(handle.get_tensor("ema/n_averaged")) == 2 * steps  # continued, not restarted
    with pytest.raises(LandmarkError, match="changed options: ema_decay"):
        train(TrainOptions(**{**options.__dict__, "epochs": 3, "ema_decay": 0.5, "resume": True}))


def test_a_busy_output_folder_is_refused_and_a_killed_run_leaves_it_free(tiny_dataset, tmp_path, capsys):
    output = tmp_path / "run"
    settings = {k: v for k, v in {**TINY_TRAIN, "epochs": 50}.items() if k != "progress"}
    first = _start_and_wait_for(_train_command("--dataset", tiny_dataset, "--output", output, *_cli_args(settings)),
                                "epoch 1:")
    try:
        for attempt in (["--dataset", str(tiny_dataset)], ["--resume"]):
            assert main(["train", "--output", str(output), *attempt, "--progress", "none"]) == 2
            captured = capsys.readouterr()
            assert captured.err.splitlines() == [f"error: {output}: is in use by another training run; wait for it "
                                                 "to end or choose another --output"]
            assert "best model" not in captured.out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    # The operating system released the dead run's lock: the folder can be resumed at once.
    done = read_checkpoint(output / "checkpoint.safetensors")["state"]["epoch"] + 1
    assert main(["train", "--output", str(output), "--resume", "--epochs", str(done), "--progress", "none"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"{output}: already finished after {done} epoch{'' if done == 1 else 's'}; "
                                         "raise --epochs to continue"]
    assert captured.out.splitlines() == [f"best model: {output / 'model.safetensors'}"]


def test_resume_refuses_changed_options(tiny_dataset, tmp_path):
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=1, **TINY_TRAIN)
    train(options)
    options.lr, options.resume, options.epochs = 0.5, True, 2
    with pytest.raises(Exception, match="changed options: lr"):
        train(options)


def test_distributed_training_with_torchrun_gloo(tiny_dataset, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "LandmarkDetectionLib", "train", "--dataset", str(tiny_dataset), "--output", str(output),
               "--device", "cpu", *_cli_args({**TINY_TRAIN, "epochs": 2, "progress": "json"})]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    totals = {r["total"] for r in steps if r.get("stage", "").startswith("train") and "total" in r}
    assert totals == {2}  # 4 training cases shared by 2 processes: 2 steps per epoch per process
    assert load_model(output / "model.safetensors").metrics["best_epoch"] >= 1


def test_generalising_recipe_trains_a_model_that_aligns_scans_first(tiny_dataset, tmp_path, afids32):
    """--synthesis: the model file carries the reference (2 mm image and landmark region) and detection on
    a moved scan aligns it first; the model header says so without torch."""
    from LandmarkDetectionLib.detect import detect_path
    from LandmarkDetectionLib.modelheader import read_header

    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=1, schema="afids-32",
                           architecture="locnet", channels=(4, 4, 4), scales_mm=(12.0, 6.0, 6.0), patch_sizes=(6, 6),
                           spacing=(6.0, 6.0, 6.0), lr=3e-3, sigma_mm=12.0, val_fraction=0.2, progress="none",
                           synthesis="default", samples_per_epoch=3, val_samples=2)
    best = train(options)
    model = load_model(best)
    assert 0 < model.metrics["validation"]["n"] <= 2 * 32  # --val-samples fixed synthetic scans (default 8)
    assert model.reference is not None and model.region is not None
    first = json.loads((tmp_path / "run" / "splits.json").read_text())["train"][0]  # the reference case
    assert np.allclose(model.prior, read_landmarks(tiny_dataset / f"{first}.mrk.json", model.schema), atol=1e-4)
    assert model.config.geometry.center_ras is not None and all(n % 16 == 0 for n in model.config.geometry.size)
    assert "reference" in read_header(best).metadata
    assert model.config.test_time_mirror  # trained on left-right flips about its grid's centre
    detection = detect_path(model, tiny_dataset / "case03.nii.gz", "cpu")
    assert detection.alignment is not None and detection.landmarks_ras.shape == (32, 3)
    assert detection.alignment.similarity > 0.15  # the same template: clearly a head, clearly aligned
    with pytest.raises(Exception, match="changed options: synthesis"):
        train(TrainOptions(**{**options.__dict__, "synthesis": "", "resume": True}))

    # Calibration measures the registration prior: the second moment of the truths' offsets from the prior,
    # in the reference frame, pooled; detection with uncertainty then fuses the two estimates.
    from LandmarkDetectionLib.calibrate import calibrate
    from LandmarkDetectionLib.data import discover_cases
    from LandmarkDetectionLib.detect import (UncertaintyOptions, detect_volume, model_input, registration_prior,
                                             sample_passes)
    from LandmarkDetectionLib.fileio import read_volume
    from LandmarkDetectionLib.uncertainty import fuse, innovation, innovation_inflation

    # Cases whose truths sit a known few mm away from the template's landmarks, so that the prior's
    # spread is the shifts', not the alignment's last digits (which vary with the thread count).
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for case, shift in zip(discover_cases(tiny_dataset)[:3], ([3.0, 0, 0], [0, -4.0, 0], [0, 0, 5.0])):
        shutil.copy(case.image, shifted / case.image.name)
        write_markups_json(shifted / f"{case.name}.mrk.json", model.schema,
                           read_landmarks(case.landmarks, model.schema) + np.asarray(shift))
    cases = discover_cases(shifted)
    options4 = UncertaintyOptions(passes=4)
    result = calibrate(model, cases, "cpu", options4)
    # Trained on flips, the model was run with and without its mirror image, and keeps it only if it helped.
    choice = result.mirror
    assert choice["network_mre_mm"] != choice["without_mre_mm"]  # both were run
    assert choice["used"] == model.config.test_time_mirror == (choice["network_mre_mm"] < choice["without_mre_mm"])
    assert model.metrics["calibration"]["test_time_mirror"] == choice
    offsets = []
    for case in cases:
        alignment = detect_path(model, case.image, "cpu").alignment
        offsets.append(alignment.to_reference(read_landmarks(case.landmarks, model.schema)) - model.prior)
    offsets = np.concatenate(offsets)
    second_moment = offsets.T @ offsets / len(offsets)
    assert np.allclose(model.prior_covariance[7], second_moment, rtol=0.02, atol=0.02)
    assert result.prior_sd_mm == pytest.approx(np.sqrt((9 + 16 + 25) / 9), rel=0.02)  # RMS of the shifts per axis
    assert result.fused_coverage == pytest.approx(0.9, abs=0.05)  # the fused ellipsoids' own factor
    assert model.metrics["calibration"]["fused_scale"] == model.config.fused_scale
    model.config.uncertainty_scale = 1.0  # a 1-epoch network barely spreads: its fitted scale is not the point here
    model.save(tmp_path / "calibrated.safetensors")
    loaded = load_model(tmp_path / "calibrated.safetensors")
    assert np.allclose(loaded.prior_covariance, model.prior_covariance, rtol=1e-5)

    # One network input (one alignment), read with and without the prior: detection is their fusion.
    image = read_volume(cases[0].image)
    prepared = model_input(loaded, image)
    fused = sample_passes(loaded, prepared, "cpu", options4)
    prior = registration_prior(loaded, prepared.alignment)
    assert np.allclose(prior[0], prepared.alignment.to_scan(model.prior))
    with_prior = loaded.prior_covariance
    loaded.prior_covariance = None
    network = sample_passes(loaded, prepared, "cpu", options4)
    mean, covariance = fuse(network.mean, network.covariance, *prior)
    # Widened by how much more the two disagree than on a typical calibration case (never narrowed).
    assert loaded.config.innovation_reference == model.metrics["calibration"]["innovation_reference"] > 0
    inflation = innovation_inflation(innovation(network.mean, network.covariance, *prior),
                                     loaded.config.innovation_reference)
    assert fused.inflation == pytest.approx(inflation) and inflation >= 1
    # (the disagreement term weighs a near-zero network spread against the prior: a relative tolerance)
    assert np.allclose(fused.mean, mean) and np.allclose(
        fused.covariance, covariance * loaded.config.fused_scale * inflation, rtol=1e-3, atol=1e-6)
    # Detecting the volume is the same, to the alignment's last digits (its optimiser is multi-threaded).
    loaded.prior_covariance = with_prior
    detected = detect_volume(loaded, image, "cpu", "c", options4).uncertainty
    assert np.allclose(detected.mean, fused.mean, rtol=0, atol=1e-3)
    # The product of the two is more certain than the network alone; the fused covariance adds their
    # disagreement to it, never takes away (before the ellipsoids' recalibration).
    product = np.linalg.inv(np.linalg.inv(network.covariance + 1e-4 * np.eye(3)) + np.linalg.inv(prior[1]))
    assert (np.linalg.det(product) < np.linalg.det(network.covariance)).all()
    assert (np.linalg.eigvalsh(covariance - product) > -1e-6).all()


def test_cosine_schedule_anneals_to_a_hundredth_by_the_last_epoch(tiny_dataset, tmp_path):
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=3,
                           **{**TINY_TRAIN, "lr": 1e-3, "schedule": "cosine", "patience": 10})
    train(options)
    rates = [float(r["lr"]) for r in csv.DictReader((tmp_path / "run" / "log.csv").open())]
    assert rates[0] < 1e-3 and rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(1e-5)
    with pytest.raises(Exception, match="--schedule"):
        train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "other"), schedule="step"))


def test_resume_takes_the_stored_options_and_a_larger_epochs_replans_the_cosine(tiny_dataset, tmp_path, capsys):
    output = tmp_path / "run"
    settings = {**TINY_TRAIN, "lr": 1e-3, "schedule": "cosine", "epochs": 2}
    assert main(["train", "--dataset", str(tiny_dataset), "--output", str(output), *_cli_args(settings)]) == 0
    assert "warning" not in capsys.readouterr().err  # a tiny grid is no GPU-sized input

    # A finished run: one line, success (exit 0), the existing best model.
    assert main(["train", "--output", str(output), "--resume", "--progress", "none"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"{output}: already finished after 2 epochs; raise --epochs to continue"]
    assert captured.out.splitlines() == [f"best model: {output / 'model.safetensors'}"]

    assert main(["train", "--output", str(output), "--resume", "--lr", "0.5", "--schedule", "cosine"]) == 2
    assert "changed options: lr (" in capsys.readouterr().err  # the schedule is as stored: not named

    # A larger --epochs continues; the cosine is recomputed for 4 epochs, ending at lr/100 again.
    assert main(["train", "--output", str(output), "--resume", "--epochs", "4", "--progress", "none"]) == 0
    rates = [float(row["lr"]) for row in _log(output)]

    def cosine(epoch, epochs):
        return 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * epoch / epochs)) / 2

    assert rates == pytest.approx([cosine(1, 2), cosine(2, 2), cosine(3, 4), cosine(4, 4)], rel=1e-9)
    stored = read_checkpoint(output / "checkpoint.safetensors")
    assert stored["options"]["epochs"] == 4 and stored["options"]["schema"] == "afids-32"


def test_resume_refuses_a_changed_dataset_but_not_a_moved_one(tiny_dataset, tmp_path, afids32):
    data, moved = tmp_path / "data", tmp_path / "moved"
    shutil.copytree(tiny_dataset, data)
    options = TrainOptions(dataset=str(data), output=str(tmp_path / "run"), epochs=1, **TINY_TRAIN)
    train(options)
    shutil.copytree(data, moved)
    resumed = TrainOptions(**{**options.__dict__, "dataset": str(moved), "epochs": 2, "resume": True})

    landmarks = read_landmarks(moved / "case00.mrk.json", afids32)
    write_markups_json(moved / "case00.mrk.json", afids32, landmarks + 1.0)  # one annotation corrected
    with pytest.raises(LandmarkError, match="dataset changed since the run"):
        train(resumed)
    shutil.copy(data / "case00.mrk.json", moved / "case00.mrk.json")
    for part in ("nii.gz", "mrk.json"):  # one case fewer
        (moved / f"case05.{part}").rename(tmp_path / f"case05.{part}")
    with pytest.raises(LandmarkError, match="dataset changed since the run"):
        train(resumed)
    for part in ("nii.gz", "mrk.json"):
        (tmp_path / f"case05.{part}").rename(moved / f"case05.{part}")

    train(resumed)  # the same data in another folder
    assert [int(row["epoch"]) for row in _log(tmp_path / "run")] == [1, 2]


def test_epochs_below_one_and_data_without_usable_landmarks_are_errors(tiny_dataset, tmp_path, capsys, afids32):
    def train_cli(dataset, *extra):
        code = main(["train", "--dataset", str(dataset), "--output", str(tmp_path / "run"),
                     *_cli_args({**TINY_TRAIN, "epochs": 1}), *extra])
        captured = capsys.readouterr()
        assert code == 2 and "best model" not in captured.out
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert train_cli(tiny_dataset, "--epochs", "0") == "error: --epochs 0: expected at least 1"
    assert train_cli(tiny_dataset, "--epochs", "-3") == "error: --epochs -3: expected at least 1"
    assert train_cli(tiny_dataset, "--val-samples", "-1") == "error: --val-samples -1: expected 0 or more"
    assert train_cli(tiny_dataset, "--ema-decay", "1.5") == "error: --ema-decay 1.5: expected 0 to 0.9999"
    empty = tmp_path / "unannotated"
    shutil.copytree(tiny_dataset, empty)
    for path in empty.glob("*.mrk.json"):  # every landmark marked missing
        write_markups_json(path, afids32, np.full((len(afids32), 3), np.nan))
    line = train_cli(empty)
    assert line.startswith(f"error: {empty}: no usable landmark in the training cases") and "missing or NaN" in line
    assert not (tmp_path / "run").exists()  # a failed run leaves no output folder behind


def test_training_on_a_cpu_warns_about_a_gpu_sized_input(tiny_dataset, tmp_path):
    """130^3 voxels per sample for highres3dnet on a CPU: one line on stderr before the first epoch."""
    command = _train_command("--dataset", tiny_dataset, "--output", tmp_path / "run", "--device", "cpu",
                             *_cli_args({**TINY_TRAIN, "size": (130, 130, 130), "epochs": 1}))
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env())
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    warning = None
    try:
        for line in process.stderr:
            if line.startswith("warning:"):
                warning = line
                break
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()
    assert warning is not None, "no warning before the first epoch"
    assert "130x130x130 voxels (2.2 million per sample) is GPU-sized" in warning
    assert "landmark-detection demo --train-model WORK" in warning and "smaller --size" in warning


def test_train_help_shows_the_defaults_a_new_run_uses():
    """The train options are SUPPRESSed (left-out ones come from TrainOptions, or the checkpoint with
    --resume); their help must still state TrainOptions' defaults."""
    parser = build_parser()
    train_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    args = parser.parse_args(["train", "--output", "out"])
    per_invocation = {"dataset", "output", "resume", "device", "progress", "amp", "channels", "schema", "help"}
    checked = set()
    for action in train_parser._actions:
        if action.dest in per_invocation:
            continue
        assert not hasattr(args, action.dest), action.dest
        default = getattr(TrainOptions, action.dest)
        text = action.help.split("(default: ")[1].split(")")[0]
        shown = "" if text == "none" else action.type(text) if action.type else text
        assert shown == default, (action.dest, text, default)
        checked.add(action.dest)
    assert checked == set(TrainOptions.__dataclass_fields__) - per_invocation - {"extra_metadata"}


def test_init_from_starts_from_a_models_weights_and_refuses_a_different_one(tiny_dataset, tmp_path):
    first = train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "first"), epochs=1, **TINY_TRAIN))
    # lr 0: the fine-tuned model's weights are exactly the ones it started from
    tuned = train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "tuned"), epochs=1, init_from=str(first),
                               **{**TINY_TRAIN, "lr": 0.0, "seed": 5}))
    source, result = _parameters(first), _parameters(tuned)
    assert source and source.keys() == result.keys() and all(torch.equal(source[k], result[k]) for k in source)
    assert load_model(tuned).training["init_from"] == "model.safetensors"
    with pytest.raises(Exception, match="differs from the run in network options"):
        train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "other"), epochs=1, init_from=str(first),
                           **{**TINY_TRAIN, "channels": (4, 4, 4)}))


def test_fine_tuning_an_aligning_model_keeps_its_reference_frame(tiny_dataset, tmp_path, afids_small, afids32):
    """--init-from a model that aligns scans first, on a user's dataset whose first case is another scan:
    the fine-tuned model keeps the source's reference image, region, prior landmarks (and their calibrated
    covariance) and input grid, takes its architecture and network options as defaults, starts from its
    weights, detects, and resumes; options that differ from the model are refused."""
    import SimpleITK as sitk

    from LandmarkDetectionLib.align import landmark_region, make_reference
    from LandmarkDetectionLib.detect import detect_path
    from LandmarkDetectionLib.fileio import read_volume
    from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
    from LandmarkDetectionLib.synth import reference_geometry
    from LandmarkDetectionLib.train import train_command
    from conftest import moved_copies

    # The source: a tiny aligning model in the reference frame of one scan, as _synthesis_setup makes it (its
    # weights untrained: training it would only cost time), "calibrated": a prior covariance and a scale.
    first = read_landmarks(tiny_dataset / "case00.mrk.json", afids32)
    reference = make_reference(read_volume(tiny_dataset / "case00.nii.gz"))
    network = {"channels": [4, 4, 8], "blocks_per_stage": 1, "dropout": 0.1}
    config = ModelConfig("highres3dnet", network, reference_geometry(first, (6.0, 6.0, 6.0)), sigma_mm=12.0,
                         uncertainty_scale=2.5)
    torch.manual_seed(3)
    source = LandmarkModel.create(config, afids32, reference, landmark_region(reference, first), first)
    source.prior_covariance = np.repeat(np.diag([4.0, 9.0, 16.0])[None], 32, axis=0)
    source.save(tmp_path / "source.safetensors")
    source = load_model(tmp_path / "source.safetensors")

    # The user's dataset: the template at other head positions (another seed), so its first case is not
    # the scan the source's reference frame was made from.
    image, landmarks = afids_small
    user = tmp_path / "user"
    moved_copies(image, landmarks, afids32, user, 1, seed=7, prefix="user")
    # Only the data, the model and the training loop are given: architecture, network options, input grid,
    # sigma and --synthesis come from the model. lr 0 and another seed: the weights stay the source's.
    given = dict(dataset=str(user), output=str(tmp_path / "tuned"), init_from=str(tmp_path / "source.safetensors"),
                 epochs=1, lr=0.0, seed=5, samples_per_epoch=2, progress="none")
    tuned_path = train_command(dict(given))
    tuned = load_model(tuned_path)

    for ours, theirs in ((tuned.reference, source.reference), (tuned.region, source.region)):
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
        assert (ours.GetOrigin(), ours.GetSpacing(), ours.GetDirection()) == \
               (theirs.GetOrigin(), theirs.GetSpacing(), theirs.GetDirection())
    assert np.array_equal(tuned.prior, source.prior)
    assert not np.allclose(tuned.prior, read_landmarks(user / "user00.mrk.json", afids32), atol=1.0)  # not rebuilt
    assert np.array_equal(tuned.prior_covariance, source.prior_covariance)  # kept (train._init_from says why)
    assert tuned.config.geometry == source.config.geometry and tuned.config.uncertainty_scale == 1.0
    assert (tuned.config.architecture, tuned.config.network) == (source.config.architecture, source.config.network)
    assert tuned.training["init_from"] == "source.safetensors"
    start, end = _parameters(tmp_path / "source.safetensors"), _parameters(tuned_path)
    assert start and start.keys() == end.keys() and all(torch.equal(start[k], end[k]) for k in start)

    detection = detect_path(tuned, tiny_dataset / "case03.nii.gz", "cpu")
    assert detection.alignment is not None and detection.alignment.similarity > 0.15
    assert detection.landmarks_ras.shape == (32, 3) and np.isfinite(detection.landmarks_ras).all()

    # --resume takes the stored options (the model's, recorded at the start) and the same reference frame.
    assert read_checkpoint(tmp_path / "tuned" / "checkpoint.safetensors")["options"]["synthesis"] == "default"
    assert train_command({"output": str(tmp_path / "tuned"), "resume": True, "epochs": 2, "progress": "none"}) \
        == tuned_path
    assert len(_log(tmp_path / "tuned")) == 2
    resumed = load_model(tuned_path)
    assert np.array_equal(resumed.prior, source.prior) and resumed.config.geometry == source.config.geometry

    # Options given explicitly must be the model's: one line naming the model file and what differs.
    for changed, named in (({"channels": (8, 8, 8), "spacing": (5.0, 5.0, 5.0)}, "network options, input spacing"),
                           ({"synthesis": ""}, "aligns scans first")):
        with pytest.raises(LandmarkError, match=f"source.safetensors.*differs from the run in {named};") as error:
            train_command({**given, "output": str(tmp_path / "refused"), **changed})
        assert "\n" not in str(error.value)
    assert not (tmp_path / "refused").exists()


def test_locnet_trains_patch_stages_on_a_landmark_subset_and_predicts_all():
    """train_patch_landmarks: in training the patch stages run for that many random landmarks (their loss
    and the gradients of only their heads); in eval mode every landmark is refined."""
    from LandmarkDetectionLib.models.locnet import LocNet

    torch.manual_seed(0)
    network = LocNet(10, (24, 24, 24), (2.0, 2.0, 2.0), scales_mm=(8.0, 4.0, 2.0), patch_sizes=(6, 6),
                     channels=(4, 4, 4))
    network.train_patch_landmarks = 3
    network.train()
    stages = network(torch.randn(1, 1, 24, 24, 24))
    chosen = stages[1][3]
    assert stages[0][3] is None and stages[0][1].shape == (1, 10, 3)
    assert len(set(chosen.tolist())) == 3 and all(s[3] is chosen and s[1].shape == (1, 3, 3) for s in stages[1:])
    target, mask = torch.rand(1, 10, 3) * 20 + 2, torch.ones(1, 10, dtype=torch.bool)
    loss = network.loss(stages, target, mask, (2.0, 2.0, 2.0), "mixed", 0.4, 3.0, progress=1.0)
    loss.backward()
    touched = network.head_weight[1].grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(chosen.tolist())
    network.eval()
    assert network.predict_indices(torch.randn(1, 1, 24, 24, 24)).shape == (1, 10, 3)
    with pytest.raises(Exception, match="locnet architecture only"):
        train(TrainOptions(dataset="unused", output="unused", train_patch_landmarks=4))
