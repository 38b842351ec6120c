"""Annotation QA figures (figures.sub_anatomy_figure, qa_overview_figure, write_qa_figures) and ``qa --figures``,
on a small synthetic volume with a bright oblique plane and points placed on it."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.annotation import annotation_qa
from LandmarkDetectionLib.cli import main as cli_main
from LandmarkDetectionLib.figures import (STATUS_COLORS, VIEW_AXES, VIEWS, direction_letter, plane_picture_axes,
                                          plane_slice, qa_figure_paths, qa_overview_figure, sub_anatomy_figure,
                                          sub_anatomy_plane)
from LandmarkDetectionLib.fileio import write_markups_json, write_volume
from LandmarkDetectionLib.geometry import LPS_TO_RAS, rigid_matrix
from LandmarkDetectionLib.schema import schema_from_dict

from conftest import oblique_direction

CENTRE = np.array([5.0, -3.0, 8.0])  # RAS mm: the bright plane's centre and the volume's
TURN = rigid_matrix((15, -10, 0), (0, 0, 0))[:3, :3]  # the plane: axial tilted 15 deg about R, -10 about A
U_PLANE, V_PLANE, NORMAL = TURN @ (1.0, 0, 0), TURN @ (0, 1.0, 0), TURN @ (0, 0, 1.0)
HALF_SLAB_MM = 2.5  # wider than a voxel diagonal: linear interpolation on the plane sees only bright voxels
SCHEMA = {
    "format": "landmark-schema", "version": 1, "name": "plate-test",
    "sub_anatomies": [
        {"name": "Plate", "plane": "axial", "color": "#e6194b", "guideline": "Place all points on one axial plane."},
        {"name": "Spot", "plane": "oblique", "color": "#3cb44b", "guideline": "Two points anywhere."}],
    "landmarks": [
        {"number": 1, "name": "P_front", "sub_anatomy": "Plate"},
        {"number": 2, "name": "P_right", "sub_anatomy": "Plate"},
        {"number": 3, "name": "P_back", "sub_anatomy": "Plate"},
        {"number": 4, "name": "P_front_right", "sub_anatomy": "Plate", "role": "secondary",
         "between": ["P_front", "P_right"], "fraction": 0.5},
        {"number": 5, "name": "P_back_right", "sub_anatomy": "Plate", "role": "secondary",
         "between": ["P_right", "P_back"], "fraction": 0.5},
        {"number": 6, "name": "S_one", "sub_anatomy": "Spot"},
        {"number": 7, "name": "S_two", "sub_anatomy": "Spot"}],
    "qa_thresholds": {"plane_angle_deg": [25, 45]}}  # the plate is tilted 18 deg from axial on purpose


@pytest.fixture(scope="module")
def schema():
    return schema_from_dict(SCHEMA)


def volume(values, size=(48, 48, 48), spacing=(1.0, 1.0, 1.0), direction=None, shift_mm=(0.0, 0.0, 0.0)):
    """A volume centred on CENTRE (+ shift) with an oblique direction, voxels = values(RAS points (N, 3))."""
    direction = np.array(direction or oblique_direction()).reshape(3, 3)
    size, spacing = np.array(size), np.array(spacing, dtype=float)
    centre_lps = LPS_TO_RAS @ (CENTRE + shift_mm)
    origin = centre_lps - direction @ (spacing * (size - 1) / 2)
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    ras = (origin + (index * spacing) @ direction.T) @ LPS_TO_RAS.T
    image = sitk.GetImageFromArray(values(ras).reshape(tuple(size[::-1])).astype(np.float32))
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(direction.ravel()))
    return image


def bright_plane(points):
    return np.where(np.abs((points - CENTRE) @ NORMAL) <= HALF_SLAB_MM, 1000.0, 0.0)


def pixel_centres(centre, u, v, n, pixel):
    """RAS position of each pixel of plane_slice's (n, n) picture, as its docstring defines them."""
    offsets = (np.arange(n) + 0.5) * pixel - n * pixel / 2
    return centre + offsets[None, :, None] * u + offsets[:, None, None] * v  # [row, column]


def inside(image, points, margin=0.0):
    """Whether RAS points sample the image between its voxel centres (where interpolation is exact)."""
    direction = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    index = (points @ LPS_TO_RAS.T - image.GetOrigin()) @ np.linalg.inv(direction).T
    return ((index >= margin) & (index <= np.array(image.GetSize()) - 1 - margin)).all(axis=-1)


