"""Training from Slicer, without Qt: the backend command of a training run, its progress as a table and a
chart in the scene, and the models folder that LandmarkDetection lists.

Runs (a ``BackendJob`` of ``job.py`` runs the arguments; it adds ``--progress json`` itself):
  ``TrainingRequest(dataset, output, recipe, epochs, device, init_from, options)`` and
  ``training_arguments(request) -> list[str]``: ``train --dataset=D --output=O [--recipe=R] [--epochs=N]
  --device=X [--init-from=MODEL] [--option=value ...]``. ``init_from`` fine-tunes an existing model, so
  corrected cases improve it: the run takes the model's architecture, network options, input grid and (for
  a model that aligns scans first) reference frame as its defaults, whatever the recipe; its schema must
  be the dataset's. An empty ``init_from`` is none.
  ``resume_arguments(output, epochs=None, device="auto") -> list[str]``: ``train --output=O --resume``; the
  backend takes every other option from the checkpoint (a larger ``epochs`` continues a finished run).
  ``can_resume(output) -> bool``: the folder holds a checkpoint. ``finished_model(output) -> Path``.
  ``RECIPE_NAMES``: the recipes a user picks from (``recipes.RECIPES``, then ``NO_RECIPE``: the train
  command's own defaults); ``describe_recipe(name) -> str``: the options a recipe sets. ``DEVICES``.

Progress:
  ``TrainingProgress(output, table_node=None)``: ``consume(record)`` takes each JSON progress record of the
  run (``runtime.Progress``: ``{"stage": "train epoch 3/30", "step", "total", "loss", "metric", "eta",
  "epoch"}`` per batch, ``{"stage", "message"}`` after each epoch). ``epoch``, ``epochs``, ``step``,
  ``total``, ``batch_loss``, ``eta``, ``fraction()`` and ``status()`` describe the run now. The epoch
  rows (``rows``: ``EpochRow(epoch, train_loss, val_mre_mm)``) come from the run's ``log.csv``, read again
  at each end-of-epoch message: exact values, and a resumed run shows its earlier epochs too.
  ``setup_progress_plot(scene, name) -> (table_node, chart_node)``: a ``vtkMRMLTableNode`` (epoch, training
  loss, validation MRE) and a ``vtkMRMLPlotChartNode`` with one ``vtkMRMLPlotSeriesNode`` per curve. MRML
  charts have one Y axis in every Slicer version (5.6 to main), so the Y axis is logarithmic: the loss
  (mm^2 and heatmap terms) and the MRE (mm) differ by orders of magnitude and both fall over training.
  ``fill_progress_table(table_node, rows)``; the series follow the table.

Models folder:
  ``MODELS_FOLDER_KEY`` (the settings key), ``models_folder(settings) -> Path`` (settings: anything with
  ``.value(key, default)``, such as ``slicer.app.userSettings()``), ``set_models_folder(settings, text)``
  (empty text: the default; also needs ``setValue`` and ``remove``) and ``models_folder_of(text) -> Path``, the
  folder a text of the models-folder field means; the default, ``default_models_folder()``,
  is ``~/LandmarkDetection/Models``: the same on Linux, macOS and Windows, kept across Slicer versions and
  reinstalls (unlike the extension's own folder, which is per Slicer revision and removed with the
  extension, or Slicer's cache, which may be cleared), and easy for the user to find, back up and share.
  ``install_model(model_path, folder, name=None) -> Path``: copies a finished model into the folder under
  a new name, never replacing a file. ``available_models(folder) -> list[ModelEntry]``: the bundled models
  first (``default``: the one a module's empty model path means), then the folder's ``*.safetensors``, each
  with name, path, schema, description, read from the header without torch; whatever is wrong with an entry
  (a damaged file, odd metadata, a missing Resources folder, a folder that cannot be listed) is its
  ``problem`` (one line), never raised.
  ``model_recipe(path) -> str | None``: the recipe a model was trained with (a fine-tune's suggested recipe:
  the same augmentation and schedule).
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import safe_name
from LandmarkDetectionLib.modelheader import read_header
from LandmarkDetectionLib.recipes import RECIPES
from LandmarkDetectionLib.resources import BUNDLED_MODELS, resources_dir

# What the train command writes in its output folder (train.py's BEST_MODEL, CHECKPOINT and log; train.py
# imports torch, which the Slicer GUI may not have yet, so the names are repeated here and tested to agree).
BEST_MODEL = "model.safetensors"
CHECKPOINT = "checkpoint.safetensors"
LOG = "log.csv"

NO_RECIPE = "none"
RECIPE_NAMES = (*RECIPES, NO_RECIPE)
DEFAULT_RECIPE = RECIPE_NAMES[0]
DEVICES = ("auto", "cuda", "cpu")  # auto: the GPU when there is one

MODELS_FOLDER_KEY = "LandmarkDetection/ModelsFolder"
MODEL_SUFFIX = ".safetensors"


# ---------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class TrainingRequest:
    """One new training run. ``recipe``: a name of RECIPE_NAMES (None or NO_RECIPE: the train command's
    defaults); ``epochs``: None for the recipe's (or the default); ``options``: other train options by
    TrainOptions field name, given explicitly so they win over the recipe (tuples as comma lists)."""

    dataset: Path
    output: Path
    recipe: str | None = DEFAULT_RECIPE
    epochs: int | None = None
    device: str = "auto"
    init_from: Path | None = None
    options: dict = field(default_factory=dict)


def _option(name: str, value) -> list[str]:
    """``--name=value`` (one argument, so a value starting with '-' is never taken for an option)."""
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return [f"--{name.replace('_', '-')}={text}"]


def _check_recipe(name: str | None) -> None:
    if name not in (None, *RECIPE_NAMES):
        raise LandmarkError(None, f"recipe {name}: no such recipe; recipes are {', '.join(RECIPE_NAMES)}")


def _check_epochs(epochs: int | None) -> None:
    if epochs is not None and epochs < 1:
        raise LandmarkError(None, f"epochs {epochs}: expected at least 1")


def training_arguments(request: TrainingRequest) -> list[str]:
    """The backend's arguments for a new run (BackendJob adds ``--progress json``)."""
    _check_recipe(request.recipe)
    _check_epochs(request.epochs)
    arguments = ["train", *_option("dataset", request.dataset), *_option("output", request.output)]
    if request.recipe not in (None, NO_RECIPE):
        arguments += _option("recipe", request.recipe)
    if request.epochs is not None:
        arguments += _option("epochs", request.epochs)
    arguments += _option("device", request.device)
    if request.init_from is not None and str(request.init_from).strip():
        arguments += _option("init_from", request.init_from)
    for name, value in request.options.items():
        arguments += _option(name, value)
    return arguments


