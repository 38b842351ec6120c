"""What a session reads and writes, through the backend: a dataset version of the whole annotation
(datasets.py, never overwriting one: landmarks, boundary curves and the model-assistance record), a case's
version loaded back for editing, a model's detection read as suggestions, and the agreement command's
outputs as table nodes. MRML only, no Qt."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from LandmarkDetectionLib import datasets, mrml
from LandmarkDetectionLib.agreement import FILES as AGREEMENT_FILES
from LandmarkDetectionLib.annotation import assistance_document
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, read_volume, safe_name

from .session import AnnotationSession
from .tables import table_from_csv

IMAGE_ATTRIBUTE = "LandmarkTraining.Image"  # on a volume node loaded from a dataset: its image file


@dataclass
class Saved:
    entry: datasets.Entry  # the manifest row of the new version
    version: datasets.Version  # the version, with its curves folder and assistance record (or None)

    @property
    def assistance(self) -> Path | None:
        """The model-assistance record, when a model pre-filled the case."""
        return self.version.assistance


# ------------------------------------------------------------------------------------------------- saving
def case_name(session: AnnotationSession) -> str:
    """The dataset case a session saves to: the case it was loaded from, else its volume's name."""
    return session.dataset[1] if session.dataset else safe_name(session.volume.GetName())


def _check_schema(folder: Path, session: AnnotationSession):
    schema = datasets.dataset_schema(folder)  # a LandmarkError when the folder is not a dataset
    if schema.names != session.schema.names:
        raise LandmarkError(folder, f"the dataset's annotations follow schema '{schema.name}'; this session "
                                    f"annotates schema '{session.schema.name}'")


def _is_case_image(volume, folder: Path, case: str) -> bool:
    """Whether the volume node was loaded from the case's image and not moved since (its landmarks are
    then in the image's space)."""
    entry = next((e for e in datasets.read_entries(folder) if e.case == case), None)
    return (entry is not None and volume.GetAttribute(IMAGE_ATTRIBUTE) == str(entry.image.resolve())
            and volume.GetParentTransformNode() is None)


@contextlib.contextmanager
def _scan_file(volume):
    """A file holding the volume as shown: the file it was loaded from when that is still exactly it
    (unchanged since read, not transformed), otherwise a temporary NRRD export with its world geometry and
    its voxel type (the dataset keeps this file: compressed, as datasets store scans)."""
    storage = volume.GetStorageNode()
    source = Path(storage.GetFileName()) if storage is not None and storage.GetFileName() else None
    if (source is not None and source.is_file() and not volume.GetModifiedSinceRead()
            and volume.GetParentTransformNode() is None):
        yield source
        return
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="LandmarkTraining-") as folder:
        path = Path(folder) / f"{safe_name(volume.GetName())}.nrrd"
        sitk.WriteImage(mrml.volume_to_image(volume, keep_type=True), str(path), True)
        yield path


def save_session(session: AnnotationSession, folder: str | Path, annotator: str, status: str = "complete",
                 case: str | None = None) -> Saved:
    """Save the session's whole annotation as the next version of ``annotator``'s annotation of the case (a
    new case copies the scan in): its landmarks, its boundary curves and, when a model pre-filled it, the
    model-assistance record, all together; earlier versions stay."""
    folder = Path(folder)
    _check_schema(folder, session)
    case = case or case_name(session)
    coords = session.coordinates()
    records = session.assistance()
    extras = {"curves": session.curves(),
              "assistance": None if records is None else assistance_document(session.model, records)}
    if case in datasets.list_cases(folder) and _is_case_image(session.volume, folder, case):
        entry = datasets.save_annotation(folder, case, annotator, coords, status, session.provenance, **extras)
    else:  # a new case, or a scan from elsewhere: add_case checks that it is the case's scan
        with _scan_file(session.volume) as image:
            entry = datasets.add_case(folder, image, coords, annotator, case, status, session.provenance, **extras)
    session.dataset = (folder, case)
    version = next(v for v in datasets.list_versions(folder, case, annotator) if v.number == entry.version)
    return Saved(entry, version)


