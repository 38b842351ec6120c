"""Synthetic test scans of real anatomy: the sample brain, random head positions, scanner-like
acquisition, and artefacts. Used by the demo, the tests, the benchmarks and the recipes of the bundled
models; nothing here is needed to detect landmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .geometry import apply_matrix, centered_grid, move_image, physical_center_ras, rigid_matrix
from .fileio import read_landmarks, read_volume, write_markups_json, write_volume
from .sample_data import fetch_sample, sample_landmarks_file
from .schema import load_schema


def sample_case(schema_name: str = "afids-32"):
    """The sample T1w volume, its landmarks of ``schema_name`` (RAS), the schema and the sample's files."""
    files = fetch_sample()
    schema = load_schema(schema_name)
    return read_volume(files.t1w), read_landmarks(sample_landmarks_file(files, schema_name), schema), schema, files


# The source paper's survey acquisition: 224x224 voxels of 1 mm in plane, 101 axial slices of 2.2 mm.
SURVEY_SIZE, SURVEY_SPACING = (224, 224, 101), (1.0, 1.0, 2.2)


def random_head_position(image: sitk.Image, rng: np.random.Generator, degrees=15.0, mm=15.0) -> np.ndarray:
    return rigid_matrix(rng.uniform(-degrees, degrees, 3), rng.uniform(-mm, mm, 3), physical_center_ras(image))


def acquire(image: sitk.Image, spacing=(1.0, 1.0, 2.2), size=(192, 224, 90)) -> sitk.Image:
    """Re-sample a (moved) head as a scanner would acquire it: axial slices in the scanner's frame,
    centred on the head, at the given spacing."""
    grid = centered_grid(physical_center_ras(image), size, spacing)
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)


def make_test_scan(image: sitk.Image, landmarks: np.ndarray, seed: int = 2026, size=(192, 224, 90)):
    """An unseen test scan: a random oblique head position, 2.2 mm slices (``size`` voxels, 1 mm in plane),
    noise, bias field and ghosting."""
    import torchio as tio

    from .augment import from_torchio, to_torchio

    rng = np.random.default_rng(seed)
    motion = random_head_position(image, rng)
    scan = acquire(move_image(image, motion), size=size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        artefacts = tio.Compose([tio.RandomBiasField(coefficients=0.3), tio.RandomGhosting(num_ghosts=(2, 4), intensity=(0.1, 0.3)),
                                 tio.RandomNoise(std=(0.01, 0.02))])
        degraded = from_torchio(artefacts(tio.Subject(image=to_torchio(scan)))["image"])
    degraded.CopyInformation(scan)
    return degraded, apply_matrix(motion, landmarks), motion


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
