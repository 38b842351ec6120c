"""Datasets: a folder of image + landmark pairs, or a CSV manifest; splits; the torch Dataset.

Folder: every volume ``NAME.nii.gz`` (or .nrrd, .mha, ...) with a landmark file ``NAME.mrk.json``
(or .fcsv, .csv) beside it. Manifest: a CSV with columns ``image`` and ``landmarks`` (paths relative
to the manifest), optional ``split`` (train, val, test), ``group`` and ``extra_images`` (other contrasts
of the same scan, ';'-separated, used by synthetic training). Rows whose ``training`` column says ``no``
are skipped (an annotation dataset, datasets.py, lists every annotator's row but trains on one per case);
other columns are ignored.

Detection inputs (``input_volumes``): a volume file, a folder (its volume files, its main DICOM series
and its DICOM subfolders) or a BIDS dataset, each volume with a unique output name.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .errors import LandmarkError
from .fileio import (LANDMARK_SUFFIXES, VOLUME_SUFFIXES, atomic_write_text, check_volume, read_landmarks, read_volume,
                     safe_name, stem)
from .geometry import Grid
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


FAR_OUTSIDE_MM = 20.0  # landmarks farther outside their image than this are a coordinate mix-up, not anatomy
_warned: set[Path] = set()


def read_case(case: Case, schema: Schema) -> tuple[sitk.Image, np.ndarray]:
    """A case's image and landmarks (RAS, schema order). Landmarks far outside the image (usually LPS
    coordinates read as RAS, or another scan's file) get one warning line per file and process."""
    image, landmarks = read_volume(case.image), read_landmarks(case.landmarks, schema)
    grid = Grid.of(image)
    margin = -FAR_OUTSIDE_MM / min(grid.spacing)  # a negative margin widens the box
    defined = np.isfinite(landmarks).all(axis=1)
    outside = defined & ~grid.contains(np.where(defined[:, None], landmarks, 0.0), margin)
    if outside.any() and case.landmarks not in _warned:
        _warned.add(case.landmarks)
        names = [schema.landmarks[i].name for i in np.flatnonzero(outside)]
        print(f"warning: {case.landmarks}: {len(names)} landmark(s) lie more than {FAR_OUTSIDE_MM:g} mm outside "
              f"{Path(case.image).name} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); "
              "check the coordinate system (RAS vs LPS) and that the file belongs to this image", file=sys.stderr)
    return image, landmarks


def discover_cases(source: str | Path, require_landmarks: bool = True) -> list[Case]:
    """Cases of a dataset folder or manifest CSV, sorted by name."""
    source = Path(source)
    if not source.exists():
        raise LandmarkError(source, "dataset does not exist")
    if (source / "dataset.json").is_file() and (source / "manifest.csv").is_file():  # a datasets.py dataset
        source = source / "manifest.csv"
    cases = _from_manifest(source) if source.is_file() else _from_folder(source, require_landmarks)
    if not cases:
        raise LandmarkError(source, "dataset holds no cases (expected NAME.nii.gz + NAME.mrk.json pairs "
                                    "or a CSV manifest with image and landmarks columns)")
    return sorted(cases, key=lambda c: c.name)


# ------------------------------------------------------------------------------------ detection inputs
@dataclass(frozen=True)
class InputVolume:
    """One volume to detect in: a volume file, or a DICOM series (``path`` is then its folder)."""

    path: Path
    output_name: str  # output file name without suffix: NAME.mrk.json, NAME.csv, ...
    subfolder: str = ""  # output folder relative to --output ("sub-01/ses-1/anat" for --bids)
    series: tuple[str, ...] = ()  # DICOM: the series' files in slice order

    def read(self) -> sitk.Image:
        if not self.series:
            return read_volume(self.path)
        try:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(list(self.series))
            image = reader.Execute()
        except RuntimeError as error:
            last = (str(error).strip().splitlines() or ["unknown problem"])[-1]
            raise LandmarkError(self.path, f"not a readable DICOM series ({last})") from None
        return check_volume(image, self.path)

    @property
    def name(self) -> str:  # as a Path's: what progress lines show
        return self.path.name

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)


