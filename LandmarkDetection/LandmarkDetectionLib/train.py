"""Training: Adam, per-epoch atomic checkpoints with exact resume, best-model export, early stopping,
mixed precision on CUDA, CSV + TensorBoard logs, and DistributedDataParallel under ``torchrun``.

Outputs in the output folder:
  model.safetensors       the best model by validation mean radial error (the file to use)
  checkpoint.safetensors  the state after the last finished epoch (weights, optimizer, RNG, options): --resume
  log.csv, tensorboard/   one row / scalar set per epoch
  splits.json             which cases went to train, val and test
  .train.lock             locked while a run uses the folder; a second run there is refused. The lock is the
                          operating system's (filelock: flock, or msvcrt on Windows), so it ends with its
                          process: a killed run never leaves the folder locked.

A kill at any moment costs at most the epoch in progress: each epoch writes its log row, then its
checkpoint (atomically). On --resume, log rows after the checkpoint's epoch (the kill came between the
two) and temporary files of interrupted writes are removed and TensorBoard is told to drop later steps,
so the outputs equal an uninterrupted run's.

--recipe NAME gives a new run the options of recipes.RECIPES[NAME] as defaults; options given on the
command line win, and the recipe's name is recorded in the model. (--resume keeps the stored options.)

--init-from MODEL fine-tunes MODEL (cases a clinician corrected improve it): the run starts from its weights,
and a new run takes its architecture, network options, input grid (--size, --spacing), --sigma-mm and, for
a model that aligns scans first, --synthesis as defaults (over a --recipe's); options given that differ
from the model are refused. A model that aligns scans first keeps its reference frame: the reference
image, landmark region, prior landmarks (and their calibrated covariance) and the input grid are the
model's, and every training case, the first included, is aligned to that reference.

--resume continues with the options stored in the checkpoint: ``--output DIR --resume`` is enough.
Options given again must equal the stored ones (checkpoint.FIXED_ON_RESUME), except --epochs,
--patience, --workers, --no-amp, --device, --progress and the dataset's path; the dataset's contents
must be unchanged (case names and splits, landmark files, image sizes). Another --epochs re-plans the
run as if it had been started with it: the cosine schedule is recomputed for the new length (the
remaining epochs get the rates of a run started with the new --epochs, so the last one still ends at
lr/100; continuing a finished run therefore raises the rate again, a warm restart), and so is the
loss's stage weighting; the plateau schedule simply goes on. Resuming a run that has finished prints
one line saying so and succeeds (exit 0) with the existing best model, so scripts may always pass
--resume and "demo --train-model --resume" goes on to its calibration step.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import filelock
import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .checkpoint import check_resume, load_checkpoint, read_checkpoint, save_checkpoint
from .data import LandmarkDataset, discover_cases, split_cases
from .detect import predict
from .errors import LandmarkError
from .fileio import atomic_write_bytes, atomic_write_text, check_writable_dir, read_landmarks
from .losses import LOSSES
from .metrics import radial_errors, summarize
from .modelfile import LandmarkModel, ModelConfig, check_config, load_model
from .modelheader import read_header
from .models import architecture_class
from .preprocess import InputGeometry
from .runtime import Progress, pick_device
from .schema import load_schema, schema_of_labels

CHECKPOINT = "checkpoint.safetensors"
BEST_MODEL = "model.safetensors"
LOCK = ".train.lock"
# highres3dnet keeps the whole input grid in every layer. One training step of its default network
# (16,32,64 channels, 3 blocks per stage) measured about 130 microseconds per voxel on one CPU core, so
# above 2 million voxels (about 128^3) a sample takes minutes and an epoch of 100 cases hours; a GPU takes
# well under a second per sample. (locnet sees a coarse copy and small patches, not the whole grid: the
# CPU recipe afids-32 is a locnet with a 5-million-voxel grid.)
CPU_VOXEL_LIMIT = 2_000_000


@dataclass
class TrainOptions:
    dataset: str
    output: str
    schema: str = "brain-88"
    architecture: str = "highres3dnet"
    channels: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 3  # highres3dnet
    dropout: float = 0.1  # highres3dnet
    scales_mm: tuple[float, ...] = (4.0, 2.0, 1.0)  # locnet
    patch_sizes: tuple[int, ...] = (24, 16)  # locnet
    train_patch_landmarks: int = 0  # locnet: landmarks whose patches train per step (0: all)
    input_statistics: bool = True  # locnet: batch norm by the input's own statistics at inference too
    size: tuple[int, int, int] = (224, 224, 101)
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.2)
    epochs: int = 100
    batch_size: int = 1
    lr: float = 1e-3
    schedule: str = "plateau"  # "plateau": halve the rate when validation stalls; "cosine": anneal to lr/100
    loss: str = "mixed"
    alpha: float = 0.4
    sigma_mm: float = 3.0
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    patience: int = 20
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    workers: int = 0
    augment: str = ""  # augmentation policy set ("" = none); see augment.py
    # Generalising recipe (synth.py, align.py): synthetic appearance and anatomy drawn from the training
    # cases in a reference frame; the model carries the reference and aligns every scan to it first.
    synthesis: str = ""  # "" = off, "default", or a synthesis JSON file
    samples_per_epoch: int = 100  # with synthesis
    val_samples: int = 0  # with synthesis: fixed synthetic validation samples (0: 8, or 4 per validation case)
    # > 0: validate and save an exponential moving average of the weights, updated every step with this
    # decay (torch.optim.swa_utils); it smooths the step-to-step noise of a constant learning rate.
    ema_decay: float = 0.0
    init_from: str = ""  # fine-tune: start from this model's weights and (aligning models) reference frame
    recipe: str = ""  # the recipes.RECIPES entry whose options a command-line run took as defaults (recorded)
    resume: bool = False
    progress: str = "bar"
    extra_metadata: dict = field(default_factory=dict)

    def model_config(self, geometry: InputGeometry | None = None) -> ModelConfig:
        """The architecture's own options (those it declares) and the input grid."""
        names = architecture_class(self.architecture).default_options
        network = {name: list(v) if isinstance(v := getattr(self, name), tuple) else v for name in names}
        geometry = geometry or InputGeometry(tuple(self.size), tuple(self.spacing))
        return ModelConfig(self.architecture, network, geometry, self.sigma_mm)