def placed_points(schema, off_plane_mm=0.0):
    """The Plate's points on a 12 mm circle of the bright plane (secondaries halfway along it), P_right
    ``off_plane_mm`` above it; the Spot's two points elsewhere."""
    angles = {"P_front": 90, "P_right": 0, "P_back": -90, "P_front_right": 45, "P_back_right": -45}
    points = np.zeros((len(schema), 3))
    for name, angle in angles.items():
        t = np.radians(angle)
        points[schema.lookup(name)] = CENTRE + 12 * (np.cos(t) * U_PLANE + np.sin(t) * V_PLANE)
    points[schema.lookup("P_right")] += off_plane_mm * NORMAL
    points[schema.lookup("S_one")] = CENTRE + (-8, 4, 6)
    points[schema.lookup("S_two")] = CENTRE + (6, -5, -7)
    return points


# ------------------------------------------------------------------------------------------- sampling
def test_the_slice_is_the_image_at_each_pixels_position_on_an_oblique_plane():
    """A linear intensity is interpolated exactly, so every pixel must equal it at its plane position:
    the slice's centre, axes, pixel size and row/column order are all checked, on an oblique volume with
    anisotropic voxels."""
    slope = np.array([3.0, -2.0, 5.0])
    image = volume(lambda p: p @ slope + 400.0, size=(30, 40, 16), spacing=(1.2, 0.9, 2.0))
    _, u, v = plane_picture_axes(NORMAL)
    centre, width, pixel = CENTRE + 1.5 * NORMAL, 24.0, 0.7
    picture = plane_slice(image, centre, u, v, width, pixel)
    n = int(np.ceil(width / pixel))
    assert picture.shape == (n, n)
    where = pixel_centres(centre, u, v, n, pixel)
    keep = inside(image, where)
    assert keep.mean() > 0.5
    np.testing.assert_allclose(picture[keep], (where @ slope + 400.0)[keep], atol=0.02)
    assert (picture[~inside(image, where, margin=-1.0)] == picture.min()).all()  # outside: the background


def test_a_bright_plane_in_the_volume_is_bright_in_its_slice_and_dark_one_slab_away(schema):
    image = volume(bright_plane)
    points = placed_points(schema)[schema.indices_of("Plate")]
    centre, normal, how = sub_anatomy_plane(points, "axial")
    assert abs(abs(normal @ NORMAL) - 1) < 1e-9 and abs((centre - CENTRE) @ NORMAL) < 1e-9
    assert "least-squares plane of the 5 placed points" in how
    view, u, v = plane_picture_axes(normal)
    assert view == "axial" and abs(u @ normal) < 1e-12 and abs(v @ normal) < 1e-12
    for offset_mm, expected in ((0.0, 1000.0), (6.0, 0.0), (-6.0, 0.0)):
        picture = plane_slice(image, centre + offset_mm * normal, u, v, 30.0, 1.0)
        keep = inside(image, pixel_centres(centre + offset_mm * normal, u, v, 30, 1.0))
        assert keep.sum() > 600
        np.testing.assert_allclose(picture[keep], expected, atol=1e-2)
    # the scanner's axial plane through the same centre cuts the tilted slab: bright exactly in the band
    # where it crosses the slab (away from the slab's faces, where interpolation blends)
    _, u0, v0 = plane_picture_axes((0, 0, 1))
    picture = plane_slice(image, centre, u0, v0, 30.0, 1.0)
    where = pixel_centres(centre, u0, v0, 30, 1.0)
    depth = np.abs((where - CENTRE) @ NORMAL)
    keep = inside(image, where)
    assert ((depth < HALF_SLAB_MM - 1.8) & keep).sum() > 50 and ((depth > HALF_SLAB_MM + 1.8) & keep).sum() > 50
    np.testing.assert_allclose(picture[(depth < HALF_SLAB_MM - 1.8) & keep], 1000.0, atol=1e-2)
    np.testing.assert_allclose(picture[(depth > HALF_SLAB_MM + 1.8) & keep], 0.0, atol=1e-2)


def test_picture_axes_keep_the_nearest_views_patient_directions():
    rng = np.random.default_rng(3)
    assert plane_picture_axes((0, 0, 2))[0] == "axial"
    view, u, v = plane_picture_axes((0, 0, 1))
    np.testing.assert_allclose(u, (-1, 0, 0))  # the patient's right on the picture's left
    np.testing.assert_allclose(v, (0, -1, 0))  # anterior at the top
    for normal in rng.normal(size=(200, 3)):
        view, u, v = plane_picture_axes(normal)
        normal = normal / np.linalg.norm(normal)
        assert view in VIEWS and np.allclose([u @ normal, v @ normal, u @ v], 0, atol=1e-12)
        assert np.isclose(np.linalg.norm(u), 1) and np.isclose(np.linalg.norm(v), 1)
        u0, v0 = VIEW_AXES[view]  # so orientation_labels(ax, view) names the picture's edges correctly
        assert (direction_letter(u), direction_letter(v)) == (direction_letter(u0), direction_letter(v0))