ANATOMICAL_SUFFIXES = ("T1w", "T2w", "PDw", "T2starw", "FLAIR")  # BIDS anat volumes that detection reads
_BIDS_SUBJECT = re.compile(r"^sub-([A-Za-z0-9]+)(?:_ses-([A-Za-z0-9]+))?(?:_|$)")


def input_volumes(source: str | Path, bids: bool = False, warn: Callable[[str], None] | None = None
                  ) -> list[InputVolume]:
    """The volumes to detect in, each with its unique output name, found before anything is written.

    ``source``: a volume file; a BIDS dataset root (``sub-*/[ses-*/]anat/*_T1w.nii.gz``, T2w, ...); or a
    folder, whose volume files, main DICOM series (found by content, any file names) and DICOM
    subfolders are each one volume. ``bids``: outputs in a BIDS-derivatives layout,
    ``sub-X/[ses-Y/]anat/<input name>_landmarks.*``. ``warn`` receives a line for each skipped DICOM file.
    """
    source = Path(source)
    warn = warn or (lambda text: None)
    if not source.exists():
        raise LandmarkError(source, "input does not exist")
    if source.is_file():
        volumes = [InputVolume(source, stem(source))]
    elif is_bids_dataset(source):
        volumes = _bids_volumes(source)
    else:
        volumes = _folder_volumes(source, warn)
    if bids:
        volumes = [_bids_output(volume) for volume in volumes]
    _check_unique_names(source, volumes)
    return volumes


def is_bids_dataset(folder: Path) -> bool:
    return (folder / "dataset_description.json").is_file() and any(p.is_dir() for p in folder.glob("sub-*"))


def _bids_volumes(root: Path) -> list[InputVolume]:
    volumes = []
    for anat in sorted([*root.glob("sub-*/anat"), *root.glob("sub-*/ses-*/anat")]):
        for path in _entries(anat):
            name = stem(path)
            if (path.is_file() and path.name.endswith((".nii.gz", ".nii"))
                    and name.rsplit("_", 1)[-1] in ANATOMICAL_SUFFIXES):
                volumes.append(InputVolume(path, name))
    if not volumes:
        raise LandmarkError(root, "BIDS dataset holds no anatomical volumes (sub-*/[ses-*/]anat/*_"
                                  f"{{{','.join(ANATOMICAL_SUFFIXES)}}}.nii.gz)")
    return volumes


def _folder_volumes(folder: Path, warn) -> list[InputVolume]:
    """The folder's own DICOM series (one volume), each volume file, and each DICOM subfolder."""
    volumes = []
    series = main_dicom_series(folder, warn)
    if series:
        volumes.append(InputVolume(folder, _folder_name(folder), series=series))
    for path in _entries(folder):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES) and not path.name.lower().endswith(".dcm"):
            volumes.append(InputVolume(path, stem(path)))
        elif path.is_dir():
            series = main_dicom_series(path, warn)
            if series:
                volumes.append(InputVolume(path, _folder_name(path), series=series))
    if not volumes:
        raise LandmarkError(folder, "folder holds no volumes (.nii.gz, .nii, .nrrd, .mha, DICOM series)")
    return sorted(volumes, key=lambda v: v.path.name)


def _folder_name(folder: Path) -> str:
    return stem(os.path.abspath(folder)) or "unnamed"  # "." and ".." name the folder they stand for


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise LandmarkError(folder, f"cannot be read ({error.strerror or error})") from None


def main_dicom_series(folder: Path, warn=None) -> tuple[str, ...]:
    """The files of the folder's largest DICOM series in slice order (empty when there is none).

    DICOM files are found by content (GDCM), whatever their names; other files (README.txt, .DS_Store,
    NIfTI volumes) are ignored. Every other series, such as a stray file of another series, is skipped
    with a line to ``warn``.
    """
    warn = warn or (lambda text: None)
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK would print "No Series were found" for every folder
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        series = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in ids]
    except RuntimeError:
        series = []
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    series = sorted(series, key=len, reverse=True)  # stable: ties keep GDCM's order
    main = series[0] if series else ()
    for files in series[1:]:
        warn(f"{files[0]}: skipped {len(files)} file(s) of another DICOM series than the folder's main one "
             f"({len(main)} files); put each series in its own folder to detect in it")
    grouped = {Path(f).name for files in series for f in files}
    unread = [p.name for p in _entries(folder) if p.suffix.lower() == ".dcm" and p.name not in grouped]
    if unread:
        warn(f"{folder}: skipped {len(unread)} .dcm file(s) that are not readable DICOM images "
             f"({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''})")
    return tuple(main)


