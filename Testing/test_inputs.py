"""Input discovery of `detect`: DICOM series found by content among stray files, folders mixing DICOM and
NIfTI, output names that would collide, BIDS datasets in and BIDS derivatives out. Real volumes, the real
command line, a tiny untrained model (detection quality is not the point here)."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LandmarkDetectionLib import __version__
from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.data import input_volumes
from LandmarkDetectionLib.modelfile import LandmarkModel, ModelConfig
from LandmarkDetectionLib.preprocess import InputGeometry
from LandmarkDetectionLib.schema import load_schema

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    config = ModelConfig("highres3dnet", {"channels": [4, 4, 8], "blocks_per_stage": 1},
                         InputGeometry((12, 10, 8), (4.0, 4.0, 5.0)), 6.0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    LandmarkModel.create(config, load_schema("afids-32")).save(path)
    return path


def volume(seed=0, size=(16, 18, 8)):
    image = sitk.GetImageFromArray(np.random.default_rng(seed).integers(0, 1000, size[::-1]).astype(np.int16))
    image.SetSpacing((1.5, 1.5, 2.0))
    image.SetOrigin((-12.0, -14.0, 5.0))
    return image


def write_dicom_series(image, folder, uid, names):
    """One DICOM file per slice with the tags a series reader needs (``names``: one file name per slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # also for names without the .dcm suffix
    for k, name in enumerate(names):
        piece = image[:, :, k]
        tags = {"0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{uid}.{k + 1}",
                "0020|000d": f"{uid}.0", "0020|000e": uid, "0020|0013": str(k + 1), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0020|0032": "\\".join(f"{v:g}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))}
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(piece)


