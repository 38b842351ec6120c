"""Grad-CAM: it points at what the network must look at, depends on the learned weights, and keeps
the input's geometry exactly; on the bundled coarse-to-fine model every listed layer works and the maps
of the finest stage sit at the landmark. The figures and the report carry colour bars, full names,
orientation letters and a legend."""

import csv
import html
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import map_coordinates

from LandmarkDetectionLib import demo_report, figures
from LandmarkDetectionLib.cli import main
from LandmarkDetectionLib.detect import model_input
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.geometry import Grid
from LandmarkDetectionLib.gradcam import compute_gradcam, focus_metrics, format_focus_table
from LandmarkDetectionLib.fileio import read_volume, write_markups_json, write_volume
from LandmarkDetectionLib.metrics import SDR_THRESHOLDS_MM
from LandmarkDetectionLib.modelfile import load_model
from LandmarkDetectionLib.resources import bundled_model_path
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

    # A map with no positive evidence (Grad-CAM's ReLU left nothing) has no centre: the printed table says
    # so in words, explains it once, and averages the centres that exist.
    result.cams[0] = 0.0
    rows = focus_metrics(result, radius_mm=10.0)
    lines = format_focus_table(model.schema, [rows]).splitlines()
    first = model.schema.landmarks[result.landmarks[0]].name
    assert np.isnan(rows[0]["com_distance_mm"]) and lines[1].startswith(first) and lines[1].endswith("empty")
    assert "empty" not in "".join(lines[2:-2]) and lines[-1].startswith("empty: no positive evidence")
    mean = float(lines[-2].split()[-1])
    assert mean == pytest.approx(np.mean([r["com_distance_mm"] for r in rows[1:]]), abs=0.05)


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


# ------------------------------------------------------- the bundled coarse-to-fine model on the real sample
# Its layers are listed at import, so that each gets its own test.
BUNDLED = load_model(bundled_model_path())
DEMO_LANDMARKS = ("AC", "PC", "GENU", "RALTH")


@pytest.fixture(scope="module")
def bundled(sample):
    image, _, _ = sample
    return BUNDLED, image


@pytest.fixture(scope="module")
def default_cams(bundled):
    model, image = bundled
    picks = [model.schema.lookup(name) for name in DEMO_LANDMARKS]
    return compute_gradcam(model, image, picks)


@pytest.mark.parametrize("layer", BUNDLED.network.gradcam_layers())
def test_every_listed_layer_gives_a_finite_map_in_the_scan(bundled, layer):
    model, image = bundled
    picks = [model.schema.lookup("AC"), model.schema.lookup("GENU")]
    result = compute_gradcam(model, image, picks, layer=layer)
    assert result.layer == layer
    assert np.isfinite(result.cams).all()
    # The gradient reached the layer: Grad-CAM's ReLU may blank one landmark's map, not every map.
    assert result.cams.max() > 0
    volume = sitk.GetArrayFromImage(result.volume(int(np.argmax(result.cams.max(axis=(1, 2, 3)))), image))
    assert np.isfinite(volume).all() and volume.max() > 0


def test_an_unlisted_layer_is_one_clear_error_naming_the_layers(bundled):
    model, image = bundled
    with pytest.raises(LandmarkError, match="refiners.1.decode.0.0"):
        compute_gradcam(model, image, [0], layer="refiners.1")


def test_the_default_layer_is_the_finest_stage(default_cams):
    network = BUNDLED.network
    assert default_cams.layer == network.gradcam_layer == f"refiners.{len(network.refiners) - 1}.decode.0.0"
    assert default_cams.layer in network.gradcam_layers()