# -------------------------------------------------------------------------------------------- figures
def test_sub_anatomy_figure_places_and_colours_the_points_by_their_distance(schema):
    import matplotlib.pyplot as plt

    from LandmarkDetectionLib.annotation import Curve

    image = volume(bright_plane)
    points = placed_points(schema, off_plane_mm=3.0)
    points[schema.lookup("P_back_right")] = np.nan  # missing: listed, not drawn
    t = np.radians(np.arange(0, 360, 5))
    circle = CENTRE + 12 * (np.cos(t)[:, None] * U_PLANE + np.sin(t)[:, None] * V_PLANE)
    result = annotation_qa(schema, points)
    figure = sub_anatomy_figure(image, schema, points, "Plate", {"Plate": Curve(circle, closed=True)},
                                result.row("Plate"), note="synthetic")
    ax = figure.axes[0]
    kept = [schema.lookup(n) for n in ("P_front", "P_right", "P_back", "P_front_right")]
    centre, normal, _ = sub_anatomy_plane(points[kept])
    distances = (points[kept] - centre) @ normal
    primaries, secondaries = ax.collections[:2]
    np.testing.assert_allclose(primaries.get_array(), distances[:3], atol=1e-9)
    np.testing.assert_allclose(secondaries.get_array(), distances[3:], atol=1e-9)
    assert np.abs(distances).max() > 0.5  # one point lifted 3 mm off: the colours are the QA's distances
    np.testing.assert_allclose(np.abs(distances), np.abs(result.distances[kept]), atol=1e-9)
    # in-plane positions: the points keep their mutual distances along the plane
    xy = np.vstack([primaries.get_offsets(), secondaries.get_offsets()])
    in_plane = points[kept] - np.outer(distances, normal)
    assert np.allclose(np.linalg.norm(xy[0] - xy[2]), np.linalg.norm(in_plane[0] - in_plane[2]))
    from matplotlib.text import Annotation  # point labels: numbers, and names of up to 6 letters

    assert sorted(t.get_text() for t in ax.texts if isinstance(t, Annotation)) == ["1", "2", "3 P_back", "4"]
    assert len(ax.lines) == 2  # the boundary curve and the 10 mm scale bar
    words = " ".join(t.get_text() for t in figure.texts)
    assert f"Plate (axial guideline): QA {result.row('Plate').overall.upper()}" in words
    assert "RMS" in words and "synthetic" in words and "Guideline: Place all points on one axial plane." in words
    assert "missing" in figure.axes[-1].texts[0].get_text()
    plt.close(figure)

    # a reference annotation (no QA row) and no image: still a figure, no status
    figure = sub_anatomy_figure(None, schema, placed_points(schema), "Spot")
    words = " ".join(t.get_text() for t in figure.texts)
    assert "Spot (oblique guideline)" in words and "QA" not in words and "2 of 2 points placed" in words
    plt.close(figure)
    figure = qa_overview_figure(result)
    words = " ".join(t.get_text() for t in [*figure.texts, *figure.axes[0].texts])
    assert result.status == "warn" and "Annotation QA: overall WARN (schema plate-test)" in words
    assert "Plate: missing: P_back_right" in words and "PLATE" not in words and "WARN" in words
    plt.close(figure)