def _distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def train(options: TrainOptions) -> Path:
    """Train a model; returns the path of the best model. With ``options.resume`` every option is as
    given here (see train_command for the command line, where left-out options come from the checkpoint)."""
    _check_values(vars(options))
    with _output_lock(options.output):
        return _run(options)


def train_command(given: dict) -> Path:
    """The ``train`` command, with the TrainOptions named on its command line (``given``). A new run takes
    the others from TrainOptions' defaults (channels: the architecture's); --resume takes them from the
    checkpoint. The folder is locked first, so a busy folder is refused before anything else is said."""
    given = _with_recipe(_with_source_model(given))
    _check_values(given)  # before the folder is made; stored values were checked when they were given
    with _output_lock(given["output"]):
        return _run(_command_line_options(dict(given)))


def _with_recipe(given: dict) -> dict:
    """A new run's options: those of its --recipe (recipes.RECIPES) under the ones given. A resumed run
    keeps its stored options."""
    from .recipes import RECIPES

    name = given.get("recipe")
    if not name or given.get("resume"):
        return given
    if name not in RECIPES:
        raise LandmarkError(None, f"--recipe {name}: no such recipe; recipes are {', '.join(RECIPES)}")
    return {**RECIPES[name], **given}


def _with_source_model(given: dict) -> dict:
    """A new fine-tune run's options: those that make the --init-from model (architecture, network options,
    input grid, heatmap sigma, and --synthesis for a model that aligns scans first) under the ones given.
    They win over a --recipe's (_with_recipe adds those below); options given that differ from the model
    are refused by _check_source. A resumed run keeps its stored options."""
    path = given.get("init_from")
    if not path or given.get("resume"):
        return given
    header = read_header(path)
    try:
        config = ModelConfig.from_dict(header.config)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise LandmarkError(path, f"model metadata is damaged ({error})") from None
    fields = TrainOptions.__dataclass_fields__
    model = {name: tuple(value) if isinstance(value, list) else value
             for name, value in config.network.items() if name in fields}
    model.update(architecture=config.architecture, size=config.geometry.size, spacing=config.geometry.spacing,
                 sigma_mm=config.sigma_mm)
    if "reference" in header.metadata:  # the model aligns scans first: so does its fine-tuning
        model["synthesis"] = "default"
    return {**model, **given}


