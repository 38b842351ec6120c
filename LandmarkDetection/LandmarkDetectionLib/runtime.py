"""Device choice and progress reporting shared by the long-running commands."""

from __future__ import annotations

import json
import sys
import time

import torch
from tqdm import tqdm


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when available, otherwise CPU; ``requested`` (cpu, cuda, cuda:1, auto) overrides."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested}: unknown device; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {requested}: unsupported device type; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {requested}: MPS is not available on this machine")
    return device


class Progress:
    """A tqdm bar for people (stderr) or, in ``json`` mode, one JSON object per line on stdout for the
    Slicer GUI: {"stage", "step", "total", "loss", "metric", "eta", ...}."""

    def __init__(self, mode: str = "bar", enabled: bool = True):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode if enabled else "none"
        self._bar = None
        self._stage, self._total, self._start = "", 0, time.monotonic()

    def start(self, stage: str, total: int) -> None:
        self.close()
        self._stage, self._total, self._start = stage, total, time.monotonic()
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True, leave=False)
        elif self.mode == "json":
            self.emit(step=0)

    def update(self, step: int, **values) -> None:
        if self.mode == "bar" and self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()},
                                  refresh=True)
        elif self.mode == "json":
            self.emit(step=step, **values)

    def emit(self, step: int, **values) -> None:
        elapsed = time.monotonic() - self._start
        eta = elapsed / step * (self._total - step) if step else None
        record = {"stage": self._stage, "step": step, "total": self._total, "loss": None, "metric": None,
                  "eta": None if eta is None else round(eta, 2), **values}
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.mode == "json":
            sys.stdout.write(json.dumps({"stage": self._stage, "message": text}) + "\n")
            sys.stdout.flush()
        elif self.mode == "bar":
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
