"""Grad-CAM: it points at what the network must look at, depends on the learned weights, and keeps
the input's geometry exactly."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.gradcam import compute_gradcam, focus_metrics
from LandmarkDetectionLib.fileio import read_volume, write_markups_json, write_volume
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.schema import load_schema
from LandmarkDetectionLib.train import TrainOptions, train
from conftest import oblique_direction

BLOBS = {"bright": 1000.0, "medium": 550.0, "dim": 250.0}


@pytest.fixture(scope="module")
def blob_task(tmp_path_factory):
    """Volumes where each landmark is a blob of its own brightness at a random place: a trained model can
    only find a landmark by looking at its blob."""
    folder = tmp_path_factory.mktemp("blobs")
    schema_path = folder.parent / "blobs-schema.json"
    schema_path.write_text(json.dumps({
        "name": "blobs", "sub_anatomies": [{"name": "Blobs", "plane": "oblique", "color": "#ff0000"}],
        "landmarks": [{"number": n + 1, "name": name, "sub_anatomy": "Blobs"} for n, name in enumerate(BLOBS)]}))
    schema = load_schema(schema_path)
    rng = np.random.default_rng(0)
    size = 24
    k, j, i = np.indices((size,) * 3, dtype=float)
    for case in range(24):
        array = rng.normal(100.0, 10.0, (size,) * 3)
        centres = []
        while len(centres) < 3:
            c = rng.uniform(4, size - 5, 3)
            if all(np.linalg.norm(c - o) > 7 for o in centres):
                centres.append(c)
        for (ci, cj, ck), amplitude in zip(centres, BLOBS.values()):
            array += amplitude * np.exp(-((i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2) / (2 * 1.2 ** 2))
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.SetSpacing((4.0, 4.0, 4.0))
        image.SetOrigin((-46.0, -46.0, -46.0))
        write_volume(image, folder / f"b{case:02d}.nii.gz")
        from LandmarkDetectionLib.geometry import Grid

        write_markups_json(folder / f"b{case:02d}.mrk.json", schema, Grid.of(image).to_ras(np.array(centres)))
    model = train(TrainOptions(dataset=str(folder), output=str(folder.parent / "blob-model"), schema=str(schema_path),
                               channels=(8, 8, 8), blocks_per_stage=1, dropout=0.0, size=(24, 24, 24),
                               spacing=(4.0, 4.0, 4.0), epochs=12, lr=5e-3, loss="mixed", sigma_mm=4.0,
                               val_fraction=0.1, patience=20, progress="none"))
    return folder, model


def test_cam_concentrates_near_the_landmark_on_a_trained_model(blob_task):
    folder, model_path = blob_task
    model = load_model(model_path)
    image = read_volume(folder / "b23.nii.gz")
    result = compute_gradcam(model, image, layer="blocks.2.conv2")
    rows = focus_metrics(result, radius_mm=10.0)
    concentrated = [r["mass_within_r"] > 3 * r["volume_within_r"] for r in rows]
    assert sum(concentrated) >= 2, rows  # most landmarks
    assert np.median([r["com_distance_mm"] for r in rows]) < 30.0


def test_randomised_weights_change_the_cam(blob_task):
    folder, model_path = blob_task
    model = load_model(model_path)
    image = read_volume(folder / "b23.nii.gz")
    trained = compute_gradcam(model, image, landmarks=[0]).cams[0].ravel()
    torch.manual_seed(123)
    for parameter in model.network.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    random = compute_gradcam(model, image, landmarks=[0]).cams[0].ravel()
    correlation = np.corrcoef(trained, random)[0, 1] if random.std() > 0 else 0.0
    assert correlation < 0.5


def test_cam_volumes_keep_a_rotated_anisotropic_input_geometry(blob_task, tmp_path, capsys):
    folder, model_path = blob_task
    image = read_volume(folder / "b05.nii.gz")
    resampled = sitk.Resample(image, [30, 26, 18], sitk.Transform(), sitk.sitkLinear, (-40.0, -50.0, -35.0),
                              (3.1, 3.7, 5.3), oblique_direction((15.0, -25.0, 10.0)), 100.0, sitk.sitkFloat32)
    path = tmp_path / "oblique.nrrd"
    write_volume(resampled, path)
    assert main(["gradcam", "--model", str(model_path), "--input", str(path), "--output", str(tmp_path / "cam"),
                 "--format", "nrrd", "--progress", "none"]) == 0
    outputs = sorted((tmp_path / "cam").glob("oblique_gradcam_*.nrrd"))
    assert [p.name for p in outputs] == sorted(f"oblique_gradcam_{n}.nrrd" for n in BLOBS)
    for p in outputs:
        cam = sitk.ReadImage(str(p))
        assert cam.GetSize() == resampled.GetSize()
        assert np.allclose(cam.GetOrigin(), resampled.GetOrigin(), atol=1e-6)
        assert np.allclose(cam.GetSpacing(), resampled.GetSpacing(), atol=1e-6)
        assert np.allclose(cam.GetDirection(), resampled.GetDirection(), atol=1e-6)
        assert sitk.GetArrayViewFromImage(cam).max() > 0
    rows = list(csv.DictReader((tmp_path / "cam" / "oblique_gradcam_focus.csv").open()))
    assert [r["landmark"] for r in rows] == list(BLOBS)


def test_compare_two_models_and_single_file_output(blob_task, tiny_dataset, tmp_path, capsys):
    folder, model_path = blob_task
    assert main(["gradcam", "--compare", str(model_path), str(model_path), "--input", str(folder / "b01.nii.gz"),
                 "--output", str(tmp_path / "cmp"), "--single-file", "--normalize", "--target", "coordinate",
                 "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "mass<r A" in printed and "mass<r B" in printed
    combined = sitk.ReadImage(str(tmp_path / "cmp" / "b01_modelA_gradcam.nii.gz"))
    assert combined.GetNumberOfComponentsPerPixel() == 3
    assert np.isclose(sitk.GetArrayViewFromImage(combined).max(), 1.0, atol=1e-4)
    rows = list(csv.DictReader((tmp_path / "cmp" / "b01_gradcam_focus.csv").open()))
    assert rows[0]["mass_within_10mm_A"] == rows[0]["mass_within_10mm_B"]  # the same model twice
    assert main(["gradcam", "--model", str(model_path), "--input", str(folder / "b01.nii.gz"),
                 "--output", str(tmp_path / "x"), "--landmarks", "nonexistent", "--progress", "none"]) == 2
