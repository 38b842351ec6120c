"""Detection: every forward pass of a model over a volume, with or without test-time noise injection,
and the loop over many volumes that the CLI and Scripts/batch_detect.py share.

A model that carries a reference (align.py) first aligns the scan to it; the network then sees the head
in the reference frame, and its predictions map back into the scan exactly. With uncertainty, a model
that also carries its registration prior (where the alignment puts each landmark, and how far real
anatomy strays from there: ``calibrate``) fuses the two estimates by their precisions (uncertainty.fuse),
so a landmark the network is unsure of leans on the registration, and one it is sure of does not. A scan
where the two disagree more than on the calibration scans gets wider ellipsoids (innovation_inflation), and
a model calibrated on exact truths adds how far raters' placements stray (the schema's rater_sd_mm).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk
import torch

from .align import AlignedGrid, Alignment, align
from .data import InputVolume
from .errors import LandmarkError
from .fileio import (atomic_write_text, check_outputs, landmarks_csv_text, read_volume, stem, write_markups_json,
                     written_together)
from .modelfile import LandmarkModel
from .preprocess import model_grid, normalize_intensity, resample_to_grid
from .uncertainty import Uncertainty, fuse, innovation, innovation_inflation, summarize_samples, write_uncertainty


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
    uncertainty: Uncertainty | None = None  # when requested
    alignment: Alignment | None = None  # for models that align scans first

    @property
    def out_of_distribution(self) -> bool:
        return self.alignment is not None and self.alignment.out_of_distribution

    def flagged(self, flag_mm: float) -> np.ndarray:
        """Which landmarks are flagged: an ellipsoid larger than ``flag_mm``, or every landmark of an
        out-of-distribution input."""
        flags = np.zeros(len(self.landmarks_ras), bool)
        if self.uncertainty is not None:
            flags |= self.uncertainty.max_semi_axis() > flag_mm
        return flags | self.out_of_distribution


@dataclass
class ModelInput:
    array: np.ndarray  # (D, H, W) float32, normalised
    grid: object  # geometry.Grid or align.AlignedGrid: ``to_ras(ijk)`` gives scan RAS
    alignment: Alignment | None = None

    def tensor(self, device) -> torch.Tensor:
        return torch.from_numpy(self.array)[None, None].to(device)


def model_input(model: LandmarkModel, image: sitk.Image) -> ModelInput:
    """The network's input for ``image``: resampled into the model's grid (after alignment to the model's
    reference, for models that carry one) and intensity-normalised."""
    geometry = model.config.geometry
    if model.reference is None:
        grid = model_grid(image, geometry)
        return ModelInput(normalize_intensity(resample_to_grid(image, grid), geometry.percentiles), grid)
    alignment = align(image, model.reference, model.region)
    grid = model_grid(None, geometry)
    array = normalize_intensity(resample_to_grid(image, grid, alignment.sitk_transform()), geometry.percentiles)
    return ModelInput(array, AlignedGrid(grid, alignment), alignment)


def predict(model: LandmarkModel, x: torch.Tensor, device) -> torch.Tensor:
    """(B, K, 3) voxel indices for an input batch (B, 1, D, H, W), in eval mode (mixed precision on CUDA);
    a model with ``test_time_mirror`` averages its reading of the input and of its mirror image."""
    device = torch.device(device)
    model.network.eval()
    with torch.inference_mode(), torch.autocast(device.type, enabled=device.type == "cuda"):
        indices = model.network.predict_indices(x)
        if model.config.test_time_mirror:
            indices = (indices + unmirror(model, model.network.predict_indices(mirror(x)))) / 2
        return indices


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The input mirrored left-right about its grid's centre plane (the i axis: last of D, H, W)."""
    return torch.flip(x, dims=[-1])


def unmirror(model: LandmarkModel, indices: torch.Tensor) -> torch.Tensor:
    """Landmark indices (..., K, 3) read on a mirrored input, back in the input's grid: the i index
    reflected, and each landmark taken from its left-right counterpart (the schema's mirror pairs)."""
    width = model.config.geometry.size[0]
    reflected = torch.cat([(width - 1) - indices[..., :1], indices[..., 1:]], dim=-1)
    return reflected[..., model.schema.mirror_indices(), :]


