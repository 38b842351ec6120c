import csv
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

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
        return {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("model/")}


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


def test_early_stopping(tiny_dataset, tmp_path):
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=10, patience=2,
                           **{**TINY_TRAIN, "lr": 0.0, "dropout": 0.0})
    train(options)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    errors = [float(r["val_mre_mm"]) for r in rows]
    best_epoch = errors.index(min(errors)) + 1
    assert len(rows) == best_epoch + 2 < 10  # two epochs without improvement stop the run


def test_resume_after_a_kill_continues_exactly(tiny_dataset, tmp_path):
    settings = {**TINY_TRAIN, "epochs": 30, "seed": 7}
    cli_settings = _cli_args({k: v for k, v in settings.items() if k != "progress"})
    def command_for(output):
        return [sys.executable, "-m", "LandmarkDetectionLib", "train", "--dataset", str(tiny_dataset),
                "--output", str(output), *cli_settings]

    # The uninterrupted run in a process of its own too: same thread count, so the same floating point.
    straight = subprocess.run([*command_for(tmp_path / "straight"), "--progress", "none"], capture_output=True,
                              text=True, env=_env())
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    command = command_for(killed)
    process = subprocess.Popen([*command, "--progress", "json"], stdout=subprocess.PIPE, text=True, env=_env())
    for line in process.stdout:
        if json.loads(line).get("message", "").startswith("epoch 2:"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    epochs_done = len(list(csv.DictReader((killed / "log.csv").open())))
    assert 2 <= epochs_done < 30

    resumed = subprocess.run([*command, "--progress", "none", "--resume"], capture_output=True, text=True,
                             env=_env())
    assert resumed.returncode == 0, resumed.stderr
    straight, again = _weights(tmp_path / "straight" / "checkpoint.safetensors"), _weights(killed / "checkpoint.safetensors")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.allclose(straight[key], again[key], atol=1e-6), key


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
    """--synthesis: the model file carries the reference (3 mm image and landmark region) and detection on
    a moved scan aligns it first; the model header says so without torch."""
    from LandmarkDetectionLib.detect import detect_path
    from LandmarkDetectionLib.modelheader import read_header

    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=1, schema="afids-32",
                           architecture="locnet", channels=(4, 4, 4), scales_mm=(12.0, 6.0, 6.0), patch_sizes=(6, 6),
                           spacing=(6.0, 6.0, 6.0), lr=3e-3, sigma_mm=12.0, val_fraction=0.2, progress="none",
                           synthesis="default", samples_per_epoch=3)
    best = train(options)
    model = load_model(best)
    assert model.reference is not None and model.region is not None and model.prior is None
    assert model.config.geometry.center_ras is not None and all(n % 16 == 0 for n in model.config.geometry.size)
    assert "reference" in read_header(best).metadata
    detection = detect_path(model, tiny_dataset / "case03.nii.gz", "cpu")
    assert detection.alignment is not None and detection.landmarks_ras.shape == (32, 3)
    assert detection.alignment.similarity > 0.15  # the same template: clearly a head, clearly aligned
    with pytest.raises(Exception, match="changed options: synthesis"):
        train(TrainOptions(**{**options.__dict__, "synthesis": "", "resume": True}))


def test_cosine_schedule_anneals_to_a_hundredth_by_the_last_epoch(tiny_dataset, tmp_path):
    options = TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=3,
                           **{**TINY_TRAIN, "lr": 1e-3, "schedule": "cosine", "patience": 10})
    train(options)
    rates = [float(r["lr"]) for r in csv.DictReader((tmp_path / "run" / "log.csv").open())]
    assert rates[0] < 1e-3 and rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(1e-5)
    with pytest.raises(Exception, match="--schedule"):
        train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "other"), schedule="step"))
