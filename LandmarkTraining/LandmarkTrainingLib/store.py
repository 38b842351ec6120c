"""What a session reads and writes, through the backend: a dataset version of the annotation (datasets.py,
never overwriting one) with the model-assistance record beside it, a case's version loaded back for
editing, a model's detection read as suggestions, and the agreement command's outputs as table nodes.
MRML only, no Qt."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from LandmarkDetectionLib import datasets, mrml
from LandmarkDetectionLib.agreement import FILES as AGREEMENT_FILES
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import atomic_write_text, read_landmarks, read_volume, safe_name

from .session import AnnotationSession
from .tables import table_from_csv

IMAGE_ATTRIBUTE = "LandmarkTraining.Image"  # on a volume node loaded from a dataset: its image file
ASSISTANCE_SUFFIX = ".assistance.json"  # v<N>.assistance.json beside annotations/<case>/<annotator>/v<N>.mrk.json


@dataclass
class Saved:
    entry: datasets.Entry  # the manifest row of the new version
    assistance: Path | None  # the model-assistance record, when a model pre-filled the case


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
    (unchanged since read, not transformed), otherwise a temporary NRRD export with its world geometry."""
    storage = volume.GetStorageNode()
    source = Path(storage.GetFileName()) if storage is not None and storage.GetFileName() else None
    if (source is not None and source.is_file() and not volume.GetModifiedSinceRead()
            and volume.GetParentTransformNode() is None):
        yield source
        return
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory(prefix="LandmarkTraining-") as folder:
        path = Path(folder) / f"{safe_name(volume.GetName())}.nrrd"
        sitk.WriteImage(mrml.volume_to_image(volume), str(path), True)
        yield path


def save_session(session: AnnotationSession, folder: str | Path, annotator: str, status: str = "complete",
                 case: str | None = None) -> Saved:
    """Save the session's landmarks as the next version of ``annotator``'s annotation of the case (a new
    case copies the scan in); earlier versions stay. A model-assisted session also writes its assistance
    record beside the version."""
    folder = Path(folder)
    _check_schema(folder, session)
    case = case or case_name(session)
    coords = session.coordinates()
    if case in datasets.list_cases(folder) and _is_case_image(session.volume, folder, case):
        entry = datasets.save_annotation(folder, case, annotator, coords, status, session.provenance)
    else:  # a new case, or a scan from elsewhere: add_case checks that it is the case's scan
        with _scan_file(session.volume) as image:
            entry = datasets.add_case(folder, image, coords, annotator, case, status, session.provenance)
    session.dataset = (folder, case)
    return Saved(entry, _write_assistance(session, entry))


def assistance_path(entry: datasets.Entry) -> Path:
    return entry.landmarks.parent / f"v{entry.version}{ASSISTANCE_SUFFIX}"


def _write_assistance(session: AnnotationSession, entry: datasets.Entry) -> Path | None:
    records = session.assistance()
    if records is None:
        return None
    path = assistance_path(entry)
    if path.exists():
        raise LandmarkError(path, "already exists; assistance records are never overwritten")
    counts = {action: sum(r["action"] == action for r in records)
              for action in ("accepted", "moved", "removed", "added", "missing")}
    document = {"format": "LandmarkTraining.assistance", "version": 1, "model": session.model,
                "annotation": entry.landmarks.name, "counts": counts, "landmarks": records}
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")
    return path


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
    """A session on one saved version (default: the newest) of ``annotator``'s annotation of ``case``, on the
    case's scan; saving it adds a new version."""
    folder = Path(folder)
    schema = datasets.dataset_schema(folder)
    versions = datasets.list_versions(folder, case, annotator)
    chosen = versions[-1] if version is None else next((v for v in versions if v.number == version), None)
    if chosen is None:
        raise LandmarkError(folder, f"case '{case}' has no version {version} by '{annotator}' (versions: "
                                    f"{', '.join(str(v.number) for v in versions)})")
    coords = read_landmarks(chosen.path, schema)
    entry = next(e for e in datasets.read_entries(folder) if e.case == case)
    volume = _case_volume(scene, entry.image, case)
    session = AnnotationSession(scene, schema, volume, coords, name=f"{case} {annotator} v{chosen.number}")
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