def resume_arguments(output: Path, epochs: int | None = None, device: str = "auto") -> list[str]:
    """Continue the run in ``output`` with its stored options; a larger ``epochs`` continues a finished run."""
    _check_epochs(epochs)
    arguments = ["train", *_option("output", output), "--resume", *_option("device", device)]
    return arguments + (_option("epochs", epochs) if epochs is not None else [])


def can_resume(output: Path) -> bool:
    return (Path(output) / CHECKPOINT).is_file()


def finished_model(output: Path) -> Path:
    """The run's best model (by validation MRE)."""
    path = Path(output) / BEST_MODEL
    if not path.is_file():
        raise LandmarkError(output, "holds no finished model (model.safetensors); train or resume first")
    return path


def describe_recipe(name: str) -> str:
    """The options a recipe sets, as the command line would give them."""
    _check_recipe(name)
    if name in (None, NO_RECIPE):
        return "the train command's own defaults (landmark-detection train --help)"
    return " ".join(argument for key, value in RECIPES[name].items() for argument in _option(key, value))


# ------------------------------------------------------------------------------------------------ progress
@dataclass(frozen=True)
class EpochRow:
    epoch: int  # 1-based
    train_loss: float
    val_mre_mm: float


_TRAIN_STAGE = re.compile(r"train epoch (\d+)/(\d+)")
EPOCH_COLUMN, LOSS_COLUMN, MRE_COLUMN = "Epoch", "Training loss", "Validation MRE (mm)"


def read_log(output: Path) -> list[EpochRow]:
    """The epoch rows of a run's log.csv (none if it has none yet)."""
    path = Path(output) / LOG
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [EpochRow(int(row["epoch"]), _number(row["train_loss"]), _number(row["val_mre_mm"]))
                    for row in csv.DictReader(handle)]
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise LandmarkError(path, f"training log is not readable ({error})") from None


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