def detect(model_file, source, output, *extra):
    return main(["detect", "--model", str(model_file), "--input", str(source), "--output", str(output),
                 "--progress", "none", "--device", "cpu", *extra])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def test_dicom_folder_with_stray_files_processes_its_main_series(model_file, tmp_path, capsys):
    series = tmp_path / "scan"
    write_dicom_series(volume(), series, "1.2.826.0.1.3680043.2.1125.7.1", [f"IM{k:04d}" for k in range(8)])
    write_dicom_series(volume(1, (16, 18, 1)), series, "1.2.826.0.1.3680043.2.1125.7.2", ["other.dcm"])
    (series / "README.txt").write_text("exported by the scanner\n")
    (series / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" * 50)
    (series / "notes.dcm").write_bytes(b"not a DICOM file at all")

    found = input_volumes(series)
    assert [(v.path, v.output_name, len(v.series)) for v in found] == [(series, "scan", 8)]
    assert found[0].read().GetSize() == (16, 18, 8)

    assert detect(model_file, series, tmp_path / "out") == 0
    assert files_under(tmp_path / "out") == ["scan.csv", "scan.mrk.json"]
    err = capsys.readouterr().err
    assert "other.dcm: skipped 1 file(s) of another DICOM series" in err and "notes.dcm" in err
    assert "error" not in err

    # Batch detection shares the discovery and the loop.
    batch = runpy.run_path(str(REPO / "LandmarkDetection" / "Scripts" / "batch_detect.py"))["run"]
    assert batch(["--input", str(series), "--output", str(tmp_path / "batch"), "--model", str(model_file),
                  "--device", "cpu"]) == 0
    assert files_under(tmp_path / "batch") == ["scan.csv", "scan.mrk.json"]


def test_folder_mixing_dicom_files_nifti_and_dicom_subfolders(model_file, tmp_path, capfd):
    folder = tmp_path / "visit"
    write_dicom_series(volume(2), folder, "1.2.826.0.1.3680043.2.1125.8.1", [f"slice{k}.dcm" for k in range(8)])
    sitk.WriteImage(volume(3), str(folder / "t1.nii.gz"))
    sitk.WriteImage(volume(4), str(folder / "t2.nrrd"))
    write_dicom_series(volume(5), folder / "flair", "1.2.826.0.1.3680043.2.1125.8.2", [f"{k}" for k in range(8)])
    (folder / "empty").mkdir()

    assert [(v.output_name, len(v.series)) for v in input_volumes(folder)] == [
        ("flair", 8), ("t1", 0), ("t2", 0), ("visit", 8)]
    assert detect(model_file, folder, tmp_path / "out") == 0
    assert files_under(tmp_path / "out") == sorted(f"{n}{s}" for n in ("flair", "t1", "t2", "visit")
                                                   for s in (".csv", ".mrk.json"))
    assert capfd.readouterr().err == ""  # no ITK chatter about folders without DICOM


@pytest.mark.parametrize("first, second", [("a.nii.gz", "a.nrrd"), ("a.nii.gz", "A.mha"), ("a.nii.gz", "a")])
def test_inputs_with_the_same_output_name_are_refused_before_anything_is_written(model_file, tmp_path, capsys,
                                                                                 first, second):
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(volume(), str(folder / first))
    if second == "a":  # a DICOM series folder named like the volume
        write_dicom_series(volume(1), folder / "a", "1.2.826.0.1.3680043.2.1125.9.1", [f"{k}" for k in range(8)])
    else:
        sitk.WriteImage(volume(1), str(folder / second))
    assert detect(model_file, folder, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {folder}: "), err
    assert first in err[0] and second in err[0] and "would both write" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def bids_dataset(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    for n, relative in enumerate(["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz",
                                  "sub-02/ses-1/anat/sub-02_ses-1_run-2_T2w.nii.gz"]):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume(n), str(root / relative))
        (root / relative.replace(".nii.gz", ".json")).write_text("{}")  # sidecars are not volumes
    for relative in ["sub-01/func/sub-01_task-rest_bold.nii.gz", "sub-01/anat/sub-01_T1w_mask.nii.gz",
                     "derivatives/old/sub-01/anat/sub-01_T1w.nii.gz"]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume(9), str(root / relative))
    return root


def test_bids_dataset_in_flat_outputs(model_file, bids_dataset, tmp_path):
    assert detect(model_file, bids_dataset, tmp_path / "out") == 0
    assert files_under(tmp_path / "out") == sorted(f"{n}{s}" for s in (".csv", ".mrk.json") for n in (
        "sub-01_T1w", "sub-02_ses-1_T1w", "sub-02_ses-1_run-2_T2w"))


def test_bids_dataset_in_bids_derivatives_out(model_file, bids_dataset, tmp_path):
    output = bids_dataset / "derivatives" / "landmark-detection"
    assert detect(model_file, bids_dataset, output, "--bids", "--uncertainty", "2") == 0
    written = ["sub-01/anat/sub-01_T1w_landmarks", "sub-02/ses-1/anat/sub-02_ses-1_T1w_landmarks",
               "sub-02/ses-1/anat/sub-02_ses-1_run-2_T2w_landmarks"]
    assert files_under(output) == sorted(["dataset_description.json", *(
        f"{n}{s}" for n in written for s in (".csv", ".mrk.json", ".uncertainty.csv", ".uncertainty.json"))])
    description = json.loads((output / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0] == {**description["GeneratedBy"][0], "Name": "landmark-detection",
                                             "Version": __version__}

    # A later run into the same derivatives folder keeps the description and adds to it.
    sitk.WriteImage(volume(7), str(bids_dataset / "sub-01" / "anat" / "sub-01_T2w.nii.gz"))
    assert detect(model_file, bids_dataset / "sub-01" / "anat" / "sub-01_T2w.nii.gz", output, "--bids") == 0
    assert (output / "sub-01/anat/sub-01_T2w_landmarks.mrk.json").is_file()


def test_bids_output_refuses_the_raw_dataset_and_inputs_without_a_subject(model_file, bids_dataset, tmp_path,
                                                                          capsys):
    before = files_under(bids_dataset)
    assert detect(model_file, bids_dataset, bids_dataset, "--bids") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset_description.json: --output holds a raw BIDS dataset" in err[0], err
    assert files_under(bids_dataset) == before

    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(volume(), str(scan))
    assert detect(model_file, scan, tmp_path / "out", "--bids") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {scan}: --bids output needs BIDS-named inputs"), err
    assert not (tmp_path / "out").exists()
