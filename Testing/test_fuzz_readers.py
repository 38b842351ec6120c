"""Every reader of user files, fed mutated bytes and random JSON (Hypothesis): it either reads the file
or raises a LandmarkError naming it. Any other exception (a traceback for the user) fails the test.

The case count is printed after the module (pytest -s shows it)."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from LandmarkDetectionLib.augment import load_config
from LandmarkDetectionLib.data import discover_cases
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.fileio import read_landmarks, read_volume, write_markups_json
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.modelheader import read_header
from LandmarkDetectionLib.resources import bundled_model_path, resources_dir
from LandmarkDetectionLib.schema import load_schema
from LandmarkDetectionLib.synth import SynthesisConfig
from LandmarkDetectionLib.uncertainty import read_uncertainty

EXAMPLES = 150
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CASES = {"count": 0}
WORK = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def mutated(data: bytes):
    """Up to 8 bytes overwritten, then an optional cut: damaged copies of a valid file."""
    edits = st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), max_size=8)
    return st.tuples(edits, st.integers(0, len(data))).map(lambda t: _apply(data, *t))


def _apply(data: bytes, edits, cut) -> bytes:
    buffer = bytearray(data)
    for position, value in edits:
        buffer[position] = value
    return bytes(buffer[: max(cut, 1)] if cut < len(data) // 2 else buffer)


def json_mutated(document):
    """The document with one value somewhere inside replaced by random JSON."""
    @st.composite
    def strategy(draw):
        doc = json.loads(json.dumps(document))
        parent, key = None, None
        node = doc
        for _ in range(draw(st.integers(0, 6))):
            if isinstance(node, dict) and node:
                k = draw(st.sampled_from(sorted(node)))
            elif isinstance(node, list) and node:
                k = draw(st.integers(0, len(node) - 1))
            else:
                break
            parent, key, node = node, k, node[k]
        value = draw(json_values)
        if parent is None:
            return value
        parent[key] = value
        return doc
    return strategy()


@pytest.fixture(scope="module", autouse=True)
def _report_case_count():
    yield
    print(f"\nfuzzed readers: {CASES['count']} cases, every one read or refused with a LandmarkError")


def _read_or_landmark_error(reader, path: Path):
    CASES["count"] += 1
    try:
        reader(path)
    except LandmarkError as error:
        # names the file, or the file it points to (a manifest's image or landmarks)
        assert str(WORK) in str(error) or path.name in str(error), f"error names no file: {error}"


def _fuzz_file(name: str, content: bytes, reader) -> None:
    path = WORK / name
    path.write_bytes(content)
    _read_or_landmark_error(reader, path)


# ------------------------------------------------------------------------------------------ valid originals
AFIDS = load_schema("afids-32")
_points = np.arange(AFIDS.__len__() * 3, dtype=float).reshape(-1, 3)
write_markups_json(WORK / "valid.mrk.json", AFIDS, _points)
MARKUPS = (WORK / "valid.mrk.json").read_bytes()
FCSV = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = 0\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        + "".join(f"{i},{x},{y},{z},0,0,0,1,1,1,0,{i},{lm.name},\n"
                  for i, (lm, (x, y, z)) in enumerate(zip(AFIDS.landmarks, _points), start=1))).encode()
CSV = ("name,x,y,z\n" + "".join(f"{lm.name},{x},{y},{z}\n" for lm, (x, y, z) in zip(AFIDS.landmarks, _points))).encode()
UNCERTAINTY = {"level": 0.9, "passes": 50, "landmarks": [
    {"name": lm.name, "mean_ras": [1.0, 2.0, 3.0], "covariance_ras": [[1, 0, 0], [0, 2, 0], [0, 0, 3]]}
    for lm in AFIDS.landmarks[:3]]}
SCHEMA = json.loads((resources_dir() / "Schemas" / "afids-32.json").read_text())
SYNTHESIS = json.loads((resources_dir() / "Augmentation" / "synthesis.json").read_text())
AUGMENT = json.loads((resources_dir() / "Augmentation" / "default.json").read_text())
_image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32))
sitk.WriteImage(_image, str(WORK / "valid.nii"))
NIFTI = (WORK / "valid.nii").read_bytes()
MODEL = bundled_model_path().read_bytes()
_length = struct.unpack("<Q", MODEL[:8])[0]
MODEL_HEADER = json.loads(MODEL[8:8 + _length])


def _model_with_metadata(metadata: dict) -> bytes:
    """The bundled model's tensors under another metadata block (values must be strings there)."""
    header = dict(MODEL_HEADER, __metadata__={k: v if isinstance(v, str) else json.dumps(v)
                                              for k, v in metadata.items()})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + MODEL[8 + _length:]


def _landmarks(path):
    return read_landmarks(path, AFIDS)


def _manifest(path):
    for case in discover_cases(path):
        read_landmarks(case.landmarks, AFIDS)


# ------------------------------------------------------------------------------------------------- tests
@FUZZ
@given(mutated(MARKUPS))
def test_markups_json_bytes(content):
    _fuzz_file("case.mrk.json", content, _landmarks)


