"""The model file: one ``.safetensors`` file, weights plus JSON metadata in its header.

The header's ``__metadata__`` holds ``format`` (``LandmarkDetectionLib.model``), ``format_version``
and JSON strings for ``config`` (architecture and options, input geometry, heatmap sigma), ``schema``
(the full landmark schema), ``training`` (data summary, intended use) and ``metrics``. Loading reads
tensors through safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from .errors import LandmarkError
from .geometry import Grid
from .modelheader import FORMAT, FORMAT_VERSION, read_header
from .fileio import atomic_write_bytes
from .models import build_network
from .preprocess import InputGeometry
from .schema import Schema, schema_from_dict

REFERENCE_IMAGE, REFERENCE_REGION, REFERENCE_LANDMARKS = "reference/image", "reference/region", "reference/landmarks"
REFERENCE_COVARIANCE = "reference/landmark_covariance"


@dataclass
class ModelConfig:
    architecture: str = "highres3dnet"
    network: dict = field(default_factory=dict)  # keyword options of the architecture
    geometry: InputGeometry = field(default_factory=InputGeometry)
    sigma_mm: float = 3.0  # width of the Gaussian heatmap target of the Mixed loss
    uncertainty_scale: float = 1.0  # covariance recalibration factor fitted by `calibrate`
    # With a registration prior: the network's scaled covariance weighs it against the prior, and this
    # factor, also fitted by `calibrate`, recalibrates the fused ellipsoids.
    fused_scale: float = 1.0
    # The network was trained on heads mirrored left-right about its grid's centre plane, their left and
    # right landmarks swapped (synth.py): detection then also reads the mirrored input (detect.py).
    test_time_mirror: bool = False
    # With a registration prior: how much the network and the prior disagree on a typical calibration scan
    # (uncertainty.innovation); a scan where they disagree more gets its ellipsoids widened by the ratio.
    innovation_reference: float | None = None
    # Calibrated on exact truths (synthetic scans of the annotated template): the fitted ellipsoids hold
    # the network's error but not how far a rater's placement strays, so detection adds the schema's
    # rater_sd_mm. Calibration on people's annotations already holds their spread.
    rater_spread: bool = False

    def to_dict(self) -> dict:
        return {"architecture": self.architecture, "network": self.network, "geometry": self.geometry.to_dict(),
                "sigma_mm": self.sigma_mm, "uncertainty_scale": self.uncertainty_scale, "fused_scale": self.fused_scale,
                "test_time_mirror": self.test_time_mirror, "innovation_reference": self.innovation_reference,
                "rater_spread": self.rater_spread}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        reference = data.get("innovation_reference")
        return cls(data["architecture"], dict(data.get("network", {})), InputGeometry.from_dict(data["geometry"]),
                   float(data.get("sigma_mm", 3.0)), float(data.get("uncertainty_scale", 1.0)),
                   float(data.get("fused_scale", 1.0)), data.get("test_time_mirror", False),
                   None if reference is None else float(reference), data.get("rater_spread", False))


@dataclass
class LandmarkModel:
    """A network with everything needed to use it: configuration, schema and provenance, and for models
    that align scans first (align.py), the reference image and the region alignment weighs."""

    network: torch.nn.Module
    config: ModelConfig
    schema: Schema
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    reference: sitk.Image | None = None
    region: sitk.Image | None = None
    # The registration prior: after alignment each landmark is expected at ``prior`` (K, 3, the reference
    # frame's landmarks) with covariance ``prior_covariance`` (K, 3, 3, mm^2, measured by ``calibrate``);
    # detection with uncertainty fuses it with the network's estimate (uncertainty.fuse).
    prior: np.ndarray | None = None
    prior_covariance: np.ndarray | None = None

    @classmethod
    def create(cls, config: ModelConfig, schema: Schema, reference: sitk.Image | None = None,
               region: sitk.Image | None = None, prior: np.ndarray | None = None) -> "LandmarkModel":
        network = build_network(config.architecture, len(schema), config.geometry, **config.network)
        return cls(network, config, schema, reference=reference, region=region, prior=prior)

    def metadata(self) -> dict[str, str]:
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "config": json.dumps(self.config.to_dict()), "schema": json.dumps(self.schema.to_dict()),
                    "training": json.dumps(self.training), "metrics": json.dumps(self.metrics)}
        if self.reference is not None:
            metadata["reference"] = json.dumps(Grid.of(self.reference).to_dict())
        return metadata

    def save(self, path: str | Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(self.network).state_dict().items()}
        if self.reference is not None:  # small: a 2 mm image (align.REFERENCE_SPACING_MM) in half precision and a byte mask
            state[REFERENCE_IMAGE] = torch.from_numpy(sitk.GetArrayFromImage(self.reference)).half()
            state[REFERENCE_REGION] = torch.from_numpy(sitk.GetArrayFromImage(self.region).astype(np.uint8))
        if self.prior is not None:
            state[REFERENCE_LANDMARKS] = torch.from_numpy(np.asarray(self.prior, np.float32))
        if self.prior_covariance is not None:
            state[REFERENCE_COVARIANCE] = torch.from_numpy(np.asarray(self.prior_covariance, np.float32))
        atomic_write_bytes(path, save_tensors(state, metadata=self.metadata()))

    def check_schema(self, other: Schema, source: str | Path) -> None:
        """Refuse data annotated with another schema than the model's."""
        if other.names != self.schema.names:
            raise LandmarkError(source, f"uses landmark schema '{other.name}' ({len(other)} landmarks) but the "
                                        f"model detects schema '{self.schema.name}' ({len(self.schema)} landmarks)")


