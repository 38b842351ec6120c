"""The recipes that train the bundled models from this repository, with fixed seeds, on the sample
brain (the MNI152NLin2009cAsym T1w and T2w templates with their AFIDs; see sample_data.py).

``afids-32`` is the generalising recipe (align.py + synth.py): one annotated template is enough to
train a model that is measured on brains it never saw (benchmarks/heldout.py). ``brain-88`` is the same
recipe on the project's brain-88 reference annotation of that template (sample_data.REFERENCE_ANNOTATIONS).
``afids-32-poses`` is the earlier recipe (24 head positions of the template with DA1-DA4 augmentation),
kept for comparison.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from .errors import LandmarkError
from .fileio import atomic_write_text

INTENDED_USE = ("Research use only; not for clinical use. Trained on one brain template (MNI152NLin2009cAsym T1w/T2w "
                "with one annotation) with synthetic appearance, anatomy and head positions.")

_GENERALISING = dict(architecture="locnet", channels=(16, 16, 12), scales_mm=(6.0, 3.0, 1.0), patch_sizes=(12, 16),
                     spacing=(1.0, 1.0, 1.0), lr=2e-3, loss="mixed", alpha=0.4, sigma_mm=3.0, patience=12, seed=0,
                     synthesis="default", samples_per_epoch=100, epochs=24, workers=1)
RECIPES = {
    # A moving average of the weights (decay 0.995: about two epochs) is validated and saved, chosen on 24
    # validation scans: at a constant rate the weights of single epochs moved the validation error by up to
    # 0.9 mm from one epoch to the next, and 8 scans made the choice of the best epoch partly chance.
    # 32 epochs, not 24: the average's validation error was still falling at epoch 24 (1.77, 1.73, 1.73
    # mm); after a loss spike at epoch 25 the plateau schedule halved the rate, and epoch 32 reached 1.69 mm
    # (about 105 minutes on 2 CPU cores).
    "afids-32": dict(schema="afids-32", **{**_GENERALISING, "ema_decay": 0.995, "val_samples": 24, "epochs": 32}),
    # 32 of the 88 landmarks' patches per step: the afids-32 recipe's network cost per step (patch stages
    # dominate); two synthesising workers and 15 epochs keep it within 1.5 hours on 2 CPU cores.
    "brain-88": dict(schema="brain-88", train_patch_landmarks=32, **{**_GENERALISING, "epochs": 15, "workers": 2}),
    "afids-32-poses": dict(schema="afids-32", architecture="locnet", channels=(12, 12, 8), scales_mm=(6.0, 3.0, 1.5),
                           patch_sizes=(16, 12), size=(96, 112, 96), spacing=(2.0, 2.0, 2.0), lr=3e-3, loss="mixed",
                           alpha=0.4, sigma_mm=3.0, val_fraction=0.125, patience=30, seed=0, augment="default",
                           epochs=60, workers=1),
}
TRAINING_DATA = {
    "afids-32": "MNI152NLin2009cAsym T1w and T2w templates (autoafids 0.1.4) with their AFIDs consensus; "
                "synthetic tissue intensities, residual poses, left-right flips, smooth deformations, "
                "scanner artefacts and field-of-view cuts (synth.py)",
    "brain-88": "MNI152NLin2009cAsym T1w and T2w templates (autoafids 0.1.4) with the project's brain-88 reference "
                "annotation (a reference made with the project's tools, not a clinical ground truth); synthetic "
                "tissue intensities, residual poses, left-right flips, smooth deformations, scanner artefacts and "
                "field-of-view cuts (synth.py)",
    "afids-32-poses": "MNI152NLin2009cAsym T1w template (autoafids 0.1.4) with its AFIDs consensus, 24 random head "
                      "positions, DA1-DA4 augmentation",
}


def _sample_manifest(folder: Path, schema: str) -> Path:
    """A one-case manifest of the sample: T1w image, T2w as an extra contrast, its landmarks of ``schema``."""
    from .sample_data import fetch_sample, sample_landmarks_file

    files = fetch_sample()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "landmarks", "extra_images", "split"])
    writer.writerow([files.t1w, sample_landmarks_file(files, schema), files.t2w, "train"])
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "manifest.csv", out.getvalue())
    return folder / "manifest.csv"


def calibration_set(folder: Path, count: int = 12, seed: int = 7, synthesis: str = "default",
                    schema_name: str = "afids-32") -> Path:
    """Scans for calibrating the uncertainty of the generalising recipe, made from the training data only:
    the sample template synthesised as in training (other seeds: new appearance, anatomy, pose) on a
    whole-head grid, then placed at a random head position, with its landmarks."""
    import numpy as np
    import SimpleITK as sitk

    from .fileio import read_volume, write_markups_json, write_volume
    from .geometry import apply_matrix, centered_grid, move_image
    from .sample_data import fetch_sample
    from .synth import SourceCase, SynthesisConfig, synthesize
    from .testscans import random_head_position, sample_case

    image, landmarks, schema, files = sample_case(schema_name)
    source = SourceCase.from_images([image, read_volume(fetch_sample().t2w)], landmarks, SynthesisConfig().classes)
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    grid = centered_grid(source.grid.center_ras(), tuple(int(e / 1.5) for e in extent), (1.5, 1.5, 1.5))
    config = SynthesisConfig.load(synthesis)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        rng = np.random.default_rng([seed, n])
        array, target, usable = synthesize(source, grid, schema.mirror_indices(), config, rng)
        volume = sitk.GetImageFromArray(array)
        volume.SetOrigin(grid.origin)
        volume.SetSpacing(grid.spacing)
        volume.SetDirection(grid.direction)
        points = np.where(usable[:, None], grid.to_ras(target), np.nan)
        motion = random_head_position(volume, rng, 25.0, 20.0)
        write_volume(move_image(volume, motion), folder / f"calibration{n:02d}.nii.gz")
        write_markups_json(folder / f"calibration{n:02d}.mrk.json", schema, apply_matrix(motion, points))
    return folder


def train_bundled_model(work: str | Path, recipe: str = "afids-32", epochs: int | None = None,
                        workers: int | None = None, device: str = "auto", progress: str = "bar",
                        resume: bool = False) -> Path:
    """Train a bundled model from scratch with its fixed seed; returns the model path in ``work``. The
    generalising recipe then calibrates the uncertainty on synthetic scans of the training data
    (calibration_set): ``work/model.safetensors``."""
    from .testscans import build_training_set
    from .train import TrainOptions, train

    if recipe not in RECIPES:
        raise LandmarkError(recipe, f"no such recipe; recipes are {', '.join(RECIPES)}")
    work = Path(work)
    settings = dict(RECIPES[recipe])
    settings["epochs"] = epochs or settings["epochs"]
    settings["workers"] = settings["workers"] if workers is None else workers
    if resume:
        dataset = work / "data" / "manifest.csv" if settings.get("synthesis") else work / "data"
    elif (work / "data").exists():
        raise LandmarkError(work / "data", "exists; choose an empty work folder (or --resume)")
    else:
        dataset = (_sample_manifest(work / "data", settings["schema"]) if settings.get("synthesis")
                   else build_training_set(work / "data"))
    options = TrainOptions(dataset=str(dataset), output=str(work / "run"), device=device, progress=progress,
                           resume=resume, **settings,
                           extra_metadata={"recipe": recipe, "training_data": TRAINING_DATA[recipe],
                                           "intended_use": INTENDED_USE})
    best = train(options)
    return calibrate_bundled_model(work, best, device, progress) if settings.get("synthesis") else best


def calibrate_bundled_model(work: Path, best: Path, device: str = "auto", progress: str = "bar") -> Path:
    """The generalising recipe's last step: fit the uncertainty scale on calibration_set scans."""
    from .calibrate import calibrate
    from .data import discover_cases
    from .detect import UncertaintyOptions
    from .modelfile import load_model
    from .runtime import Progress, pick_device

    device = pick_device(device)
    model = load_model(best, device)
    cases = discover_cases(calibration_set(work / "calibration", schema_name=model.schema.name))
    result = calibrate(model, cases, device, UncertaintyOptions(passes=50, seed=0), Progress(progress),
                       exact_truths=True)  # synthetic scans: their landmarks are exact
    model.metrics["calibration"]["dataset"] = "synthetic scans of the training template (recipes.calibration_set)"
    model.training["dataset"] = Path(model.training.get("dataset", "")).name  # no local folders in a model file
    model.save(work / "model.safetensors")
    print(f"uncertainty calibrated on {result.cases} synthetic scans of the training template")
    print("\n".join(result.report()))
    return work / "model.safetensors"