@FUZZ
@given(json_mutated(json.loads(MARKUPS)))
def test_markups_json_structure(document):
    _fuzz_file("case.mrk.json", json.dumps(document).encode(), _landmarks)


@FUZZ
@given(mutated(FCSV))
def test_fcsv_bytes(content):
    _fuzz_file("case.fcsv", content, _landmarks)


@FUZZ
@given(mutated(CSV))
def test_csv_bytes(content):
    _fuzz_file("case.csv", content, _landmarks)


@FUZZ
@given(json_mutated(UNCERTAINTY))
def test_uncertainty_json(document):
    _fuzz_file("case.uncertainty.json", json.dumps(document).encode(), read_uncertainty)


@FUZZ
@given(json_mutated(SCHEMA))
def test_schema_json(document):
    _fuzz_file("schema.json", json.dumps(document).encode(), load_schema)


@FUZZ
@given(json_mutated(SYNTHESIS))
def test_synthesis_settings(document):
    _fuzz_file("synthesis.json", json.dumps(document).encode(), SynthesisConfig.load)


@FUZZ
@given(json_mutated(AUGMENT))
def test_augmentation_policies(document):
    _fuzz_file("policies.json", json.dumps(document).encode(), load_config)


@FUZZ
@given(mutated(NIFTI))
def test_nifti_bytes(content):
    _fuzz_file("volume.nii", content, read_volume)


@FUZZ
@given(st.text(max_size=300))
def test_manifest_text(text):
    shutil.copy(WORK / "valid.mrk.json", WORK / "a.mrk.json")
    _fuzz_file("manifest.csv", ("image,landmarks\nvolume.nii,a.mrk.json\n" + text).encode(), _manifest)


@FUZZ
@given(mutated(MODEL[: 8 + _length + 4096]))
def test_model_header_bytes(content):
    """Damage in the header (the tensors after it are cut: read_header must notice)."""
    _fuzz_file("model.safetensors", content, read_header)


@FUZZ
@given(st.sampled_from(["config", "schema", "training", "metrics"]).flatmap(
    lambda key: json_mutated(json.loads(MODEL_HEADER["__metadata__"][key])).map(lambda doc: (key, doc))))
def test_model_metadata(change):
    key, document = change
    _fuzz_file("model.safetensors", _model_with_metadata({**MODEL_HEADER["__metadata__"], key: document}), load_model)


@pytest.mark.parametrize("option,value", [("size", [100000, 100000, 100000]), ("spacing", [float("nan"), 1, 1]),
                                          ("spacing", [-2, 2, 2]), ("channels", [10**9, 12, 8]),
                                          ("test_time_mirror", "false"), ("rater_spread", "yes"),
                                          ("innovation_reference", -1.0), ("innovation_reference", float("inf"))])
def test_absurd_model_configuration_is_refused_before_allocating(option, value):
    metadata = dict(MODEL_HEADER["__metadata__"])
    config = json.loads(metadata["config"])
    section = {"size": config["geometry"], "spacing": config["geometry"], "test_time_mirror": config,
               "rater_spread": config, "innovation_reference": config}
    section.get(option, config["network"])[option] = value
    path = WORK / f"absurd-{option}.safetensors"
    path.write_bytes(_model_with_metadata({**metadata, "config": json.dumps(config)}))
    with pytest.raises(LandmarkError, match="metadata is damaged"):
        load_model(path)


def test_nan_weights_are_refused():
    first = next(k for k in MODEL_HEADER if k != "__metadata__" and MODEL_HEADER[k]["dtype"] == "F32")
    start = 8 + _length + MODEL_HEADER[first]["data_offsets"][0]
    damaged = bytearray(MODEL)
    damaged[start:start + 4] = struct.pack("<f", float("nan"))
    path = WORK / "nan.safetensors"
    path.write_bytes(bytes(damaged))
    with pytest.raises(LandmarkError, match="NaN"):
        load_model(path)


def _tiny_checkpoint() -> bytes:
    """A real training checkpoint of a tiny network (written by checkpoint.save_checkpoint)."""
    import torch

    from LandmarkDetectionLib.checkpoint import save_checkpoint
    from LandmarkDetectionLib.train import TrainOptions

    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(network.parameters())
    network(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4)
    options = TrainOptions(dataset="data", output=str(WORK))
    save_checkpoint(WORK / "valid.ckpt", options, network, optimizer, scheduler, {"epoch": 0}, "fingerprint")
    return (WORK / "valid.ckpt").read_bytes()


CHECKPOINT = _tiny_checkpoint()


def _load_checkpoint(path):
    import torch

    from LandmarkDetectionLib.checkpoint import load_checkpoint, read_checkpoint

    read_checkpoint(path)
    network = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(network.parameters())
    load_checkpoint(path, network, optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4))


@FUZZ
@given(mutated(CHECKPOINT))
def test_checkpoint_bytes(content):
    _fuzz_file("checkpoint.safetensors", content, _load_checkpoint)
