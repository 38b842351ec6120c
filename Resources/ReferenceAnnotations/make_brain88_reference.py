"""Build the brain-88 reference annotation of the sample template (MNI152NLin2009cAsym, 1 mm) with the
project's own annotation tools, deterministically.

    .venv/bin/python Resources/ReferenceAnnotations/make_brain88_reference.py [--output DIR]

It is a reference annotation made with this project's tools, not a clinical ground truth. Every point
follows the brain-88 schema's definitions and guidelines:

- Where the anatomy allows an objective rule, the points come from that rule (the rules are stated in
  the schema's ``reference_rule`` of each sub-anatomy): brain boundaries from the outline of a brain
  mask on the plane, the corpus callosum from the outline of its white matter on the mid-sagittal
  slice, the globes of the eyes from the T2w vitreous, AFIDs-anchored brain stem points from the human
  AFIDs consensus that ships with the template.
- Where it needs judgement, the point is placed at the RAS coordinates in ``JUDGED`` below, chosen by
  looking at slices of the T1w and T2w (and, where it lies on a boundary, moved onto that boundary).
- Secondary points sit at their schema fractions of arc length along the boundary curve between their
  primaries (annotation.place_secondaries); every curve lies in its sub-anatomy's plane, and every
  sub-anatomy's points lie on its plane.

The brain mask is derived here from the template's own T1w and T2w with SimpleITK (no other template
is used): tissue is T1w above the CSF level and T2w below the CSF level; a 5 mm erosion cuts it from the
scalp, the component at a seed in the white matter is grown back within the tissue, then closed and
filled. Each boundary is that mask sampled on the plane, closed with a disc (bridging sulci and the
interhemispheric notch, as a boundary annotation does) and outlined at half level.

It writes into the output folder (default: this script's folder)
- ``brain88_MNI152NLin2009cAsym.mrk.json``: the 88 landmarks (Slicer markups, LPS; labels = names);
- ``brain88_curves/NN_<sub-anatomy>[_side].mrk.json``: the boundary curves the secondaries follow
  (Slicer Curve / ClosedCurve markups, read by ``landmark-detection qa --curves``);
- ``figures/brain88_NN_<sub-anatomy>.png``: one figure per sub-anatomy (figures.sub_anatomy_figure);
and prints the QA table (annotation.annotation_qa), which must pass (warnings allowed).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import contourpy
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from LandmarkDetectionLib import figures
from LandmarkDetectionLib.annotation import FAIL, Curve, annotation_qa, closest_on_curve, place_secondaries, \
    point_at_arc, project_to_plane, resample_polyline
from LandmarkDetectionLib.fileio import atomic_path, atomic_write_text, curve_markups_json, read_landmarks, \
    safe_name, write_markups_json
from LandmarkDetectionLib.geometry import LPS_TO_RAS
from LandmarkDetectionLib.planes import compute_planes, fit_plane
from LandmarkDetectionLib.sample_data import fetch_sample
from LandmarkDetectionLib.schema import load_schema

HERE = Path(__file__).resolve().parent
LANDMARK_FILE = "brain88_MNI152NLin2009cAsym.mrk.json"
CURVE_FOLDER = "brain88_curves"
FIGURE_FOLDER = "figures"
NOTE = "Reference annotation of the MNI152NLin2009cAsym template made with the project's tools (not a clinical ground truth)"

# Intensity levels of the template (its T1w and T2w run 0..10000): CSF, grey and white matter measured
# on it (lateral ventricle T1w ~2300 / T2w ~9600, cortex T1w ~4500 / T2w ~6500, white matter T1w ~8800).
T1_TISSUE = 3500.0  # T1w above: brain tissue (and scalp), below: CSF and bone
T2_CSF = 7500.0  # T2w above: CSF (and the vitreous)
T1_WHITE = 6500.0  # T1w above: white matter (half way between the callosal white matter and grey matter)
T1_STEM = 5000.0  # T1w above: brain stem tissue, below: the cisterns and the fourth ventricle
T2_VITREOUS = 8000.0  # T2w above: vitreous (85% of its maximum; 7000 already spills into the orbital fat)

CURVE_STEP_MM = 3.0  # the stored curves: at most this far between control points, primaries included
PIXEL_MM = 0.5  # the planes are sampled at this spacing

# Points placed by judgement (RAS mm), chosen by looking at the T1w and T2w on the sub-anatomy's plane;
# each is then moved onto its plane (and, where named so below, onto its boundary).
JUDGED = {
    # mid-sagittal: just below the posterior commissure, where the third ventricle narrows into the aqueduct
    "BS_aqueduct_inlet": (0.0, -26.3, -4.8),
    # the notch between the inferior edge of the pons and the medulla (moved onto the stem outline)
    "BS_pontomedullary_junction": (0.0, -31.0, -48.6),
    # the dorsal medulla where the fourth ventricle's lower end closes (moved onto the stem outline)
    "BS_obex": (0.0, -46.0, -57.7),
    # the lowest point of the inferior vermis, above the cisterna magna (moved onto the brain outline)
    "MSP_inferior_cerebellum": (0.0, -60.3, -60.4),
    # the posterior end of the genu's lower limb, where it thins into the lamina rostralis (onto the CC outline)
    "CC_rostrum": (0.0, 15.2, -1.3),
    # orbital apex: the optic nerve entering the optic canal (coronal T1w: the nerve in the fat cone)
    "EYE_R_orbital_apex": (19.5, 23.0, -36.5),
    "EYE_L_orbital_apex": (-19.5, 23.0, -36.0),
    # Temporal Lobe plane (T1w and T2w): the temporal pole's front (moved onto the brain outline); the
    # uncus, the medial tip of the hippocampal head at the crural cistern; the atrium of the lateral
    # ventricle, where the temporal horn opens into it (the temporo-occipital junction)
    "TL_R_pole": (35.6, 23.5, -42.6),
    "TL_R_medial": (16.3, -4.9, -26.4),
    "TL_R_posterior": (31.2, -51.6, 0.5),
    "TL_L_pole": (-32.4, 21.0, -41.7),
    "TL_L_medial": (-15.2, -6.1, -26.0),
    "TL_L_posterior": (-29.7, -55.2, 2.1),
}
# The medial boundary of each temporal lobe on its plane, drawn by judgement (as an annotator clicks a
# curve): from the atrium along the medial side of the hippocampus and parahippocampal gyrus (the
# ambient cistern) to the uncus, then along the anteromedial surface (the crural and sylvian cisterns)
# to the temporal pole. The lateral boundary is the brain outline (objective).
TEMPORAL_MEDIAL = {
    "R": ([(26.2, -47.3, -2.0), (22.2, -42.1, -5.0), (20.1, -36.1, -8.5), (19.5, -29.1, -12.5),
           (19.5, -20.5, -17.4), (17.9, -12.7, -21.9)],
          [(16.8, -0.6, -28.9), (18.2, 3.8, -31.4), (20.2, 8.2, -33.9), (21.7, 12.5, -36.4), (24.6, 17.7, -39.4),
           (28.6, 21.7, -41.6)]),
    "L": ([(-25.8, -48.7, -1.6), (-21.8, -42.6, -5.1), (-19.4, -36.5, -8.6), (-18.5, -29.5, -12.6),
           (-20.5, -21.7, -17.0), (-18.1, -14.8, -21.0)],
          [(-15.7, -1.8, -28.5), (-17.7, 2.6, -31.0), (-19.8, 6.9, -33.5), (-21.3, 12.9, -37.0), (-24.4, 18.5, -40.2)]),
}
# The foramen magnum on the mid-sagittal slice: basion (tip of the clivus) and opisthion (posterior
# rim), judged on the T1w/T2w; BS_medulla_foramen_magnum is the anterior medulla on this line.
BASION = (0.0, -29.1, -64.9)
OPISTHION = (0.0, -67.7, -69.2)
# The long axis of both hippocampi (centre of the hippocampus under the temporal horn on sagittal T2w at
# x = +-30 mm, at two coronal levels): the Temporal Lobe plane is their least-squares plane.
HIPPOCAMPAL_AXES = ((30.0, -15.0, -20.5), (30.0, -35.0, -9.0), (-30.0, -15.0, -21.0), (-30.0, -35.0, -9.5))


# ------------------------------------------------------------------------------------------ plane slices
class Section:
    """A square of a plane sampled as an image: pixel (row r, column c) is the point
    centre + x e1 + y e2 with x = (c + 0.5) p - w / 2, y = (r + 0.5) p - w / 2 (figures.plane_slice)."""

    def __init__(self, centre, e1, e2, width_mm: float = 240.0):
        self.centre, self.e1, self.e2 = (np.asarray(v, dtype=float) for v in (centre, e1, e2))
        self.normal = np.cross(self.e1, self.e2)
        self.n = int(np.ceil(width_mm / PIXEL_MM))
        self.width = self.n * PIXEL_MM

    def sample(self, image: sitk.Image, offset_mm: float = 0.0) -> np.ndarray:
        centre = self.centre + offset_mm * self.normal
        return figures.plane_slice(image, centre, self.e1, self.e2, self.width, PIXEL_MM)

    def to_ras(self, rc) -> np.ndarray:
        """RAS points of (row, column) pixel coordinates (N, 2)."""
        rc = np.asarray(rc, dtype=float).reshape(-1, 2)
        x, y = ((rc[:, 1] + 0.5) * PIXEL_MM - self.width / 2), ((rc[:, 0] + 0.5) * PIXEL_MM - self.width / 2)
        return self.centre + x[:, None] * self.e1 + y[:, None] * self.e2

    def to_rc(self, ras) -> np.ndarray:
        d = np.asarray(ras, dtype=float).reshape(-1, 3) - self.centre
        return np.column_stack([(d @ self.e2 + self.width / 2) / PIXEL_MM - 0.5,
                                (d @ self.e1 + self.width / 2) / PIXEL_MM - 0.5])

    def project(self, ras) -> np.ndarray:
        return project_to_plane(np.asarray(ras, dtype=float), self.centre, self.normal)


def disc(radius_mm: float) -> np.ndarray:
    r = int(np.ceil(radius_mm / PIXEL_MM))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return np.hypot(yy, xx) * PIXEL_MM <= radius_mm


def region_outline(mask: np.ndarray, section: Section, seed_ras, close_mm: float = 0.0) -> np.ndarray:
    """The outer outline (closed, (N, 3) RAS, first point not repeated) of the component of a 2D mask
    that holds ``seed_ras``, after closing it with a disc of ``close_mm`` and filling its holes; the
    outline is the half level of the region smoothed with a 1 mm Gaussian (no pixel steps)."""
    pad = int(np.ceil(close_mm / PIXEL_MM)) + 4
    region = np.pad(mask, pad)
    if close_mm > 0:
        region = ndimage.binary_closing(region, disc(close_mm))
    labels, _ = ndimage.label(ndimage.binary_fill_holes(region))
    row, col = np.round(section.to_rc(seed_ras)[0]).astype(int) + pad
    if labels[row, col] == 0:
        raise RuntimeError("the seed of a region lies outside it")
    region = ndimage.binary_fill_holes(labels == labels[row, col])
    smooth = ndimage.gaussian_filter(region.astype(float), 1.0 / PIXEL_MM)
    lines = contourpy.contour_generator(z=smooth).lines(0.5)
    line = max(lines, key=len)  # the outer outline
    rc = np.column_stack([line[:, 1], line[:, 0]]) - pad
    if np.allclose(rc[0], rc[-1]):
        rc = rc[:-1]
    return section.to_ras(rc)


def line_crossings(outline: np.ndarray, centre, normal) -> np.ndarray:
    """Where a closed outline (N, 3) crosses the plane through ``centre`` with ``normal``: (M, 3) RAS."""
    d = (outline - centre) @ normal
    nxt = np.roll(np.arange(len(outline)), -1)
    hits = np.flatnonzero((d > 0) != (d[nxt] > 0))
    t = d[hits] / (d[hits] - d[nxt[hits]])
    return outline[hits] + t[:, None] * (outline[nxt[hits]] - outline[hits])


def nearest_index(outline: np.ndarray, point) -> int:
    return int(np.argmin(np.linalg.norm(outline - np.asarray(point, dtype=float), axis=1)))


def walk(outline: np.ndarray, start: int, stop: int, step: int) -> np.ndarray:
    """Vertices of a closed outline from index ``start`` to ``stop`` (both included) in direction ``step``."""
    n = len(outline)
    count = ((stop - start) * step) % n + 1
    return outline[(start + step * np.arange(count)) % n]


def direction_through(outline: np.ndarray, start: int, stop: int, via: int) -> int:
    """+1 or -1: the direction from ``start`` to ``stop`` round a closed outline that passes ``via``."""
    n = len(outline)
    return 1 if (via - start) % n < (stop - start) % n else -1


def chain(pieces, step_mm: float = CURVE_STEP_MM) -> np.ndarray:
    """One polyline through consecutive pieces (each (N, 3), each starting where the previous ended),
    every piece resampled at equal spacing of at most ``step_mm``, so that the pieces' ends (the
    primary points) are vertices of the result."""
    out = []
    for piece in pieces:
        piece = np.asarray(piece, dtype=float)
        length = float(np.linalg.norm(np.diff(piece, axis=0), axis=1).sum())
        n = max(2, int(np.ceil(length / step_mm)) + 1)
        points = resample_polyline(piece, n)
        out.append(points if not out else points[1:])
    return np.vstack(out)


def cut_at(outline: np.ndarray, point) -> tuple[np.ndarray, int]:
    """The closed outline with ``point`` inserted as a vertex after the nearest segment, and its index."""
    nxt = np.roll(outline, -1, axis=0)
    seg = nxt - outline
    t = np.clip(np.einsum("ij,ij->i", point - outline, seg) / np.einsum("ij,ij->i", seg, seg), 0, 1)
    gap = np.linalg.norm(outline + t[:, None] * seg - point, axis=1)
    k = int(gap.argmin())
    return np.insert(outline, k + 1, point, axis=0), k + 1


def with_vertices(outline: np.ndarray, marks) -> tuple[np.ndarray, list[int]]:
    """The closed outline with each point of ``marks`` made a vertex (inserted unless it is one), and
    their indices."""
    for point in marks:
        if np.min(np.linalg.norm(outline - point, axis=1)) > 1e-9:
            outline, _ = cut_at(outline, point)
    return outline, [nearest_index(outline, point) for point in marks]


def snap(outline: np.ndarray, point) -> np.ndarray:
    """The point of a closed outline nearest to ``point``."""
    closed = np.vstack([outline, outline[:1]])
    s, _ = closest_on_curve(closed, np.asarray(point, dtype=float)[None])
    return point_at_arc(closed, s)[0]


# ------------------------------------------------------------------------------------------ the template
class Template:
    """The sample's images, the AFIDs consensus, the head's axes and the brain mask."""

    def __init__(self):
        files = fetch_sample()
        self.t1 = sitk.ReadImage(str(files.t1w), sitk.sitkFloat32)
        self.t2 = sitk.ReadImage(str(files.t2w), sitk.sitkFloat32)
        afids_schema = load_schema("afids-32")
        afids = read_landmarks(files.afids, afids_schema)
        self.afids = dict(zip(afids_schema.names, afids))
        # The mid-sagittal plane and the AC-PC frame of the human AFIDs consensus (planes.compute_planes:
        # the MSP fitted to the ten midline AFIDs; AC-PC axes x right, y anterior, z superior).
        found = compute_planes(afids_schema, afids)
        self.msp_centre, self.msp_normal = found.planes["mid-sagittal"].centre, found.planes["mid-sagittal"].normal
        self.right, self.anterior, self.superior = found.acpc.rotation.T
        self.brain = brain_mask(self.t1, self.t2)

    def msp_section(self) -> Section:
        """The mid-sagittal plane: columns anterior, rows inferior, centred 10 mm above the MSP centre."""
        anterior = self.anterior - (self.anterior @ self.msp_normal) * self.msp_normal
        anterior /= np.linalg.norm(anterior)
        superior = np.cross(self.msp_normal, anterior)
        return Section(self.msp_centre + 10.0 * superior, anterior, -superior)

    def axial_section(self, through) -> Section:
        """The axial plane parallel to the AC-PC frame through a point: columns to the left, rows posterior."""
        centre = np.asarray(through, dtype=float)
        centre = centre - ((centre - self.msp_centre) @ self.right) * self.right  # centred on the midline
        return Section(centre - 15.0 * self.anterior, -self.right, -self.anterior, 220.0)


def brain_mask(t1: sitk.Image, t2: sitk.Image) -> sitk.Image:
    """The brain (with the brain stem and cerebellum) of the template, from its own T1w and T2w."""
    tissue = (t1 > T1_TISSUE) & (t2 < T2_CSF)
    core = sitk.BinaryErode(tissue, [5] * 3, sitk.sitkBall)  # cut from the scalp, orbits and neck
    components = sitk.ConnectedComponent(core)
    seed = t1.TransformPhysicalPointToIndex(tuple(LPS_TO_RAS @ np.array([25.0, 0.0, 30.0])))  # white matter
    brain = sitk.BinaryDilate(components == components[seed], [5] * 3, sitk.sitkBall) & tissue
    brain = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(brain, [3] * 3, sitk.sitkBall))
    return sitk.Cast(brain, sitk.sitkFloat32)


# ------------------------------------------------------------------------------------- the sub-anatomies
def mid_sagittal(tpl: Template, points: dict, curves: dict) -> None:
    """Brain Stem, Brain Boundary MSP and Corpus Callosum, all on the AFIDs mid-sagittal plane."""
    sec = tpl.msp_section()
    up, forward = -sec.e2, sec.e1
    t1 = sec.sample(tpl.t1)

    # Brain Boundary MSP: the brain mask within 3 mm of the MSP (the medial surfaces of both
    # hemispheres), closed with a 3 mm disc; the anterior, superior and posterior primaries are the
    # outline's extremes. The cerebellum's lowest point needs judgement: the mask bridges the cisterna
    # magna to the medulla, so the outline has no lowest cerebellar point of its own.
    slab = np.max([sec.sample(tpl.brain, o) for o in np.arange(-3.0, 3.01, 1.0)], axis=0) > 0.5
    outline = region_outline(slab, sec, tpl.afids["AC"] + 25 * tpl.superior, close_mm=3.0)
    extremes = [outline[(outline @ forward).argmax()], outline[(outline @ up).argmax()],
                outline[(outline @ forward).argmin()], snap(outline, sec.project(JUDGED["MSP_inferior_cerebellum"]))]
    outline, marks = with_vertices(outline, extremes)
    course = direction_through(outline, marks[0], marks[2], marks[1])
    for name, index in zip(("MSP_anterior", "MSP_superior", "MSP_posterior", "MSP_inferior_cerebellum"), marks):
        points[name] = outline[index]
    curves["Brain Boundary MSP"] = [chain([walk(outline, a, b, course) for a, b in zip(marks[:-1], marks[1:])])]

    # Corpus Callosum: the outline of the T1w white matter on the MSP, the component through the body.
    body = tpl.afids["AC"] + 27.0 * tpl.superior - 10.0 * tpl.anterior
    cc = region_outline(t1 > T1_WHITE, sec, snap_inside(t1 > T1_WHITE, sec, body))
    cc, r = cut_at(cc, snap(cc, sec.project(JUDGED["CC_rostrum"])))
    ahead, height = cc @ forward, cc @ up
    genu, splenium = int(ahead.argmax()), int(ahead.argmin())
    upper = direction_through(cc, genu, splenium, int(height.argmax()))
    edge = (genu + upper * np.arange(((splenium - genu) * upper) % len(cc) + 1)) % len(cc)  # the superior edge
    middle = (ahead[genu] + ahead[splenium]) / 2
    mid = int(edge[np.argmin(np.abs(ahead[edge] - middle))])
    # the splenium's lowest point: the lowest outline point within 15 mm of its posterior end
    near = np.flatnonzero(ahead < ahead[splenium] + 15.0)
    low = int(near[np.argmin(height[near])])
    points.update(CC_rostrum=cc[r], CC_genu=cc[genu], CC_mid_body=cc[mid], CC_splenium_posterior=cc[splenium],
                  CC_splenium_inferior=cc[low])
    curves["Corpus Callosum"] = [chain([walk(cc, r, genu, upper), walk(cc, genu, mid, upper),
                                        walk(cc, mid, splenium, upper), walk(cc, splenium, low, upper)])]

    # Brain Stem: the AFIDs consensus gives the interpeduncular fossa and the pontomesencephalic junction
    # (identical definitions); the anterior surface is the outline of the stem (T1w above the cisterns).
    stem_seed = tpl.afids["PMJ"] - 15.0 * tpl.superior - 5.0 * tpl.anterior  # inside the pons
    stem = region_outline(t1 > T1_STEM, sec, stem_seed)
    ipf, pmj = sec.project(tpl.afids["SIPF"]), sec.project(tpl.afids["PMJ"])
    pmdj = snap(stem, sec.project(JUDGED["BS_pontomedullary_junction"]))
    obex = snap(stem, sec.project(JUDGED["BS_obex"]))
    basion, opisthion = sec.project(BASION), sec.project(OPISTHION)
    across = np.cross(opisthion - basion, sec.normal)  # the foramen magnum line's normal in the plane
    crossing = line_crossings(stem, basion, across)
    magnum = crossing[np.argmax(crossing @ forward)]  # the anterior surface of the medulla on that line
    # the fastigium: the most posterior point of the fourth ventricle (T1w below the stem level, the
    # component behind the pons, within 25 mm below the inferior colliculi)
    ventricle_seed = tpl.afids["ICS"] - 20.0 * tpl.superior - 4.0 * tpl.anterior
    window = np.zeros_like(t1, dtype=bool)
    rc = np.round(sec.to_rc([tpl.afids["ICS"] - 40.0 * tpl.superior - 25 * tpl.anterior,
                             tpl.afids["ICS"] + 2.0 * tpl.superior + 10 * tpl.anterior])).astype(int)
    window[min(rc[:, 0]):max(rc[:, 0]), min(rc[:, 1]):max(rc[:, 1])] = True
    ventricle = region_outline((t1 < T1_STEM) & window, sec, ventricle_seed)
    fastigium = ventricle[np.argmin(ventricle @ forward)]
    points.update(BS_superior_interpeduncular_fossa=ipf, BS_pontomesencephalic_junction=pmj,
                  BS_pontomedullary_junction=pmdj, BS_medulla_foramen_magnum=magnum, BS_obex=obex,
                  BS_fastigium=fastigium, BS_aqueduct_inlet=sec.project(JUDGED["BS_aqueduct_inlet"]))
    # the anterior surface of the stem from the interpeduncular fossa to the foramen magnum
    stem, marks = with_vertices(stem, [snap(stem, ipf), snap(stem, pmj), pmdj, magnum])
    course = direction_through(stem, marks[0], marks[3], marks[2])
    pieces = [walk(stem, start, stop, course) for start, stop in zip(marks[:-1], marks[1:])]
    curves["Brain Stem"] = [chain(pieces)]


def snap_inside(mask: np.ndarray, sec: Section, point) -> np.ndarray:
    """``point`` if the mask holds it, else the nearest pixel of the mask (a seed for region_outline)."""
    rc = np.round(sec.to_rc(point)[0]).astype(int)
    if mask[rc[0], rc[1]]:
        return np.asarray(point, dtype=float)
    inside = np.argwhere(mask)
    return sec.to_ras(inside[np.argmin(np.linalg.norm(inside - rc, axis=1))])[0]


def axial_boundary(tpl: Template, points: dict, curves: dict, genu) -> None:
    """Frontal Lobe (axial through the genu) and Brain Axial Boundary (axial 20 mm above AC)."""
    msp_line = tpl.msp_normal

    # Frontal Lobe: the brain outline on the axial plane through the genu; the pole where the midline
    # meets it in front, the lateral extremes where the coronal line through the genu meets it.
    sec = tpl.axial_section(genu)
    mask = sec.sample(tpl.brain) > 0.5
    outline = region_outline(mask, sec, sec.project(genu) - 20 * tpl.anterior, close_mm=5.0)
    pole = max(line_crossings(outline, tpl.msp_centre, msp_line), key=lambda p: p @ tpl.anterior)
    sides = line_crossings(outline, genu, tpl.anterior)
    right, left = max(sides, key=lambda p: p @ tpl.right), min(sides, key=lambda p: p @ tpl.right)
    outline, (i, r, left_i) = with_vertices(outline, [pole, right, left])
    course = direction_through(outline, r, left_i, i)
    points.update(FL_frontal_pole=outline[i], FL_right_lateral=outline[r], FL_left_lateral=outline[left_i])
    curves["Frontal Lobe"] = [chain([walk(outline, r, i, course), walk(outline, i, left_i, course)])]

    # Brain Axial Boundary: 20 mm above AC (the plane definition), through the lateral ventricles.
    sec = tpl.axial_section(tpl.afids["AC"] + 20.0 * tpl.superior)
    mask = sec.sample(tpl.brain) > 0.5
    outline = region_outline(mask, sec, sec.centre + 40 * tpl.right, close_mm=5.0)
    ends = line_crossings(outline, tpl.msp_centre, msp_line)
    front, back = max(ends, key=lambda p: p @ tpl.anterior), min(ends, key=lambda p: p @ tpl.anterior)
    right, left = outline[np.argmax(outline @ tpl.right)], outline[np.argmin(outline @ tpl.right)]
    outline, marks = with_vertices(outline, [front, right, back, left])
    points.update(AX_anterior=outline[marks[0]], AX_right_lateral=outline[marks[1]], AX_posterior=outline[marks[2]],
                  AX_left_lateral=outline[marks[3]])
    course = direction_through(outline, marks[0], marks[2], marks[1])
    pieces = [walk(outline, a, b, course) for a, b in zip(marks, marks[1:] + marks[:1])]
    loop = chain(pieces)
    curves["Brain Axial Boundary"] = [Curve(loop[:-1], closed=True, name="Brain Axial Boundary")]
    # the interhemispheric fissure along the midline: from each end inwards, it ends at the first
    # callosal white matter (T1w above T1_WHITE): the genu in front, the splenium behind
    for name, start, stop in (("AX_fissure_anterior", outline[marks[0]], outline[marks[2]]),
                              ("AX_fissure_posterior", outline[marks[2]], outline[marks[0]])):
        line = start + np.linspace(0, 1, int(np.linalg.norm(stop - start) / 0.25))[:, None] * (stop - start)
        inside = np.flatnonzero(sample_points(tpl.t1, line) > T1_WHITE)
        if not len(inside):
            raise RuntimeError(f"{name}: no callosal white matter on the midline of the axial plane")
        points[name] = line[inside[0]]


def sample_points(image: sitk.Image, ras) -> np.ndarray:
    """Linear interpolation of an image at RAS points (N, 3)."""
    array = sitk.GetArrayViewFromImage(image)
    index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(LPS_TO_RAS @ p)) for p in ras])
    return ndimage.map_coordinates(array, index[:, ::-1].T, order=1)


def eyes(tpl: Template, points: dict) -> None:
    """Eye: the globes from the T2w vitreous; lens and optic nerve head on the globe's surface; orbital
    apex judged; all eight points then projected onto their least-squares plane."""
    vitreous = sitk.GetArrayViewFromImage(tpl.t2) > T2_VITREOUS
    labels, count = ndimage.label(vitreous)
    sizes = ndimage.sum_labels(vitreous, labels, range(1, count + 1))
    centres = []
    for label in np.flatnonzero(sizes > 1000) + 1:  # a globe's vitreous holds about 5000 voxels
        index = np.array(ndimage.center_of_mass(vitreous, labels, label))[::-1]
        centre = LPS_TO_RAS @ np.array(tpl.t2.TransformContinuousIndexToPhysicalPoint(tuple(index)))
        offset = centre - tpl.afids["AC"]
        if offset @ tpl.anterior > 30 and offset @ tpl.superior < -20:  # in the orbits
            centres.append(centre)
    if len(centres) != 2:
        raise RuntimeError(f"expected two globes, found {len(centres)}")
    for side, centre in (("R", max(centres, key=lambda c: c @ tpl.right)), ("L", min(centres, key=lambda c: c @ tpl.right))):
        apex = np.asarray(JUDGED[f"EYE_{side}_orbital_apex"], dtype=float)
        # the globe's surface: where the T2w falls to half way between the vitreous and the lids in front
        ray = centre + np.arange(0, 25, 0.1)[:, None] * tpl.anterior
        values = sample_points(tpl.t2, ray)
        level = (values[0] + values[-1]) / 2
        front = ray[np.argmax(values < level)]
        # the lens is not resolved in the template: its centre is 5.5 mm behind the front of the globe
        # (anterior chamber 3.5 mm + half the lens's 4 mm thickness, textbook adult values)
        lens = front - 5.5 * tpl.anterior
        # the optic nerve head: where the line from the globe centre to the orbital apex leaves the vitreous
        toward = (apex - centre) / np.linalg.norm(apex - centre)
        ray = centre + np.arange(0, 25, 0.1)[:, None] * toward
        head = ray[np.argmax(sample_points(tpl.t2, ray) < T2_VITREOUS)]
        points[f"EYE_{side}_lens"], points[f"EYE_{side}_globe_centre"] = lens, centre
        points[f"EYE_{side}_optic_nerve_head"], points[f"EYE_{side}_orbital_apex"] = head, apex


def temporal(tpl: Template, points: dict, curves: dict) -> None:
    """Temporal Lobe: on the least-squares plane of both hippocampal long axes. Per side a closed
    boundary: the brain outline from the pole along the lateral surface back to the level of the
    atrium, across at that level to the atrium, then the judged medial boundary by the uncus back to
    the pole. The lateral extreme is the outline's most lateral point on that stretch."""
    centre, normal = fit_plane(np.array(HIPPOCAMPAL_AXES))
    normal = normal if normal @ tpl.superior > 0 else -normal
    e1 = -tpl.right + (tpl.right @ normal) * normal
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(normal, e1)
    e2 = e2 if e2 @ tpl.anterior < 0 else -e2  # rows run posterior
    sec = Section(centre + 10.0 * e2, e1, e2, 220.0)
    midbrain_centre = sec.project((tpl.afids["RSLMS"] + tpl.afids["LSLMS"]) / 2)
    outline = region_outline(sec.sample(tpl.brain) > 0.5, sec, midbrain_centre, close_mm=3.0)
    for side, sign in (("R", 1.0), ("L", -1.0)):
        pole = snap(outline, sec.project(JUDGED[f"TL_{side}_pole"]))
        uncus, atrium = sec.project(JUDGED[f"TL_{side}_medial"]), sec.project(JUDGED[f"TL_{side}_posterior"])
        level = line_crossings(outline, atrium, e2)  # the outline at the atrium's level
        outside = max(level, key=lambda p: sign * (p @ tpl.right))  # on this side's lateral surface
        loop, (i, j) = with_vertices(outline, [pole, outside])
        course = direction_through(loop, i, j, int(np.argmax(sign * (loop @ tpl.right))))
        lateral_surface = walk(loop, i, j, course)
        k = int(np.argmax(sign * (lateral_surface @ tpl.right)))
        lateral = lateral_surface[k]
        behind, front = (sec.project(np.array(part)) for part in TEMPORAL_MEDIAL[side])
        boundary = chain([lateral_surface[:k + 1], np.vstack([lateral_surface[k:], atrium]),
                          np.vstack([atrium, behind, uncus]), np.vstack([uncus, front, pole])])
        curves.setdefault("Temporal Lobe", []).append(
            Curve(boundary[:-1], closed=True, name=f"Temporal Lobe {'right' if side == 'R' else 'left'}"))
        points.update({f"TL_{side}_pole": pole, f"TL_{side}_lateral": lateral, f"TL_{side}_posterior": atrium,
                       f"TL_{side}_medial": uncus})
    # the midbrain's anterior surface at the midline: its outline (T1w above the cisterns) meets the MSP
    midbrain = region_outline(sec.sample(tpl.t1) > T1_STEM, sec, midbrain_centre)
    crossings = line_crossings(midbrain, tpl.msp_centre, tpl.msp_normal)
    points["TL_midbrain_anterior"] = max(crossings, key=lambda p: p @ tpl.anterior)


