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
class UncertaintyOptions:
    passes: int = 50
    shift_mm: float = 5.0  # locnet: uniform shift of the finest crops
    level: float = 0.9  # confidence level of the ellipsoids
    flag_mm: float = 5.0  # flag landmarks whose longest semi-axis exceeds this
    seed: int = 0


@dataclass
class Detection:
    name: str
    landmarks_ras: np.ndarray  # (K, 3); with uncertainty, the mean of the passes
    source: Path | None = None
    uncertainty: object = None  # uncertainty.Uncertainty when requested


def predict_indices(model: LandmarkModel, batch: torch.Tensor) -> torch.Tensor:
    """(B, K, 3) voxel indices of the landmarks in the model's input grid, for a (B, 1, D, H, W) batch."""
    network = model.network
    if hasattr(network, "predict_indices"):
        return network.predict_indices(batch)
    from .heatmaps import soft_argmax, spatial_softmax
    return soft_argmax(spatial_softmax(network(batch)))


def detect_image(model: LandmarkModel, image: sitk.Image, device: torch.device) -> np.ndarray:
    """The (K, 3) RAS landmarks of one volume."""
    device = torch.device(device)
    array, grid = prepare(image, model.config.geometry)
    model.network.eval()
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        indices = predict_indices(model, torch.from_numpy(array)[None, None].to(device))
    return grid.to_ras(indices[0].float().cpu().numpy().astype(np.float64))


def output_paths(output_dir: Path, name: str, uncertainty: bool = False) -> dict[str, Path]:
    paths = {"markups": output_dir / f"{name}.mrk.json", "csv": output_dir / f"{name}.csv"}
    if uncertainty:
        paths.update(uncertainty_json=output_dir / f"{name}.uncertainty.json",
                     uncertainty_csv=output_dir / f"{name}.uncertainty.csv")
    return paths


def write_detection(model: LandmarkModel, detection: Detection, output_dir: Path, overwrite: bool = False,
                    extra_columns: dict | None = None, options: UncertaintyOptions | None = None) -> dict[str, Path]:
    paths = output_paths(output_dir, detection.name, detection.uncertainty is not None)
    if not overwrite:
        for path in paths.values():
            if path.exists():
                raise LandmarkError(path, "already exists; pass --overwrite to replace it")
    if detection.source is not None:
        source = detection.source.resolve()
        if any(p.resolve() == source for p in paths.values()):
            raise LandmarkError(detection.source, "output would overwrite the input")
    extra_columns = dict(extra_columns or {})
    if detection.uncertainty is not None:
        from .uncertainty import write_uncertainty

        options = options or UncertaintyOptions()
        semi = detection.uncertainty.max_semi_axis()
        extra_columns.update(max_semi_axis_mm=semi, flagged=(semi > options.flag_mm).astype(int))
        method = "finest-crop shifts" if model.config.architecture == "locnet" else "Monte Carlo dropout"
        write_uncertainty(output_dir / detection.name, model, detection.uncertainty, options.flag_mm,
                          options.passes, method)
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


def detect_volume(model: LandmarkModel, image: sitk.Image, device: torch.device, name: str,
                  uncertainty: UncertaintyOptions | None = None, source: Path | None = None) -> Detection:
    if uncertainty is None or uncertainty.passes <= 0:
        return Detection(name, detect_image(model, image, device), source)
    from .uncertainty import detect_with_uncertainty

    result = detect_with_uncertainty(model, image, device, uncertainty.passes, uncertainty.shift_mm,
                                     uncertainty.level, uncertainty.seed)
    return Detection(name, result.mean, source, result)


def detect_path(model: LandmarkModel, path: Path, device: torch.device,
                uncertainty: UncertaintyOptions | None = None) -> Detection:
    return detect_volume(model, read_volume(path), device, stem(path), uncertainty, path)
