"""Datasets: a folder of image + landmark pairs, or a CSV manifest; splits; the torch Dataset.

Folder: every volume ``NAME.nii.gz`` (or .nrrd, .mha, ...) with a landmark file ``NAME.mrk.json``
(or .fcsv, .csv) beside it. Manifest: a CSV with columns ``image`` and ``landmarks`` (paths relative
to the manifest), optional ``split`` (train, val, test), ``group`` and ``extra_images`` (other contrasts
of the same scan, ';'-separated, used by synthetic training).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import LandmarkError
from .fileio import LANDMARK_SUFFIXES, VOLUME_SUFFIXES, read_landmarks, read_volume, stem
from .preprocess import InputGeometry, model_grid, normalize_intensity, resample_to_grid
from .schema import Schema

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    landmarks: Path | None
    split: str = ""
    group: str = ""
    extra_images: tuple[Path, ...] = ()  # other contrasts of the same scan (e.g. T2w), for synthesis


def discover_cases(source: str | Path, require_landmarks: bool = True) -> list[Case]:
    """Cases of a dataset folder or manifest CSV, sorted by name."""
    source = Path(source)
    if not source.exists():
        raise LandmarkError(source, "dataset does not exist")
    cases = _from_manifest(source) if source.is_file() else _from_folder(source, require_landmarks)
    if not cases:
        raise LandmarkError(source, "dataset holds no cases (expected NAME.nii.gz + NAME.mrk.json pairs "
                                    "or a CSV manifest with image and landmarks columns)")
    return sorted(cases, key=lambda c: c.name)


def input_volumes(source: str | Path) -> list[Path]:
    """The volumes to process: a volume file, a DICOM series folder, or a folder of volumes."""
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


def list_volumes(folder: Path) -> list[Path]:
    volumes = []
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if path.name.startswith("."):
            continue
        if path.is_file() and name.endswith(VOLUME_SUFFIXES) and not name.endswith(".dcm"):
            volumes.append(path)
        elif path.is_dir() and any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
            volumes.append(path)  # a DICOM series folder
    return volumes


def _from_folder(folder: Path, require_landmarks: bool) -> list[Case]:
    cases = []
    for volume in list_volumes(folder):
        name = stem(volume)
        landmarks = next((folder / f"{name}{s}" for s in LANDMARK_SUFFIXES if (folder / f"{name}{s}").is_file()), None)
        if landmarks is None and require_landmarks:
            raise LandmarkError(volume, f"has no landmark file beside it (expected {name}.mrk.json, .fcsv or .csv)")
        cases.append(Case(name, volume, landmarks))
    return cases


def _from_manifest(manifest: Path) -> list[Case]:
    try:
        rows = list(csv.DictReader(manifest.open(encoding="utf-8-sig")))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LandmarkError(manifest, f"not a readable CSV manifest ({error})") from None
    if not rows or not {"image", "landmarks"} <= set(rows[0]):
        raise LandmarkError(manifest, "manifest needs 'image' and 'landmarks' columns")
    cases, names = [], set()
    for line, row in enumerate(rows, start=2):
        image = (manifest.parent / row["image"].strip()).resolve()
        landmarks = (manifest.parent / row["landmarks"].strip()).resolve()
        split = (row.get("split") or "").strip().lower()
        if split and split not in SPLITS:
            raise LandmarkError(manifest, f"line {line}: split {split!r} is not one of {', '.join(SPLITS)}")
        name = (row.get("name") or "").strip() or stem(image)
        if name in names:
            raise LandmarkError(manifest, f"line {line}: case name '{name}' appears twice")
        names.add(name)
        extra = tuple((manifest.parent / p.strip()).resolve() for p in (row.get("extra_images") or "").split(";")
                      if p.strip())
        cases.append(Case(name, image, landmarks, split, (row.get("group") or "").strip(), extra))
    return cases


def split_cases(cases: list[Case], val_fraction=0.2, test_fraction=0.0, seed=0) -> dict[str, list[Case]]:
    """Keep the manifest's split column where given; split the rest by a seeded shuffle."""
    splits = {s: [c for c in cases if c.split == s] for s in SPLITS}
    free = [c for c in cases if not c.split]
    order = np.random.default_rng(seed).permutation(len(free))
    n_test = int(round(test_fraction * len(free)))
    n_val = max(1 if len(free) > 1 and val_fraction > 0 else 0, int(round(val_fraction * len(free))))
    for rank, index in enumerate(order):
        split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        splits[split].append(free[index])
    for split in splits.values():
        split.sort(key=lambda c: c.name)
    return splits


# A world-space augmentation: (image, landmarks RAS (K,3), numpy Generator) -> (image, landmarks RAS).
Augmentation = Callable


class LandmarkDataset(torch.utils.data.Dataset):
    """Samples in the model's input grid: image (1, D, H, W), target indices (K, 3), mask (K,).

    Without augmentation the resampled volumes are cached after first use. With augmentation each
    item is drawn from a generator seeded by (seed, epoch, index), so a run is reproducible whatever
    the number of DataLoader workers, and a resumed run draws what the killed run would have drawn.
    """

    def __init__(self, cases: list[Case], schema: Schema, geometry: InputGeometry,
                 augmentation: Augmentation | None = None, seed: int = 0):
        self.cases, self.schema, self.geometry = cases, schema, geometry
        self.augmentation, self.seed, self.epoch = augmentation, seed, 0
        self._cache: dict[int, tuple] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def load(self, index: int):
        case = self.cases[index]
        return read_volume(case.image), read_landmarks(case.landmarks, self.schema)

    def __getitem__(self, index: int):
        if self.augmentation is None and index in self._cache:
            return self._cache[index]
        image, landmarks = self.load(index)
        if self.augmentation is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, landmarks = self.augmentation(image, landmarks, rng)
        grid = model_grid(image, self.geometry)
        array = normalize_intensity(resample_to_grid(image, grid), self.geometry.percentiles)
        target = grid.to_index(landmarks)
        mask = np.isfinite(target).all(-1) & grid.contains(landmarks)
        item = (torch.from_numpy(array)[None], torch.from_numpy(np.nan_to_num(target)).float(),
                torch.from_numpy(mask), torch.from_numpy(grid.index_to_ras).float())
        if self.augmentation is None:
            self._cache[index] = item
        return item