def assemble(schema, points: dict) -> np.ndarray:
    landmarks = np.full((len(schema), 3), np.nan)
    for name, p in points.items():
        landmarks[schema.lookup(name)] = p
    return landmarks


def write_outputs(output: Path, schema, landmarks, curves, tpl: Template, qa) -> None:
    from PIL import Image
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    write_markups_json(output / LANDMARK_FILE, schema, landmarks, name="brain-88 reference MNI152NLin2009cAsym",
                       locked=True)
    folder = output / CURVE_FOLDER
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.mrk.json"):
        old.unlink()
    for k, sub in enumerate(schema.sub_anatomies, start=1):
        for curve in curves.get(sub.name, []):
            curve = curve if isinstance(curve, Curve) else Curve(curve, name=sub.name)
            name = curve.name or sub.name
            document = curve_markups_json(np.round(curve.points, 3), name, curve.closed, locked=True)
            text = json.dumps(document, separators=(",", ":")).replace('},{"id"', '},\n{"id"')  # a point a line
            atomic_write_text(folder / f"{k:02d}_{safe_name(name)}.mrk.json", text + "\n")
    window1, window2 = figures.intensity_window(tpl.t1), figures.intensity_window(tpl.t2)
    for k, sub in enumerate(schema.sub_anatomies, start=1):
        image, window = (tpl.t2, window2) if sub.name == "Eye" else (tpl.t1, window1)
        figure = figures.sub_anatomy_figure(image, schema, landmarks, sub.name, curves, qa.row(sub.name), window,
                                            tpl.msp_normal, NOTE + (" - shown on the T2w" if sub.name == "Eye" else ""))
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=70, bbox_inches="tight", facecolor="white")
        plt.close(figure)
        buffer.seek(0)
        picture = Image.open(buffer).convert("RGB")
        path = output / FIGURE_FOLDER / f"brain88_{k:02d}_{safe_name(sub.name)}.png"
        with atomic_path(path, suffix=".png") as tmp:
            picture.save(tmp, format="PNG", optimize=True)
        print(f"{path.relative_to(output)}: {path.stat().st_size / 1024:.0f} KB")


def build(tpl: Template, schema):
    points, curves = {}, {}
    mid_sagittal(tpl, points, curves)
    axial_boundary(tpl, points, curves, points["CC_genu"])
    eyes(tpl, points)
    temporal(tpl, points, curves)
    landmarks = assemble(schema, points)
    # the Eye's points onto their least-squares plane (every other sub-anatomy was built on its plane)
    eye = schema.indices_of("Eye")
    landmarks[eye] = project_to_plane(landmarks[eye], *fit_plane(landmarks[eye]))
    for index, position in place_secondaries(schema, landmarks, curves).items():
        landmarks[index] = position
    return landmarks, curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=HERE, help="folder to write into (default: this folder)")
    args = parser.parse_args(argv)
    schema = load_schema("brain-88")
    tpl = Template()
    landmarks, curves = build(tpl, schema)
    qa = annotation_qa(schema, landmarks, curves, tpl.msp_normal)
    print(qa.text())
    write_outputs(args.output, schema, landmarks, curves, tpl, qa)
    return 1 if qa.status == FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