def _command_line_options(given: dict) -> TrainOptions:
    fields = TrainOptions.__dataclass_fields__
    if given.get("resume"):
        checkpoint = Path(given["output"]) / CHECKPOINT
        if not checkpoint.is_file():
            raise LandmarkError(checkpoint, "--resume given but no checkpoint exists in the output folder")
        stored = read_checkpoint(checkpoint)["options"]
        given = {**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields}, **given}
        if "dataset" not in given:  # checkpoints written before the options were all stored
            raise LandmarkError(checkpoint, "this checkpoint does not record its dataset; give --dataset")
    elif "dataset" not in given:
        raise LandmarkError(None, "--dataset is required (only --resume takes it from the checkpoint)")
    elif "schema" not in given:  # the built-in schema the labels name
        given["schema"] = schema_of_labels(discover_cases(given["dataset"])[0].landmarks).name
    if "channels" not in given:
        architecture = architecture_class(given.get("architecture", TrainOptions.architecture))
        given["channels"] = architecture.default_options["channels"]
    return TrainOptions(**given)


@contextlib.contextmanager
def _output_lock(output):
    """Hold the output folder's lock for the whole run (rank 0 of a torchrun job holds it for all)."""
    if _distributed()[0] != 0:
        yield
        return
    created = not Path(output).exists()
    folder = check_writable_dir(output)
    lock = filelock.FileLock(folder / LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise LandmarkError(folder, "is in use by another training run; wait for it to end or choose "
                                    "another --output") from None
    succeeded = False
    try:
        yield
        succeeded = True
    finally:
        lock.release()
        if created and not succeeded and [p.name for p in folder.iterdir()] == [LOCK]:
            (folder / LOCK).unlink()  # a run that failed before writing anything leaves no folder behind
            folder.rmdir()


def _check_values(values: dict) -> None:
    """Refuse impossible option values (those present in ``values``) before anything is written."""
    if values.get("loss", "mixed") not in LOSSES:
        raise LandmarkError(None, f"--loss {values['loss']}: expected one of {', '.join(LOSSES)}")
    if values.get("schedule", "plateau") not in SCHEDULES:
        raise LandmarkError(None, f"--schedule {values['schedule']}: expected one of {', '.join(SCHEDULES)}")
    for name in ("epochs", "batch_size", "patience", "samples_per_epoch"):
        if values.get(name, 1) < 1:
            raise LandmarkError(None, f"--{name.replace('_', '-')} {values[name]}: expected at least 1")
    for name in ("train_patch_landmarks", "val_samples"):
        if values.get(name, 0) < 0:
            raise LandmarkError(None, f"--{name.replace('_', '-')} {values[name]}: expected 0 or more")
    if values.get("train_patch_landmarks", 0) and values.get("architecture", TrainOptions.architecture) != "locnet":
        raise LandmarkError(None, "--train-patch-landmarks applies to the locnet architecture only")
    bounds = {"lr": (0, 1), "alpha": (0, 1), "sigma_mm": (0.1, 100), "val_fraction": (0, 0.9),
              "test_fraction": (0, 0.9), "workers": (0, 64), "dropout": (0, 0.9), "blocks_per_stage": (1, 16),
              "ema_decay": (0, 0.9999)}
    for name, (low, high) in bounds.items():
        value = values.get(name, low)
        if not (math.isfinite(value) and low <= value <= high):
            raise LandmarkError(None, f"--{name.replace('_', '-')} {value}: expected {low} to {high}")
    if values.get("val_fraction", 0) + values.get("test_fraction", 0) >= 1:
        raise LandmarkError(None, "--val-fraction plus --test-fraction must leave cases to train on")


def _run(options: TrainOptions) -> Path:
    try:  # the same bounds a model file is held to: --size, --spacing, --channels, scales, patches
        check_config(options.model_config())
    except ValueError as error:
        raise LandmarkError(None, f"training options: {error}") from None
    rank, local_rank, world = _distributed()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and options.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    try:
        return _train(options, rank, local_rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    options: TrainOptions
    output: Path
    device: torch.device
    world: int
    main: bool
    splits: dict
    fingerprint: str  # of the dataset, stored in every checkpoint
    model: LandmarkModel
    network: torch.nn.Module  # the model's network, or its DistributedDataParallel wrapper
    train_set: object
    val_set: object
    sampler: object
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    amp_dtype: object
    use_amp: bool
    state: dict
    progress: Progress
    writer: object = None
    ema: object = None  # torch.optim.swa_utils.AveragedModel of the network, with --ema-decay

    @property
    def evaluated(self) -> LandmarkModel:
        """The model that is validated and saved: the network's moving average with --ema-decay."""
        return self.model if self.ema is None else dataclasses.replace(self.model, network=self.ema.module)


def _train(options: TrainOptions, rank: int, local_rank: int, world: int) -> Path:
    main = rank == 0
    output = check_writable_dir(options.output)
    schema = load_schema(options.schema)
    cases = discover_cases(options.dataset)
    splits = _split(options, cases, schema)
    fingerprint = _dataset_fingerprint(cases)
    checkpoint = output / CHECKPOINT
    saved = None
    if options.resume and checkpoint.exists():
        saved = read_checkpoint(checkpoint)
        check_resume(checkpoint, saved, options, fingerprint)
    elif options.resume:
        raise LandmarkError(checkpoint, "--resume given but no checkpoint exists in the output folder")
    elif checkpoint.exists():
        raise LandmarkError(checkpoint, "a previous run is here; pass --resume to continue it or choose another output")
    if main:
        _restore_outputs(output, saved["state"]["epoch"] + 1 if saved else 0)
    if saved is not None and (finished := _already_finished(options, saved["state"])):
        if main:
            print(f"{output}: {finished}", file=sys.stderr)
            _evaluate_test_split(_best_model(output, saved["state"]), splits["test"], pick_device(options.device),
                                 only_if_missing=True)  # a kill during the last epoch's test evaluation
        return _best_model(output, saved["state"])

    run = _setup(options, rank, local_rank, world, output, schema, splits, fingerprint)
    for epoch in range(run.state["epoch"] + 1, options.epochs):
        started = time.monotonic()
        train_loss = _train_epoch(run, epoch)
        val = _validate(run.evaluated, run.val_set, run.device) if run.main else {}
        _end_epoch(run, epoch, train_loss, val, started)
        if run.state["finished"]:
            break
    run.progress.close()
    if run.writer is not None:
        run.writer.close()
    best = _best_model(output, run.state)
    if run.main:
        _evaluate_test_split(best, run.splits["test"], run.device)
    if world > 1:
        dist.barrier()
    return best


def _split(options: TrainOptions, cases, schema) -> dict:
    """Train/val/test cases, after checking every annotation (before any training) and that training
    and validation have landmarks to learn and score."""
    landmarks = {case.name: read_landmarks(case.landmarks, schema) for case in cases}
    splits = split_cases(cases, options.val_fraction, options.test_fraction, options.seed)
    if not splits["train"]:
        raise LandmarkError(options.dataset, "no training cases after the train/val/test split")
    for name, chosen in (("training", splits["train"]), ("validation", splits["val"] or splits["train"])):
        if not any(np.isfinite(landmarks[case.name]).all(axis=1).any() for case in chosen):
            raise LandmarkError(options.dataset, f"no usable landmark in the {name} cases "
                                                 f"({', '.join(c.name for c in chosen)}): all are missing or NaN")
    return splits


def _dataset_fingerprint(cases) -> str:
    """What --resume must find unchanged: case names and splits, the landmark files' contents, and the
    image files' sizes (hashing every scan of a large dataset would take minutes; a changed compressed
    scan almost never keeps its size)."""
    def size(path: Path) -> int:
        return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    digest = hashlib.sha256()
    for case in cases:
        record = [case.name, case.split, [size(Path(p)) for p in (case.image, *case.extra_images)],
                  hashlib.sha256(Path(case.landmarks).read_bytes()).hexdigest()]
        digest.update(json.dumps(record).encode())
    return digest.hexdigest()


def _already_finished(options: TrainOptions, state: dict) -> str | None:
    """Why a resumed run has nothing left to do under ``options``, or None."""
    done = state["epoch"] + 1
    epochs = f"{done} epoch{'' if done == 1 else 's'}"
    if done >= options.epochs:
        return f"already finished after {epochs}; raise --epochs to continue"
    if state["stale_epochs"] >= options.patience:
        return (f"already stopped early after {epochs} ({state['stale_epochs']} without improvement); "
                "raise --patience to continue")
    return None


def _best_model(output: Path, state: dict) -> Path:
    if state["best_epoch"] < 0:  # never a "best model" line about a file that does not exist
        raise LandmarkError(output, "no epoch gave a finite validation error, so no model was saved; "
                                    "check that the validation landmarks lie inside the input grid (--size, --spacing)")
    return output / BEST_MODEL


def _restore_outputs(output: Path, epochs: int) -> None:
    """Make the folder what an uninterrupted run leaves after ``epochs`` epochs: remove temporary files of
    writes a kill interrupted and the log rows of epochs after the checkpoint's."""
    for leftover in output.glob(".*.part*"):  # fileio.atomic_path's temporary names
        leftover.unlink()
    log = output / "log.csv"
    if not log.exists():
        return
    with log.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if None not in row and None not in row.values()
                and row["epoch"].isdigit() and int(row["epoch"]) <= epochs]
    if not rows:
        log.unlink()
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=reader.fieldnames)  # as _append_csv writes them
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(log, text.getvalue().encode("utf-8"))