def _unwrap(network):
    return network.module if hasattr(network, "module") else network


# Bounds of a plausible model: a damaged or hostile header is refused before any memory is allocated.
MAX_INPUT_VOXELS = 512 ** 3
MAX_OPTION_VALUE = 1024  # channels, patch sizes, blocks, scales (mm)
MAX_OPTION_LENGTH = 8  # stages


def check_config(config: ModelConfig) -> None:
    """Raise ValueError naming the first implausible value of a model configuration."""
    from .models import architecture_class

    geometry = config.geometry
    if len(geometry.size) != 3 or not all(8 <= n <= 1024 for n in geometry.size):
        raise ValueError(f"input size {list(geometry.size)} (expected three sizes of 8 to 1024 voxels)")
    if np.prod(geometry.size, dtype=np.int64) > MAX_INPUT_VOXELS:
        raise ValueError(f"input size {list(geometry.size)} exceeds {MAX_INPUT_VOXELS} voxels")
    if len(geometry.spacing) != 3 or not all(np.isfinite(v) and 0 < v <= 20 for v in geometry.spacing):
        raise ValueError(f"input spacing {list(geometry.spacing)} (expected three spacings above 0 and up to 20 mm)")
    low, high = geometry.percentiles
    if not 0 <= low < high <= 100:
        raise ValueError(f"intensity percentiles {[low, high]}")
    if geometry.center_ras is not None and not (len(geometry.center_ras) == 3 and np.isfinite(geometry.center_ras).all()):
        raise ValueError(f"grid centre {geometry.center_ras}")
    for name, value in (("sigma_mm", config.sigma_mm), ("uncertainty_scale", config.uncertainty_scale),
                        ("fused_scale", config.fused_scale)):
        if not (np.isfinite(value) and 0 < value <= 1e6):
            raise ValueError(f"{name} {value}")
    for name in ("test_time_mirror", "rater_spread"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} {getattr(config, name)!r} (expected true or false)")
    reference = config.innovation_reference
    if reference is not None and not (np.isfinite(reference) and 0 < reference <= 1e6):
        raise ValueError(f"innovation_reference {reference}")
    defaults = architecture_class(config.architecture).default_options
    for name, value in config.network.items():
        if name not in defaults:
            raise ValueError(f"unknown {config.architecture} option {name!r}")
        if isinstance(defaults[name], bool):
            if not isinstance(value, bool):
                raise ValueError(f"{config.architecture} option {name} = {value!r} (expected true or false)")
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        default = defaults[name][0] if isinstance(defaults[name], (list, tuple)) else defaults[name]
        minimum = 1 if isinstance(default, int) else 0  # counts (channels, voxels, blocks) are at least 1
        if not 1 <= len(values) <= MAX_OPTION_LENGTH or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                and minimum <= v <= MAX_OPTION_VALUE for v in values):
            raise ValueError(f"{config.architecture} option {name} = {value!r}")