def _bids_output(volume: InputVolume) -> InputVolume:
    """Where --bids writes a volume's outputs: sub-X/[ses-Y/]anat/<input name>_landmarks.*"""
    match = _BIDS_SUBJECT.match(volume.output_name)
    if match is None:
        raise LandmarkError(volume.path, "--bids output needs BIDS-named inputs (sub-<label>[_ses-<label>]_..."
                                         "_T1w.nii.gz) or a BIDS dataset as --input")
    subject, session = match.groups()
    subfolder = f"sub-{subject}/" + (f"ses-{session}/" if session else "") + "anat"
    return InputVolume(volume.path, safe_name(f"{volume.output_name}_landmarks"), subfolder, volume.series)


def _check_unique_names(source: Path, volumes: list[InputVolume]) -> None:
    """Two inputs that would write the same outputs (a.nii.gz and a.nrrd) are refused before any work;
    names are compared ignoring case, as macOS and Windows file systems do."""
    seen: dict[tuple[str, str], InputVolume] = {}
    for volume in volumes:
        key = (volume.subfolder, volume.output_name.casefold())
        if key in seen:
            first = seen[key]
            output = "/".join(filter(None, [volume.subfolder, f"{first.output_name}.mrk.json"]))
            raise LandmarkError(source, f"{_shown(first.path, source)} and {_shown(volume.path, source)} would both "
                                        f"write {output}; rename one or detect them into separate --output folders")
        seen[key] = volume


def _shown(path: Path, source: Path) -> str:
    try:
        return str(path.relative_to(source)) if path != source else path.name
    except ValueError:
        return str(path)


def bids_dataset_description() -> dict:
    from . import __version__

    return {"Name": "Landmark detection", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "landmark-detection", "Version": __version__,
                             "Description": "Anatomical landmarks detected by LandmarkDetectionLib "
                                            "(3D Slicer LandmarkDetection extension)"}]}


def write_bids_description(output: Path) -> Path:
    """``dataset_description.json`` of the derivatives folder: written when missing, kept when present
    (adding subjects to earlier outputs); a raw (non-derivative) dataset's description is refused, so
    derivatives never land inside the input dataset."""
    path = Path(output) / "dataset_description.json"
    if path.exists():
        try:
            kind = json.loads(path.read_text(encoding="utf-8")).get("DatasetType", "raw")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            kind = "unreadable"
        if kind != "derivative":
            what = "a raw BIDS dataset" if kind == "raw" else "a dataset description that is not a BIDS derivative"
            raise LandmarkError(path, f"--output holds {what}; write derivatives to their own folder, such as "
                                      "DATASET/derivatives/landmark-detection")
        return path
    atomic_write_text(path, json.dumps(bids_dataset_description(), indent=2) + "\n")
    return path


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
    if not rows:
        raise LandmarkError(manifest, "manifest lists no cases")
    if not {"image", "landmarks"} <= set(rows[0]):
        raise LandmarkError(manifest, "manifest needs 'image' and 'landmarks' columns")
    cases, names = [], set()
    for line, row in enumerate(rows, start=2):
        row = {key: (value or "") for key, value in row.items() if key is not None}  # short rows: empty cells
        if row.get("training", "").strip().lower() == "no":
            continue  # another annotator's annotation of a case (datasets.py): not trained on
        if not row["image"].strip() or not row["landmarks"].strip():
            raise LandmarkError(manifest, f"line {line}: needs an image and a landmarks file")
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
        return read_case(self.cases[index], self.schema)

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
