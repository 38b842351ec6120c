"""Shared fixtures: tiny synthetic volumes with exact geometry, the AFIDs sample, tiny datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LandmarkDetectionLib.geometry import apply_matrix, move_image, rigid_matrix
from LandmarkDetectionLib.testscans import random_head_position
from LandmarkDetectionLib.fileio import read_landmarks, read_volume, write_markups_json, write_volume
from LandmarkDetectionLib.preprocess import resample_isotropic
from LandmarkDetectionLib.schema import load_schema

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "GradCAMViewer"))  # the viewer's Qt-free scene logic, as Slicer would find it


def oblique_direction(degrees=(20.0, -10.0, 35.0)) -> tuple:
    """An LPS direction matrix that is neither axis-aligned nor symmetric."""
    return tuple(rigid_matrix(degrees, (0, 0, 0))[:3, :3].ravel())


def make_volume(size=(20, 24, 16), spacing=(1.5, 1.2, 2.5), origin=(-12.0, 7.0, 30.0), direction=None,
                seed=0) -> sitk.Image:
    """A random-textured float volume with the given geometry."""
    array = np.random.default_rng(seed).normal(100.0, 20.0, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction or oblique_direction())
    return image


@pytest.fixture(scope="session")
def brain88():
    return load_schema("brain-88")


@pytest.fixture(scope="session")
def afids32():
    return load_schema("afids-32")


@pytest.fixture(scope="session")
def sample():
    """The MNI152NLin2009cAsym T1w template and its AFIDs annotation (from the autoafids wheel)."""
    from LandmarkDetectionLib.sample_data import fetch_sample

    files = fetch_sample()
    return read_volume(files.t1w), read_landmarks(files.afids, load_schema("afids-32")), files


def moved_copies(image, landmarks, schema, folder: Path, count: int, seed: int, degrees=15.0, mm=15.0,
                 prefix="case"):
    """``count`` copies of a scan moved by seeded random rigid motions, written as NIfTI + .mrk.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    motions = []
    for n in range(count):
        matrix = random_head_position(image, rng, degrees, mm)
        write_volume(move_image(image, matrix), folder / f"{prefix}{n:02d}.nii.gz")
        write_markups_json(folder / f"{prefix}{n:02d}.mrk.json", schema, apply_matrix(matrix, landmarks))
        motions.append(matrix)
    return motions


@pytest.fixture(scope="session")
def afids_small(sample):
    """The sample at 3 mm (fast to read and resample) with its landmarks."""
    image, landmarks, _ = sample
    return resample_isotropic(image, 3.0), landmarks


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, afids_small, afids32):
    """Six moved copies of the 3 mm template: a dataset folder for fast training tests."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    image, landmarks = afids_small
    moved_copies(image, landmarks, afids32, folder, 6, seed=1)
    return folder


TINY_TRAIN = dict(schema="afids-32", channels=(4, 4, 8), blocks_per_stage=1, dropout=0.1, size=(16, 20, 16),
                  spacing=(11.0, 11.0, 11.0), lr=3e-3, sigma_mm=12.0, val_fraction=0.34, progress="none")


@pytest.fixture
def mrml_scene():
    """A real MRML scene (slicer-core wheel) with the markups logic registered, as Slicer sets it up."""
    slicer = pytest.importorskip("slicer")
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    markups_logic.SetMRMLApplicationLogic(app_logic)
    markups_logic.SetMRMLScene(scene)
    scene._keep_alive = (app_logic, markups_logic)  # the logics must outlive the test's use of the scene
    return scene