def set_input_statistics(model: LandmarkModel, on: bool, path) -> None:
    """Switch a locnet model's batch normalisation at inference between the input's own statistics and
    torch's running averages (models/locnet.py): the same tensors in another norm layer. For a model
    trained before the option existed; its uncertainty must be calibrated again afterwards."""
    if model.config.architecture != "locnet":
        raise LandmarkError(path, f"--input-statistics applies to locnet models; this is a "
                                  f"{model.config.architecture} model")
    state = model.network.state_dict()
    device = next(model.network.parameters()).device
    model.config.network["input_statistics"] = on
    model.network = build_network(model.config.architecture, len(model.schema), model.config.geometry,
                                  **model.config.network).to(device)
    model.network.load_state_dict(state, strict=True)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LandmarkModel:
    path = Path(path)
    metadata = read_header(path).metadata
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        check_config(config)
        schema = schema_from_dict(json.loads(metadata["schema"]), source=str(path))
        training = json.loads(metadata.get("training", "{}"))
        metrics = json.loads(metadata.get("metrics", "{}"))
        reference_grid = json.loads(metadata["reference"]) if "reference" in metadata else None
        if not isinstance(training, dict) or not isinstance(metrics, dict):
            raise ValueError("training and metrics must be JSON objects")
        model = LandmarkModel.create(config, schema)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as error:
        raise LandmarkError(path, f"model metadata is damaged ({error})") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        reference = state.pop(REFERENCE_IMAGE, None)
        region = state.pop(REFERENCE_REGION, None)
        prior = state.pop(REFERENCE_LANDMARKS, None)
        prior_covariance = state.pop(REFERENCE_COVARIANCE, None)
        model.network.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0]
        raise LandmarkError(path, f"weights do not match the model's architecture ({first})") from None
    if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
        raise LandmarkError(path, "model weights hold NaN or infinite values (a diverged or damaged model)")
    if (reference is None) != (reference_grid is None) or (reference is None) != (region is None):
        raise LandmarkError(path, "model metadata is damaged (reference image and its geometry do not match)")
    if reference is not None:
        try:
            reference, region = _image(reference.float().numpy(), reference_grid), _image(region.numpy(), reference_grid)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise LandmarkError(path, f"model metadata is damaged (reference geometry: {error})") from None
    if prior is not None:
        prior = prior.double().numpy()
        if prior.shape != (len(schema), 3) or not np.isfinite(prior).all() or reference is None:
            raise LandmarkError(path, "model metadata is damaged (reference landmarks do not fit the schema)")
    if prior_covariance is not None:
        prior_covariance = prior_covariance.double().numpy()
        if prior is None or not _covariances(prior_covariance, len(schema)):
            raise LandmarkError(path, "model metadata is damaged (reference landmark covariance)")
    model.network.to(device).eval()
    return LandmarkModel(model.network, config, schema, training, metrics, reference, region, prior,
                         prior_covariance)


def _covariances(values: np.ndarray, count: int) -> bool:
    """``count`` finite, symmetric, positive definite 3x3 matrices?"""
    if values.shape != (count, 3, 3) or not np.isfinite(values).all():
        return False
    return bool(np.allclose(values, values.transpose(0, 2, 1), atol=1e-4)
                and (np.linalg.eigvalsh(values) > 0).all())


def _image(array: np.ndarray, grid: dict) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(grid["origin"]))
    image.SetSpacing(tuple(grid["spacing"]))
    image.SetDirection(tuple(grid["direction"]))
    return image
