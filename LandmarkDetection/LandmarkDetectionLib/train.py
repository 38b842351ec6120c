"""Training: Adam, per-epoch atomic checkpoints with exact resume, best-model export, early stopping,
mixed precision on CUDA, CSV + TensorBoard logs, and DistributedDataParallel under ``torchrun``.

Outputs in the output folder:
  model.safetensors       the best model by validation mean radial error (the file to use)
  checkpoint.safetensors  the state after the last finished epoch (weights, optimizer, RNG): --resume
  log.csv, tensorboard/   one row / scalar set per epoch
  splits.json             which cases went to train, val and test
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, save_checkpoint
from .data import LandmarkDataset, discover_cases, split_cases
from .detect import predict
from .errors import LandmarkError
from .fileio import atomic_write_text, check_writable_dir, read_landmarks
from .losses import LOSSES
from .metrics import radial_errors, summarize
from .modelfile import LandmarkModel, ModelConfig
from .models import architecture_class
from .preprocess import InputGeometry
from .runtime import Progress, pick_device
from .schema import load_schema

CHECKPOINT = "checkpoint.safetensors"
BEST_MODEL = "model.safetensors"
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
    """Train a model; returns the path of the best model."""
    if options.loss not in LOSSES:
        raise LandmarkError(None, f"--loss {options.loss}: expected one of {', '.join(LOSSES)}")
    if options.schedule not in SCHEDULES:
        raise LandmarkError(None, f"--schedule {options.schedule}: expected one of {', '.join(SCHEDULES)}")
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


def _train(options: TrainOptions, rank: int, local_rank: int, world: int) -> Path:
    run = _setup(options, rank, local_rank, world)
    for epoch in range(run.state["epoch"] + 1, options.epochs):
        if run.state["finished"]:
            break
        started = time.monotonic()
        train_loss = _train_epoch(run, epoch)
        val = _validate(run.model, run.val_set, run.device) if run.main else {}
        _end_epoch(run, epoch, train_loss, val, started)
    run.progress.close()
    if run.writer is not None:
        run.writer.close()
    if run.main and run.splits["test"]:
        _evaluate_test_split(run.output / BEST_MODEL, run.splits["test"], run.device)
    if world > 1:
        dist.barrier()
    return run.output / BEST_MODEL


def _setup(options: TrainOptions, rank: int, local_rank: int, world: int) -> _Run:
    """Data, model, optimizer and loop state, restored from the checkpoint with --resume."""
    main = rank == 0
    output = check_writable_dir(options.output)
    device = pick_device(options.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    schema = load_schema(options.schema)
    cases = discover_cases(options.dataset)
    for case in cases:  # fail on bad annotations before any training
        read_landmarks(case.landmarks, schema)
    splits = split_cases(cases, options.val_fraction, options.test_fraction, options.seed)
    if not splits["train"]:
        raise LandmarkError(options.dataset, "no training cases after the train/val/test split")

    if options.synthesis:
        model, train_set, val_set = _synthesis_setup(options, schema, splits)
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

    state = {"epoch": -1, "best_mre": math.inf, "best_epoch": -1, "stale_epochs": 0, "finished": False}
    checkpoint = output / CHECKPOINT
    if options.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, options, model.network, optimizer, scheduler)
    elif options.resume:
        raise LandmarkError(checkpoint, "--resume given but no checkpoint exists in the output folder")
    elif checkpoint.exists():
        raise LandmarkError(checkpoint, "a previous run is here; pass --resume to continue it or choose another output")
    if main:
        atomic_write_text(output / "splits.json", json.dumps(
            {s: [c.name for c in splits[s]] for s in splits}, indent=2))
    return _Run(options, output, device, world, main, splits, model, network, train_set, val_set, sampler, loader,
                optimizer, scheduler, scaler, amp_dtype, use_amp, state, Progress(options.progress, enabled=main),
                _tensorboard(output / "tensorboard") if main else None)


SCHEDULES = ("plateau", "cosine")


def _scheduler(optimizer, options: TrainOptions):
    if options.schedule == "cosine":  # a short CPU budget ends with the smallest steps, not mid-plateau
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, options.epochs),
                                                          eta_min=options.lr / 100)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(2, options.patience // 3))


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
        run.model.save(run.output / BEST_MODEL)
    row = {"epoch": epoch + 1, "train_loss": train_loss, "val_mre_mm": val_mre,
           "val_sdr_2mm": val.get("sdr_2mm"), "val_sdr_4mm": val.get("sdr_4mm"),
           "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - started, 3)}
    _append_csv(run.output / "log.csv", row)
    if run.writer is not None:
        for key, value in row.items():
            if key != "epoch" and value is not None:
                run.writer.add_scalar(key, value, epoch + 1)
        run.writer.flush()
    save_checkpoint(run.output / CHECKPOINT, options, run.model.network, run.optimizer, run.scheduler, state)
    run.progress.message(f"epoch {epoch + 1}: loss {train_loss:.4g}, validation MRE {val_mre:.3f} mm"
                         + (" (best)" if improved else ""))


def _synthesis_setup(options: TrainOptions, schema, splits):
    """The generalising recipe: the first training case is the reference frame (its 3 mm copy and the
    landmark region go into the model file); every case is aligned to it, split into tissue classes, and
    drawn from by synth.py. (Starting the refining stages at the reference's landmarks, ``model.prior``,
    measured worse than the coarse stage on the recipe's calibration scans, so the recipe does not.) Validation: a fixed set of synthetic samples from the validation cases (or,
    with one case, from the training case with other seeds)."""
    from .align import align, landmark_region, make_reference
    from .fileio import read_volume
    from .synth import SourceCase, SynthesisConfig, SynthesisDataset, reference_geometry

    synthesis = SynthesisConfig.load(options.synthesis)
    first = splits["train"][0]
    first_image = read_volume(first.image)
    first_landmarks = read_landmarks(first.landmarks, schema)
    reference = make_reference(first_image)
    region = landmark_region(reference, first_landmarks)
    geometry = reference_geometry(first_landmarks, options.spacing)

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
    model = LandmarkModel.create(options.model_config(geometry), schema, reference, region)
    mirror = schema.mirror_indices()
    train_set = SynthesisDataset(train_sources, geometry, mirror, synthesis, options.seed, options.samples_per_epoch)
    val_set = SynthesisDataset(val_sources, geometry, mirror, synthesis, options.seed + 1_000_003,
                               max(8, 4 * len(val_sources)), cache=True)
    return model, train_set, val_set


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



def _evaluate_test_split(model_path: Path, cases, device) -> None:
    """Score the best model on the held-out test split and store the result in its metadata."""
    from .detect import detect_image
    from .fileio import read_volume
    from .modelfile import load_model

    model = load_model(model_path, device)
    errors = [radial_errors(detect_image(model, read_volume(c.image), device), read_landmarks(c.landmarks, model.schema))
              for c in cases]
    model.metrics["test"] = summarize(np.concatenate(errors))
    model.save(model_path)


def _training_summary(options: TrainOptions, splits, epoch: int) -> dict:
    # The dataset's name only: a model file must not record local folders (user or patient names).
    summary = {"dataset": Path(options.dataset).name, "cases": {s: len(v) for s, v in splits.items()},
               "epochs_trained": epoch + 1, "loss": options.loss, "alpha": options.alpha, "lr": options.lr,
               "schedule": options.schedule,
               "batch_size": options.batch_size, "seed": options.seed, "augment": options.augment or None,
               "torch": torch.__version__}
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


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional: the CSV log always exists
        return None
    return SummaryWriter(str(folder))