def _setup(options: TrainOptions, rank: int, local_rank: int, world: int, output: Path, schema, splits: dict,
           fingerprint: str) -> _Run:
    """Data, model, optimizer and loop state, restored from the checkpoint with --resume."""
    main = rank == 0
    device = pick_device(options.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu" and options.workers and world == 1:
        # Leave the workers' cores to them: on 2 cores one synthesising worker and a two-thread training
        # step contend, and a step takes the sum of both times instead of the longer one.
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - options.workers))

    source = None
    if options.init_from:  # checked before the (slow) alignment of the training cases
        source = load_model(options.init_from)
        _check_source(source, options, schema)
    if options.synthesis:
        model, train_set, val_set = _synthesis_setup(options, schema, splits, source)
    else:
        config = options.model_config()
        torch.manual_seed(options.seed)
        model = LandmarkModel.create(config, schema)
        augmentation = None
        if options.augment:
            from .augment import load_policies  # the realistic MRI augmentation of issue 3
            augmentation = load_policies(options.augment)
        train_set = LandmarkDataset(splits["train"], schema, config.geometry, augmentation, options.seed)
        val_set = LandmarkDataset(splits["val"] or splits["train"], schema, config.geometry)
    if source is not None:
        _init_from(model, source)
    if options.train_patch_landmarks:
        model.network.train_patch_landmarks = options.train_patch_landmarks
    voxels = math.prod(model.config.geometry.size)
    if main and device.type == "cpu" and options.architecture == "highres3dnet" and voxels > CPU_VOXEL_LIMIT:
        print(f"warning: an input grid of {'x'.join(map(str, model.config.geometry.size))} voxels "
              f"({voxels / 1e6:.1f} million per sample) is GPU-sized for highres3dnet: on this CPU expect minutes "
              "per sample and hours per epoch; on a CPU train the afids-32 recipe (landmark-detection demo "
              "--train-model WORK) or choose a smaller --size or coarser --spacing", file=sys.stderr)
    model.network.to(device)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=options.seed, drop_last=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=options.batch_size, sampler=sampler,
                                         num_workers=options.workers, persistent_workers=False,
                                         pin_memory=device.type == "cuda")
    network = model.network
    if world > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(network.parameters(), lr=options.lr)
    scheduler = _scheduler(optimizer, options)
    use_amp = options.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    ema = None
    if options.ema_decay:
        ema = AveragedModel(model.network, multi_avg_fn=get_ema_multi_avg_fn(options.ema_decay), use_buffers=True)
    state = {"epoch": -1, "best_mre": math.inf, "best_epoch": -1, "stale_epochs": 0, "finished": False}
    if options.resume:
        state = load_checkpoint(output / CHECKPOINT, model.network, optimizer, scheduler, ema)
        state["finished"] = False  # _already_finished said there is more to do under these options
        _replan_cosine(scheduler, optimizer, options.epochs)
    if main:
        atomic_write_text(output / "splits.json", json.dumps(
            {s: [c.name for c in splits[s]] for s in splits}, indent=2))
    # purge_step: TensorBoard hides what a killed run logged after the checkpoint's epoch
    writer = _tensorboard(output / "tensorboard", purge_step=state["epoch"] + 2) if main else None
    return _Run(options, output, device, world, main, splits, fingerprint, model, network, train_set, val_set,
                sampler, loader, optimizer, scheduler, scaler, amp_dtype, use_amp, state,
                Progress(options.progress, enabled=main), writer, ema)