def test_the_default_maps_concentrate_near_the_detected_landmarks(bundled):
    """The finest stage works on 1.5 mm voxels and learned heatmaps of sigma 3 mm (the recipe's sigma_mm),
    so its maps must centre near the detected landmarks and hold within 2 sigma clearly more of their mass
    than maps spread evenly over the stage's 18 mm patch would. A map placed at the wrong crop (another
    landmark's, or the crop's corner) is off by some 10 mm; an uninformative one spreads evenly.
    Grad-CAM keeps only positive evidence (its ReLU): a network may find a landmark mostly by what it is
    not, and then that landmark's map is faint or empty and lies wherever the little evidence is (an
    earlier bundled AFIDs network left its LIGO map empty on this scan). So all 32 maps are judged
    together: nine in ten centre within 2 sigma (6 mm: still clearly nearer than a wrong crop's 10 mm; the
    32-epoch network's faint ICS, SIPF, RSAMTH and RVOH maps centre 4.7-6.7 mm away), and the median one
    within sigma."""
    model, image = bundled
    result = compute_gradcam(model, image)
    sigma = 3.0
    rows = focus_metrics(result, radius_mm=2 * sigma)
    k, j, i = np.indices(result.cams.shape[1:])
    ijk = np.stack([i, j, k], -1).reshape(-1, 3)
    distances, ratios, drawn = [], [], []
    for n, (landmark, row) in enumerate(zip(result.landmarks, rows)):
        assert np.isfinite(result.cams[n]).all() and result.cams[n].min() >= 0
        if result.cams[n].max() == 0:  # no positive evidence: no centre, reported as such
            assert np.isnan(row["com_distance_mm"]) and row["mass_within_r"] == 0
            distances.append(np.inf)
            continue
        distances.append(row["com_distance_mm"])
        ras = result.grid_to_ras(n, ijk)
        even_share = np.mean(np.linalg.norm(ras - result.predicted_ras[landmark], axis=1) <= 2 * sigma)
        ratios.append(row["mass_within_r"] / even_share)
        # The map as written into the scan's own geometry keeps its centre (to the resampling's blur).
        volume = result.volume(n, image)
        array = sitk.GetArrayViewFromImage(volume).astype(np.float64)
        kk, jj, ii = np.nonzero(array)
        scan_ras = Grid.of(volume).to_ras(np.stack([ii, jj, kk], -1))
        centroid = (scan_ras * array[kk, jj, ii, None]).sum(0) / array[kk, jj, ii].sum()
        drawn.append(np.linalg.norm(centroid - result.predicted_ras[landmark]))
    distances = np.asarray(distances)
    names = [model.schema.landmarks[landmark].name for landmark in result.landmarks]
    print("maps centred off the landmark:", {n: round(d, 1) for n, d in zip(names, distances) if d >= 1.5 * sigma})
    assert np.mean(distances < 2 * sigma) >= 0.9 and np.median(distances) < sigma
    assert np.median(drawn) < sigma and np.mean(np.asarray(drawn) < 2 * sigma) >= 0.9
    assert np.median(ratios) > 2.0, ratios


def test_each_stage_map_lies_where_that_stage_saw_the_scan(bundled):
    """A stage's map sits on the stage's own grid: the coarse grid, or each landmark's crop. Sampling the
    network's input at that grid's voxels gives exactly what the stage was fed."""
    model, image = bundled
    network = model.network
    blocks = ["coarse", *(f"refiners.{s}" for s in range(len(network.refiners)))]
    fed = {}

    def keep_input(block):
        def hook(_module, inputs, _output):
            fed.setdefault(block, inputs[0].detach())  # returns None: the output stays as it is
        return hook

    hooks = [network.get_submodule(block).register_forward_hook(keep_input(block)) for block in blocks]
    picks = [model.schema.lookup("AC"), model.schema.lookup("RALTH")]
    try:
        results = {block: compute_gradcam(model, image, picks, layer=f"{block}.decode") for block in blocks}
    finally:
        for hook in hooks:
            hook.remove()
    array = model_input(model, image).array
    for block, result in results.items():
        for n, landmark in enumerate(picks):
            grid = result.grids[n]
            k, j, i = np.indices(tuple(reversed(grid.size)))
            index = result.input_grid.to_index(grid.to_ras(np.stack([i, j, k], -1).reshape(-1, 3)))
            expected = map_coordinates(array, index[:, ::-1].T, order=1, mode="nearest")
            seen = fed[block][landmark if fed[block].shape[0] > 1 else 0, 0].numpy().ravel()
            assert np.allclose(seen, expected, atol=1e-4 * np.ptp(array)), (block, landmark)


