"""Training from Slicer without Qt (LandmarkDetectionAppLib.training): the backend arguments of new,
fine-tuning and resumed runs read by the real command-line parser, --recipe defaults, progress into real MRML
table and chart nodes (slicer-core), the models folder and its list (odd files included), and one real run
through BackendJob."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_TRAIN
from LandmarkDetectionLib.cli import build_parser, main
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.modelheader import read_header
from LandmarkDetectionLib.recipes import RECIPES
from LandmarkDetectionLib.resources import bundled_model_path
from LandmarkDetectionLib.runtime import Progress

sys.path.insert(0, str(REPO / "LandmarkDetection"))
from LandmarkDetectionAppLib import training  # noqa: E402
from LandmarkDetectionAppLib.job import BackendJob, backend_command  # noqa: E402
from LandmarkDetectionAppLib.training import (NO_RECIPE, RECIPE_NAMES, TrainingProgress,  # noqa: E402
                                              TrainingRequest, available_models, install_model, models_folder,
                                              resume_arguments, setup_progress_plot, training_arguments)

LOG_HEADER = "epoch,train_loss,val_mre_mm,val_sdr_2mm,val_sdr_4mm,lr,seconds\n"  # as train.py writes log.csv


def parsed(arguments):
    """What the backend process BackendJob starts would read from its command line."""
    command = backend_command(*arguments)
    assert command[1:3] == ["-m", "LandmarkDetectionLib"]
    return build_parser().parse_args(command[3:])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, afids32):
    """A small untrained model file in a run folder named like a user's run."""
    import torch

    from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
    from LandmarkDetectionLib.preprocess import InputGeometry

    torch.manual_seed(0)
    config = ModelConfig("highres3dnet", {"channels": [4, 4, 8], "blocks_per_stage": 1},
                         InputGeometry((12, 10, 8), (16.0, 16.0, 20.0)), 6.0)
    model = LandmarkModel.create(config, afids32)
    model.training = {"epochs_trained": 3, "recipe": "afids-32-poses"}
    model.metrics = {"validation": {"mre_mm": 2.5}}
    path = tmp_path_factory.mktemp("runs") / "my run" / "model.safetensors"
    path.parent.mkdir()
    model.save(path)
    return path


# ------------------------------------------------------------------------------------------------ arguments
def test_new_and_fine_tuning_runs_are_read_by_the_backend_parser(tmp_path, tiny_model):
    request = TrainingRequest(tmp_path / "data set", tmp_path / "run 1", "afids-32", 5, "cpu", tiny_model,
                              {"lr": 1e-4, "patch_sizes": (12, 16)})
    args = parsed(training_arguments(request))
    assert args.command == "train" and args.progress == "json"
    assert (args.dataset, args.output, args.recipe, args.epochs, args.device) == (
        str(tmp_path / "data set"), str(tmp_path / "run 1"), "afids-32", 5, "cpu")
    assert args.init_from == str(tiny_model) and args.lr == 1e-4 and args.patch_sizes == (12, 16)
    assert not args.resume
    # no recipe, no epochs: nothing but what was given; left-out options stay absent (TrainOptions' defaults)
    args = parsed(training_arguments(TrainingRequest(tmp_path / "data", tmp_path / "run", NO_RECIPE)))
    assert not hasattr(args, "recipe") and not hasattr(args, "epochs") and not hasattr(args, "init_from")
    assert args.device == "auto"
    # a value that starts with '-' stays a value
    assert parsed(training_arguments(TrainingRequest(Path("-scans"), Path("-run")))).dataset == "-scans"
    # an emptied "Fine-tune from" field is no model (an empty path would be the current folder)
    for empty in ("", "  "):
        args = parsed(training_arguments(TrainingRequest(tmp_path / "data", tmp_path / "run", init_from=empty)))
        assert not hasattr(args, "init_from")


def test_resume_arguments_are_read_by_the_backend_parser(tmp_path):
    args = parsed(resume_arguments(tmp_path / "run 1"))
    assert args.resume and args.output == str(tmp_path / "run 1") and args.device == "auto"
    assert not hasattr(args, "dataset") and not hasattr(args, "epochs")  # the checkpoint's
    assert parsed(resume_arguments(tmp_path / "run", epochs=40, device="cuda")).epochs == 40


