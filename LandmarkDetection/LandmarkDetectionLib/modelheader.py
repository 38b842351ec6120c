"""A model file's header, read without torch: the safetensors JSON header (an 8-byte little-endian length,
then JSON) holds the model's metadata. The Slicer modules use this to list a model's schema and landmarks
before their Python dependencies are installed."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import LandmarkError

FORMAT = "LandmarkDetectionLib.model"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass
class ModelHeader:
    metadata: dict[str, str]  # the raw header metadata (JSON strings)

    def _json(self, key: str, default=None):
        try:
            return json.loads(self.metadata[key]) if key in self.metadata else default
        except json.JSONDecodeError as error:
            raise LandmarkError(None, f"model metadata '{key}' is damaged ({error})") from None

    @property
    def config(self) -> dict:
        return self._json("config", {})

    @property
    def schema(self) -> dict:
        return self._json("schema", {})

    @property
    def training(self) -> dict:
        return self._json("training", {})

    @property
    def metrics(self) -> dict:
        return self._json("metrics", {})


def read_header(path: str | Path) -> ModelHeader:
    """The metadata of a model file, checked to be ours."""
    path = Path(path)
    if not path.is_file():
        raise LandmarkError(path, "model file does not exist")
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"header length {length} is implausible")
            raw = handle.read(length)
            if len(raw) < length:
                raise ValueError("header is cut short")
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        if 8 + length + max(ends, default=0) != path.stat().st_size:
            raise ValueError("the tensors do not fill the file")
    except (OSError, ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError) as error:
        raise LandmarkError(path, f"not a readable model file: truncated or not safetensors ({error})") from None
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise LandmarkError(path, "is a safetensors file but not a LandmarkDetection model (no model metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise LandmarkError(path, f"model format version {metadata.get('format_version')!r} is not supported "
                                  f"(this version reads {FORMAT_VERSION})")
    return ModelHeader(metadata)