# ------------------------------------------------------------------------------------------- figures
def test_slices_put_the_patient_right_where_the_r_label_is():
    """A bright blob 20 mm to the patient's right of the centre, in an oblique volume: the axial and coronal
    slices show it on the side labelled R (the picture's left: radiological), the sagittal one not at all."""
    image = sitk.Image([60, 60, 60], sitk.sitkFloat32)
    image.SetSpacing((1.2, 1.0, 1.5))
    image.SetDirection(oblique_direction((10.0, 25.0, -15.0)))
    grid = Grid.of(image)
    center = grid.center_ras()
    k, j, i = np.indices((60, 60, 60))
    ras = grid.to_ras(np.stack([i, j, k], -1).reshape(-1, 3))
    blob = np.exp(-np.sum((ras - center - [20.0, 0.0, 0.0]) ** 2, axis=1) / (2 * 4.0 ** 2)).reshape(60, 60, 60)
    image = sitk.GetImageFromArray(blob.astype(np.float32))
    image.CopyInformation(grid.reference_image())
    for view in figures.VIEWS:
        picture, _ = figures.ras_slab(image, center, view, half_width_mm=30.0)
        figure, ax = figures.plt.subplots()
        figures.orientation_labels(ax, view, 60.0)
        labels = {t.get_text(): t.get_position() for t in ax.texts}
        figures.plt.close(figure)
        if view == "sagittal":
            assert picture.max() < 0.05 and set(labels) == {"A", "P", "S", "I"}
            assert labels["A"][0] < labels["P"][0] and labels["S"][1] < labels["I"][1]  # y grows downwards
            continue
        _, column = np.unravel_index(np.argmax(picture), picture.shape)
        assert column < picture.shape[1] / 2 - 10 and labels["R"][0] < 30.0 < labels["L"][0]


def test_gradcam_figure_has_a_colour_bar_full_names_and_orientation(default_cams, bundled, tmp_path):
    model, image = bundled
    schema = model.schema
    cams = {landmark: default_cams.volume(n, image) for n, landmark in enumerate(default_cams.landmarks)}
    figure = demo_report.gradcam_figure(image, schema, cams, default_cams.predicted_ras, tmp_path / "cam.png",
                                        default_cams.layer)
    assert (tmp_path / "cam.png").stat().st_size > 0
    colorbars = [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "Grad-CAM" in colorbars[0].get_ylabel()
    titles = [ax.get_title() for ax in figure.axes]
    assert "Anterior commissure (AC)" in titles and "Right anterolateral temporal horn (RALTH)" in titles
    panels = [ax for ax in figure.axes if ax.images]
    assert len(panels) == 3 * len(cams)
    for ax, view in zip(panels, figures.VIEWS * len(cams)):
        letters = {t.get_text() for t in ax.texts}
        assert letters == ({"A", "P", "S", "I"} if view == "sagittal" else
                           {"R", "L", "A", "P"} if view == "axial" else {"R", "L", "S", "I"})
    assert "radiological" in figure._suptitle.get_text()
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["detected landmark"]


def test_report_names_every_landmark_in_full_and_has_a_legend(afids32, tmp_path):
    errors = np.linspace(0.5, 3.0, len(afids32))
    figure = demo_report.error_figure(afids32, errors, tmp_path / "errors.png")
    ticks = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert ticks == [figures.full_name(lm) for lm in afids32.landmarks] and "Culmen (CUL)" in ticks
    assert {t.get_text() for t in figure.axes[0].get_legend().get_texts()} == {s.name for s in afids32.sub_anatomies}
    summary = {"n": len(afids32), "seconds": 1.0, "device": "cpu", "passes": 50, "mre_mm": 1.0, "sd_mm": 0.5,
               "median_mm": 1.0, "max_mm": 3.0, "flagged": 0, "coverage": 0.9, "files": ["a.png"],
               **{f"sdr_{t:g}mm": 50.0 for t in SDR_THRESHOLDS_MM}}
    pictures = {key: tmp_path / "errors.png" for key in ("landmarks", "errors", "uncertainty", "gradcam")}
    demo_report.write_html(tmp_path / "report.html", summary, BUNDLED, afids32, errors, errors, 5.0, pictures, "")
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    for landmark in afids32.landmarks:
        assert html.escape(figures.full_name(landmark)) in text
    assert "<h2>Legend</h2>" in text and "radiological convention" in text
    for meaning in ("prediction", "truth", "confidence ellipsoid", "detected landmark", "sub-anatomy"):
        assert meaning in text.split("<h2>Legend</h2>")[1].split("<h2>")[0], meaning