def test_bad_requests_are_one_line_errors(tmp_path):
    with pytest.raises(LandmarkError, match="recipe nonsense: no such recipe"):
        training_arguments(TrainingRequest(tmp_path, tmp_path, "nonsense"))
    with pytest.raises(LandmarkError, match="epochs 0: expected at least 1"):
        training_arguments(TrainingRequest(tmp_path, tmp_path, epochs=0))
    with pytest.raises(LandmarkError, match="epochs 0"):
        resume_arguments(tmp_path, epochs=0)


def test_recipe_names_and_descriptions_are_the_recipes_as_the_parser_reads_them():
    assert RECIPE_NAMES == (*RECIPES, NO_RECIPE) and training.DEFAULT_RECIPE in RECIPES
    for name, values in RECIPES.items():
        args = parsed(["train", "--output", "o", *training.describe_recipe(name).split()])
        assert {key: getattr(args, key) for key in values} == values


def test_an_unknown_recipe_or_a_bad_explicit_option_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--dataset", str(tmp_path), "--output", str(tmp_path / "o"), "--recipe", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err
    # the recipe's lr (valid) is replaced by the explicit one, which is checked before anything is written
    assert main(["train", "--dataset", str(tmp_path), "--output", str(tmp_path / "o"), "--recipe", "afids-32",
                 "--lr", "5"]) == 2
    assert capsys.readouterr().err == "error: --lr 5.0: expected 0 to 1\n"
    assert not (tmp_path / "o").exists()


def test_names_of_the_train_outputs_agree_with_train_py():
    from LandmarkDetectionLib import train

    assert (training.BEST_MODEL, training.CHECKPOINT) == (train.BEST_MODEL, train.CHECKPOINT)


# ------------------------------------------------------------------------------------------------- progress
def emitted(capsys, steps) -> list[dict]:
    """The JSON records the backend's own Progress writes for ``steps`` (callables on it)."""
    progress = Progress("json")
    capsys.readouterr()
    for step in steps:
        step(progress)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_progress_fills_the_table_and_chart_nodes(mrml_scene, tmp_path, capsys):
    import slicer

    table, chart = setup_progress_plot(mrml_scene, "run 1")
    (tmp_path / "log.csv").write_text(LOG_HEADER + "1,40.5,9.25,10,30,0.002,3.1\n")
    progress = TrainingProgress(tmp_path, table)  # a resumed run shows its earlier epochs at once
    assert [(r.epoch, r.train_loss, r.val_mre_mm) for r in progress.rows] == [(1, 40.5, 9.25)]
    assert table.GetNumberOfRows() == 1

    for record in emitted(capsys, [lambda p: p.start("train epoch 2/5", 10),
                                   lambda p: p.update(4, loss=20.0, metric=9.25, epoch=2)]):
        progress.consume(record)
    assert (progress.epoch, progress.epochs, progress.step, progress.total) == (2, 5, 4, 10)
    assert progress.fraction() == pytest.approx((1 + 0.4) / 5)
    assert "epoch 2/5, step 4/10" in progress.status() and "best validation MRE 9.25 mm (epoch 1)" in progress.status()

    with open(tmp_path / "log.csv", "a") as log:  # the backend writes the row, then says the epoch ended
        log.write("2,18.25,4.5,30,60,0.002,3.0\n")
    for record in emitted(capsys, [lambda p: p.message("epoch 2: loss 18.25, validation MRE 4.500 mm (best)")]):
        progress.consume(record)
    assert table.GetNumberOfRows() == 2
    assert [table.GetCellText(1, c) for c in range(3)] == ["2", "18.25", "4.5"]
    assert [table.GetColumnName(c) for c in range(3)] == [training.EPOCH_COLUMN, training.LOSS_COLUMN,
                                                           training.MRE_COLUMN]

    assert chart.GetNumberOfPlotSeriesNodes() == 2 and chart.GetYAxisLogScale()
    series = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert [(s.GetTableNode(), s.GetXColumnName(), s.GetYColumnName()) for s in series] == [
        (table, training.EPOCH_COLUMN, training.LOSS_COLUMN), (table, training.EPOCH_COLUMN, training.MRE_COLUMN)]
    assert all(s.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter for s in series)