class TrainingProgress:
    """A training run as its progress records arrive (see the module docstring); fills ``table_node``,
    when given, with the epoch rows."""

    def __init__(self, output: Path, table_node=None):
        self.output = Path(output)
        self.table_node = table_node
        self.rows: list[EpochRow] = []
        self.epoch = self.epochs = self.step = self.total = 0
        self.batch_loss: float | None = None
        self.eta: float | None = None
        self.message = ""
        self.refresh()

    def consume(self, record: dict) -> None:
        if "message" in record:  # said after each epoch, once its log row is written
            self.message = str(record["message"])
            self.refresh()
            return
        stage = _TRAIN_STAGE.fullmatch(str(record.get("stage", "")))
        if stage is None:  # another stage (none today): nothing of an epoch to show
            return
        self.epoch, self.epochs = int(stage[1]), int(stage[2])
        self.step, self.total = int(record.get("step") or 0), int(record.get("total") or 0)
        self.batch_loss, self.eta = record.get("loss"), record.get("eta")

    def refresh(self) -> None:
        """Read the run's log again and show it in the table."""
        self.rows = read_log(self.output)
        if self.table_node is not None:
            fill_progress_table(self.table_node, self.rows)

    def best(self) -> EpochRow | None:
        finite = [row for row in self.rows if math.isfinite(row.val_mre_mm)]
        return min(finite, key=lambda row: row.val_mre_mm) if finite else None

    def fraction(self) -> float:
        """How much of the planned epochs is done, 0 to 1 (early stopping may end the run sooner)."""
        if not self.epochs:
            return 0.0
        within = self.step / self.total if self.total else 0.0
        return min(1.0, (self.epoch - 1 + within) / self.epochs)

    def status(self) -> str:
        parts = []
        if self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}, step {self.step}/{self.total}")
        if self.batch_loss is not None:
            parts.append(f"loss {self.batch_loss:.4g}")
        best = self.best()
        if best is not None:
            parts.append(f"best validation MRE {best.val_mre_mm:.2f} mm (epoch {best.epoch})")
        if self.eta is not None:
            parts.append(f"about {_duration(self.eta)} left in this epoch")
        return "; ".join(parts) or "starting..."


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def setup_progress_plot(scene, name: str):
    """A table node and a chart node with a loss and a validation-MRE series (log-scale Y axis)."""
    import slicer
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} log")
    for title in (EPOCH_COLUMN, LOSS_COLUMN, MRE_COLUMN):
        column = vtk.vtkDoubleArray()
        column.SetName(title)
        table.AddColumn(column)
    # Column names as the view's header (Slicer 5.8 renamed the setter); locked: the backend writes it.
    (getattr(table, "SetUseColumnTitleAsColumnHeader", None) or table.SetUseColumnNameAsColumnHeader)(True)
    table.SetLocked(True)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
    for title, color in ((LOSS_COLUMN, (0.85, 0.35, 0.1)), (MRE_COLUMN, (0.1, 0.45, 0.8))):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {title.lower()}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(EPOCH_COLUMN)
        series.SetYColumnName(title)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetColor(*color)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle("epoch")
    chart.SetYAxisTitle("training loss, validation MRE (mm); log scale")
    chart.SetYAxisLogScale(True)
    return table, chart


def fill_progress_table(table_node, rows: list[EpochRow]) -> None:
    """Replace the table's rows by ``rows`` (the chart's series follow the table)."""
    columns = [table_node.GetTable().GetColumnByName(name) for name in (EPOCH_COLUMN, LOSS_COLUMN, MRE_COLUMN)]
    for column in columns:
        column.SetNumberOfTuples(len(rows))
    for index, row in enumerate(rows):
        for column, value in zip(columns, (row.epoch, row.train_loss, row.val_mre_mm)):
            column.SetValue(index, value)
    for column in columns:
        column.Modified()
    table_node.Modified()


# ------------------------------------------------------------------------------------------ models folder
@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    schema: str = ""
    description: str = ""
    bundled: bool = False
    problem: str = ""  # why the file cannot be used, one line; "" when it can
    default: bool = False  # the default bundled model (a module's empty model path)

    @property
    def usable(self) -> bool:
        return not self.problem


def default_models_folder() -> Path:
    return Path.home() / "LandmarkDetection" / "Models"


def models_folder_of(text: str) -> Path:
    """The models folder a text names ('~' expanded where it can be); empty: the default."""
    text = str(text or "").strip()
    if not text:
        return default_models_folder()
    try:
        return Path(text).expanduser()
    except RuntimeError:  # '~someone' without such a user
        return Path(text)


def models_folder(settings) -> Path:
    """The folder the user chose in the settings (``MODELS_FOLDER_KEY``), else the default."""
    return models_folder_of(settings.value(MODELS_FOLDER_KEY, ""))


def set_models_folder(settings, text: str) -> Path:
    """Remember the folder ``text`` names (empty: forget it, back to the default); returns the folder in use."""
    text = str(text or "").strip()
    if text:
        settings.setValue(MODELS_FOLDER_KEY, text)
    else:
        settings.remove(MODELS_FOLDER_KEY)
    return models_folder_of(text)


