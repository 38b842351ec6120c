"""Detection: a model and a volume in, every landmark of the schema out, in RAS mm."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .errors import LandmarkError
from .io import atomic_write_text, landmarks_csv_text, read_volume, stem, write_markups_json
from .modelfile import LandmarkModel
from .preprocess import prepare


@dataclass
class Detection:
    name: str
    landmarks_ras: np.ndarray  # (K, 3)
    source: Path | None = None


def predict_indices(model: LandmarkModel, batch: torch.Tensor) -> torch.Tensor:
    """(B, K, 3) voxel indices of the landmarks in the model's input grid, for a (B, 1, D, H, W) batch."""
    network = model.network
    if hasattr(network, "predict_indices"):
        return network.predict_indices(batch)
    from .heatmaps import soft_argmax, spatial_softmax
    return soft_argmax(spatial_softmax(network(batch)))


def detect_image(model: LandmarkModel, image: sitk.Image, device: torch.device) -> np.ndarray:
    """The (K, 3) RAS landmarks of one volume."""
    array, grid = prepare(image, model.config.geometry)
    model.network.eval()
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        indices = predict_indices(model, torch.from_numpy(array)[None, None].to(device))
    return grid.to_ras(indices[0].float().cpu().numpy().astype(np.float64))


def output_paths(output_dir: Path, name: str) -> dict[str, Path]:
    return {"markups": output_dir / f"{name}.mrk.json", "csv": output_dir / f"{name}.csv"}


def write_detection(model: LandmarkModel, detection: Detection, output_dir: Path, overwrite: bool = False,
                    extra_columns: dict | None = None) -> dict[str, Path]:
    paths = output_paths(output_dir, detection.name)
    if not overwrite:
        for path in paths.values():
            if path.exists():
                raise LandmarkError(path, "already exists; pass --overwrite to replace it")
    if detection.source is not None:
        source = detection.source.resolve()
        if any(p.resolve() == source for p in paths.values()):
            raise LandmarkError(detection.source, "output would overwrite the input")
    write_markups_json(paths["markups"], model.schema, detection.landmarks_ras, name=f"{detection.name} landmarks")
    atomic_write_text(paths["csv"], landmarks_csv_text(model.schema, detection.landmarks_ras, extra_columns))
    return paths


def input_volumes(source: str | Path) -> list[Path]:
    """A volume file, a DICOM series folder, or a folder of volumes."""
    from .data import list_volumes

    source = Path(source)
    if not source.exists():
        raise LandmarkError(source, "input does not exist")
    if source.is_file():
        return [source]
    if any(p.suffix.lower() == ".dcm" for p in source.iterdir()):
        return [source]
    volumes = list_volumes(source)
    if not volumes:
        raise LandmarkError(source, "folder holds no volumes (.nii.gz, .nii, .nrrd, .mha, DICOM series)")
    return volumes


def detect_path(model: LandmarkModel, path: Path, device: torch.device) -> Detection:
    return Detection(stem(path), detect_image(model, read_volume(path), device), path)