def test_a_damaged_log_is_one_line_naming_it(tmp_path):
    (tmp_path / "log.csv").write_text("epoch,something\n1,2\n")
    with pytest.raises(LandmarkError, match="log.csv: training log is not readable"):
        TrainingProgress(tmp_path)


# ------------------------------------------------------------------------------------------------- models
class Settings(dict):
    """What models_folder reads from: QSettings' ``value(key, default)``."""

    def value(self, key, default=None):
        return self.get(key, default)


    def setValue(self, key, value):
        self[key] = value

    def remove(self, key):
        self.pop(key, None)


def test_models_folder_is_the_setting_or_the_default(tmp_path):
    default = training.default_models_folder()
    assert default.parts[-2:] == ("LandmarkDetection", "Models") and default.is_absolute()
    assert models_folder(Settings()) == default
    assert models_folder(Settings({training.MODELS_FOLDER_KEY: ""})) == default
    assert models_folder(Settings({training.MODELS_FOLDER_KEY: str(tmp_path)})) == tmp_path
    assert models_folder(Settings({training.MODELS_FOLDER_KEY: None})) == default  # QSettings' missing value


def test_the_models_folder_field_chooses_a_folder_and_emptied_means_the_default(tmp_path):
    settings = Settings()
    assert training.set_models_folder(settings, f" {tmp_path} ") == tmp_path
    assert settings == {training.MODELS_FOLDER_KEY: str(tmp_path)} and models_folder(settings) == tmp_path
    assert training.set_models_folder(settings, "") == training.default_models_folder()
    assert settings == {} and models_folder(settings) == training.default_models_folder()
    assert training.models_folder_of("~/x") == Path.home() / "x"
    assert training.models_folder_of("  ") == training.default_models_folder()


def test_install_model_never_replaces_a_file(tiny_model, tmp_path):
    folder = tmp_path / "Models"
    first = install_model(tiny_model, folder)  # model.safetensors is named after its run folder
    assert first == folder / "my_run.safetensors" and first.read_bytes() == tiny_model.read_bytes()
    (folder / "my_run-3.safetensors").write_bytes(b"someone else's")
    assert install_model(tiny_model, folder) == folder / "my_run-2.safetensors"
    assert install_model(tiny_model, folder) == folder / "my_run-4.safetensors"
    assert (folder / "my_run-3.safetensors").read_bytes() == b"someone else's"
    assert install_model(tiny_model, folder, name="tuned") == folder / "tuned.safetensors"
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(tiny_model.read_bytes()[:-10])
    with pytest.raises(LandmarkError, match="damaged.safetensors: not a readable model file"):
        install_model(damaged, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["my_run-2.safetensors", "my_run-3.safetensors",
                                                        "my_run-4.safetensors", "my_run.safetensors",
                                                        "tuned.safetensors"]  # no temporary file left


def test_available_models_lists_bundled_then_the_folder_and_damaged_files_with_their_problem(tiny_model, tmp_path):
    folder = tmp_path / "Models"
    install_model(tiny_model, folder, name="b-model")
    (folder / "a-damaged.safetensors").write_bytes(tiny_model.read_bytes()[:100])
    (folder / "notes.txt").write_text("not a model")
    entries = available_models(folder)
    assert [e.name for e in entries] == ["afids-32 (bundled)", "brain-88 (bundled)", "a-damaged", "b-model"]
    bundled, bundled88, damaged, mine = entries
    assert bundled88.usable and not bundled88.default and bundled88.path == bundled_model_path("brain-88")
    assert bundled.bundled and bundled.usable and bundled.path == bundled_model_path() and bundled.schema == "afids-32"
    assert not damaged.usable and "truncated" in damaged.problem and "\n" not in damaged.problem
    assert mine.usable and not mine.bundled and mine.schema == "afids-32"
    assert mine.description == ("afids-32 (32 landmarks), highres3dnet; validation MRE 2.50 mm; 3 epochs, "
                                "recipe afids-32-poses")
    assert training.model_recipe(mine.path) == "afids-32-poses"
    assert [e.name for e in available_models(tmp_path / "absent")] == ["afids-32 (bundled)", "brain-88 (bundled)"]


def header_only_model(path: Path, **parts) -> Path:
    """A model file as far as its header goes (a safetensors header without tensors): metadata parts as given."""
    from LandmarkDetectionLib.modelheader import FORMAT, FORMAT_VERSION

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: json.dumps(v) for k, v in parts.items()}}
    header = json.dumps({"__metadata__": metadata}).encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