# ------------------------------------------------------------------------------------------------ loading
def _case_volume(scene, image: Path, name: str):
    """The volume node of a dataset image: the one already loaded, else a new one."""
    key = str(image.resolve())
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for k in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(k)
        if node.GetAttribute(IMAGE_ATTRIBUTE) == key:
            return node
    node = mrml.image_to_volume(scene, read_volume(image), name)
    node.SetAttribute(IMAGE_ATTRIBUTE, key)
    return node


def load_case(scene, folder: str | Path, case: str, annotator: str, version: int | None = None) -> AnnotationSession:
    """A session on one saved version (default: the newest) of ``annotator``'s annotation of ``case``, with its
    boundary curves, on the case's scan; saving it adds a new version."""
    folder = Path(folder)
    stored = datasets.load_annotation(folder, case, annotator, version)
    entry = next(e for e in datasets.read_entries(folder) if e.case == case)
    volume = _case_volume(scene, entry.image, case)
    session = AnnotationSession(scene, datasets.dataset_schema(folder), volume, stored.landmarks,
                                name=f"{case} {annotator} v{stored.version.number}")
    for sub, curves in stored.curves.items():
        for curve in curves:
            session.add_curve(sub, curve.closed, curve.points)
    session.dataset = (folder, case)
    return session


# ------------------------------------------------------------------------------------- model suggestions
def check_model_schema(model: Path, schema) -> None:
    """A model pre-fills a session only when it detects the session's landmarks."""
    from LandmarkDetectionLib.modelheader import read_header  # no torch

    detected = read_header(model).schema
    names = [str(lm.get("name")) for lm in detected.get("landmarks", [])]
    if names != schema.names:
        raise LandmarkError(model, f"detects schema '{detected.get('name')}'; the session annotates schema "
                                   f"'{schema.name}'")


def detection_arguments(model: Path, image: Path, output: Path, passes: int, device: str = "auto") -> list[str]:
    """The ``detect`` command of a pre-fill (BackendJob adds ``--progress json``)."""
    return ["detect", "--model", str(model), "--input", str(image), "--output", str(output), "--device", device,
            "--uncertainty", str(passes)]


def read_suggestions(output: Path, stem: str, schema) -> tuple[np.ndarray, np.ndarray]:
    """A detection's landmarks (K, 3) and each one's longest ellipsoid semi-axis (mm; NaN without
    uncertainty), in schema order."""
    from LandmarkDetectionLib.uncertainty import read_uncertainty

    coords = read_landmarks(Path(output) / f"{stem}.mrk.json", schema)
    semi = np.full(len(schema), np.nan)
    path = Path(output) / f"{stem}.uncertainty.json"
    if path.is_file():
        result, records = read_uncertainty(path)
        for record, value in zip(records, result.max_semi_axis()):
            index = schema.lookup(str(record.get("name", "")))
            if index is not None:
                semi[index] = value
    return coords, semi


# ---------------------------------------------------------------------------------------------- agreement
def agreement_output(folder: str | Path) -> Path:
    """A new folder for an agreement run's outputs: <dataset>/agreement/<UTC time>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(folder) / "agreement" / stamp


def agreement_arguments(folder: str | Path, output: Path) -> list[str]:
    return ["agreement", str(folder), "--output", str(output)]


@dataclass
class AgreementResults:
    tables: dict  # file name -> table node
    figures: list[Path]  # the box plots


def load_agreement(scene, output: Path) -> AgreementResults:
    """The agreement command's CSVs as table nodes; its PNG box plots by path."""
    output = Path(output)
    names = list(AGREEMENT_FILES.values())
    csvs = [output / n for n in names if n.endswith(".csv")]
    missing = [p.name for p in csvs if not p.is_file()]
    if missing:
        raise LandmarkError(output, f"holds no {', '.join(missing)}: not an agreement output folder")
    tables = {p.name: table_from_csv(scene, p, f"agreement {p.stem}") for p in csvs}
    return AgreementResults(tables, [output / n for n in names if n.endswith(".png") and (output / n).is_file()])