def detect_image(model: LandmarkModel, image: sitk.Image, device) -> np.ndarray:
    """The (K, 3) RAS landmarks of one volume."""
    return detect_volume(model, image, device, "").landmarks_ras


def sample_passes(model: LandmarkModel, prepared: ModelInput, device, options: UncertaintyOptions) -> Uncertainty:
    """Test-time noise injection: ``options.passes`` stochastic passes, summarised per landmark. A model
    with ``test_time_mirror`` runs half of them on the mirrored input: there its left landmarks come from
    the network's right-side outputs, a second opinion whose errors are largely its own (on the bundled
    AFIDs model's calibration scans averaging the two halves took the network from 2.92 to 2.61 mm at the
    same cost, and their disagreement widens the spread where the network is unsure)."""
    generator = torch.Generator().manual_seed(options.seed)
    network, x = model.network, prepared.tensor(device)
    network.eval()
    with torch.inference_mode():
        half = options.passes // 2 if model.config.test_time_mirror else 0
        if half:
            indices = torch.cat([network.sample_indices(x, options.passes - half, generator, options.shift_mm),
                                 unmirror(model, network.sample_indices(mirror(x), half, generator, options.shift_mm))])
        else:
            indices = network.sample_indices(x, options.passes, generator, options.shift_mm)
    samples = prepared.grid.to_ras(indices[:, 0].double().cpu().numpy())
    return reported_uncertainty(model, summarize_samples(samples, options.level, model.config.uncertainty_scale),
                                prepared.alignment)


def reported_uncertainty(model: LandmarkModel, network: Uncertainty, alignment: Alignment | None) -> Uncertainty:
    """What detection reports from the network's recalibrated spread: for a model with a registration
    prior, the two fused (uncertainty.fuse), the ellipsoids recalibrated and widened where the two disagree
    more than on the calibration scans (uncertainty.innovation_inflation); for a model calibrated on exact
    truths, the schema's rater spread added."""
    result = network
    prior = registration_prior(model, alignment)
    if prior is not None:
        inflation = innovation_inflation(innovation(network.mean, network.covariance, *prior),
                                         model.config.innovation_reference)
        mean, covariance = fuse(network.mean, network.covariance, *prior)
        result = Uncertainty(mean, covariance * model.config.fused_scale * inflation, network.level, network.samples,
                             inflation)
    if model.config.rater_spread:
        result = replace(result, covariance=result.covariance + model.schema.rater_covariance())
    return result


def registration_prior(model: LandmarkModel, alignment: Alignment | None):
    """Where the alignment alone puts each landmark in the scan, and its covariance there ((K, 3), (K, 3, 3)
    RAS), for models that carry their prior; else None."""
    if model.prior_covariance is None or alignment is None:
        return None
    linear = alignment.matrix[:3, :3]
    return alignment.to_scan(model.prior), linear @ model.prior_covariance @ linear.T


def detect_volume(model: LandmarkModel, image: sitk.Image, device, name: str,
                  uncertainty: UncertaintyOptions | None = None, source: Path | None = None) -> Detection:
    prepared = model_input(model, image)
    if uncertainty is None or uncertainty.passes <= 0:
        indices = predict(model, prepared.tensor(device), device)
        landmarks = prepared.grid.to_ras(indices[0].float().cpu().numpy().astype(np.float64))
        return Detection(name, landmarks, source, None, prepared.alignment)
    result = sample_passes(model, prepared, device, uncertainty)
    return Detection(name, result.mean, source, result, prepared.alignment)


def detect_path(model: LandmarkModel, path: Path, device, uncertainty: UncertaintyOptions | None = None) -> Detection:
    return detect_volume(model, read_volume(path), device, stem(path), uncertainty, path)


# ------------------------------------------------------------------------------------------------ output
def output_paths(output_dir: Path, name: str, uncertainty: bool = False) -> dict[str, Path]:
    paths = {"markups": output_dir / f"{name}.mrk.json", "csv": output_dir / f"{name}.csv"}
    if uncertainty:
        paths.update(uncertainty_json=output_dir / f"{name}.uncertainty.json",
                     uncertainty_csv=output_dir / f"{name}.uncertainty.csv")
    return paths