def test_one_odd_model_file_never_breaks_the_list(tmp_path, monkeypatch):
    folder = tmp_path / "Models"
    folder.mkdir()
    schema = {"name": "afids-32", "landmarks": [{"name": "AC"}]}
    header_only_model(folder / "a.safetensors", schema=schema, config={"architecture": "locnet"},
                      metrics={"validation": 2.5}, training={"recipe": 7})
    header_only_model(folder / "b.safetensors", schema={"name": "x", "landmarks": 3})
    odd, damaged = available_models(folder)[2:]
    assert odd.usable and odd.description == "afids-32 (1 landmarks), locnet; recipe 7"
    assert not damaged.usable and damaged.problem.startswith("model metadata is damaged (TypeError:")
    assert [e.default for e in available_models(folder)] == [True, False, False, False]

    def no_resources():
        raise FileNotFoundError("Resources/Schemas not found beside the backend")

    monkeypatch.setattr(training, "resources_dir", no_resources)  # an incomplete installation
    bundled, bundled88, *rest = available_models(folder)
    assert bundled.default and bundled.bundled and not bundled.usable and not bundled88.usable
    assert bundled.problem == "not installed (Resources/Schemas not found beside the backend)"
    assert [e.name for e in rest] == ["a", "b"]


def test_models_are_listed_before_torch_is_installed(tiny_model):
    """The LandmarkDetection module lists the models folder before its Python dependencies are installed."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from LandmarkDetectionAppLib.training import available_models\n"
            f"print([(e.name, e.usable) for e in available_models({str(tiny_model.parent)!r})])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO / "LandmarkDetection"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[('afids-32 (bundled)', True), ('brain-88 (bundled)', True), ('model', True)]"


# ----------------------------------------------------------------------------------------------- end to end
def run_job(arguments, progress):
    outcomes = []
    job = BackendJob(lambda job: arguments, progress.consume, outcomes.append)
    job.start()
    deadline = time.monotonic() + 120
    while not job.finished:
        assert time.monotonic() < deadline, "the training did not finish"
        job.poll()
        time.sleep(0.05)
    assert outcomes[0].ok, outcomes[0].message
    return job


def test_a_run_through_backend_job_then_install(tiny_dataset, tmp_path, mrml_scene):
    """The widget's path: a 1-epoch run with a recipe (explicit options win), its epoch row in the chart's
    table, and the finished model installed and listed."""
    output = tmp_path / "run"
    table, _ = setup_progress_plot(mrml_scene, "run")
    progress = TrainingProgress(output, table)
    tiny = {"architecture": "highres3dnet", **{k: v for k, v in TINY_TRAIN.items() if k not in ("schema", "progress")}}
    request = TrainingRequest(tiny_dataset, output, "afids-32-poses", 1, "cpu", options=tiny)
    run_job(training_arguments(request), progress)
    assert [row.epoch for row in progress.rows] == [1] and table.GetNumberOfRows() == 1
    assert progress.epochs == 1 and progress.fraction() == 1.0
    header = read_header(output / "model.safetensors")
    assert header.training["recipe"] == "afids-32-poses"
    assert header.config["network"]["channels"] == list(tiny["channels"])  # given: wins over the recipe's
    assert header.training["augment"] == RECIPES["afids-32-poses"]["augment"]  # not given: the recipe's

    assert training.can_resume(output)  # Resume's arguments: test_resume_arguments_are_read_by_the_backend_parser

    installed = install_model(training.finished_model(output), tmp_path / "Models")
    entry = available_models(tmp_path / "Models")[-1]
    assert entry.path == installed and entry.usable and "recipe afids-32-poses" in entry.description
