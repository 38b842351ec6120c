"""Augmentation: every policy moves landmarks exactly with the image, reproducibly, never clipping."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.augment import POLICIES, Augmenter, faux_volume_transport, load_config
from LandmarkDetectionLib.geometry import Grid
from conftest import oblique_direction

SIGMA_VOX = 1.5


@pytest.fixture(scope="module")
def blob_volume():
    """88 Gaussian blobs on a jittered lattice in an oblique, anisotropic volume; their centres (RAS)."""
    size = (72, 64, 40)
    rng = np.random.default_rng(0)
    lattice = np.stack(np.meshgrid(np.arange(10, 63, 9), np.arange(10, 55, 9), np.arange(8, 33, 8), indexing="ij"),
                       -1).reshape(-1, 3)[:88].astype(float)
    centers = lattice + rng.uniform(-0.5, 0.5, lattice.shape)
    k, j, i = np.indices(size[::-1], dtype=float)
    array = np.full(size[::-1], 100.0)
    for ci, cj, ck in centers:
        array += 1000.0 * np.exp(-((i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2) / (2 * SIGMA_VOX ** 2))
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing((1.1, 1.3, 2.2))
    image.SetOrigin((30.0, -20.0, 10.0))
    image.SetDirection(oblique_direction((12.0, -8.0, 20.0)))
    return image, Grid.of(image).to_ras(centers)


def blob_centroids(image, points_ras, radius=3):
    """Intensity centroid of the blob near each point, in RAS (background and artifacts suppressed)."""
    grid = Grid.of(image)
    array = sitk.GetArrayFromImage(image).astype(float)
    out = np.full_like(points_ras, np.nan)
    for n, ijk in enumerate(grid.to_index(points_ras)):
        if not np.isfinite(ijk).all():
            continue
        lo = np.maximum(np.floor(ijk - radius).astype(int), 0)
        hi = np.minimum(np.ceil(ijk + radius).astype(int) + 1, np.asarray(grid.size))
        window = array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
        weights = np.clip(window - (window.min() + 0.5 * (window.max() - window.min())), 0, None)
        k, j, i = np.indices(window.shape)
        centroid = np.array([(weights * i).sum(), (weights * j).sum(), (weights * k).sum()]) / weights.sum()
        out[n] = grid.to_ras(centroid + lo)
    return out


def error_in_voxels(image, a_ras, b_ras, applied=None):
    """Distance in voxels of the image's effective resolution. Simulated anisotropy (thick slices, taken
    by nearest-neighbour downsampling) defines a blob's centre only to within a thick slice: along the
    slice axis directly, and sideways too once a rotation has tilted the blob. Landmarks do not move with
    it (the grid is unchanged); the unit is then the thick slice."""
    grid = Grid.of(image)
    distance = np.linalg.norm(grid.to_index(a_ras) - grid.to_index(b_ras), axis=-1)
    for name, params in (applied.steps if applied else []):
        if name == "Anisotropy":
            distance = distance / params["downsampling"]
    return distance


@pytest.mark.parametrize("policy", POLICIES)
def test_blob_centroids_follow_the_transported_landmarks(blob_volume, policy):
    image, centers = blob_volume
    augmenter = Augmenter(load_config())
    assert np.nanmax(error_in_voxels(image, blob_centroids(image, centers), centers)) < 0.1  # the oracle itself
    for seed in range(3):
        out, moved, applied = augmenter.augment(image, centers, np.random.default_rng(seed), policy=policy)
        assert applied.policy == policy and applied.residual_mm < 1e-4
        assert Grid.of(out) == Grid.of(image)  # the world geometry is kept
        keep = np.isfinite(moved).all(-1)
        assert keep.sum() >= 80
        errors = error_in_voxels(image, blob_centroids(out, moved[keep]), moved[keep], applied)
        assert np.nanmax(errors) < 0.5, (policy, seed, applied.steps, np.nanmax(errors))
        if applied.spatial:
            assert np.nanmax(np.linalg.norm(moved - centers, axis=-1)) > 1.0  # landmarks really moved


def test_the_faux_volume_oracle_agrees_to_a_voxel(blob_volume):
    image, centers = blob_volume
    augmenter = Augmenter(load_config())
    _, moved, applied = augmenter.augment(image, centers[:6], np.random.default_rng(1), policy="DA4")
    faux = faux_volume_transport(applied, image, centers[:6])
    assert np.nanmax(error_in_voxels(image, faux, moved)) < 1.0


def test_same_seed_same_sample(blob_volume):
    image, centers = blob_volume
    augmenter = Augmenter(load_config())
    a = augmenter(image, centers, np.random.default_rng(42))
    b = augmenter(image, centers, np.random.default_rng(42))
    c = augmenter(image, centers, np.random.default_rng(43))
    assert np.array_equal(sitk.GetArrayFromImage(a[0]), sitk.GetArrayFromImage(b[0]))
    assert np.array_equal(a[1], b[1], equal_nan=True)
    assert not np.array_equal(sitk.GetArrayFromImage(a[0]), sitk.GetArrayFromImage(c[0]))


def test_out_of_view_landmarks_are_redrawn_or_flagged_never_clipped(blob_volume):
    image, centers = blob_volume
    grid = Grid.of(image)
    edge = centers.copy()
    edge[0] = grid.to_ras([0.2, 30.0, 20.0])  # at the very border: most affine draws push it out
    config = load_config()
    config["patient"]["affine"].update(degrees=0.0, scales=[1.0, 1.0], translation_mm=15.0)
    redraw = Augmenter(config)
    for seed in range(5):
        _, moved, applied = redraw.augment(image, edge, np.random.default_rng(seed), policy="DA3")
        if applied.flagged:  # only when every redraw failed
            assert np.isnan(moved[applied.flagged]).all()
        else:
            assert grid.contains(moved).all()
    flag = Augmenter({**config, "out_of_view": "flag"})
    flagged_any = False
    for seed in range(10):
        _, moved, applied = flag.augment(image, edge, np.random.default_rng(seed), policy="DA3")
        outside = ~grid.contains(np.nan_to_num(moved, nan=1e9))
        assert set(np.flatnonzero(outside)) == set(applied.flagged)
        flagged_any |= bool(applied.flagged)
    assert flagged_any


def test_bad_policy_file_is_refused(tmp_path):
    from LandmarkDetectionLib.errors import LandmarkError

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"policies": {"DA9": 1.0}}))
    with pytest.raises(LandmarkError, match="policies"):
        load_config(path)


def test_offline_augment_command_writes_copies_and_a_manifest(tiny_dataset, tmp_path, afids32):
    import csv
    import hashlib

    from LandmarkDetectionLib.cli import main
    from LandmarkDetectionLib.fileio import read_landmarks, read_volume

    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_dataset.iterdir()}
    assert main(["augment", "--input", str(tiny_dataset), "--output", str(tmp_path / "aug"), "--copies", "2",
                 "--seed", "3", "--schema", "afids-32", "--progress", "none"]) == 0
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_dataset.iterdir()} == before
    rows = list(csv.DictReader((tmp_path / "aug" / "manifest.csv").open()))
    assert len(rows) == 12 and {r["policy"] for r in rows} <= set(POLICIES)
    for row in rows[:3]:
        image = read_volume(tmp_path / "aug" / row["image"])
        points = read_landmarks(tmp_path / "aug" / row["landmarks"], afids32)
        assert image.GetSize() == read_volume(row["source"]).GetSize()
        assert np.isfinite(points).all() or row["flagged_missing"]
    assert main(["augment", "--input", str(tiny_dataset), "--output", str(tiny_dataset / "inside"),
                 "--schema", "afids-32", "--progress", "none"]) == 2
    assert not (tiny_dataset / "inside").exists()


def test_preview_png(tiny_dataset, tmp_path):
    from LandmarkDetectionLib.cli import main

    path = tmp_path / "preview.png"
    assert main(["augment", "--input", str(tiny_dataset), "--preview", str(path), "--schema", "afids-32"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 50_000


def test_training_augments_on_the_fly_in_worker_processes(tiny_dataset, tmp_path):
    import csv

    from LandmarkDetectionLib.train import TrainOptions, train
    from conftest import TINY_TRAIN

    model = train(TrainOptions(dataset=str(tiny_dataset), output=str(tmp_path / "run"), epochs=2, workers=2,
                               augment="default", **TINY_TRAIN))
    from LandmarkDetectionLib.modelfile import load_model

    assert load_model(model).training["augment"] == "default"
    assert len(list(csv.DictReader((tmp_path / "run" / "log.csv").open()))) == 2


def test_anisotropy_alone_keeps_landmarks_and_geometry(blob_volume):
    from LandmarkDetectionLib.augment import Applied

    image, centers = blob_volume
    augmenter = Augmenter(load_config())
    applied = Applied("DA3", steps=[("Anisotropy", {"axis": 2, "downsampling": 2.5})])
    moved, residual = augmenter.transport(applied, image, centers)
    assert np.array_equal(moved, centers) and residual.max() == 0
    out = augmenter.apply(applied, image, np.random.default_rng(0))
    assert Grid.of(out) == Grid.of(image)
    assert not np.array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(image))
