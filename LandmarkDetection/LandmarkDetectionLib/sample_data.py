"""The bundled sample: the MNI152NLin2009cAsym T1w template and its human AFIDs-32 consensus.

Both ship inside the ``autoafids==0.1.4`` wheel on PyPI (autoafids: MIT; AFIDs annotations:
CC-BY-4.0; MNI ICBM 2009c template: (c) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University, used under its permissive licence). The wheel is
fetched with pip (the only network access the project needs), its SHA-256 checked, and the two files
are extracted into a cache folder and checked again. Nothing else is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .digest import file_sha256
from .errors import LandmarkError
from .resources import resources_dir


@dataclass(frozen=True)
class SampleFiles:
    t1w: Path
    afids: Path
    attribution: str
    t2w: Path | None = None


def manifest() -> dict:
    return json.loads((resources_dir() / "SampleData.json").read_text(encoding="utf-8"))


def cache_dir() -> Path:
    root = os.environ.get("LANDMARK_DETECTION_CACHE") or Path.home() / ".cache" / "landmark-detection"
    return Path(root)


def fetch_sample(folder: Path | None = None) -> SampleFiles:
    """The sample files, from the cache or freshly extracted from the pip-downloaded wheel."""
    from .fileio import atomic_write_bytes  # here: Slicer reads the manifest at startup, without SimpleITK

    info = manifest()
    folder = Path(folder) if folder else cache_dir() / "sample"
    files = {key: folder / Path(member).name for key, (member, _) in info["files"].items()}
    if all(p.exists() and file_sha256(p) == info["files"][k][1] for k, p in files.items()):
        return SampleFiles(files["t1w"], files["afids"], info["attribution"], files.get("t2w"))
    wheel = _download_wheel(info)
    with zipfile.ZipFile(wheel) as archive:
        for key, (member, digest) in info["files"].items():
            data = archive.read(member)
            if hashlib.sha256(data).hexdigest() != digest:
                raise LandmarkError(wheel, f"{member} does not match its SHA-256 {digest}")
            atomic_write_bytes(files[key], data)
    return SampleFiles(files["t1w"], files["afids"], info["attribution"], files.get("t2w"))


# The sample brain's annotation for each schema: AFIDs-32 is the human consensus in the wheel; brain-88 is
# the project's reference annotation of the same template (Resources/ReferenceAnnotations, its README section).
REFERENCE_ANNOTATIONS = {"brain-88": "ReferenceAnnotations/brain88_MNI152NLin2009cAsym.mrk.json"}
SAMPLE_SCHEMAS = ("afids-32", *REFERENCE_ANNOTATIONS)  # the schemas the sample brain is annotated with


def sample_landmarks_file(files: SampleFiles, schema: str = "afids-32") -> Path:
    """The file holding the sample brain's landmarks of ``schema``."""
    if schema == "afids-32":
        return files.afids
    if schema not in REFERENCE_ANNOTATIONS:
        raise LandmarkError(schema, f"the sample brain has no annotation of this schema; it has afids-32, "
                                    f"{', '.join(REFERENCE_ANNOTATIONS)}")
    return resources_dir() / REFERENCE_ANNOTATIONS[schema]


def _download_wheel(info: dict) -> Path:
    wheels = cache_dir() / "wheels"
    wheel = wheels / info["wheel"]
    if wheel.exists() and file_sha256(wheel) == info["wheel_sha256"]:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--quiet", "--dest", tmp, info["requirement"]]
        result = subprocess.run(command, capture_output=True, text=True)
        downloaded = Path(tmp) / info["wheel"]
        if result.returncode != 0 or not downloaded.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise LandmarkError(info["requirement"], f"pip could not download the sample wheel ({last})")
        if file_sha256(downloaded) != info["wheel_sha256"]:
            raise LandmarkError(downloaded, f"SHA-256 mismatch (expected {info['wheel_sha256']})")
        os.replace(downloaded, wheel)
    return wheel
