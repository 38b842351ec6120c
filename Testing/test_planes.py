"""Scan planes and AC-PC alignment (LandmarkDetectionLib.planes) on synthetic heads with exact answers, and
the mid-sagittal plane from a scan's symmetry on a synthetic head that is mirror-symmetric about a known plane."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.geometry import LPS_TO_RAS, Grid, apply_matrix, centered_grid, rigid_matrix
from LandmarkDetectionLib.fileio import write_markups_json, write_volume
from LandmarkDetectionLib.planes import (add_planes_command, compute_planes, fit_plane, fit_plane_robust,
                                         head_points_from_image, mirror_pairs, orient_right, resample_acpc,
                                         symmetry_plane, write_planes)
from LandmarkDetectionLib.resources import resources_dir
from LandmarkDetectionLib.schema import SchemaPlanes, load_schema, schema_from_dict

# A synthetic head in its own AC-PC space (RAS mm): midline AFIDs on x = 0, right AFIDs at x > 0; the
# left ones are their mirror images. Rough anatomical positions, exact geometry.
MIDLINE = {"AC": (0, 0, 0), "PC": (0, -26, 0), "ICS": (0, -36, -12), "PMJ": (0, -18, -22), "SIPF": (0, -14, -8),
           "CUL": (0, -48, 6), "IMS": (0, -8, -11), "PG": (0, -34, 5), "GENU": (0, 28, 9), "SPLE": (0, -38, 11)}
RIGHT = {"RSLMS": (12, -22, -4), "RILMS": (10, -24, -14), "RMB": (3, -8, -12), "RLVAC": (16, 0, 14),
         "RLVPC": (18, -26, 16), "RALTH": (36, -8, -26), "RSAMTH": (26, -6, -20), "RIAMTH": (24, -4, -30),
         "RIGO": (12, -40, 2), "RVOH": (24, -70, 4), "ROSF": (14, 26, -14)}
OBLIQUE = [(20, -25, 30), (-35, 10, 25), (0, 32, -20), (28, 22, -35)]


def afids_head(schema, matrix=None):
    coords = {**MIDLINE, **RIGHT, **{"L" + k[1:]: (-v[0], v[1], v[2]) for k, v in RIGHT.items()}}
    points = np.array([coords[name] for name in schema.names], dtype=float)
    return points if matrix is None else apply_matrix(matrix, points)


def brain88_head(schema, matrix=None):
    """brain-88 with its mid-sagittal groups on x = 0, the Brain Axial Boundary on z = 20 and the frontal
    pole ahead of the occipital pole on the midline; every mirror pair mirrored."""
    rng = np.random.default_rng(7)
    points = np.zeros((len(schema), 3))
    mirror = schema.mirror_indices()
    for i, lm in enumerate(schema.landmarks):
        y, z = rng.uniform(-60, 60), rng.uniform(-40, 40)
        if lm.sub_anatomy in ("Brain Stem", "Brain Boundary MSP", "Corpus Callosum"):
            points[i] = (0, y, z)
        elif lm.sub_anatomy == "Brain Axial Boundary":
            points[i] = (0 if mirror[i] == i else rng.uniform(20, 65), y, 20)
        else:
            points[i] = (0 if mirror[i] == i else rng.uniform(5, 60), y, z)
    points[schema.names.index("MSP_anterior")] = (0, 70, 0)
    points[schema.names.index("MSP_posterior")] = (0, -100, 0)
    for i, j in mirror_pairs(schema):  # left = mirrored right
        points[j] = points[i] * (-1, 1, 1)
    return points if matrix is None else apply_matrix(matrix, points)


def angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(abs(np.dot(a, b)) / np.linalg.norm(a) / np.linalg.norm(b), -1, 1)))


def head_image(turn_deg=(0.0, -6.0, 12.0), shift=(4.0, -3.0, 2.0)):
    """A head-like volume (4 mm voxels) mirror-symmetric about a known plane: the head frame's x = 0 turned
    by ``turn_deg`` (about R, A, S) and moved by ``shift`` (head frame -> RAS: rigid_matrix(turn_deg, shift)).
    Returns (image, plane centre, plane normal)."""
    rotation = rigid_matrix(turn_deg, (0, 0, 0))[:3, :3]
    grid = centered_grid(np.zeros(3), (48, 56, 48), (4.0, 4.0, 4.0))
    k, j, i = np.meshgrid(*(np.arange(n) for n in grid.size[::-1]), indexing="ij")
    ras = grid.to_ras(np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float))
    x, y, z = ((ras - shift) @ rotation).T  # head-frame coordinates

    def blob(cx, cy, cz, radius, height):
        return height * np.exp(-((np.abs(x) - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * radius ** 2))

    inside = (x / 70) ** 2 + (y / 85) ** 2 + (z / 65) ** 2
    values = 100 / (1 + np.exp((inside - 1) * 20)) + blob(30, 25, 10, 8, 80) + blob(20, -30, -15, 10, -40) \
        + blob(0, -50, 20, 6, 60) + blob(0, 40, -20, 9, 50)  # |x|: mirror-symmetric; nothing is in y or z
    image = sitk.GetImageFromArray(values.reshape(grid.size[::-1]).astype(np.float32))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image, np.asarray(shift, float), rotation @ np.array([1.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------- fitting
def test_fit_plane_recovers_a_known_plane_exactly():
    rng = np.random.default_rng(0)
    normal = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    offset = 17.25
    basis = np.linalg.svd(normal[None])[2][1:]  # two unit vectors orthogonal to the normal
    points = offset * normal + rng.uniform(-50, 50, (12, 2)) @ basis
    centre, fitted = fit_plane(points)
    assert np.allclose(fitted, normal, atol=1e-9) or np.allclose(fitted, -normal, atol=1e-9)
    assert abs(abs(fitted @ centre) - offset) < 1e-9
    batched_centres, batched = fit_plane(np.stack([points, points[::-1]]))  # leading dimensions batch
    assert np.allclose(batched, fitted, atol=1e-12) and np.allclose(batched_centres, centre, atol=1e-12)


def test_robust_fit_keeps_every_point_without_an_outlier():
    points = afids_head(load_schema("afids-32"))[:5]
    _, normal, inliers = fit_plane_robust(points)
    assert inliers.all() and np.allclose(np.abs(normal), (1, 0, 0), atol=1e-12)


def test_robust_msp_leaves_out_one_gross_outlier(afids32):
    motion = rigid_matrix((20, -25, 30), (5, -12, 30))
    points = afids_head(afids32, motion)
    truth_normal = motion[:3, :3] @ (1.0, 0.0, 0.0)
    genu = afids32.names.index("GENU")
    points[genu] += 15.0 * truth_normal + (0, 4, 0)
    midline = [afids32.names.index(n) for n in afids32.planes.mid_sagittal]
    assert angle_deg(fit_plane(points[midline])[1], truth_normal) > 1.0  # plain least squares is pulled off
    result = compute_planes(afids32, points)
    msp = result.planes["mid-sagittal"]
    assert np.allclose(msp.normal, truth_normal, atol=1e-9)
    assert msp.excluded == ("GENU",) and "GENU" not in msp.landmarks and msp.rms_mm < 1e-9
    assert any("GENU lies" in w for w in result.warnings)


# ----------------------------------------------------------------------------------------- oblique heads
@pytest.mark.parametrize("degrees", OBLIQUE)
def test_planes_and_acpc_frame_turn_exactly_with_an_oblique_head(afids32, degrees):
    motion = rigid_matrix(degrees, (8, -20, 14), center_ras=(3, -10, 5))
    rotation = motion[:3, :3]
    upright = compute_planes(afids32, afids_head(afids32))
    moved = compute_planes(afids32, afids_head(afids32, motion))
    assert np.allclose(upright.planes["mid-sagittal"].normal, (1, 0, 0), atol=1e-12)
    assert np.allclose(moved.planes["mid-sagittal"].normal, rotation[:, 0], atol=1e-9)
    assert np.allclose(moved.acpc.rotation, rotation, atol=1e-9)  # the head's own axes are the frame
    assert np.allclose(moved.acpc.matrix @ motion, np.eye(4), atol=1e-9)  # subject -> AC-PC undoes the motion
    assert set(moved.planes) == set(upright.planes) == {"mid-sagittal", "acpc-axial", "acpc-coronal",
                                                        "sub-anatomy-midline"}
    for name, plane in upright.planes.items():
        turned = moved.planes[name]
        assert np.allclose(turned.normal, rotation @ plane.normal, atol=1e-9), name
        assert np.allclose(turned.axes, plane.axes @ rotation.T, atol=1e-9), name
        assert np.allclose(turned.centre, apply_matrix(motion, plane.centre), atol=1e-9), name
        assert np.allclose(turned.fov_centre, apply_matrix(motion, plane.fov_centre), atol=1e-9), name
        assert np.allclose(turned.fov_mm, plane.fov_mm, atol=1e-9), name
        assert np.allclose(np.cross(*turned.axes), turned.normal, atol=1e-12), name
    assert not moved.warnings


def test_plane_normals_and_axes_follow_the_head_axes(afids32):
    planes = compute_planes(afids32, afids_head(afids32)).planes
    assert np.allclose(planes["acpc-axial"].normal, (0, 0, 1)) and np.allclose(planes["acpc-axial"].axes, [(1, 0, 0), (0, 1, 0)])
    assert np.allclose(planes["acpc-coronal"].normal, (0, 1, 0)) and np.allclose(planes["acpc-coronal"].axes, [(0, 0, 1), (1, 0, 0)])
    assert np.allclose(planes["mid-sagittal"].axes, [(0, 1, 0), (0, 0, 1)])


def test_brain88_axial_and_sub_anatomy_planes_turn_with_the_head(brain88):
    motion = rigid_matrix((25, -30, 20), (10, 5, -8))
    upright = compute_planes(brain88, brain88_head(brain88))
    moved = compute_planes(brain88, brain88_head(brain88, motion))
    assert upright.acpc is None and moved.acpc is None  # brain-88 names no AC and PC
    assert np.allclose(upright.planes["axial"].normal, (0, 0, 1), atol=1e-12)
    assert abs(upright.planes["axial"].offset_mm - 20) < 1e-9
    assert np.allclose(upright.planes["mid-sagittal"].normal, (1, 0, 0), atol=1e-12)
    assert {f"sub-anatomy-{s}" for s in ("brain-stem", "brain-boundary-msp", "corpus-callosum", "brain-axial-boundary",
                                         "frontal-lobe", "eye", "temporal-lobe")} <= set(moved.planes)
    for name, plane in upright.planes.items():
        assert np.allclose(moved.planes[name].normal, motion[:3, :3] @ plane.normal, atol=1e-9), name
        assert np.allclose(moved.planes[name].fov_mm, plane.fov_mm, atol=1e-9), name
    assert np.allclose(moved.planes["axial"].normal, motion[:3, :3] @ (0, 0, 1), atol=1e-9)


# ------------------------------------------------------------------------------------- left-right guard
def test_mirror_pairs_put_the_right_landmark_first(afids32, brain88):
    pairs = mirror_pairs(afids32)
    assert len(pairs) == 11
    assert all(afids32.names[r][0] == "R" and afids32.names[l][0] == "L" for r, l in pairs)
    pairs88 = mirror_pairs(brain88)
    assert len(pairs88) == sum(1 for lm in brain88.landmarks if lm.mirror) // 2
    for r, l in pairs88:
        assert "right" in brain88.names[r] or "_R_" in brain88.names[r], brain88.names[r]


def test_the_msp_normal_sign_comes_from_the_mirror_pairs_not_the_svd(afids32):
    points = afids_head(afids32, rigid_matrix((0, 0, 30), (0, 0, 0)))
    pairs = mirror_pairs(afids32)
    for sign in (1, -1):
        normal, warnings = orient_right(sign * np.array([np.cos(np.pi / 6), np.sin(np.pi / 6), 0]), points, pairs,
                                        afids32.names)
        assert np.allclose(normal, (np.cos(np.pi / 6), np.sin(np.pi / 6), 0)) and not warnings


def test_a_few_swapped_labels_are_reported_and_do_not_flip_the_normal(afids32):
    motion = rigid_matrix((-20, 15, 25), (0, 10, 0))
    points = afids_head(afids32, motion)
    names = afids32.names
    for right, left in (("RMB", "LMB"), ("RLVAC", "LLVAC")):  # the annotator mixed up two pairs
        i, j = names.index(right), names.index(left)
        points[[i, j]] = points[[j, i]]
    result = compute_planes(afids32, points)
    assert np.allclose(result.planes["mid-sagittal"].normal, motion[:3, :3] @ (1, 0, 0), atol=1e-9)
    swapped = [w for w in result.warnings if "wrong side" in w]
    assert len(swapped) == 1 and "RMB/LMB" in swapped[0] and "RLVAC/LLVAC" in swapped[0]
    assert not any("left-right swap" in w for w in result.warnings)


def test_all_labels_swapped_gives_a_left_right_swap_warning_and_a_normal_consistent_with_the_labels(afids32):
    motion = rigid_matrix((10, -20, 30), (4, 0, -6))
    points = afids_head(afids32, motion)
    for r, l in mirror_pairs(afids32):  # every right label on the left and vice versa
        points[[r, l]] = points[[l, r]]
    result = compute_planes(afids32, points)
    normal = result.planes["mid-sagittal"].normal
    assert np.allclose(normal, -(motion[:3, :3] @ (1, 0, 0)), atol=1e-9)  # points where the labels say right
    assert all((points[r] - points[l]) @ normal > 0 for r, l in mirror_pairs(afids32))
    assert any(w.startswith("left-right swap") for w in result.warnings)
    frame = result.acpc  # still a proper rotation (right-handed), as the labels define it
    assert np.isclose(np.linalg.det(frame.rotation), 1.0) and np.allclose(frame.rotation[:, 0], normal, atol=1e-9)


# --------------------------------------------------------------------------------------------- AC-PC
@pytest.mark.parametrize("degrees", OBLIQUE[:2])
def test_acpc_frame_maps_ac_to_the_origin_and_pc_onto_minus_y(afids32, degrees):
    points = afids_head(afids32, rigid_matrix(degrees, (-7, 12, 40)))
    frame = compute_planes(afids32, points).acpc
    ac, pc = points[afids32.names.index("AC")], points[afids32.names.index("PC")]
    distance = np.linalg.norm(ac - pc)
    assert np.allclose(apply_matrix(frame.matrix, ac), 0, atol=1e-9)
    assert np.allclose(apply_matrix(frame.matrix, pc), (0, -distance, 0), atol=1e-9)
    assert np.allclose(frame.matrix @ frame.inverse, np.eye(4), atol=1e-12)
    acpc = frame.to_acpc(points)
    assert acpc[afids32.names.index("RLVAC"), 0] > 0 and acpc[afids32.names.index("GENU"), 2] > 0
    assert np.allclose(acpc, afids_head(afids32), atol=1e-9)


def test_acpc_frame_x_is_the_msp_normal_made_orthogonal_to_an_acpc_line_off_the_plane(afids32):
    points = afids_head(afids32)
    points[afids32.names.index("AC")] += (1.5, 0, 0)  # AC 1.5 mm right of the midline plane
    result = compute_planes(afids32, points, outlier_mm=10)
    frame, msp = result.acpc, result.planes["mid-sagittal"]
    x, y, _ = frame.rotation.T
    assert np.allclose(y, (points[0] - points[1]) / np.linalg.norm(points[0] - points[1]), atol=1e-12)
    assert np.allclose(frame.rotation.T @ frame.rotation, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(frame.rotation), 1)
    assert abs(np.linalg.det(np.stack([x, y, msp.normal]))) < 1e-12 and x @ msp.normal > 0.99  # x in span(normal, y)


def test_the_itk_transform_file_round_trips(afids32, tmp_path):
    motion = rigid_matrix((20, -30, 25), (6, -9, 31))
    result = compute_planes(afids32, afids_head(afids32, motion))
    paths = write_planes(tmp_path, result)
    transform = sitk.ReadTransform(str(paths["acpc_tfm"]))
    acpc_points = np.random.default_rng(3).uniform(-80, 80, (20, 3))
    subject = apply_matrix(result.acpc.inverse, acpc_points)
    for p_acpc, p_subject in zip(acpc_points, subject):  # AC-PC space (LPS) -> subject (LPS)
        mapped = np.asarray(transform.TransformPoint(tuple(LPS_TO_RAS @ p_acpc)))
        assert np.allclose(LPS_TO_RAS @ mapped, p_subject, atol=1e-9)
    matrix = np.loadtxt(paths["acpc_matrix"])
    assert np.allclose(matrix, result.acpc.matrix, atol=1e-12) and np.allclose(matrix @ motion, np.eye(4), atol=1e-9)
    document = json.loads(paths["acpc_json"].read_text())
    assert np.allclose(document["subject_to_acpc"], matrix) and document["coordinate_system"] == "RAS"
    msp = json.loads(paths["mid-sagittal"].read_text())
    assert msp["coordinate_system"] == "RAS" and len(msp["landmarks"]) == 10 and len(msp["fov_mm"]) == 2
    assert np.allclose(msp["normal_ras"], motion[:3, :3] @ (1, 0, 0), atol=1e-9)
    index = json.loads(paths["index"].read_text())
    assert set(index["planes"]) == set(result.planes)
    with pytest.raises(LandmarkError, match="already exists"):
        write_planes(tmp_path, result)
    write_planes(tmp_path, result, overwrite=True)
    with pytest.raises(LandmarkError, match="overwrite an input"):
        write_planes(tmp_path, result, overwrite=True, inputs=[paths["acpc_tfm"]])


# ------------------------------------------------------------------------------------------ uncertainty
def test_plane_uncertainty_grows_with_the_covariance_and_vanishes_for_tiny_ones(afids32):
    points = afids_head(afids32, rigid_matrix((20, 20, -25), (0, 0, 0)))
    results = {}
    for sd in (1e-6, 0.5, 1.0, 5.0):
        covariance = np.tile(np.eye(3) * sd ** 2, (len(afids32), 1, 1))
        results[sd] = compute_planes(afids32, points, covariance, samples=400, seed=1)
    tiny = results[1e-6].planes["mid-sagittal"].uncertainty
    assert tiny.angle_deg < 1e-4 and tiny.offset_mm < 1e-5 and tiny.trustworthy and tiny.samples == 400
    for name in ("mid-sagittal", "acpc-axial", "sub-anatomy-midline"):
        angles = [results[sd].planes[name].uncertainty.angle_deg for sd in (1e-6, 0.5, 1.0, 5.0)]
        offsets = [results[sd].planes[name].uncertainty.offset_mm for sd in (1e-6, 0.5, 1.0, 5.0)]
        assert angles == sorted(angles) and offsets == sorted(offsets), name
        # the same seeded noise, twice as large, moves small planes twice as far
        assert results[1.0].planes[name].uncertainty.offset_mm == pytest.approx(
            2 * results[0.5].planes[name].uncertainty.offset_mm, rel=0.05), name
    wide = results[5.0].planes["mid-sagittal"].uncertainty
    assert not wide.trustworthy and "deg" in wide.reason
    assert results[5.0].acpc.uncertainty["trustworthy"] is False
    assert results[1e-6].acpc.uncertainty["ac_offset_mm"] < 1e-5
    again = compute_planes(afids32, points, np.tile(np.eye(3) * 0.25, (len(afids32), 1, 1)), samples=400, seed=1)
    assert again.planes["mid-sagittal"].uncertainty == results[0.5].planes["mid-sagittal"].uncertainty  # seeded


def test_uncertainty_follows_the_direction_of_the_covariance(afids32):
    points = afids_head(afids32)
    along_plane = np.tile(np.diag([1e-8, 4.0, 4.0]), (len(afids32), 1, 1))  # landmarks slide within the MSP
    across = np.tile(np.diag([4.0, 1e-8, 1e-8]), (len(afids32), 1, 1))
    within = compute_planes(afids32, points, along_plane, samples=300).planes["mid-sagittal"].uncertainty
    off = compute_planes(afids32, points, across, samples=300).planes["mid-sagittal"].uncertainty
    assert within.angle_deg < 1e-3 and off.angle_deg > 1.0 and off.offset_mm > 0.3


# ----------------------------------------------------------------------------------------------- resample
def test_resample_acpc_puts_the_ac_voxel_at_the_acpc_origin(afids32, tmp_path):
    direction = tuple(rigid_matrix((15, -20, 30), (0, 0, 0))[:3, :3].ravel())
    image = sitk.Image([40, 44, 36], sitk.sitkFloat32)
    image.SetSpacing((1.1, 0.9, 1.3))
    image.SetOrigin((-20.0, 15.0, -8.0))
    image.SetDirection(direction)
    ac_index = (17, 25, 13)
    image[ac_index] = 1000.0
    ac = Grid.of(image).to_ras(ac_index)
    motion = rigid_matrix((25, -20, 30), ac)  # about the world origin, so AC lands on ac
    result = compute_planes(afids32, afids_head(afids32, motion))
    assert np.allclose(result.acpc.ac, ac, atol=1e-9)
    paths = write_planes(tmp_path, result)
    for transform in (result.acpc, result.acpc.matrix, sitk.ReadTransform(str(paths["acpc_tfm"]))):
        resampled = resample_acpc(image, transform, spacing=1.0)
        array = sitk.GetArrayFromImage(resampled)
        brightest = np.unravel_index(array.argmax(), array.shape)[::-1]  # (i, j, k)
        assert tuple(brightest) == tuple((np.array(resampled.GetSize()) - 1) // 2)
        assert np.allclose(resampled.TransformIndexToPhysicalPoint(tuple(int(v) for v in brightest)), 0, atol=1e-9)
        assert array.max() == pytest.approx(1000.0, rel=1e-4)
        assert np.allclose(resampled.GetDirection(), np.eye(3).ravel()) and resampled.GetSpacing() == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------- scan symmetry
@pytest.mark.parametrize("turn", [(0, 0, 0), (0, -6, 12), (5, 20, -25)])
def test_symmetry_plane_is_the_plane_the_head_is_mirror_symmetric_about(turn):
    image, centre, normal = head_image(turn)
    plane = symmetry_plane(image)
    assert angle_deg(plane.normal, normal) < 1.0 and plane.normal @ normal > 0  # toward RAS +x
    assert abs(plane.distances(centre[None])[0]) < 1.0 and abs(plane.distances(plane.centre[None])[0]) < 1e-9
    assert (plane.name, plane.kind) == ("mid-sagittal-symmetry", "mid-sagittal")
    # in-plane: the scanner's anterior on the plane (a nod is not seen by symmetry), then superior
    anterior = np.array([0.0, 1.0, 0.0]) - plane.normal[1] * plane.normal
    assert np.allclose(plane.axes[0], anterior / np.linalg.norm(anterior))
    assert np.allclose(plane.axes[1], np.cross(plane.normal, plane.axes[0])) and plane.axes[1][2] > 0.9
    assert 160 < plane.fov_mm[0] < 200 and 130 < plane.fov_mm[1] < 170  # the head (170 x 130 mm) plus margins


def test_symmetry_plane_needs_a_head():
    image = sitk.Image([20, 20, 20], sitk.sitkFloat32)
    image[10, 10, 10] = 5.0  # one bright voxel: no head to mirror
    with pytest.raises(LandmarkError, match="scan.nii.gz: has no head"):
        symmetry_plane(image, source="scan.nii.gz")


def test_head_points_are_the_foreground_voxels():
    image = sitk.Image([10, 12, 8], sitk.sitkFloat32)
    image.SetOrigin((5.0, -3.0, 2.0))
    image.SetSpacing((2.0, 1.0, 3.0))
    for index in ((2, 3, 4), (7, 1, 0), (5, 11, 6)):
        image[index] = 100.0
    points = head_points_from_image(image)
    expected = Grid.of(image).to_ras([(7, 1, 0), (2, 3, 4), (5, 11, 6)])  # in (k, j, i) order
    assert np.allclose(points, expected)
    corners = head_points_from_image(sitk.Image([3, 3, 3], sitk.sitkFloat32))  # no foreground: the corners
    assert len(corners) == 8 and np.ptp(corners, axis=0).tolist() == [2.0, 2.0, 2.0]


# ----------------------------------------------------------------------------------------- schema planes
def _mini(planes):
    return {"name": "mini", "sub_anatomies": [{"name": "Mid", "plane": "mid-sagittal"}],
            "landmarks": [{"number": n + 1, "name": f"p{n + 1}", "sub_anatomy": "Mid", "aliases": [f"point {n + 1}"]}
                          for n in range(5)], "planes": planes}


def test_schema_planes_are_parsed_resolving_aliases_and_round_trip(tmp_path):
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(_mini({"mid-sagittal": {"landmarks": ["p1", "point 2", "P3"]}, "ac": "p1", "pc": "p2",
                                      "anterior": {"from": "p2", "to": "p1"}, "sub_anatomies": ["Mid"]})))
    schema = load_schema(path)
    assert schema.planes == SchemaPlanes(("p1", "p2", "p3"), (), "p1", "p2", ("p2", "p1"), ("Mid",))
    assert schema_from_dict(schema.to_dict(), schema.source) == schema


@pytest.mark.parametrize("planes, message", [
    ({"mid-sagittal": {"landmarks": ["p1", "p2", "nope"]}}, "unknown landmark 'nope'"),
    ({"mid-sagittal": {"landmarks": ["p1", "p2"]}}, "at least 3 landmarks"),
    ({"mid-sagittal": {"landmarks": ["p1", "p2", "point 1"]}}, "twice"),
    ({"mid-sagittal": ["p1", "p2", "p3"]}, "must be an object"),
    ({"midsagittal": {"landmarks": ["p1", "p2", "p3"]}}, "unknown key"),
    ({"ac": "p1"}, "both 'ac' and 'pc'"),
    ({"ac": "p1", "pc": "point 1"}, "same landmark"),
    ({"ac": "p1", "pc": "PCX"}, "unknown landmark 'PCX'"),
    ({"anterior": {"from": "p1"}}, "anterior"),
    ({"sub_anatomies": ["Nowhere"]}, "unknown sub-anatomy"),
    ([], "must be an object"),
])
def test_bad_schema_planes_are_refused_with_the_schema_file_named(tmp_path, planes, message):
    path = tmp_path / "user.json"
    path.write_text(json.dumps(_mini(planes)))
    with pytest.raises(LandmarkError, match=message) as error:
        load_schema(path)
    assert str(path) in str(error.value)


def test_builtin_schemas_declare_their_planes_and_keep_their_formatting(afids32, brain88):
    assert afids32.planes.mid_sagittal == tuple(afids32.names[i] for i in afids32.indices_of("Midline"))
    assert (afids32.planes.ac, afids32.planes.pc) == ("AC", "PC")
    assert brain88.planes.ac is None and "no AC" in brain88.planes.note
    assert brain88.planes.axial == tuple(brain88.names[i] for i in brain88.indices_of("Brain Axial Boundary"))
    for name in ("afids-32", "brain-88"):
        text = (resources_dir() / "Schemas" / f"{name}.json").read_text(encoding="utf-8")
        data = json.loads(text)
        assert text == json.dumps(data, indent=1, ensure_ascii=False) + "\n"
        schema = load_schema(name)
        assert schema.to_dict()["planes"] == data["planes"]
        assert schema_from_dict(schema.to_dict(), schema.source) == schema


# ---------------------------------------------------------------------------------------------------- CLI
def _parser():
    parser = argparse.ArgumentParser(prog="test")
    add_planes_command(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv):
    args = _parser().parse_args(argv)
    return args.handler(args)


def _uncertainty_file(path, schema, points, sd):
    records = [{"name": lm.name, "mean_ras": list(map(float, p)), "covariance_ras": (np.eye(3) * sd ** 2).tolist()}
               for lm, p in zip(schema.landmarks, points)]
    path.write_text(json.dumps({"format": "LandmarkDetectionLib.uncertainty", "version": 1, "level": 0.9,
                                "landmarks": records[::-1]}))  # any order: matched by name
    return path


def test_planes_command_writes_everything_and_refuses_to_overwrite(afids32, tmp_path, capsys):
    points = afids_head(afids32, rigid_matrix((20, -25, 30), (3, 4, 5)))
    landmarks = tmp_path / "case.mrk.json"
    write_markups_json(landmarks, afids32, points)
    uncertainty = _uncertainty_file(tmp_path / "case.uncertainty.json", afids32, points, 0.3)
    out = tmp_path / "out"
    assert _run(["planes", "--landmarks", str(landmarks), "--uncertainty", str(uncertainty), "--output", str(out),
                 "--samples", "200"]) == 0  # schema guessed from the labels
    printed = capsys.readouterr().out
    assert "schema afids-32" in printed and "mid-sagittal" in printed and "trustworthy" in printed
    assert {p.name for p in out.iterdir()} == {"planes.json", "mid-sagittal.plane.json", "acpc-axial.plane.json",
                                               "acpc-coronal.plane.json", "sub-anatomy-midline.plane.json",
                                               "acpc.json", "acpc_matrix.txt", "acpc.tfm"}
    msp = json.loads((out / "mid-sagittal.plane.json").read_text())
    assert msp["uncertainty"]["trustworthy"] is True and msp["uncertainty"]["samples"] == 200
    before = (out / "acpc.tfm").read_bytes()
    with pytest.raises(LandmarkError, match="already exists"):
        _run(["planes", "--landmarks", str(landmarks), "--output", str(out)])
    assert _run(["planes", "--landmarks", str(landmarks), "--output", str(out), "--overwrite"]) == 0
    assert (out / "acpc.tfm").read_bytes() == before
    with pytest.raises(LandmarkError, match="input"):
        _run(["planes", "--landmarks", str(landmarks), "--output", str(landmarks)])


def test_planes_command_resamples_the_scan_into_acpc_space(afids32, tmp_path):
    image = sitk.Image([30, 30, 30], sitk.sitkFloat32)
    image.SetOrigin((-14.5, -14.5, -14.5))
    image[15, 15, 15] = 500.0
    image[15, 5, 15] = 200.0
    points = afids_head(afids32, rigid_matrix((0, 0, 20), (-0.5, -0.5, 0.5)))  # AC on voxel (15, 15, 15)
    landmarks = tmp_path / "case.fcsv"
    from LandmarkDetectionLib.fileio import write_landmarks, write_volume

    write_landmarks(landmarks, afids32, points)
    scan = tmp_path / "scan.nii.gz"
    write_volume(image, scan)
    out = tmp_path / "out"
    assert _run(["planes", "--landmarks", str(landmarks), "--output", str(out), "--resample", str(scan),
                 "--schema", "afids-32"]) == 0
    resampled = sitk.ReadImage(str(out / "scan_acpc.nii.gz"))
    array = sitk.GetArrayFromImage(resampled)
    centre = (np.array(resampled.GetSize()) - 1) // 2
    assert array[tuple(centre[::-1])] == pytest.approx(500.0, rel=1e-4)


def test_planes_command_finds_the_symmetry_plane_of_a_scan_with_or_without_landmarks(afids32, tmp_path, capsys):
    turn, shift = (0, -6, 12), (4.0, -3.0, 2.0)
    image, centre, normal = head_image(turn, shift)
    scan = tmp_path / "scan.nii.gz"
    write_volume(image, scan)
    assert _run(["planes", "--image", str(scan)]) == 0  # printed only
    printed = capsys.readouterr().out
    assert "scan.nii.gz: mid-sagittal plane by symmetry: normal (+" in printed and list(tmp_path.iterdir()) == [scan]

    out = tmp_path / "out"
    assert _run(["planes", "--image", str(scan), "--output", str(out)]) == 0
    assert [p.name for p in out.iterdir()] == ["mid-sagittal-symmetry.plane.json"]
    written = json.loads((out / "mid-sagittal-symmetry.plane.json").read_text())
    assert written["kind"] == "mid-sagittal" and angle_deg(written["normal_ras"], normal) < 1.0
    assert abs(np.dot(np.subtract(written["centre_ras"], centre), normal)) < 1.0
    with pytest.raises(LandmarkError, match="already exists"):
        _run(["planes", "--image", str(scan), "--output", str(out)])

    # landmarks of the same head: every plane, and how far their mid-sagittal plane lies from the scan's
    landmarks = tmp_path / "case.mrk.json"
    write_markups_json(landmarks, afids32, afids_head(afids32, rigid_matrix(turn, shift)))
    both = tmp_path / "both"
    assert _run(["planes", "--landmarks", str(landmarks), "--image", str(scan), "--output", str(both)]) == 0
    angle, offset = map(float, re.search(r"lies ([\d.]+) deg and ([\d.]+) mm", capsys.readouterr().out).groups())
    assert angle < 1.0 and offset < 1.0
    assert {"planes.json", "mid-sagittal.plane.json", "mid-sagittal-symmetry.plane.json", "acpc.tfm"} <= \
        {p.name for p in both.iterdir()}
    msp = json.loads((both / "mid-sagittal.plane.json").read_text())
    assert 160 < msp["fov_mm"][0] < 200  # the scan's head sizes the fields of view


def test_planes_command_errors(afids32, brain88, tmp_path):
    landmarks = tmp_path / "b88.mrk.json"
    write_markups_json(landmarks, brain88, brain88_head(brain88))
    scan = tmp_path / "scan.nii.gz"
    with pytest.raises(LandmarkError, match="names no AC and PC"):
        _run(["planes", "--landmarks", str(landmarks), "--output", str(tmp_path / "o"), "--resample", str(scan)])
    assert _run(["planes", "--landmarks", str(landmarks), "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "axial.plane.json").exists() and not (tmp_path / "o" / "acpc.tfm").exists()
    wrong = _uncertainty_file(tmp_path / "w.uncertainty.json", afids32, afids_head(afids32), 1.0)
    with pytest.raises(LandmarkError, match="not in schema 'brain-88'"):
        _run(["planes", "--landmarks", str(landmarks), "--uncertainty", str(wrong), "--output", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()
    odd = tmp_path / "odd.csv"
    odd.write_text("name,x,y,z\nfoo,1,2,3\n")
    with pytest.raises(LandmarkError, match="match no built-in schema"):
        _run(["planes", "--landmarks", str(odd), "--output", str(tmp_path / "q")])
    with pytest.raises(LandmarkError, match="needs --landmarks, --image SCAN or both"):
        _run(["planes", "--output", str(tmp_path / "r")])
    for option in ("--uncertainty", "--resample"):
        with pytest.raises(LandmarkError, match=f"x.json: {option} needs --landmarks"):
            _run(["planes", "--image", str(scan), option, str(tmp_path / "x.json")])
    with pytest.raises(LandmarkError, match="--resample needs --output"):
        _run(["planes", "--landmarks", str(landmarks), "--resample", str(scan)])