def install_model(model_path: Path, folder: Path, name: str | None = None) -> Path:
    """Copy a finished model into ``folder`` as ``NAME.safetensors`` (NAME-2, NAME-3, ... when taken); never
    replaces a file. ``name`` defaults to the file's name, or its run folder's for ``model.safetensors``."""
    model_path, folder = Path(model_path), Path(folder)
    read_header(model_path)  # only models go into the folder
    stem = name or (model_path.parent.name if model_path.name == BEST_MODEL else model_path.name[: -len(MODEL_SUFFIX)])
    stem = safe_name(stem)
    temporary = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{stem}.", suffix=".part", dir=folder)
        os.close(handle)
        shutil.copyfile(model_path, temporary)
        for number in range(1, 10_000):
            target = folder / f"{stem}{'' if number == 1 else f'-{number}'}{MODEL_SUFFIX}"
            try:
                with open(target, "xb"):  # claims the name: a file that exists is never touched
                    pass
            except FileExistsError:
                continue
            try:
                os.replace(temporary, target)  # replaces only the empty file claimed above
            except OSError:
                target.unlink()
                raise
            temporary = None
            return target
        raise LandmarkError(folder, f"has no free name for {stem}{MODEL_SUFFIX}")
    except OSError as error:
        raise LandmarkError(folder, f"could not install the model here ({error.strerror or error})") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


def available_models(folder: Path | None) -> list[ModelEntry]:
    """The bundled models, named by their schema (the user picks the schema to detect), then ``folder``'s
    models by name; whatever is wrong with one is its problem."""
    try:
        bundled, missing = [resources_dir() / relative for relative in BUNDLED_MODELS.values()], ""
    except OSError as error:  # an incomplete installation: the bundled models are listed, unusable
        bundled, missing = [Path(relative) for relative in BUNDLED_MODELS.values()], f"not installed ({error})"
    entries = [_entry(path, f"{schema} (bundled)", True, k == 0, missing)
               for k, (schema, path) in enumerate(zip(BUNDLED_MODELS, bundled))]
    if folder is None:
        return entries
    listed = {path.resolve() for path in bundled}
    try:
        found = Path(folder).glob(f"*{MODEL_SUFFIX}") if Path(folder).is_dir() else ()
        paths = sorted(found, key=lambda p: p.name.lower())
        paths = [path for path in paths if not path.name.startswith(".") and path.resolve() not in listed]
    except (OSError, RuntimeError) as error:  # unreadable, or a symbolic link loop
        return entries + [ModelEntry(Path(folder).name, Path(folder), problem=f"the folder cannot be listed ({error})")]
    return entries + [_entry(path, path.name[: -len(MODEL_SUFFIX)], False) for path in paths]


def _entry(path: Path, name: str, bundled: bool, default: bool = False, problem: str = "") -> ModelEntry:
    if problem:
        return ModelEntry(name, path, bundled=bundled, problem=problem, default=default)
    try:
        header = read_header(path)
        schema, config, training, metrics = header.schema, header.config, header.training, header.metrics
        if not all(isinstance(part, dict) for part in (schema, config, training, metrics)):
            raise LandmarkError(path, "model metadata is damaged (not JSON objects)")
        description = _description(schema, config, training, metrics)
    except LandmarkError as error:
        return ModelEntry(name, path, bundled=bundled, problem=error.problem, default=default)
    except Exception as error:  # noqa: BLE001 - one odd file must not break the list of models
        return ModelEntry(name, path, bundled=bundled, default=default,
                          problem=f"model metadata is damaged ({type(error).__name__}: {error})")
    return ModelEntry(name, path, str(schema.get("name", "")), description, bundled, default=default)


def _description(schema: dict, config: dict, training: dict, metrics: dict) -> str:
    """One line: schema and landmarks, architecture, validation MRE, training."""
    parts = [f"{schema.get('name', '?')} ({len(schema.get('landmarks', []))} landmarks), "
             f"{config.get('architecture', '?')}"]
    validation = metrics.get("validation")
    mre = validation.get("mre_mm") if isinstance(validation, dict) else None
    if isinstance(mre, (int, float)):
        parts.append(f"validation MRE {mre:.2f} mm")
    trained = [f"{training['epochs_trained']} epochs" if "epochs_trained" in training else "",
               f"recipe {training['recipe']}" if training.get("recipe") else "",
               f"fine-tuned from {training['init_from']}" if training.get("init_from") else ""]
    if any(trained):
        parts.append(", ".join(t for t in trained if t))
    return "; ".join(parts)


def model_recipe(path: Path) -> str | None:
    """The recipe a model was trained with, when it is one of RECIPES: the recipe to fine-tune it with."""
    recipe = read_header(path).training.get("recipe")
    return recipe if recipe in RECIPES else None

