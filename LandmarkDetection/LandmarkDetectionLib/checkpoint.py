"""Training checkpoints: one ``.safetensors`` file with the weights, Adam moments and RNG state as tensors
and everything else (loop state, the options that must not change on --resume, optimizer and scheduler
settings) as JSON in its header. Written atomically after every epoch; nothing is ever unpickled."""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors import safe_open
from safetensors.torch import save as save_tensors

from .errors import LandmarkError
from .fileio import atomic_write_bytes

FORMAT = "LandmarkDetectionLib.checkpoint"
# Options that must not change between a run and its --resume.
FIXED_ON_RESUME = ("schema", "architecture", "channels", "blocks_per_stage", "dropout", "scales_mm", "patch_sizes",
                   "size", "spacing", "loss", "alpha", "sigma_mm", "lr", "schedule", "batch_size", "seed", "val_fraction",
                   "test_fraction", "augment", "synthesis", "samples_per_epoch")


def options_record(options) -> dict:
    record = dataclasses.asdict(options)
    return {key: (list(v) if isinstance(v, tuple) else v) for key, v in record.items() if key in FIXED_ON_RESUME}


def save_checkpoint(path, options, network, optimizer, scheduler, state) -> None:
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
    metadata = {"format": FORMAT, "state": json.dumps(state),
                "options": json.dumps(options_record(options)),
                "param_groups": json.dumps(optimizer_state["param_groups"]),
                "optimizer_scalars": json.dumps(scalars), "scheduler": json.dumps(scheduler.state_dict())}
    atomic_write_bytes(path, save_tensors(tensors, metadata=metadata))


def load_checkpoint(path, options, network, optimizer, scheduler) -> dict:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for damaged files
        raise LandmarkError(path, f"checkpoint is damaged ({error})") from None
    if metadata.get("format") != FORMAT:
        raise LandmarkError(path, "not a training checkpoint of this program")
    saved = json.loads(metadata["options"])
    defaults = options_record(type(options)(dataset="", output=""))  # options added after the checkpoint was written
    changed = [k for k, v in options_record(options).items() if saved.get(k, defaults[k]) != v]
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