def _run(argv, capsys):
    code = cli_main(["qa", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _colour_pixels(png, hex_colour):
    picture = matplotlib.image.imread(png)[..., :3]
    rgb = np.array([int(hex_colour[k:k + 2], 16) / 255 for k in (1, 3, 5)])
    return int((np.abs(picture - rgb).max(axis=-1) < 2 / 255).sum())


def test_qa_command_writes_a_figure_per_sub_anatomy_and_the_overview(schema, tmp_path, capsys):
    (tmp_path / "plate.json").write_text(json.dumps(SCHEMA))
    write_volume(volume(bright_plane), tmp_path / "scan.nii.gz")
    write_markups_json(tmp_path / "good.mrk.json", schema, placed_points(schema))
    write_markups_json(tmp_path / "bad.mrk.json", schema, placed_points(schema, off_plane_mm=12.0))
    common = ["--schema", tmp_path / "plate.json", "--image", tmp_path / "scan.nii.gz"]

    code, out, _ = _run(["--landmarks", tmp_path / "good.mrk.json", *common, "--figures", tmp_path / "good",
                         "--output", tmp_path / "good" / "qa.csv"], capsys)
    assert code == 0 and "overall: PASS" in out and "figures:" in out
    names = sorted(p.name for p in (tmp_path / "good").iterdir())
    assert names == ["qa.csv", "qa_01_Plate.png", "qa_02_Spot.png", "qa_overview.png"]
    for png in (tmp_path / "good").glob("*.png"):
        picture = matplotlib.image.imread(png)
        assert picture.shape[0] > 200 and picture.shape[1] > 600 and picture[..., :3].std() > 0.05
    assert _colour_pixels(tmp_path / "good" / "qa_01_Plate.png", STATUS_COLORS["pass"]) > 500  # the status badge

    code, out, _ = _run(["--landmarks", tmp_path / "bad.mrk.json", *common, "--figures", tmp_path / "bad"], capsys)
    assert code == 1 and "overall: FAIL" in out  # a failing QA still writes its figures
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == sorted(
        p.name for p in qa_figure_paths(tmp_path / "bad", schema).values())
    assert _colour_pixels(tmp_path / "bad" / "qa_01_Plate.png", STATUS_COLORS["fail"]) > 500
    assert _colour_pixels(tmp_path / "bad" / "qa_01_Plate.png", STATUS_COLORS["pass"]) == 0

    # without --image: the points on an empty plane
    code, _, _ = _run(["--landmarks", tmp_path / "good.mrk.json", "--schema", tmp_path / "plate.json",
                       "--figures", tmp_path / "points-only"], capsys)
    assert code == 0 and len(list((tmp_path / "points-only").glob("qa_*.png"))) == 3


def test_qa_figures_bad_input_is_one_line_and_writes_nothing(schema, tmp_path, capsys):
    (tmp_path / "plate.json").write_text(json.dumps(SCHEMA))
    write_volume(volume(bright_plane), tmp_path / "scan.nii.gz")
    write_volume(volume(lambda p: p[:, 0], shift_mm=(0, 0, 150)), tmp_path / "elsewhere.nii.gz")
    write_markups_json(tmp_path / "case.mrk.json", schema, placed_points(schema))
    (tmp_path / "not-a-folder").write_text("keep")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "qa_overview.png").write_text("keep")
    case = ["--landmarks", tmp_path / "case.mrk.json", "--schema", tmp_path / "plate.json"]
    before = sorted(tmp_path.rglob("*"))
    for argv, path, problem in (
            ([*case, "--image", tmp_path / "scan.nii.gz"], "scan.nii.gz", "--image is only used with --figures"),
            ([*case, "--figures", tmp_path / "not-a-folder"], "not-a-folder", "must be a folder"),
            ([*case, "--image", tmp_path / "elsewhere.nii.gz", "--figures", tmp_path / "f1"], "elsewhere.nii.gz",
             "7 of 7 placed landmarks lie outside this image"),
            ([*case, "--image", tmp_path / "plate.json", "--figures", tmp_path / "f2"], "plate.json",
             "not a readable image"),
            ([*case, "--figures", tmp_path / "old"], "qa_overview.png", "already exists; pass --overwrite"),
            ([*case, "--image", tmp_path / "scan.nii.gz", "--figures", tmp_path / "f3", "--output",
              tmp_path / "f3" / "qa.txt"], "qa.txt", "--output must be a .csv file")):
        code, _, err = _run(argv, capsys)
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("error: ") and path in err[0] and problem in err[0], err
    assert sorted(tmp_path.rglob("*")) == before  # no figure, CSV or empty folder left behind
    assert (tmp_path / "old" / "qa_overview.png").read_text() == "keep"


def test_scatter_labels_never_overlap_and_the_worst_landmarks_get_theirs():
    """The uncertainty-vs-error figure's labels: a dense cluster cannot hold every name; those drawn never
    overlap each other or the legend, stay inside the axes, and the outliers drawn first keep theirs."""
    from LandmarkDetectionLib.figures import place_labels, plt

    rng = np.random.default_rng(3)
    xs = np.concatenate([[7.5, 6.0], 4.0 + rng.normal(0, 0.3, 30)])
    ys = np.concatenate([[3.0, 2.0], 1.0 + rng.normal(0, 0.3, 30)])
    names = ["SIPF", "LSAMTH", *(f"L{n:02d}XYZ" for n in range(30))]
    figure, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(xs, ys)
    ax.plot([0, 8], [0, 8], label="error = semi-axis")
    ax.legend()
    figure.tight_layout()
    drawn = place_labels(ax, xs, ys, names)
    renderer = figure.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in drawn]
    frame, legend = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
    assert [text.get_text() for text in drawn[:2]] == ["SIPF", "LSAMTH"]
    assert 5 < len(drawn) < len(names)  # the cluster is labelled in part
    for n, box in enumerate(boxes):
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) and not box.overlaps(legend)
        assert not any(box.overlaps(other) for other in boxes[n + 1:])
    plt.close(figure)
