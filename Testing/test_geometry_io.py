import json

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.geometry import Grid, apply_matrix, centered_grid, move_image, rigid_matrix
from LandmarkDetectionLib.fileio import (read_landmarks, read_points, read_volume, write_landmarks,
                                     write_markups_json, write_volume)
from conftest import make_volume


def test_index_to_ras_matches_simpleitk_for_an_oblique_anisotropic_volume():
    image = make_volume()
    grid = Grid.of(image)
    for ijk in [(0, 0, 0), (3, 7, 11), (19, 23, 15)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(grid.to_ras(ijk), lps * [-1, -1, 1], atol=1e-9)
    continuous = np.array([2.25, 5.5, 7.75])
    lps = np.array(image.TransformContinuousIndexToPhysicalPoint(continuous.tolist()))
    assert np.allclose(grid.to_ras(continuous), lps * [-1, -1, 1], atol=1e-9)
    assert np.allclose(grid.to_index(grid.to_ras(continuous)), continuous, atol=1e-9)


def test_centered_grid_is_centred():
    grid = centered_grid([10.0, -20.0, 5.0], (9, 11, 7), (1.0, 2.0, 3.0))
    assert np.allclose(grid.center_ras(), [10.0, -20.0, 5.0])
    assert np.allclose(np.diag(grid.index_to_ras[:3, :3]), [-1.0, -2.0, 3.0])


def test_move_image_moves_content_exactly_with_the_landmarks():
    image = make_volume()
    matrix = rigid_matrix((10, -20, 5), (3, -4, 6), (0, 0, 10))
    moved = move_image(image, matrix)
    ijk = (5, 6, 7)
    before = Grid.of(image).to_ras(ijk)
    after = Grid.of(moved).to_ras(ijk)  # the same voxel, now elsewhere in the world
    assert np.allclose(after, apply_matrix(matrix, before), atol=1e-9)
    assert moved[ijk] == image[ijk]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_volume_round_trip_keeps_geometry(tmp_path, suffix):
    image = make_volume()
    path = tmp_path / f"v{suffix}"
    write_volume(image, path)
    back = read_volume(path)
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    assert np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path):
    image = sitk.Cast(make_volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)), sitk.sitkInt16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        slice_.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        slice_.SetMetaData("0020|0013", str(k))
        slice_.SetMetaData("0028|0030", f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}")
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(slice_)
    back = read_volume(folder)
    assert back.GetSize() == image.GetSize()
    assert np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-3)


@pytest.mark.parametrize("suffix", [".mrk.json", ".fcsv", ".csv"])
def test_landmark_round_trip(tmp_path, brain88, suffix):
    coords = np.random.default_rng(0).uniform(-80, 80, (88, 3))
    path = tmp_path / f"points{suffix}"
    write_landmarks(path, brain88, coords)
    assert np.allclose(read_landmarks(path, brain88), coords, atol=1e-4 if suffix == ".csv" else 1e-9)


def test_markups_json_in_ras_and_lps_and_missing_points(tmp_path, afids32):
    coords = np.arange(96, dtype=float).reshape(32, 3)
    path = tmp_path / "p.mrk.json"
    write_markups_json(path, afids32, coords)
    data = json.loads(path.read_text())
    assert data["markups"][0]["coordinateSystem"] == "LPS"
    assert data["markups"][0]["controlPoints"][1]["position"] == [-3.0, -4.0, 5.0]
    markup = data["markups"][0]
    markup["coordinateSystem"] = "RAS"
    for cp, xyz in zip(markup["controlPoints"], coords):
        cp["position"] = list(xyz)
    markup["controlPoints"][4]["positionStatus"] = "missing"
    path.write_text(json.dumps(data))
    back = read_landmarks(path, afids32)
    assert np.isnan(back[4]).all()
    assert np.allclose(np.delete(back, 4, 0), np.delete(coords, 4, 0))


def test_afids_fcsv_with_numbers_as_labels(sample, afids32):
    _, landmarks, files = sample
    points = read_points(files.afids)
    assert points[0].label == "1" and points[0].description == "AC"
    assert np.allclose(landmarks[0], [-0.204861407692308, 2.72288076923077, -4.88105282051282])


def test_lps_fcsv_header_is_honoured(tmp_path, afids32):
    lines = ["# CoordinateSystem = LPS", "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    lines += [f"{i},1,2,3,0,0,0,1,1,1,0,{n},," for i, n in enumerate(afids32.names)]
    path = tmp_path / "lps.fcsv"
    path.write_text("\n".join(lines))
    assert np.allclose(read_landmarks(path, afids32)[0], [-1, -2, 3])


@pytest.mark.parametrize("edit, message", [
    (lambda pts: pts[:-1], "missing: LOSF"),
    (lambda pts: pts + [("extra", 1, 2, 3)], "not in schema 'afids-32': extra"),
    (lambda pts: [("A C" if p[0] == "AC" else p[0], *p[1:]) for p in pts], "not in schema"),
    (lambda pts: pts + [pts[0]], "appears more than once"),
])
def test_bad_landmark_files_are_refused(tmp_path, afids32, edit, message):
    points = [(n, 1.0, 2.0, 3.0) for n in afids32.names]
    path = tmp_path / "bad.csv"
    path.write_text("name,x,y,z\n" + "\n".join(",".join(map(str, p)) for p in edit(points)))
    with pytest.raises(LandmarkError, match=message) as error:
        read_landmarks(path, afids32)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def _image(array, spacing=(1, 1, 1)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.float32))
    image.SetSpacing(spacing[: image.GetDimension()])
    return image


@pytest.mark.parametrize("image, message", [
    (lambda: _image(np.random.rand(10, 12)), "is 2D"),
    (lambda: sitk.JoinSeries([_image(np.random.rand(4, 5, 6))] * 3), "is 4D"),
    (lambda: _image(np.random.rand(1, 10, 12)), "single slice"),
    (lambda: _image(np.zeros((5, 6, 7))), "is empty"),
    (lambda: _image(np.where(np.eye(6)[None].repeat(4, 0) > 0, np.nan, 1.0)), "NaN"),
])
def test_bad_volumes_are_refused(tmp_path, image, message):
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(image(), str(path))
    with pytest.raises(LandmarkError, match=message) as error:
        read_volume(path)
    assert str(path) in str(error.value)


def test_unreadable_volume(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(b"not an image")
    with pytest.raises(LandmarkError, match="not a readable image"):
        read_volume(path)


def test_outputs_get_normal_permissions(tmp_path, afids32):
    import os
    import stat

    path = tmp_path / "p.mrk.json"
    write_markups_json(path, afids32, np.zeros((32, 3)))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
