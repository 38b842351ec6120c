"""Training checkpoints: one ``.safetensors`` file with the weights, Adam moments and RNG state as tensors
and everything else (loop state, the run's options, a fingerprint of its dataset, optimizer and scheduler
settings) as JSON in its header. Written atomically after every epoch; nothing is ever unpickled."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from .errors import LandmarkError
from .fileio import atomic_write_bytes

FORMAT = "LandmarkDetectionLib.checkpoint"
# Options that must not change between a run and its --resume. The others may: --epochs, --patience,
# --workers, --amp, and the dataset's path when its contents are unchanged (the fingerprint says so).
FIXED_ON_RESUME = ("schema", "architecture", "channels", "blocks_per_stage", "dropout", "scales_mm", "patch_sizes",
                   "train_patch_landmarks",
                   "size", "spacing", "loss", "alpha", "sigma_mm", "lr", "schedule", "batch_size", "seed", "val_fraction",
                   "test_fraction", "augment", "synthesis", "samples_per_epoch", "val_samples", "ema_decay", "init_from",
                   "recipe")
# Options of one invocation, never stored: where and how this process runs.
NOT_STORED = ("output", "resume", "progress", "device")


def options_record(options) -> dict:
    """The options a checkpoint stores (all but NOT_STORED), tuples as lists: --resume takes from here
    every option the command line does not give."""
    record = dataclasses.asdict(options)
    if record["dataset"]:  # found again from another working folder
        record["dataset"] = str(Path(record["dataset"]).resolve())
    return {key: (list(v) if isinstance(v, tuple) else v) for key, v in record.items() if key not in NOT_STORED}


def save_checkpoint(path, options, network, optimizer, scheduler, state, dataset_fingerprint: str,
                    ema=None) -> None:
    """Weights (and their moving average, ``ema``), optimizer moments and RNG state as tensors; everything
    else as JSON. No pickle."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema/{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
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
    metadata = {"format": FORMAT, "state": json.dumps(state),
                "options": json.dumps(options_record(options)), "dataset": dataset_fingerprint,
                "param_groups": json.dumps(optimizer_state["param_groups"]),
                "optimizer_scalars": json.dumps(scalars), "scheduler": json.dumps(scheduler.state_dict())}
    atomic_write_bytes(path, save_tensors(tensors, metadata=metadata))


def read_checkpoint(path) -> dict:
    """The header alone (no tensors): {"options": stored options, "state": loop state, "dataset":
    fingerprint or None for checkpoints older than fingerprints}."""
    metadata = _open(path, tensors=False)[0]
    try:
        record = {"options": json.loads(metadata["options"]), "state": json.loads(metadata["state"]),
                  "dataset": metadata.get("dataset")}
        if not isinstance(record["options"], dict) or not isinstance(record["state"], dict):
            raise ValueError("options and state must be JSON objects")
    except (KeyError, ValueError) as error:
        raise LandmarkError(path, f"checkpoint is damaged ({type(error).__name__}: {error})") from None
    return record


def check_resume(path, saved: dict, options, dataset_fingerprint: str) -> None:
    """Refuse a --resume whose fixed options or dataset differ from the interrupted run's."""
    defaults = options_record(type(options)(dataset="", output=""))  # options added after the checkpoint was written
    current = options_record(options)
    changed = [k for k in FIXED_ON_RESUME if saved["options"].get(k, defaults[k]) != current[k]]
    if changed:
        raise LandmarkError(path, f"--resume with changed options: {', '.join(changed)} (they must match the "
                                  "interrupted run; leave them out to use the stored ones)")
    if saved["dataset"] is not None and saved["dataset"] != dataset_fingerprint:
        raise LandmarkError(options.dataset, "dataset changed since the run in the output folder began (other cases "
                                             "or landmark files); --resume needs the same data")


def load_checkpoint(path, network, optimizer, scheduler, ema=None) -> dict:
    """Restore weights, optimizer, scheduler, RNG state and the weights' moving average (when ``ema`` is
    given); returns the loop state."""
    metadata, tensors = _open(path, tensors=True)
    try:
        if ema is not None:
            ema.load_state_dict({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
        return _restore(metadata, tensors, network, optimizer, scheduler)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:  # a damaged or foreign state
        first = " ".join(str(error).split())[:200]
        raise LandmarkError(path, f"checkpoint is damaged ({type(error).__name__}: {first})") from None


def _restore(metadata, tensors, network, optimizer, scheduler) -> dict:
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


def _open(path, tensors: bool):
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            values = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except Exception as error:  # safetensors raises several types for damaged files
        raise LandmarkError(path, f"checkpoint is damaged ({error})") from None
    if metadata.get("format") != FORMAT:
        raise LandmarkError(path, "not a training checkpoint of this program")
    return metadata, values
