"""The main job out of the box: the sample brain, an unseen test scan made from it, detection and its
accuracy against the known truth; and the recipe that trains the bundled demo model.

The demo's test scan comes from the same template the demo model was trained on (moved to a new head
position, re-acquired with 2.2 mm slices, with scanner artefacts). It shows the tool working; it is not
a measure of accuracy on new anatomy: benchmarks/heldout.py measures that on other brains.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .detect import write_detection
from .errors import LandmarkError
from .geometry import apply_matrix, centered_grid, move_image, physical_center_ras, rigid_matrix
from .io import atomic_write_text, check_writable_dir, read_landmarks, read_volume, write_markups_json, write_volume
from .metrics import radial_errors, summarize
from .modelfile import load_model
from .resources import resources_dir
from .sample_data import fetch_sample
from .schema import load_schema

DEMO_MODEL = "Models/afids32-demo.safetensors"
INTENDED_USE = ("Research demonstration of the LandmarkDetection extension only; not for clinical use. Trained on "
                "one brain template (MNI152NLin2009cAsym) with synthetic head positions and scanner artefacts.")


def demo_model_path() -> Path:
    return resources_dir() / DEMO_MODEL


def sample_case():
    """The sample T1w volume, its AFIDs (RAS) and the schema."""
    files = fetch_sample()
    schema = load_schema("afids-32")
    return read_volume(files.t1w), read_landmarks(files.afids, schema), schema, files


def random_head_position(image: sitk.Image, rng: np.random.Generator, degrees=15.0, mm=15.0) -> np.ndarray:
    return rigid_matrix(rng.uniform(-degrees, degrees, 3), rng.uniform(-mm, mm, 3), physical_center_ras(image))


def acquire(image: sitk.Image, spacing=(1.0, 1.0, 2.2), size=(192, 224, 90)) -> sitk.Image:
    """Re-sample a (moved) head as a scanner would acquire it: axial slices in the scanner's frame,
    centred on the head, at the given spacing."""
    grid = centered_grid(physical_center_ras(image), size, spacing)
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)


def make_test_scan(image: sitk.Image, landmarks: np.ndarray, seed: int = 2026):
    """An unseen test scan: a random oblique head position, 2.2 mm slices, noise, bias field and ghosting."""
    import torchio as tio

    from .augment import from_torchio, to_torchio

    rng = np.random.default_rng(seed)
    motion = random_head_position(image, rng)
    scan = acquire(move_image(image, motion))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        artefacts = tio.Compose([tio.RandomBiasField(coefficients=0.3), tio.RandomGhosting(num_ghosts=(2, 4), intensity=(0.1, 0.3)),
                                 tio.RandomNoise(std=(0.01, 0.02))])
        degraded = from_torchio(artefacts(tio.Subject(image=to_torchio(scan)))["image"])
    degraded.CopyInformation(scan)
    return degraded, apply_matrix(motion, landmarks), motion


# ------------------------------------------------------------------------------------------------- demo
def run_demo(output: str | Path, model_path: str | Path | None = None, device: str = "auto", seed: int = 2026,
             passes: int = 50, flag_mm: float = 5.0, gradcam_landmarks=("AC", "PC", "GENU", "RALTH")) -> dict:
    """Make the unseen test scan, detect with uncertainty, explain a few landmarks with Grad-CAM, and write
    everything with report.html into ``output``."""
    from . import report
    from .detect import UncertaintyOptions, detect_volume
    from .gradcam import compute_gradcam
    from .runtime import pick_device

    started = time.monotonic()
    output = check_writable_dir(output)
    device = pick_device(device)
    model_path = Path(model_path) if model_path else demo_model_path()
    model = load_model(model_path, device)
    image, landmarks, schema, files = sample_case()
    model.check_schema(schema, files.afids)
    scan, truth, _ = make_test_scan(image, landmarks, seed)
    write_volume(scan, output / "test_scan.nii.gz")
    write_markups_json(output / "truth.mrk.json", schema, truth, name="truth")

    options = UncertaintyOptions(passes=passes, flag_mm=flag_mm, seed=seed)
    detect_started = time.monotonic()
    detection = detect_volume(model, scan, device, "test_scan", options)
    detect_seconds = time.monotonic() - detect_started
    predicted, uncertainty = detection.landmarks_ras, detection.uncertainty
    errors = radial_errors(predicted, truth)
    paths = write_detection(model, detection, output, overwrite=True, extra_columns={"error_mm": errors},
                            options=options)

    chosen = [schema.lookup(name) for name in gradcam_landmarks if schema.lookup(name) is not None]
    cams = compute_gradcam(model, scan, chosen, device=device)
    (output / "gradcam").mkdir(exist_ok=True)
    cam_volumes = {}
    for n, index in enumerate(chosen):
        cam_volumes[index] = cams.volume(n, scan)
        write_volume(cam_volumes[index], output / "gradcam" / f"test_scan_gradcam_{schema.landmarks[index].name}.nii.gz")

    semi = uncertainty.max_semi_axis()
    summary = summarize(errors)
    from scipy.stats import chi2

    summary.update(seconds=round(time.monotonic() - started, 1), detect_seconds=round(detect_seconds, 2),
                   device=str(device), model=str(model_path), passes=passes, flagged=int((semi > flag_mm).sum()),
                   coverage=float((uncertainty.mahalanobis_squared(truth) <= chi2.ppf(uncertainty.level, 3)).mean()),
                   landmarks=str(paths["markups"]),
                   note="The test scan was made from the training template (new head position, 2.2 mm slices, "
                        "scanner artefacts); accuracy on unseen anatomy is measured by benchmarks/heldout.py.")
    figure_paths = {key: output / f"{key}.png" for key in ("landmarks", "errors", "uncertainty", "gradcam")}
    report.landmark_panels(scan, schema, predicted, truth, uncertainty, figure_paths["landmarks"])
    report.error_figure(schema, errors, figure_paths["errors"])
    report.uncertainty_figure(schema, errors, semi, flag_mm, figure_paths["uncertainty"])
    report.gradcam_figure(scan, schema, cam_volumes, predicted, figure_paths["gradcam"], cams.layer)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["files"] = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file()) + ["report.html"]
    report.write_html(output / "report.html", summary, model, schema, errors, semi, flag_mm, figure_paths,
                      files.attribution)
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2))
    summary["report"] = str(output / "report.html")
    return summary


# ------------------------------------------------------------------------------------ demo model recipe
def build_training_set(folder: Path, copies: int = 24, seed: int = 0, spacing_mm: float = 2.0) -> Path:
    """Moved copies of the sample template (at ``spacing_mm``, for speed) with their AFIDs."""
    from .preprocess import resample_isotropic

    image, landmarks, schema, _ = sample_case()
    image = resample_isotropic(image, spacing_mm)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for n in range(copies):
        motion = random_head_position(image, rng)
        write_volume(move_image(image, motion), folder / f"template{n:02d}.nii.gz")
        write_markups_json(folder / f"template{n:02d}.mrk.json", schema, apply_matrix(motion, landmarks))
    return folder


DEMO_TRAINING = dict(schema="afids-32", architecture="locnet", channels=(12, 12, 8), scales_mm=(6.0, 3.0, 1.5),
                     patch_sizes=(16, 12), size=(96, 112, 96), spacing=(2.0, 2.0, 2.0), lr=3e-3, loss="mixed",
                     alpha=0.4, sigma_mm=3.0, val_fraction=0.125, patience=30, seed=0, augment="default")


def train_demo_model(work: str | Path, epochs: int = 60, workers: int = 1, device: str = "auto",
                     progress: str = "bar") -> Path:
    """Train the demo model from scratch with a fixed seed; returns the model path in ``work``."""
    from .train import TrainOptions, train

    work = Path(work)
    if (work / "data").exists():
        raise LandmarkError(work / "data", "exists; choose an empty work folder")
    build_training_set(work / "data")
    options = TrainOptions(dataset=str(work / "data"), output=str(work / "run"), epochs=epochs, workers=workers,
                           device=device, progress=progress, **DEMO_TRAINING,
                           extra_metadata={"training_data": "MNI152NLin2009cAsym T1w template (autoafids 0.1.4) "
                                           "with its AFIDs consensus, 24 random head positions, DA1-DA4 augmentation",
                                           "intended_use": INTENDED_USE})
    return train(options)
