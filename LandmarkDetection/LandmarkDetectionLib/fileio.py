"""Reading and writing volumes and landmark files with exact geometry.

Volumes: anything SimpleITK reads (NIfTI, NRRD, MHA, ...) and DICOM series folders.
Landmarks: Slicer ``.mrk.json`` (any coordinate system it declares; written in LPS as Slicer does),
``.fcsv`` (RAS or LPS header) and CSV (name,x,y,z in RAS, or name,l,p,s in LPS).
Every write is atomic: a temporary file in the same folder replaced into place, so a failure never
leaves a half-written output.
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import io as _io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LandmarkError
from .schema import Schema

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
LANDMARK_SUFFIXES = (".mrk.json", ".fcsv", ".csv", ".json")
MARKUPS_SCHEMA_URL = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                      "Resources/Schema/markups-schema-v1.0.3.json#")
_LPS = np.array([-1.0, -1.0, 1.0])


def stem(path: str | Path) -> str:
    """File name without its (possibly double) suffix: ``a/b.nii.gz`` -> ``b``."""
    name = Path(path).name
    for suffix in (*VOLUME_SUFFIXES, *LANDMARK_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ---------------------------------------------------------------------------------------------- volumes
def read_volume(path: str | Path) -> sitk.Image:
    """A 3D scalar float32 image with its full geometry, or a LandmarkError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise LandmarkError(path, "does not exist")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            # The largest series of the folder: stray files and scout series are left out (data.input_volumes
            # warns about them where it discovers the inputs).
            files = max((reader.GetGDCMSeriesFileNames(str(path), uid) for uid in reader.GetGDCMSeriesIDs(str(path))),
                        key=len, default=())
            if not files:
                raise LandmarkError(path, "folder holds no DICOM series")
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
            _check_nifti_finite(path)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise LandmarkError(path, f"not a readable image ({first[-1] if first else 'unknown format'})") from None
    except (MemoryError, OverflowError):
        raise LandmarkError(path, "not a readable image (its header declares an impossible size)") from None
    return check_volume(image, path)


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader turns NaN voxels into 0 without a word; look at the raw float data instead
    (nibabel comes with TorchIO)."""
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel

    try:
        nifti = nibabel.load(str(path))
    except Exception:  # SimpleITK read it; nibabel's opinion is only a second check
        return
    try:
        data = np.asanyarray(nifti.dataobj) if nifti.get_data_dtype().kind == "f" else None
    except OSError as error:  # the header promises more voxels than the file holds
        raise LandmarkError(path, f"voxel data is truncated or damaged ({error})") from None
    except Exception:  # noqa: BLE001 - any other nibabel complaint: SimpleITK's reading stands
        return
    if data is not None and not np.isfinite(data).all():
        raise LandmarkError(path, "contains NaN or infinite voxel values")


def check_volume(image: sitk.Image, path: str | Path = "<volume>") -> sitk.Image:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LandmarkError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                                  "a scalar 3D volume is needed")
    size = image.GetSize()
    if image.GetDimension() != 3:
        raise LandmarkError(path, f"is {image.GetDimension()}D (size {'x'.join(map(str, size))}); "
                                  "a 3D volume is needed")
    if min(size) < 2:
        raise LandmarkError(path, f"is a single slice (size {'x'.join(map(str, size))}); a 3D volume is needed")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise LandmarkError(path, "contains NaN or infinite voxel values")
    if float(values.max()) == float(values.min()):
        raise LandmarkError(path, f"is empty (every voxel is {float(values.min()):g})")
    return image


def write_volume(image: sitk.Image, path: str | Path) -> None:
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as error:  # ITK reports a full disk as a RuntimeError
            raise OSError(" ".join(str(error).split()[-8:])) from None


# -------------------------------------------------------------------------------------------- landmarks
@dataclass
class Point:
    label: str
    ras: np.ndarray  # (3,), NaN where the annotator marked the point missing
    description: str = ""


def read_points(path: str | Path) -> list[Point]:
    """Every control point of a landmark file, RAS mm, in file order (no schema matching)."""
    path = Path(path)
    if not path.is_file():
        raise LandmarkError(path, "does not exist")
    name = path.name.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise LandmarkError(path, f"cannot be read ({error})") from None
    if name.endswith(".json"):
        points = _read_markups_json(text, path)
    elif name.endswith(".fcsv"):
        points = _read_fcsv(text, path)
    elif name.endswith(".csv"):
        points = _read_csv(text, path)
    else:
        raise LandmarkError(path, f"unknown landmark format; expected one of {', '.join(LANDMARK_SUFFIXES)}")
    if not points:
        raise LandmarkError(path, "holds no landmarks")
    return points


def read_landmarks(path: str | Path, schema: Schema) -> np.ndarray:
    """The schema's landmarks from a file as a (K, 3) RAS array in schema order.

    Points are matched by label (name, alias or landmark number; for AFIDs ``.fcsv`` files the
    description is tried as well). Missing, extra, duplicated or unknown labels are errors; a point the
    annotator marked missing (Slicer positionStatus) becomes NaN.
    """
    points = read_points(path)
    coords = np.full((len(schema), 3), np.nan)
    found = [False] * len(schema)
    unknown = []
    for point in points:
        index = schema.lookup(point.label)
        if index is None and point.description:
            index = schema.lookup(point.description)
        if index is None:
            unknown.append(point.label or "<no label>")
            continue
        if found[index]:
            raise LandmarkError(path, f"landmark '{schema.landmarks[index].name}' appears more than once")
        found[index] = True
        coords[index] = point.ras
    if unknown:
        from .schema import schemas_fitting

        fitting = [name for name in schemas_fitting([p.label for p in points]) if name != schema.name]
        hint = f"; they fit schema '{fitting[0]}' (pass --schema {fitting[0]})" if fitting else ""
        raise LandmarkError(path, f"{len(unknown)} label(s) not in schema '{schema.name}': {_short(unknown)}{hint}")
    missing = [schema.landmarks[i].name for i, ok in enumerate(found) if not ok]
    if missing:
        raise LandmarkError(path, f"{len(missing)} landmark(s) of schema '{schema.name}' are missing: "
                                  f"{_short(missing)}")
    return coords


def _short(items, limit=6):
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _read_markups_json(text, path):
    try:
        data = json.loads(text)
        markups = data["markups"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LandmarkError(path, "not a Slicer markups JSON file (no 'markups' list)") from None
    if not isinstance(markups, list) or not all(isinstance(m, dict) for m in markups):
        raise LandmarkError(path, "not a Slicer markups JSON file ('markups' is not a list of markups)")
    points = []
    for markup in markups:
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise LandmarkError(path, f"unknown coordinateSystem {system!r}")
        sign = _LPS if system == "LPS" else np.ones(3)
        control_points = markup.get("controlPoints") or []
        if not isinstance(control_points, list) or not all(isinstance(cp, dict) for cp in control_points):
            raise LandmarkError(path, "markups 'controlPoints' is not a list of points")
        for cp in control_points:
            status = cp.get("positionStatus", "defined")
            position = cp.get("position")
            if status in ("missing", "undefined") or position is None:
                ras = np.full(3, np.nan)
            else:
                ras = _coordinates(position, path) * sign
            points.append(Point(str(cp.get("label", "")), ras, str(cp.get("description", ""))))
    return points


def _coordinates(values, path):
    try:
        xyz = np.asarray([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        raise LandmarkError(path, f"non-numeric coordinates {values!r}") from None
    if xyz.shape != (3,) or not np.isfinite(xyz).all():
        raise LandmarkError(path, f"bad coordinates {values!r}")
    return xyz


def _read_fcsv(text, path):
    system, columns, rows = "RAS", None, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                system = {"0": "RAS", "1": "LPS", "ras": "RAS", "lps": "LPS"}.get(value.lower())
                if system is None:
                    raise LandmarkError(path, f"unknown CoordinateSystem {value!r}")
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(next(csv.reader([line])))
    columns = columns or ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc"]
    try:
        ix, iy, iz, il = (columns.index(c) for c in ("x", "y", "z", "label"))
    except ValueError:
        raise LandmarkError(path, "fcsv header lacks x, y, z or label columns") from None
    idesc = columns.index("desc") if "desc" in columns else None
    sign = _LPS if system == "LPS" else np.ones(3)
    points = []
    for row in rows:
        if len(row) <= max(ix, iy, iz, il):
            raise LandmarkError(path, f"truncated row {','.join(row)!r}")
        desc = row[idesc] if idesc is not None and idesc < len(row) else ""
        points.append(Point(row[il], _coordinates([row[ix], row[iy], row[iz]], path) * sign, desc))
    return points


def _read_csv(text, path):
    reader = csv.DictReader(_io.StringIO(text))
    fields = {f.strip().lower(): f for f in (reader.fieldnames or [])}
    label = fields.get("name") or fields.get("label")
    if label is None:
        raise LandmarkError(path, "CSV needs a 'name' (or 'label') column")
    systems = [axes for axes in (("l", "p", "s"), ("x", "y", "z"), ("r", "a", "s")) if all(c in fields for c in axes)]
    if len(systems) > 1:
        raise LandmarkError(path, "CSV has both LPS (l,p,s) and RAS (x,y,z or r,a,s) coordinate columns; keep one")
    if all(c in fields for c in ("l", "p", "s")):
        keys, sign = ("l", "p", "s"), _LPS
    elif all(c in fields for c in ("x", "y", "z")):
        keys, sign = ("x", "y", "z"), np.ones(3)
    elif all(c in fields for c in ("r", "a", "s")):
        keys, sign = ("r", "a", "s"), np.ones(3)
    else:
        raise LandmarkError(path, "CSV needs x,y,z (RAS) or l,p,s (LPS) columns")
    points = []
    for row in reader:
        values = [row[fields[k]] for k in keys]
        if all(v in ("", None) for v in values):
            ras = np.full(3, np.nan)
        else:
            ras = _coordinates(values, path) * sign
        points.append(Point(row[label].strip(), ras, (row.get(fields.get("sub_anatomy", ""), "") or "")))
    return points


def _control_point(n: int, label: str, description: str, ras, locked: bool) -> dict:
    """One control point of a markups JSON document (LPS); NaN coordinates are a missing point."""
    ras = np.asarray(ras, dtype=float)
    defined = bool(np.isfinite(ras).all())
    return {"id": str(n + 1), "label": label, "description": description, "associatedNodeID": "",
            "position": [float(v) for v in ras * _LPS] if defined else [0.0, 0.0, 0.0],
            "orientation": [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0],
            "selected": True, "locked": locked, "visibility": True,
            "positionStatus": "defined" if defined else "missing"}


def _markups_document(kind: str, name: str, control_points: list[dict], locked: bool, color) -> dict:
    markup = {"type": kind, "coordinateSystem": "LPS", "coordinateUnits": "mm", "locked": locked,
              "fixedNumberOfControlPoints": False, "labelFormat": "%N-%d", "name": name,
              "lastUsedControlPointNumber": len(control_points), "controlPoints": control_points}
    if color is not None:
        markup["display"] = {"color": list(color), "selectedColor": list(color)}
    return {"@schema": MARKUPS_SCHEMA_URL, "markups": [markup]}


def markups_json(schema: Schema, coords_ras: np.ndarray, indices=None, name="Landmarks", locked=False,
                 color=None) -> dict:
    """A Slicer markups JSON document (LPS, as Slicer writes) for the given schema landmarks."""
    indices = range(len(schema)) if indices is None else indices
    control_points = [_control_point(n, schema.landmarks[i].name, schema.landmarks[i].sub_anatomy, coords_ras[i],
                                     locked) for n, i in enumerate(indices)]
    return _markups_document("Fiducial", name, control_points, locked, color)


def write_markups_json(path, schema: Schema, coords_ras, **kwargs) -> None:
    atomic_write_text(path, json.dumps(markups_json(schema, coords_ras, **kwargs), indent=2))


def curve_markups_json(points_ras, name: str, closed: bool = False, locked: bool = False, color=None) -> dict:
    """A Slicer markups JSON document (LPS) of one Curve, or ClosedCurve, whose control points are the
    (N >= 2, 3) RAS ``points_ras`` in order (a closed curve's last point is left out when it repeats the
    first: the markup closes itself). One curve per file: Slicer reads the first markup of a file."""
    points = np.asarray(points_ras, dtype=float)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2 or not np.isfinite(points).all():
        raise ValueError(f"curve {name!r}: expected (N >= 2, 3) finite points, got shape {points.shape}")
    if closed and len(points) > 2 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    control_points = [_control_point(n, f"{name}-{n + 1}", "", point, locked) for n, point in enumerate(points)]
    return _markups_document("ClosedCurve" if closed else "Curve", name, control_points, locked, color)


def write_curve_json(path, points_ras, name: str, closed: bool = False, **kwargs) -> None:
    """Write one boundary curve as a Slicer ``.mrk.json`` (see curve_markups_json)."""
    atomic_write_text(path, json.dumps(curve_markups_json(points_ras, name, closed, **kwargs), indent=2))


def landmarks_csv_text(schema: Schema, coords_ras: np.ndarray, extra: dict | None = None) -> str:
    """CSV text: number, name, sub_anatomy, x, y, z (RAS mm), then any extra per-landmark columns."""
    extra = extra or {}
    out = _io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["number", "name", "sub_anatomy", "x", "y", "z", *extra])
    for i, lm in enumerate(schema.landmarks):
        xyz = ["" if not np.isfinite(v) else f"{v:.4f}" for v in coords_ras[i]]
        writer.writerow([lm.number, lm.name, lm.sub_anatomy, *xyz, *(_fmt(col[i]) for col in extra.values())])
    return out.getvalue()


def _fmt(value):
    return f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)


def write_landmarks(path, schema: Schema, coords_ras) -> None:
    """Write landmarks in the format the suffix names (.mrk.json, .fcsv or .csv)."""
    name = str(path).lower()
    if name.endswith(".json"):
        write_markups_json(path, schema, coords_ras)
    elif name.endswith(".csv"):
        atomic_write_text(path, landmarks_csv_text(schema, coords_ras))
    elif name.endswith(".fcsv"):
        lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = LPS",
                 "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
        for i, lm in enumerate(schema.landmarks):
            l, p, s = (float(v) for v in np.asarray(coords_ras[i], dtype=float) * _LPS)
            lines.append(f"{i + 1},{l!r},{p!r},{s!r},0,0,0,1,1,1,0,{lm.name},{lm.sub_anatomy},")
        atomic_write_text(path, "\n".join(lines) + "\n")
    else:
        raise LandmarkError(path, "unknown landmark format; expected one of .mrk.json, .fcsv, .csv")


# ------------------------------------------------------------------------------------------ atomic writes
_STAGED: contextvars.ContextVar[list | None] = contextvars.ContextVar("staged_writes", default=None)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` (at the end of an enclosing
    ``written_together`` block, if any), on failure it vanishes. A failed write (a full disk) is a
    LandmarkError naming the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise LandmarkError(path.parent, f"cannot write here ({error.strerror or error})") from None
    staged = _STAGED.get()
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        if staged is None:
            os.replace(tmp, path)
        else:
            staged.append((tmp, path))
            tmp = None
    except OSError as error:
        raise LandmarkError(path, f"could not be written ({error.strerror or error})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def written_together():
    """Files that belong together (landmarks, CSV, uncertainty): every atomic write inside the block lands
    when the block ends without error, all of them, or none (a full disk half-way leaves nothing)."""
    staged: list = []
    token = _STAGED.set(staged)
    try:
        yield
        for tmp, path in staged:
            os.replace(tmp, path)
        staged.clear()
    finally:
        _STAGED.reset(token)
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)


def remove_if_empty(folder: str | Path) -> None:
    """Remove ``folder`` and its subfolders if no file is left in them (after a failed run)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def safe_name(name: str) -> str:
    """A file name from any text (case, landmark, volume names): letters, digits, '-', '_' and '.', never
    a path, never hidden, never empty."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).lstrip(".")
    return cleaned or "unnamed"


def check_outputs(paths, inputs=(), overwrite: bool = False) -> None:
    """The one check every command makes before it writes: no output is (or resolves to) an input, and
    existing outputs are replaced only with ``overwrite``. Raises before anything is written."""
    resolved_inputs = {Path(p).resolve() for p in inputs if p}
    for path in paths:
        if Path(path).resolve() in resolved_inputs:
            raise LandmarkError(path, "output would overwrite an input (inputs are never touched); choose another output")
    if not overwrite:
        for path in paths:
            if Path(path).exists():
                raise LandmarkError(path, "already exists; pass --overwrite to replace it")


def check_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise LandmarkError(path, f"output folder is not writable ({error.strerror or error})") from None
    return path