def write_detection(model: LandmarkModel, detection: Detection, output_dir: Path, overwrite: bool = False,
                    extra_columns: dict | None = None, options: UncertaintyOptions | None = None) -> dict[str, Path]:
    paths = output_paths(output_dir, detection.name, detection.uncertainty is not None)
    check_outputs(paths.values(), [detection.source], overwrite)
    options = options or UncertaintyOptions()
    extra_columns = dict(extra_columns or {})
    if detection.uncertainty is not None:
        extra_columns.update(max_semi_axis_mm=detection.uncertainty.max_semi_axis())
    if detection.uncertainty is not None or detection.alignment is not None:
        extra_columns.update(flagged=detection.flagged(options.flag_mm).astype(int))
    with written_together():
        atomic_write_text(paths["csv"], landmarks_csv_text(model.schema, detection.landmarks_ras, extra_columns))
        write_markups_json(paths["markups"], model.schema, detection.landmarks_ras,
                           name=f"{detection.name} landmarks")
        if detection.uncertainty is not None:
            write_uncertainty(output_dir / detection.name, model.schema, detection.uncertainty, options.flag_mm,
                              options.passes, model.network.uncertainty_method, model.config.uncertainty_scale,
                              detection.flagged(options.flag_mm))
    return paths


def uncertainty_passes(model: LandmarkModel, asked: int | None = None) -> int:
    """The uncertainty passes to run: those ``asked`` for, else what the model needs. A model that fuses
    its network with its registration prior needs them to fuse (the count it was calibrated with); any
    other model runs without."""
    if asked is not None:
        return asked
    if model.prior_covariance is None:
        return 0
    return int((model.metrics.get("calibration") or {}).get("passes", UncertaintyOptions.passes))


def calibration_mismatch(model: LandmarkModel, options: UncertaintyOptions) -> str | None:
    """A warning when uncertainty is asked with other noise settings than the model's calibration was
    fitted with (its covariance scale holds for those only), or not asked of a model that fuses its
    network with its registration prior (fusion needs the network's spread), else None."""
    fitted = model.metrics.get("calibration") or {}
    if options.passes <= 0 and model.prior_covariance is not None:
        return (f"without uncertainty passes this model gives its network's estimate alone, not fused with its "
                f"registration prior (pass --uncertainty {uncertainty_passes(model)})")
    if options.passes <= 0 or not fitted.get("passes"):
        return None
    asked = {"passes": options.passes, "shift_mm": options.shift_mm}
    differ = [f"{key} {asked[key]:g} (calibrated with {fitted[key]:g})" for key in asked
              if key in fitted and float(fitted[key]) != float(asked[key])]
    if not differ:
        return None
    return (f"the uncertainty scale was calibrated for other noise settings: {', '.join(differ)}; the ellipsoids' "
            f"coverage is only known for those (pass --uncertainty {fitted['passes']})")


def detection_summary(model: LandmarkModel, detection: Detection, options: UncertaintyOptions) -> str:
    """One line for people: how many landmarks, how many flagged, and any out-of-distribution warning."""
    text = f"{len(model.schema)} landmarks"
    if detection.uncertainty is not None or detection.out_of_distribution:
        text += f", {int(detection.flagged(options.flag_mm).sum())} flagged uncertain"
    if detection.out_of_distribution:
        text += (f"; does not look like the head MRI the model knows (out-of-distribution score "
                 f"{1 - detection.alignment.similarity:.2f}); every landmark is flagged")
    return text


def detect_many(model: LandmarkModel, volumes: list, output_dir: Path, device,
                options: UncertaintyOptions | None = None, overwrite: bool = False) -> Iterator:
    """Detect and write every volume (paths, or data.input_volumes' InputVolumes with their output names
    and subfolders); a failing volume is reported and the others go on. Yields (volume, detection or None,
    error or None) as each finishes."""
    for volume in volumes:
        item = volume if isinstance(volume, InputVolume) else InputVolume(Path(volume), stem(volume))
        try:
            detection = detect_volume(model, item.read(), device, item.output_name, options, item.path)
            write_detection(model, detection, Path(output_dir) / item.subfolder, overwrite, options=options)
        except LandmarkError as error:
            yield volume, None, error
            continue
        except (OSError, RuntimeError, ValueError) as error:  # readers and SimpleITK on damaged input
            yield volume, None, LandmarkError(volume, f"could not be processed ({' '.join(str(error).split())})")
            continue
        yield volume, detection, None
