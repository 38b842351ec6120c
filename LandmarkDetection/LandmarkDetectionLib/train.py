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
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from .data import LandmarkDataset, discover_cases, split_cases
from .detect import predict_indices
from .errors import LandmarkError
from .io import atomic_write_bytes, atomic_write_text, check_writable_dir, read_landmarks
from .losses import LOSSES
from .metrics import radial_errors, summarize
from .modelfile import LandmarkModel, ModelConfig
from .preprocess import InputGeometry
from .runtime import Progress, pick_device
from .schema import load_schema

CHECKPOINT = "checkpoint.safetensors"
BEST_MODEL = "model.safetensors"
# Options that must not change between a run and its --resume.
_FIXED_ON_RESUME = ("schema", "architecture", "channels", "blocks_per_stage", "dropout", "scales_mm", "patch_sizes",
                    "size", "spacing", "loss",
                    "alpha", "sigma_mm", "lr", "batch_size", "seed", "val_fraction", "test_fraction", "augment")


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
    resume: bool = False
    progress: str = "bar"
    extra_metadata: dict = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        if self.architecture == "locnet":
            network = {"channels": list(self.channels), "scales_mm": list(self.scales_mm),
                       "patch_sizes": list(self.patch_sizes)}
        else:
            network = {"channels": list(self.channels), "blocks_per_stage": self.blocks_per_stage,
                       "dropout": self.dropout}
        return ModelConfig(self.architecture, network, InputGeometry(tuple(self.size), tuple(self.spacing)),
                           self.sigma_mm)


def _distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world


