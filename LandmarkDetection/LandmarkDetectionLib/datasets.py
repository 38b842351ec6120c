"""Annotation datasets: scans and versioned landmark annotations by several annotators, in one folder
whose manifest ``train`` reads directly.

Layout of a dataset folder::

    dataset.json                          schema (a built-in name, or schema.json beside it), creation time
    manifest.csv                          one row per (case, annotator): what train and agreement read
    images/<case>.nii.gz                  the scan, copied in once (the user's file is never touched)
    annotations/<case>/<annotator>/v1.mrk.json, v2.mrk.json, ...   every saved version, never overwritten
    annotations/<case>/<annotator>/v2.curves/<Sub_Anatomy>-01.mrk.json ...   a version's boundary curves
    annotations/<case>/<annotator>/v2.assistance.json               a version's model-assistance record
    annotations/<case>/<annotator>/versions.json                    status, provenance, time and extras of each

A version may carry the whole annotation, not only its landmarks: the boundary curves the secondary points
were spaced along (one Slicer curve ``.mrk.json`` per curve, named after its sub-anatomy, so ``qa --curves``
and Slicer read them; a dense polyline, the curve exactly as the QA measured it) and the record of what the
annotator did with a model's suggestions. ``load_annotation`` gives all of it back.

The manifest has data.py's columns (image, landmarks, extra_images, split, group, name) plus
``training``, ``annotator``, ``status`` (draft, complete, reviewed), ``provenance`` (manual, imported,
model-assisted:<model name>), ``created`` (ISO time, UTC) and ``version``. Each row points to the
annotator's newest version.

Several annotators per case: ``train`` needs one annotation per case, so exactly one row of a case has
``training`` = yes and the others no (data.py skips rows marked no). The training row is the case's best
annotation: reviewed before complete, then the newest, then the annotator's name; a draft is never trained
on, so a case with drafts only has no training row (train leaves it out). Every row keeps the case's
split and group. The rule is applied on every save, so hand edits of the training column do not last.

Every file is written atomically, the annotation, its versions.json and the manifest of one save land
together, and a lock file serialises saves by concurrent processes of one user.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .annotation import Curve, as_curves, read_curves
from .digest import file_sha256
from .errors import LandmarkError
from .fileio import (
    atomic_path,
    atomic_write_text,
    read_landmarks,
    read_volume,
    safe_name,
    stem,
    write_curve_json,
    write_markups_json,
    written_together,
)
from .schema import Schema, builtin_schemas, load_schema

INFO = "dataset.json"
MANIFEST = "manifest.csv"
COLUMNS = ("image", "landmarks", "extra_images", "split", "group", "name",
           "training", "annotator", "status", "provenance", "created", "version")
STATUSES = ("draft", "complete", "reviewed")  # in rising order of trust
PROVENANCES = ("manual", "imported", "model-assisted:<model name>")
SPLITS = ("", "train", "val", "test")
_COPIED_AS_IS = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats; others are converted to .nrrd
LOCK = ".dataset.lock"
LOCK_STALE_S = 120.0  # a lock older than this was left by a process that died


@dataclass(frozen=True)
class Entry:
    """One manifest row: a case's newest annotation by one annotator."""

    case: str
    annotator: str
    image: Path  # absolute
    landmarks: Path  # absolute: annotations/<case>/<annotator>/v<version>.mrk.json
    version: int
    status: str
    provenance: str
    created: str  # ISO time (UTC) the version was saved
    split: str = ""  # the case's split ('' = train decides)
    group: str = ""
    extra_images: tuple[Path, ...] = ()
    training: bool = False  # the row train reads for this case


@dataclass(frozen=True)
class Version:
    """One saved annotation version."""

    number: int
    path: Path
    status: str
    provenance: str
    created: str
    source: str = ""  # the file it was saved from, when it came from one
    curves: Path | None = None  # the folder of its boundary curves, when it has any
    assistance: Path | None = None  # its model-assistance record, when a model pre-filled it