SCHEDULES = ("plateau", "cosine")


def _scheduler(optimizer, options: TrainOptions):
    if options.schedule == "cosine":  # a short CPU budget ends with the smallest steps, not mid-plateau
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, options.epochs),
                                                          eta_min=options.lr / 100)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(2, options.patience // 3))


def _replan_cosine(scheduler, optimizer, epochs: int) -> None:
    """A cosine schedule resumed with another --epochs: from here on, the rates of a run started with
    that many epochs (closed form; torch's recursive step then continues it exactly)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == epochs:
        return
    scheduler.T_max = epochs
    phase = (1 + math.cos(math.pi * scheduler.last_epoch / epochs)) / 2
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * phase


def _train_epoch(run: _Run, epoch: int) -> float:
    """One pass over the training data; the mean loss across ranks."""
    options, model, device = run.options, run.model, run.device
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    run.network.train()
    run.progress.start(f"train epoch {epoch + 1}/{options.epochs}", len(run.loader))
    losses = []
    best = run.state["best_mre"]
    for step, (image, target, mask, _) in enumerate(run.loader, start=1):
        image, target, mask = image.to(device), target.to(device), mask.to(device)
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            prediction = run.network(image)  # through the DDP wrapper, so gradients are synchronised
        loss = model.network.loss(prediction, target, mask, model.config.geometry.spacing, options.loss,
                                  options.alpha, model.config.sigma_mm, progress=epoch / max(1, options.epochs - 1))
        if not torch.isfinite(loss):
            raise LandmarkError(options.output, f"training diverged: the loss is {float(loss)} at epoch "
                                                f"{epoch + 1}, step {step}; try a lower --lr")
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update_parameters(model.network)
        losses.append(float(loss.detach()))
        run.progress.update(step, loss=losses[-1], metric=None if math.isinf(best) else best, epoch=epoch + 1)
    return _mean_across_ranks(float(np.mean(losses)), device, run.world)


def _end_epoch(run: _Run, epoch: int, train_loss: float, val: dict, started: float) -> None:
    """Learning-rate schedule, early stopping, best model, log row, TensorBoard and checkpoint."""
    options, state = run.options, run.state
    val_mre = _broadcast(val.get("mre_mm", math.nan), run.device, run.world)
    if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        run.scheduler.step(val_mre)
    else:
        run.scheduler.step()
    improved = val_mre < state["best_mre"]
    state.update(epoch=epoch, stale_epochs=0 if improved else state["stale_epochs"] + 1)
    if improved:
        state.update(best_mre=val_mre, best_epoch=epoch)
    state["finished"] = state["stale_epochs"] >= options.patience or epoch + 1 >= options.epochs
    if not run.main:
        return
    if improved:
        run.model.training = _training_summary(options, run.splits, epoch)
        run.model.metrics = {"validation": val, "best_epoch": epoch + 1}
        run.evaluated.save(run.output / BEST_MODEL)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_mre_mm": val_mre,
           "val_sdr_2mm": val.get("sdr_2mm"), "val_sdr_4mm": val.get("sdr_4mm"),
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - started, 3)}
    _append_csv(run.output / "log.csv", row)
    if run.writer is not None:
        for key, value in row.items():
            if key != "epoch" and value is not None:
                run.writer.add_scalar(key, value, epoch + 1)
        run.writer.flush()
    save_checkpoint(run.output / CHECKPOINT, options, run.model.network, run.optimizer, run.scheduler, state,
                    run.fingerprint, run.ema)
    run.progress.message(f"epoch {epoch + 1}: loss {train_loss:.4g}, validation MRE {val_mre:.3f} mm"
                         + (" (best)" if improved else ""))


def _synthesis_setup(options: TrainOptions, schema, splits, source: LandmarkModel | None = None):
    """The generalising recipe: the first training case is the reference frame (its 2 mm copy and the
    landmark region go into the model file); every case is aligned to it, split into tissue classes, and
    drawn from by synth.py. Validation: a fixed set of synthetic samples from the validation cases (or,
    with one case, from the training case with other seeds). Fine-tuning a model that aligns scans first
    (``source``): its reference, region, prior landmarks and input grid instead, and every case is aligned."""
    from .align import align, landmark_region, make_reference
    from .fileio import read_volume
    from .synth import SourceCase, SynthesisConfig, SynthesisDataset, reference_geometry

    synthesis = SynthesisConfig.load(options.synthesis)
    if source is not None:  # it aligns scans first (_check_source): the frame its network was trained in
        first = first_image = None
        reference, region, prior, geometry = source.reference, source.region, source.prior, source.config.geometry
    else:
        first = splits["train"][0]
        first_image = read_volume(first.image)
        prior = read_landmarks(first.landmarks, schema)
        reference = make_reference(first_image)
        region = landmark_region(reference, prior)
        geometry = reference_geometry(prior, options.spacing)

    def sources(cases):
        result = []
        for case in cases:
            image = first_image if case == first else read_volume(case.image)
            to_case = np.eye(4) if case == first else align(image, reference, region).matrix
            images = [image] + [read_volume(p) for p in case.extra_images]
            result.append(SourceCase.from_images(images, read_landmarks(case.landmarks, schema),
                                                 synthesis.classes, to_case))
        return result

    train_sources = sources(splits["train"])
    val_sources = sources(splits["val"]) if splits["val"] else train_sources
    torch.manual_seed(options.seed)
    # The reference's landmarks: where the alignment alone puts each landmark (the registration prior,
    # whose spread ``calibrate`` measures).
    model = LandmarkModel.create(options.model_config(geometry), schema, reference, region, prior)
    model.config.test_time_mirror = synthesis.flip_probability > 0  # flipped about the grid's centre
    mirror = schema.mirror_indices()
    train_set = SynthesisDataset(train_sources, geometry, mirror, synthesis, options.seed, options.samples_per_epoch)
    val_set = SynthesisDataset(val_sources, geometry, mirror, synthesis, options.seed + 1_000_003,
                               options.val_samples or max(8, 4 * len(val_sources)), cache=True)
    return model, train_set, val_set


def _check_source(source: LandmarkModel, options: TrainOptions, schema) -> None:
    """Fine-tuning needs the run's schema, architecture, network options and input grid to be the
    --init-from model's, and a model that aligns scans first fine-tunes only in a run that aligns too
    (--synthesis). A synthesis run takes the model's whole grid; its own --size is unused, as always."""
    aligns = source.reference is not None
    geometry = source.config.geometry
    compared = [("schema landmarks", schema.names, source.schema.names),
                ("architecture", options.architecture, source.config.architecture),
                # an option the source's file predates is the run's (it is new to the fine-tuned model)
                ("network options", options.model_config().network,
                 {**options.model_config().network, **source.config.network}),
                ("input spacing", [float(s) for s in options.spacing], list(geometry.spacing)),
                ("aligns scans first", bool(options.synthesis), aligns)]
    if not aligns:
        compared.append(("input size", list(options.size), list(geometry.size)))
    mismatches = [name for name, ours, theirs in compared if ours != theirs]
    if mismatches:
        raise LandmarkError(options.init_from, f"--init-from: this model differs from the run in "
                                               f"{', '.join(mismatches)}; leave those options out to take the "
                                               "model's (landmark-detection info shows them)")


def _init_from(model: LandmarkModel, source: LandmarkModel) -> None:
    """Fine-tuning: the new run starts from the source model's weights (corrected cases improve a model)."""
    model.network.load_state_dict(source.network.state_dict())
    model.config.uncertainty_scale = 1.0  # the network changes, so its uncertainty is calibrated again
    # The prior's covariance is kept: it is the spread of true landmarks around the prior landmarks after
    # alignment to the reference, measured by the source's calibration. Reference, region and prior are the
    # source's (_synthesis_setup), so the alignment and that spread do not change when the network does;
    # dropping it would turn off the fusion with the prior until the user calibrates again (which measures
    # both anew). Models that do not align scans have neither.
    model.prior_covariance = source.prior_covariance


def _validate(model: LandmarkModel, dataset, device) -> dict:
    """Radial errors in mm of the current network on a dataset (eval mode), summarised."""
    was_training = model.network.training
    model.network.eval()
    errors = []
    with torch.inference_mode():
        for index in range(len(dataset)):
            image, target, mask, index_to_ras = dataset[index]
            pred = predict(model, image[None].to(device), device)[0].float().cpu()
            matrix = index_to_ras.double()
            pred_ras = pred.double() @ matrix[:3, :3].T + matrix[:3, 3]
            true_ras = target.double() @ matrix[:3, :3].T + matrix[:3, 3]
            error = radial_errors(pred_ras.numpy(), true_ras.numpy())
            errors.append(np.where(mask.numpy(), error, np.nan))
    model.network.train(was_training)
    return summarize(np.concatenate(errors))



def _evaluate_test_split(model_path: Path, cases, device, only_if_missing: bool = False) -> None:
    """Score the best model on the held-out test split (if any) and store the result in its metadata."""
    from .detect import detect_image
    from .fileio import read_volume
    from .modelheader import read_header

    if not cases or (only_if_missing and "test" in read_header(model_path).metrics):
        return
    model = load_model(model_path, device)
    errors = [radial_errors(detect_image(model, read_volume(c.image), device), read_landmarks(c.landmarks, model.schema))
              for c in cases]
    model.metrics["test"] = summarize(np.concatenate(errors))
    model.save(model_path)


def _training_summary(options: TrainOptions, splits, epoch: int) -> dict:
    # The dataset's name only: a model file must not record local folders (user or patient names).
    summary = {"dataset": Path(options.dataset).name, "cases": {s: len(v) for s, v in splits.items()},
               "epochs_trained": epoch + 1, "loss": options.loss, "alpha": options.alpha, "lr": options.lr,
               "schedule": options.schedule, "init_from": Path(options.init_from).name or None,
               "batch_size": options.batch_size, "seed": options.seed, "augment": options.augment or None,
               "ema_decay": options.ema_decay or None,
               "torch": torch.__version__}
    if options.recipe:
        summary["recipe"] = options.recipe
    summary.update(options.extra_metadata)
    return summary


def _mean_across_ranks(value: float, device, world: int) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / world


def _broadcast(value: float, device, world: int) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def _tensorboard(folder: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: the CSV log always exists
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)