def train(options: TrainOptions) -> Path:
    """Train a model; returns the path of the best model."""
    if options.loss not in LOSSES:
        raise LandmarkError(None, f"--loss {options.loss}: expected one of {', '.join(LOSSES)}")
    rank, local_rank, world = _distributed()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and options.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    try:
        return _train(options, rank, local_rank, world)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(options: TrainOptions, rank: int, local_rank: int, world: int) -> Path:
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

    config = options.model_config()
    torch.manual_seed(options.seed)
    model = LandmarkModel.create(config, schema)
    model.network.to(device)
    augmentation = None
    if options.augment:
        from .augment import load_policies  # the realistic MRI augmentation of issue 3
        augmentation = load_policies(options.augment)
    train_set = LandmarkDataset(splits["train"], schema, config.geometry, augmentation, options.seed)
    val_set = LandmarkDataset(splits["val"] or splits["train"], schema, config.geometry)
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
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5,
                                                           patience=max(2, options.patience // 3))
    use_amp = options.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    state = {"epoch": -1, "best_mre": math.inf, "best_epoch": -1, "stale_epochs": 0, "finished": False}
    checkpoint = output / CHECKPOINT
    if options.resume and checkpoint.exists():
        state = _load_checkpoint(checkpoint, options, model.network, optimizer, scheduler)
    elif options.resume:
        raise LandmarkError(checkpoint, "--resume given but no checkpoint exists in the output folder")
    elif checkpoint.exists():
        raise LandmarkError(checkpoint, "a previous run is here; pass --resume to continue it or choose another output")

    progress = Progress(options.progress, enabled=main)
    writer = _tensorboard(output / "tensorboard") if main else None
    if main:
        atomic_write_text(output / "splits.json", json.dumps(
            {s: [c.name for c in splits[s]] for s in splits}, indent=2))
    spacing = config.geometry.spacing
    steps = len(loader)
    for epoch in range(state["epoch"] + 1, options.epochs):
        if state["finished"]:
            break
        started = time.monotonic()
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        network.train()
        progress.start(f"train epoch {epoch + 1}/{options.epochs}", steps)
        losses = []
        for step, (image, target, mask, _) in enumerate(loader, start=1):
            image, target, mask = image.to(device), target.to(device), mask.to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                prediction = network(image)  # through the DDP wrapper, so gradients are synchronised
            loss = model.network.loss(prediction, target, mask, spacing, options.loss, options.alpha,
                                      config.sigma_mm, progress=epoch / max(1, options.epochs - 1))
            if not torch.isfinite(loss):
                raise LandmarkError(options.output, f"training diverged: the loss is {float(loss)} at epoch "
                                                    f"{epoch + 1}, step {step}; try a lower --lr")
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            progress.update(step, loss=losses[-1], metric=None if math.isinf(state["best_mre"]) else state["best_mre"],
                            epoch=epoch + 1)
        train_loss = _mean_across_ranks(float(np.mean(losses)), device, world)
        val = _validate(model, val_set, device) if main else {}
        val_mre = _broadcast(val.get("mre_mm", math.nan), device, world)
        scheduler.step(val_mre)
        improved = val_mre < state["best_mre"]
        state.update(epoch=epoch, stale_epochs=0 if improved else state["stale_epochs"] + 1)
        if improved:
            state.update(best_mre=val_mre, best_epoch=epoch)
        state["finished"] = state["stale_epochs"] >= options.patience or epoch + 1 >= options.epochs
        if main:
            if improved:
                model.training = _training_summary(options, splits, epoch)
                model.metrics = {"validation": val, "best_epoch": epoch + 1}
                model.save(output / BEST_MODEL)
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_mre_mm": val_mre,
                   "val_sdr_2mm": val.get("sdr_2mm"), "val_sdr_4mm": val.get("sdr_4mm"),
                   "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.monotonic() - started, 3)}
            _append_csv(output / "log.csv", row)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch" and value is not None:
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            _save_checkpoint(checkpoint, options, model.network, optimizer, scheduler, state)
            progress.message(f"epoch {epoch + 1}: loss {train_loss:.4g}, validation MRE {val_mre:.3f} mm"
                             + (" (best)" if improved else ""))
    progress.close()
    if writer is not None:
        writer.close()
    if main and splits["test"]:
        _evaluate_test_split(output / BEST_MODEL, splits["test"], device)
    if world > 1:
        dist.barrier()
    return output / BEST_MODEL


def _validate(model: LandmarkModel, dataset: LandmarkDataset, device) -> dict:
    """Radial errors in mm of the current network on a dataset (eval mode), summarised."""
    was_training = model.network.training
    model.network.eval()
    errors = []
    with torch.inference_mode():
        for index in range(len(dataset)):
            image, target, mask, index_to_ras = dataset[index]
            pred = predict_indices(model, image[None].to(device))[0].float().cpu()
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
    from .io import read_volume
    from .modelfile import load_model

    model = load_model(model_path, device)
    errors = [radial_errors(detect_image(model, read_volume(c.image), device), read_landmarks(c.landmarks, model.schema))
              for c in cases]
    model.metrics["test"] = summarize(np.concatenate(errors))
    model.save(model_path)


def _training_summary(options: TrainOptions, splits, epoch: int) -> dict:
    summary = {"dataset": str(options.dataset), "cases": {s: len(v) for s, v in splits.items()},
               "epochs_trained": epoch + 1, "loss": options.loss, "alpha": options.alpha, "lr": options.lr,
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


# ------------------------------------------------------------------------------------------- checkpoints
def _options_record(options: TrainOptions) -> dict:
    record = dataclasses.asdict(options)
    return {key: (list(v) if isinstance(v, tuple) else v) for key, v in record.items() if key in _FIXED_ON_RESUME}


def _save_checkpoint(path, options, network, optimizer, scheduler, state) -> None:
    """Weights, optimizer moments and RNG state as tensors; everything else as JSON. No pickle."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    scalars = {}
    for index, param_state in optimizer_state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    metadata = {"format": "LandmarkDetectionLib.checkpoint", "state": json.dumps(state),
                "options": json.dumps(_options_record(options)),
                "param_groups": json.dumps(optimizer_state["param_groups"]),
                "optimizer_scalars": json.dumps(scalars), "scheduler": json.dumps(scheduler.state_dict())}
    atomic_write_bytes(path, save_tensors(tensors, metadata=metadata))


def _load_checkpoint(path, options, network, optimizer, scheduler) -> dict:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for damaged files
        raise LandmarkError(path, f"checkpoint is damaged ({error})") from None
    if metadata.get("format") != "LandmarkDetectionLib.checkpoint":
        raise LandmarkError(path, "not a training checkpoint of this program")
    saved = json.loads(metadata["options"])
    changed = [k for k, v in _options_record(options).items() if saved.get(k) != v]
    if changed:
        raise LandmarkError(path, f"--resume with changed options: {', '.join(changed)} (they must match the "
                                  "interrupted run)")
    network.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    param_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            param_state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata["optimizer_scalars"]).items():
        index, name = key.split("/", 1)
        param_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": param_state, "param_groups": json.loads(metadata["param_groups"])})
    scheduler.load_state_dict(json.loads(metadata["scheduler"]))
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return json.loads(metadata["state"])