@dataclass(frozen=True)
class StoredAnnotation:
    """One saved version with everything stored with it."""

    version: Version
    landmarks: np.ndarray  # (K, 3) RAS in schema order, NaN where not placed
    curves: dict[str, list[Curve]]  # {sub-anatomy: [Curve]}; empty without curves
    assistance: dict | None  # the model-assistance record (annotation.assistance_document), if any


# ------------------------------------------------------------------------------------------------ reading
def is_dataset(folder: str | Path) -> bool:
    return (Path(folder) / INFO).is_file()


def _check_dataset(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise LandmarkError(folder, "dataset does not exist")
    if not is_dataset(folder):
        raise LandmarkError(folder, f"not a dataset (no {INFO}); create one with: landmark-detection dataset create "
                                    f"{folder} --schema brain-88")
    return folder


def dataset_info(folder: str | Path) -> dict:
    """The dataset's ``dataset.json``."""
    path = _check_dataset(folder) / INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LandmarkError(path, f"not a readable dataset description ({error})") from None
    if not isinstance(info, dict) or not isinstance(info.get("schema"), str):
        raise LandmarkError(path, "not a dataset description (no 'schema')")
    return info


def dataset_schema(folder: str | Path) -> Schema:
    """The schema every annotation of the dataset follows."""
    name = dataset_info(folder)["schema"]
    if name in builtin_schemas():
        return load_schema(name)
    return load_schema(Path(folder) / name)


def read_entries(folder: str | Path) -> list[Entry]:
    """The manifest's rows, sorted by case and annotator."""
    folder = _check_dataset(folder)
    path = folder / MANIFEST
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        rows = list(reader)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise LandmarkError(path, f"not a readable CSV manifest ({error})") from None
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise LandmarkError(path, f"not a dataset manifest (no column(s) {', '.join(missing)})")
    entries = []
    for line, row in enumerate(rows, start=2):
        row = {key: (value or "").strip() for key, value in row.items() if key is not None}
        try:
            version = int(row["version"])
        except ValueError:
            raise LandmarkError(path, f"line {line}: version {row['version']!r} is not a number") from None
        extra = tuple(folder / p for p in row["extra_images"].split(";") if p)
        entries.append(Entry(row["name"], row["annotator"], folder / row["image"], folder / row["landmarks"], version,
                             row["status"], row["provenance"], row["created"], row["split"], row["group"], extra,
                             row["training"].lower() == "yes"))
    return sorted(entries, key=lambda e: (e.case, e.annotator))


def list_cases(folder: str | Path) -> list[str]:
    return sorted({e.case for e in read_entries(folder)})


def list_annotators(folder: str | Path, case: str | None = None) -> list[str]:
    """The annotators of one case, or of the whole dataset."""
    entries = read_entries(folder)
    if case is not None:
        entries = _case_entries(folder, entries, case)
    return sorted({e.annotator for e in entries})


def list_versions(folder: str | Path, case: str, annotator: str) -> list[Version]:
    """Every saved version of one annotator's annotation of a case, oldest first."""
    entries = _case_entries(folder, read_entries(folder), case)
    if annotator not in {e.annotator for e in entries}:
        raise LandmarkError(folder, f"case '{case}' has no annotation by '{annotator}' (annotators: "
                                    f"{', '.join(sorted({e.annotator for e in entries}))})")
    return _read_versions(Path(folder) / "annotations" / case / annotator)


def _case_entries(folder, entries: list[Entry], case: str) -> list[Entry]:
    chosen = [e for e in entries if e.case == case]
    if not chosen:
        raise LandmarkError(folder, f"dataset has no case '{case}'")
    return chosen


def _read_versions(annotator_dir: Path) -> list[Version]:
    path = annotator_dir / "versions.json"
    if path.is_file():
        try:
            records = json.loads(path.read_text(encoding="utf-8"))["versions"]
            return [Version(int(r["version"]), annotator_dir / r["file"], r.get("status", ""), r.get("provenance", ""),
                            r.get("created", ""), r.get("source", ""),
                            annotator_dir / r["curves"] if r.get("curves") else None,
                            annotator_dir / r["assistance"] if r.get("assistance") else None) for r in records]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise LandmarkError(path, f"not a readable version list ({error})") from None
    # without the list (a hand-made folder): the version files themselves
    numbers = sorted(_version_number(p) for p in annotator_dir.glob("v*.mrk.json") if _version_number(p))
    return [Version(n, annotator_dir / f"v{n}.mrk.json", "", "", "") for n in numbers]


def _version_number(path: Path) -> int:
    """N of a version's file or extra (v<N>.mrk.json, v<N>.curves, v<N>.assistance.json); 0 for other names."""
    text = path.name[1:].split(".", 1)[0] if path.name.startswith("v") else ""
    return int(text) if text.isdigit() else 0


def load_annotation(folder: str | Path, case: str, annotator: str, version: int | None = None) -> StoredAnnotation:
    """One saved version (default: the newest) of ``annotator``'s annotation of ``case``, with its boundary
    curves and model-assistance record."""
    folder = Path(folder)
    schema = dataset_schema(folder)
    versions = list_versions(folder, case, annotator)
    chosen = versions[-1] if version is None else next((v for v in versions if v.number == version), None)
    if chosen is None:
        raise LandmarkError(folder, f"case '{case}' has no version {version} by '{annotator}' (versions: "
                                    f"{', '.join(str(v.number) for v in versions)})")
    curves = read_curves(chosen.curves, schema)[0] if chosen.curves else {}
    assistance = None
    if chosen.assistance:
        try:
            assistance = json.loads(chosen.assistance.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LandmarkError(chosen.assistance, f"not a readable assistance record ({error})") from None
    return StoredAnnotation(chosen, read_landmarks(chosen.path, schema), curves, assistance)


def version_curves(landmarks: str | Path) -> Path | None:
    """The boundary curves a dataset stored with an annotation version file (annotations/<case>/<annotator>/
    v<N>.mrk.json: its v<N>.curves folder), or None for any other file or a version without curves."""
    path = Path(landmarks)
    if not (path.parent / "versions.json").is_file():
        return None
    return next((v.curves for v in _read_versions(path.parent) if v.path.name == path.name), None)


# ------------------------------------------------------------------------------------------------ writing
def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time(text: str) -> datetime:
    """An ISO time from the manifest (a hand-edited one too); unreadable ones count as oldest."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def create_dataset(folder: str | Path, schema: str | Path = "brain-88") -> Path:
    """A new, empty dataset in ``folder`` (created if needed) for annotations following ``schema`` (a
    built-in schema name, or a schema file, which is copied in as schema.json)."""
    folder = Path(folder)
    loaded = load_schema(schema)
    for name in (INFO, MANIFEST):
        if (folder / name).exists():
            raise LandmarkError(folder / name, "already exists: the folder already holds a dataset")
    if folder.exists() and not folder.is_dir():
        raise LandmarkError(folder, "is a file, not a folder")
    info = {"format": "LandmarkDetectionLib.dataset", "version": 1, "created": now_utc()}
    with written_together():
        if str(schema) in builtin_schemas():
            info["schema"] = str(schema)
        else:
            info["schema"] = "schema.json"
            atomic_write_text(folder / "schema.json", json.dumps(loaded.to_dict(), indent=1) + "\n")
        atomic_write_text(folder / MANIFEST, _manifest_text(folder, []))
        atomic_write_text(folder / INFO, json.dumps(info, indent=1) + "\n")
    return folder


def add_case(folder: str | Path, image: str | Path | None, landmarks, annotator: str, case: str | None = None,
             status: str = "complete", provenance: str = "manual", split: str | None = None,
             group: str | None = None, extra_images=(), curves=None, assistance: dict | None = None) -> Entry:
    """Add ``annotator``'s annotation of a scan: a new case (the scan copied in), or, when the case exists,
    a new version by this annotator (``image``, if given, must be the case's scan).

    ``landmarks``: a landmark file (.mrk.json, .fcsv, .csv) or a (K, 3) RAS array in schema order. ``case``
    defaults to the scan's file name. ``split`` and ``group`` set the case's split (train, val, test or ''
    for train to decide) and group; None keeps them. ``curves`` and ``assistance`` are stored with the
    version (see save_annotation). Returns the manifest row of the new version.
    """
    folder = _check_dataset(folder)
    with _locked(folder):
        entries = read_entries(folder)
        if case is None:
            if image is None:
                raise LandmarkError(folder, "a new case needs an image (or name an existing case)")
            case = safe_name(stem(image))
        _check_name(case, "case")
        known = [e for e in entries if e.case == case]
        _check_unique(folder, case, {e.case for e in entries}, "case")
        with written_together():
            if known:
                if image is not None:
                    _check_same_image(Path(image), known[0].image, case)
                if extra_images:
                    raise LandmarkError(folder, f"case '{case}' exists; its extra images cannot be changed")
                image_path, extra = known[0].image, known[0].extra_images
            else:
                if image is None:
                    raise LandmarkError(folder, f"dataset has no case '{case}'; a new case needs an image")
                image_path = _copy_volume(Path(image), folder / "images", case)
                extra = tuple(_copy_volume(Path(p), folder / "images", f"{case}_extra-{i}")
                              for i, p in enumerate(extra_images, start=1))
            template = Entry(case, annotator, image_path, Path(), 0, "", "", "",
                             known[0].split if known else "", known[0].group if known else "", extra)
            return _save(folder, entries, template, landmarks, status, provenance, split, group, curves, assistance)


def save_annotation(folder: str | Path, case: str, annotator: str, landmarks, status: str = "complete",
                    provenance: str = "manual", curves=None, assistance: dict | None = None) -> Entry:
    """Save a new version of ``annotator``'s annotation of an existing case (a new annotator may start
    one); earlier versions stay as they are. ``landmarks``: a file or a (K, 3) RAS array in schema order.

    Stored with the version, when given: ``curves``, the boundary curves ({sub-anatomy: Curve, (N, 3) RAS
    points or a list of them}, as annotation_qa takes them), and ``assistance``, the model-assistance
    record (a JSON object, annotation.assistance_document). Everything of one save lands together."""
    folder = _check_dataset(folder)
    with _locked(folder):
        entries = read_entries(folder)
        known = _case_entries(folder, entries, case)
        with written_together():
            template = Entry(case, annotator, known[0].image, Path(), 0, "", "", "", known[0].split,
                             known[0].group, known[0].extra_images)
            return _save(folder, entries, template, landmarks, status, provenance, None, None, curves, assistance)


def _save(folder: Path, entries: list[Entry], template: Entry, landmarks, status, provenance, split, group,
          curves=None, assistance=None) -> Entry:
    """Write the next version of (case, annotator) with its extras, its versions.json and the manifest
    (inside the caller's lock and written_together block)."""
    _check_name(template.annotator, "annotator")
    _check_unique(folder, template.annotator, {e.annotator for e in entries if e.case == template.case}, "annotator")
    if status not in STATUSES:
        raise LandmarkError(folder, f"status {status!r} is not one of {', '.join(STATUSES)}")
    _check_provenance(folder, provenance)
    if split is not None and split not in SPLITS:
        raise LandmarkError(folder, f"split {split!r} is not one of train, val, test (or empty)")
    schema = dataset_schema(folder)
    if isinstance(landmarks, (str, Path)):
        source = str(Path(landmarks).resolve())
        coords = read_landmarks(landmarks, schema)
    else:
        source = ""
        coords = np.asarray(landmarks, dtype=float)
        if coords.shape != (len(schema), 3):
            raise LandmarkError(folder, f"landmarks have shape {coords.shape}; schema '{schema.name}' needs "
                                        f"({len(schema)}, 3)")
    curves = _checked_curves(folder, schema, curves)
    annotator_dir = folder / "annotations" / template.case / template.annotator
    versions = _read_versions(annotator_dir)
    # above every number in use, a file or folder left by a failed save included: nothing is ever reused
    number = max([v.number for v in versions] + [_version_number(p) for p in annotator_dir.glob("v*")] + [0]) + 1
    path = annotator_dir / f"v{number}.mrk.json"
    curves_dir = annotator_dir / f"v{number}.curves" if curves else None
    assistance_path = annotator_dir / f"v{number}.assistance.json" if assistance is not None else None
    assistance_text = _assistance_text(folder, assistance, path.name) if assistance is not None else None
    for target in (path, curves_dir, assistance_path):
        if target is not None and target.exists():  # cannot happen under the lock; never overwrite a version
            raise LandmarkError(target, "already exists; annotation versions are never overwritten")
    created = now_utc()
    write_markups_json(path, schema, coords, name=f"{template.case} {template.annotator} v{number}")
    for sub, sub_curves in curves.items():
        for k, curve in enumerate(sub_curves, start=1):
            write_curve_json(curves_dir / f"{safe_name(sub)}-{k:02d}.mrk.json", curve.points, f"{sub} boundary {k}",
                             curve.closed)
    if assistance_path is not None:
        atomic_write_text(assistance_path, assistance_text)
    record = Version(number, path, status, provenance, created, source, curves_dir, assistance_path)
    atomic_write_text(annotator_dir / "versions.json", _versions_text(template, [*versions, record]))
    entry = replace(template, landmarks=path, version=number, status=status, provenance=provenance, created=created)
    split = entry.split if split is None else split
    group = entry.group if group is None else group
    rows = [e for e in entries if (e.case, e.annotator) != (entry.case, entry.annotator)] + [entry]
    rows = [replace(e, split=split, group=group) if e.case == entry.case else e for e in rows]  # per case
    updated = choose_training(sorted(rows, key=lambda e: (e.case, e.annotator)))
    atomic_write_text(folder / MANIFEST, _manifest_text(folder, updated))
    return next(e for e in updated if (e.case, e.annotator) == (entry.case, entry.annotator))


def _checked_curves(folder: Path, schema: Schema, curves) -> dict[str, list[Curve]]:
    """{sub-anatomy: [Curve]} of the schema's sub-anatomies, each with two distinct finite points at least."""
    try:
        checked = as_curves(curves, schema)
        for sub_curves in checked.values():
            for curve in sub_curves:
                curve.polyline  # noqa: B018 - building it checks for two distinct finite points
    except ValueError as error:
        raise LandmarkError(folder, f"boundary curves: {error}") from None
    return {sub: sub_curves for sub, sub_curves in checked.items() if sub_curves}


def _assistance_text(folder: Path, assistance, annotation: str) -> str:
    """The model-assistance record as the JSON text stored beside the annotation version it describes."""
    if not isinstance(assistance, dict):
        raise LandmarkError(folder, "the model-assistance record must be a JSON object")
    try:
        return json.dumps({**assistance, "annotation": annotation}, indent=1) + "\n"
    except (TypeError, ValueError) as error:
        raise LandmarkError(folder, f"the model-assistance record is not JSON ({error})") from None


def choose_training(entries: list[Entry]) -> list[Entry]:
    """Mark the one row per case that train reads: no drafts; reviewed before complete, then the newest,
    then the first annotator by name."""
    best = {}
    candidates = sorted((e for e in entries if e.status in STATUSES[1:]), key=lambda e: e.annotator)
    # stable sort: among equal status and time the first name stays first
    for e in sorted(candidates, key=lambda e: (STATUSES.index(e.status), _time(e.created)), reverse=True):
        best.setdefault(e.case, e)
    return [replace(e, training=best.get(e.case) is e) for e in entries]


def _manifest_text(folder: Path, entries: list[Entry]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for e in entries:
        writer.writerow([_relative(e.image, folder), _relative(e.landmarks, folder),
                         ";".join(_relative(p, folder) for p in e.extra_images), e.split, e.group, e.case,
                         "yes" if e.training else "no", e.annotator, e.status, e.provenance, e.created, e.version])
    return out.getvalue()


def _versions_text(template: Entry, versions: list[Version]) -> str:
    records = [{"version": v.number, "file": v.path.name, "status": v.status, "provenance": v.provenance,
                "created": v.created, "source": v.source, **({"curves": v.curves.name} if v.curves else {}),
                **({"assistance": v.assistance.name} if v.assistance else {})} for v in versions]
    return json.dumps({"case": template.case, "annotator": template.annotator, "versions": records}, indent=1) + "\n"


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(path, folder)).as_posix()


def _check_name(name: str, what: str) -> None:
    if not name or safe_name(name) != name or name in (".", ".."):
        raise LandmarkError(None, f"{what} name {name!r} must be letters, digits, '-', '_' and '.' "
                                  f"(for example {safe_name(name)!r})")


def _check_unique(folder: Path, name: str, existing: set[str], what: str) -> None:
    """Names differing only in case would share a folder on macOS and Windows."""
    clash = [n for n in existing if n != name and n.casefold() == name.casefold()]
    if clash:
        raise LandmarkError(folder, f"{what} '{name}' differs from existing {what} '{clash[0]}' only in letter case")


def _check_provenance(folder: Path, provenance: str) -> None:
    kind, _, model = provenance.partition(":")
    if provenance in ("manual", "imported") or (kind == "model-assisted" and model.strip()):
        return
    raise LandmarkError(folder, f"provenance {provenance!r} is not one of {', '.join(PROVENANCES)}")


def _copy_volume(source: Path, images: Path, name: str) -> Path:
    """The scan copied into the dataset once (byte for byte; multi-file formats and DICOM folders are
    converted to NRRD with their geometry and voxel type). The source is only read."""
    read_volume(source)  # a readable 3D scalar volume, or a LandmarkError naming it
    suffix = next((s for s in _COPIED_AS_IS if source.name.lower().endswith(s)), None) if source.is_file() else None
    target = images / f"{name}{suffix or '.nrrd'}"
    if target.exists():
        raise LandmarkError(target, "already exists in the dataset but no case uses it; remove it or choose another "
                                    "case name")
    with atomic_path(target, suffix=suffix or ".nrrd") as tmp:
        if suffix:
            shutil.copyfile(source, tmp)
        else:
            sitk.WriteImage(_read_raw(source), str(tmp), useCompression=True)
    return target


def _read_raw(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        files = max((reader.GetGDCMSeriesFileNames(str(path), uid) for uid in reader.GetGDCMSeriesIDs(str(path))),
                    key=len)
        reader.SetFileNames(files)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def _check_same_image(given: Path, stored: Path, case: str) -> None:
    if given.is_file() and file_sha256(given) == file_sha256(stored):
        return
    a, b = read_volume(given), read_volume(stored)
    same = (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection())
            and np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)))
    if not same:
        raise LandmarkError(given, f"is not the scan of case '{case}' ({stored.name}); name a new case with --case")




@contextlib.contextmanager
def _locked(folder: Path, timeout_s: float = 30.0):
    """One save at a time: a lock file created exclusively; one older than LOCK_STALE_S is taken over."""
    path = folder / LOCK
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            break
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > LOCK_STALE_S:
                    path.unlink()
                    continue
            if time.monotonic() > deadline:
                raise LandmarkError(path, "the dataset is busy (another save holds this lock); try again, or "
                                          "remove the file if no other save is running") from None
            time.sleep(0.05)
        except OSError as error:
            raise LandmarkError(folder, f"cannot write here ({error.strerror or error})") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------------------------------------- CLI
def add_dataset_command(subparsers) -> argparse.ArgumentParser:
    """Define ``dataset create|add|list`` on an argparse subparsers object; handler ``args.handler(args)``."""
    p = subparsers.add_parser("dataset", help="annotation datasets: scans with versioned annotations by several "
                                              "annotators, and a manifest train reads",
                              description="Annotation datasets: scans with versioned landmark annotations by several "
                                          "annotators, and a manifest.csv that train reads directly.")
    commands = p.add_subparsers(dest="dataset_command", required=True, metavar="{create,add,list}",
                                help="create a dataset, add a case or an annotation version, list what it holds")

    c = commands.add_parser("create", help="create an empty dataset folder",
                            description="Create an empty dataset: dataset.json and manifest.csv.")
    c.add_argument("dataset", metavar="DIR", help="dataset folder (created if needed)")
    c.add_argument("--schema", default="brain-88", help="schema name or JSON file the annotations follow "
                                                        "(default brain-88)")
    c.set_defaults(handler=run_create)

    a = commands.add_parser("add", help="add a scan's annotation (a new case, or a new version of an annotator's)",
                            description="Add an annotation: the scan is copied in once, the annotation saved as "
                                        "annotations/<case>/<annotator>/v<N>.mrk.json; earlier versions are kept.")
    a.add_argument("dataset", metavar="DIR", help="dataset folder made by 'dataset create'")
    a.add_argument("--image", default=None, help="the scan (needed for a new case; for an existing case it is "
                                                 "checked to be the case's scan)")
    a.add_argument("--landmarks", required=True, help="the annotation (.mrk.json, .fcsv or .csv); never modified")
    a.add_argument("--annotator", required=True, help="who annotated (letters, digits, '-', '_', '.')")
    a.add_argument("--case", default=None, help="case name (default: the scan's file name)")
    a.add_argument("--status", choices=STATUSES, default="complete",
                   help="draft (never trained on), complete or reviewed (default complete)")
    a.add_argument("--provenance", default="manual",
                   help="manual, imported or model-assisted:<model name> (default manual)")
    a.add_argument("--split", choices=("train", "val", "test"), default=None,
                   help="the case's split (default: keep it; train splits cases without one)")
    a.add_argument("--group", default=None, help="the case's group for per-group evaluation (default: keep it)")
    a.add_argument("--extra-image", action="append", default=[], metavar="SCAN",
                   help="another contrast of the same scan for synthetic training (repeatable; new cases only)")
    a.add_argument("--curves", default=None, metavar="PATH",
                   help="the annotation's boundary curves, stored with the version: a markups .mrk.json of "
                        "Curve/ClosedCurve markups or a folder of them, each named after its sub-anatomy (as qa "
                        "--curves reads them)")
    a.set_defaults(handler=run_add)

    s = commands.add_parser("list", help="list cases, annotators and versions",
                            description="List the dataset's cases, their annotators and annotation versions.")
    s.add_argument("dataset", metavar="DIR", help="dataset folder")
    s.set_defaults(handler=run_list)
    return p


def run_create(args) -> int:
    folder = create_dataset(args.dataset, args.schema)
    print(f"created dataset {folder} (schema {dataset_schema(folder).name}); add annotations with: "
          f"landmark-detection dataset add {folder} --image SCAN --landmarks FILE --annotator NAME; "
          f"train on it with: landmark-detection train --dataset {folder / MANIFEST}")
    return 0


def run_add(args) -> int:
    curves = read_curves(args.curves, dataset_schema(args.dataset))[0] if args.curves else None
    entry = add_case(args.dataset, args.image, args.landmarks, args.annotator, args.case, args.status,
                     args.provenance, args.split, args.group, args.extra_image, curves)
    folder = Path(args.dataset)
    print(f"{entry.case}: saved {args.annotator}'s annotation as {_relative(entry.landmarks, folder)} "
          f"({entry.status}, {entry.provenance}){'; train reads it' if entry.training else ''}")
    return 0


def run_list(args) -> int:
    print(listing_text(args.dataset))
    return 0


def listing_text(folder: str | Path) -> str:
    """Cases, annotators and versions as readable lines."""
    folder = Path(folder)
    entries = read_entries(folder)
    schema = dataset_info(folder)["schema"]
    cases = sorted({e.case for e in entries})
    training = sum(e.training for e in entries)
    annotators = len({e.annotator for e in entries})
    header = (f"{folder}: schema {schema}, {len(cases)} case(s), {annotators} annotator(s), {training} case(s) "
              f"train reads ({folder / MANIFEST})")
    lines = [header]
    for case in cases:
        rows = [e for e in entries if e.case == case]
        extras = f", split {rows[0].split}" if rows[0].split else ""
        extras += f", group {rows[0].group}" if rows[0].group else ""
        lines.append(f"{case}: {_relative(rows[0].image, folder)}{extras}")
        width = max(len(e.annotator) for e in rows)
        for e in rows:
            versions = _read_versions(e.landmarks.parent)
            newest = next((v for v in versions if v.number == e.version), None)
            extras = "".join(f"  +{name}" for name, stored in (("curves", newest and newest.curves),
                                                               ("assistance", newest and newest.assistance)) if stored)
            lines.append(f"  {e.annotator:<{width}}  v{e.version} of {len(versions)}  {e.status:<8}  {e.created}  "
                         f"{e.provenance}{extras}{'  <- train reads this' if e.training else ''}")
    return "\n".join(lines)
