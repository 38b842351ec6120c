"""Figures with matplotlib: orthogonal slices in anatomical orientation with landmarks overlaid.

Slices follow the radiological convention (``CONVENTION``); every slice is labelled with the patient
directions at its edges, derived from the same axes the slice is resampled along."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window
from matplotlib import patheffects  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from .geometry import LPS_TO_RAS  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")
# Picture columns run along u, rows along v (top row first), both RAS unit vectors. Radiological
# convention: the patient's right (RAS x > 0) on the picture's left, so columns run towards -x (R to L);
# sagittal columns run from anterior to posterior; rows run from superior (or anterior, axial) down.
VIEW_AXES = {"axial": ((-1, 0, 0), (0, -1, 0)), "coronal": ((-1, 0, 0), (0, 0, -1)),
             "sagittal": ((0, -1, 0), (0, 0, -1))}
CONVENTION = ("radiological convention: the patient's right on the image's left (axial, coronal), "
              "anterior on the left (sagittal)")
_DIRECTION_LETTERS = {(0, 1): "R", (0, -1): "L", (1, 1): "A", (1, -1): "P", (2, 1): "S", (2, -1): "I"}


def full_name(landmark) -> str:
    """A landmark's name in words, from its schema entry: its longest alias with the short name
    ("Anterior commissure (AC)"), or else its name with spaces and its sub-anatomy."""
    words = [a.strip() for a in landmark.aliases if len(a.strip()) > len(landmark.name)]
    text = f"{max(words, key=len)} ({landmark.name})" if words else \
        f"{landmark.name.replace('_', ' ')} ({landmark.sub_anatomy})"
    return text[:1].upper() + text[1:]


def direction_letter(vector) -> str:
    """R, L, A, P, S or I: the patient direction a RAS vector points to most."""
    vector = np.asarray(vector, dtype=float)
    axis = int(np.argmax(np.abs(vector)))
    return _DIRECTION_LETTERS[(axis, 1 if vector[axis] > 0 else -1)]


def orientation_labels(ax, view: str, width_mm: float, fontsize: float = 8) -> None:
    """The patient direction at the middle of each edge of a slice drawn by ``ras_slab``."""
    u, v = (np.asarray(a, dtype=float) for a in VIEW_AXES[view])
    outline = [patheffects.withStroke(linewidth=1.5, foreground="black")]
    inset = 0.03 * width_mm
    for (x, y), vector, align in (((inset, width_mm / 2), -u, ("left", "center")),
                                  ((width_mm - inset, width_mm / 2), u, ("right", "center")),
                                  ((width_mm / 2, inset), -v, ("center", "top")),
                                  ((width_mm / 2, width_mm - inset), v, ("center", "bottom"))):
        ax.text(x, y, direction_letter(vector), color="white", fontsize=fontsize, fontweight="bold",
                ha=align[0], va=align[1], path_effects=outline)


def intensity_window(image: sitk.Image) -> tuple[float, float]:
    """A display window for a whole scan: its 1st and 99.5th percentiles over non-background voxels."""
    values = sitk.GetArrayViewFromImage(image).ravel()
    inside = values[values > values.min()]
    low, high = np.percentile(inside if inside.size else values, (1, 99.5))
    return float(low), float(high)


def ras_slab(image: sitk.Image, center_ras, view: str, half_width_mm: float = 90.0, pixel_mm: float = 1.0):
    """A 2D slice through ``center_ras`` in radiological display (``VIEW_AXES``), and its frame
    (centre, u, v, half width) in RAS mm."""
    c = np.asarray(center_ras, dtype=float)
    n = int(2 * half_width_mm / pixel_mm) + 1
    u, v = (np.asarray(a, dtype=float) for a in VIEW_AXES[view])
    corner = c - half_width_mm * u - half_width_mm * v
    return _sample_square(image, corner, u, v, n, pixel_mm), (c, u, v, half_width_mm)


def _sample_square(image: sitk.Image, first_ras, u, v, n: int, pixel_mm: float) -> np.ndarray:
    """(n, n) float32 samples of ``image`` on a square of a plane: pixel (row r, column c) at
    first + c p u + r p v (RAS mm). SimpleITK resampling onto a one-slice reference image whose columns and
    rows run along u and v (as LPS direction cosines), by linear interpolation in physical space, so the
    scan's own origin, spacing and direction are honoured exactly; outside the image: its minimum."""
    reference = sitk.Image([n, n, 1], sitk.sitkFloat32)
    direction = np.column_stack([LPS_TO_RAS @ u, LPS_TO_RAS @ v, LPS_TO_RAS @ np.cross(u, v)])
    reference.SetDirection(tuple(direction.ravel()))
    reference.SetSpacing((pixel_mm, pixel_mm, 1.0))
    reference.SetOrigin(tuple(LPS_TO_RAS @ np.asarray(first_ras, dtype=float)))
    background = float(sitk.GetArrayViewFromImage(image).min())
    plane = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(plane)[0]


def project(points_ras, frame):
    """Picture coordinates (column, row in mm from the top-left) and the distance from the slice plane."""
    c, u, v, half = frame
    d = np.asarray(points_ras, dtype=float) - c
    return d @ u + half, d @ v + half, np.abs(d @ np.cross(u, v))


def draw_slices(axes_row, image, center_ras, overlays=(), slab_mm=6.0, half_width_mm=90.0, titles=None):
    """Three orthogonal slices through ``center_ras``; ``overlays`` are (points (K,3), matplotlib style)
    pairs, drawn where a point lies within ``slab_mm`` of the slice."""
    for ax, view in zip(axes_row, VIEWS):
        picture, frame = ras_slab(image, center_ras, view, half_width_mm)
        low, high = np.percentile(picture, (1, 99.5))
        ax.imshow(picture, cmap="gray", vmin=low, vmax=high, extent=(0, 2 * half_width_mm, 2 * half_width_mm, 0))
        for points, style in overlays:
            x, y, distance = project(points, frame)
            near = np.isfinite(distance) & (distance <= slab_mm)
            ax.scatter(x[near], y[near], **style)
        ax.set_xticks([])
        ax.set_yticks([])
        orientation_labels(ax, view, 2 * half_width_mm)
        if titles:
            ax.set_title(titles.get(view, view), fontsize=8)


def save(figure, path) -> None:
    from .fileio import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(figure)


def uncertainty_scatter(errors, semi_axes, level: float, path, labels=None, flag_mm: float | None = None,
                        coverage: float | None = None) -> None:
    """Radial error against the longest ellipsoid semi-axis, one dot per landmark (and case), with the
    Spearman correlation, the coverage and the flag threshold when given."""
    from scipy.stats import spearmanr

    errors, semi_axes = np.ravel(errors), np.ravel(semi_axes)
    keep = np.isfinite(errors) & np.isfinite(semi_axes)
    figure, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(semi_axes[keep], errors[keep], s=14, alpha=0.7)
    limit = max(float(semi_axes[keep].max(initial=1.0)), float(errors[keep].max(initial=1.0))) * 1.05
    ax.plot([0, limit], [0, limit], color="gray", lw=0.8, ls="--", label="error = semi-axis")
    if flag_mm is not None:
        ax.axvline(flag_mm, color="red", lw=0.8, ls="--", label=f"flag threshold {flag_mm:g} mm")
    ax.set_xlabel(f"uncertainty: longest semi-axis of the {level * 100:.0f}% ellipsoid (mm)")
    ax.set_ylabel("radial error (mm)")
    title = "Uncertainty vs error"
    if keep.sum() > 2:
        title += f": Spearman {spearmanr(semi_axes[keep], errors[keep]).statistic:.2f}"
    if coverage is not None:
        title += f", {coverage * 100:.0f}% of truths inside"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    figure.tight_layout()
    if labels is not None:
        # The worst landmarks first (largest error, then largest uncertainty): in a dense cluster the
        # labels that would overlap one already drawn are left out (the report's table lists every one).
        order = [n for n in np.lexsort((-semi_axes, -errors)) if keep[n]]
        place_labels(ax, semi_axes[order], errors[order], [labels[n] for n in order])
    save(figure, path)


LABEL_OFFSETS = ((3, 2, "left", "bottom"), (3, -2, "left", "top"), (-3, 2, "right", "bottom"), (-3, -2, "right", "top"))


def place_labels(ax, xs, ys, labels, fontsize: float = 6) -> list:
    """Label the points in the order given, each at the first of four corners beside its dot where it
    overlaps no label already drawn (nor the legend) and stays inside the axes; a label with no free corner
    is left out. Returns the drawn texts. (Hand-written: a greedy pass is all a few dozen labels need, where
    adjustText would move them all.)"""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    drawn = []
    for name, x, y in zip(labels, xs, ys):
        for dx, dy, ha, va in LABEL_OFFSETS:
            text = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               ha=ha, va=va)
            box = text.get_window_extent(renderer).padded(1)
            if frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1) and \
                    not any(box.overlaps(other) for other in taken):
                taken.append(box)
                drawn.append(text)
                break
            text.remove()
    return drawn


# ------------------------------------------------------------------------------ annotation QA figures
# One figure per sub-anatomy: the scan sampled on the plane of its points (their least-squares plane, the
# plane annotation.annotation_qa measures against), the points at their in-plane positions coloured by
# their signed distance from it, the drawn boundary curves, and the sub-anatomy's QA row in the title; and
# an overview table of every sub-anatomy's checks. sub_anatomy_figure works without a QA row too, e.g. to
# show a reference annotation: the plane's slice with its points, boundary curve and guideline.

STATUS_COLORS = {"pass": "#1a9850", "warn": "#f08c00", "fail": "#d73027", "n/a": "#9e9e9e"}
_STATUS_FILLS = {"pass": "#d9f0d3", "warn": "#fde3b5", "fail": "#f9cdc7", "n/a": "#eeeeee", "": "white"}
_SIDE_WORDS = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}
QA_MARGIN_MM = 20.0  # picture margin around a sub-anatomy's points and curves
QA_MIN_HALF_WIDTH_MM = 35.0
QA_PICTURE_PIXELS = 400  # samples across the picture (at most; never finer than 0.25 mm)
OUTSIDE_TOLERANCE_MM = 1.0  # a landmark farther than this outside the image makes it the wrong image


def plane_picture_axes(normal) -> tuple[str, np.ndarray, np.ndarray]:
    """How to show a plane: the one of VIEWS nearest to it (by normal) and that view's picture axes made
    to lie in the plane: u (columns, left to right) the view's u projected onto the plane, v (rows, top
    to bottom) the in-plane direction at right angles to u on the side of the view's v. Each keeps the
    patient direction of the view's axis (the largest component cannot change when the tilt is below
    the nearest view's), so the picture follows the view's convention and orientation_labels(ax, view,
    width) names its edges correctly."""
    normal = np.asarray(normal, dtype=float)
    normal = normal / np.linalg.norm(normal)
    view = max(VIEWS, key=lambda name: abs(np.cross(*VIEW_AXES[name]) @ normal))
    u0, v0 = (np.asarray(a, dtype=float) for a in VIEW_AXES[view])
    u = u0 - (u0 @ normal) * normal
    u = u / np.linalg.norm(u)
    v = np.cross(normal, u)
    return view, u, v if v @ v0 >= 0 else -v


def plane_slice(image: sitk.Image, centre_ras, u, v, width_mm: float, pixel_mm: float) -> np.ndarray:
    """The image on a square of a plane, as an (n, n) float32 array with n = ceil(width_mm / pixel_mm):
    the square is centred on ``centre_ras`` and spanned by the orthonormal RAS vectors u (along the
    columns) and v (down the rows); pixel (row r, column c) is the image at
    centre + ((c + 0.5) p - w / 2) u + ((r + 0.5) p - w / 2) v, p = pixel_mm, w = n p (so the picture is
    w mm wide and shown with imshow(extent=(0, w, w, 0))). Outside the image: its minimum."""
    u, v, centre = (np.asarray(a, dtype=float) for a in (u, v, centre_ras))
    if abs(u @ u - 1) > 1e-6 or abs(v @ v - 1) > 1e-6 or abs(u @ v) > 1e-6:
        raise ValueError("plane_slice needs orthonormal in-plane axes u and v")
    n = max(2, int(np.ceil(width_mm / pixel_mm - 1e-9)))
    first = centre + (pixel_mm / 2 - n * pixel_mm / 2) * (u + v)  # the centre of pixel (0, 0)
    return _sample_square(image, first, u, v, n, pixel_mm)


def sub_anatomy_plane(points, plane_kind: str = "oblique", msp_normal=None):
    """The plane to show a sub-anatomy's placed points (M, 3) on: (centre, unit normal, description),
    or None when M is 0. Their least-squares plane (planes.fit_plane, as the QA fits it) when they span
    one; otherwise the plane the guideline expects (annotation.expected_normal; axial for an oblique
    guideline) through their centroid. The normal points to the patient's right, front or top (the
    side of its largest component)."""
    from .annotation import expected_normal
    from .planes import _is_planar, fit_plane

    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if not len(points):
        return None
    if len(points) >= 3 and _is_planar(points):
        centre, normal = fit_plane(points)
        how = f"least-squares plane of the {len(points)} placed points"
    else:
        centre = points.mean(axis=0)
        normal = expected_normal(plane_kind, msp_normal)
        kind = plane_kind if normal is not None else "axial"
        normal = expected_normal("axial") if normal is None else normal
        how = f"{kind} plane through the {len(points)} placed point(s) (too few off one line for a plane of their own)"
    normal = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    normal = normal if normal[np.abs(normal).argmax()] > 0 else -normal
    return centre, normal, how


def check_landmarks_inside(image: sitk.Image, landmarks, names, image_path=None) -> None:
    """A LandmarkError naming the image when a placed landmark lies outside it (more than
    OUTSIDE_TOLERANCE_MM beyond its outer voxel faces): then the figures would show another scan, or
    none, under the points."""
    from .errors import LandmarkError

    points = np.asarray(landmarks, dtype=float).reshape(-1, 3)
    placed = np.flatnonzero(np.isfinite(points).all(axis=1))
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    outside = []
    for i in placed:
        index = np.array(image.TransformPhysicalPointToContinuousIndex(tuple(LPS_TO_RAS @ points[i])))
        beyond_mm = np.maximum(np.maximum(-0.5 - index, index - (size - 0.5)), 0) * spacing
        if np.linalg.norm(beyond_mm) > OUTSIDE_TOLERANCE_MM:
            outside.append(names[i])
    if outside:
        raise LandmarkError(image_path or "<image>", f"{len(outside)} of {len(placed)} placed landmarks lie outside "
                                                     f"this image (first: {outside[0]}); is it the scan they were "
                                                     "placed on?")


def _tagged(text: str, status: str) -> str:
    return text if status in ("pass", "n/a", "") else f"{text} [{status.upper()}]"


def qa_row_text(row) -> str:
    """A QA row (annotation.QaRow) as two lines for a title: the plane measures, then spacing, order,
    missing and duplicates; checks that warn or fail are tagged [WARN] / [FAIL]."""
    s = row.status
    if np.isfinite(row.rms_mm):
        planarity = (_tagged(f"distance to plane RMS {row.rms_mm:.2f} mm", s.get("planarity_rms", "")) + ", " +
                     _tagged(f"max {row.max_mm:.2f} mm ({row.farthest})", s.get("planarity_max", "")))
    else:
        planarity = "no plane check (" + (row.notes[0] if row.notes and row.notes[0].startswith("no plane") else
                                           "the schema gives this sub-anatomy no plane of its own") + ")"
    angle = (_tagged(f"angle {row.angle_deg:.1f}\N{DEGREE SIGN} to the {row.expected_plane} plane",
                     s.get("plane_angle", "")) if np.isfinite(row.angle_deg) else "no expected plane")
    if s.get("order", "n/a") == "n/a" and not np.isfinite(row.spacing_cv):
        spacing = "spacing and order: no secondary points to check"
    else:
        spacing = (_tagged(f"spacing CV {row.spacing_cv:.3f}", s.get("spacing", "")) + "; " +
                   _tagged("order ok" if not row.out_of_order else f"{len(row.out_of_order)} out of order",
                           s.get("order", "")))
    counts = (_tagged(f"{len(row.missing)} missing", s.get("missing", "")) + ", " +
              _tagged(f"{len(row.duplicates)} duplicate(s)", s.get("duplicates", "")))
    return f"{planarity}; {angle}\n{spacing}; {counts}"


_LABEL_SPOTS = ((5, 4, "left", "bottom"), (5, -4, "left", "top"), (-5, 4, "right", "bottom"),
                (-5, -4, "right", "top"), (0, 7, "center", "bottom"), (0, -7, "center", "top"))


def _label_box(marker, spot, w: float, h: float) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) in points of a w x h label put at ``spot`` (of _LABEL_SPOTS) by a marker."""
    dx, dy, ha, va = spot
    left = marker[0] + dx - {"left": 0, "right": w, "center": w / 2}[ha]
    bottom = marker[1] + dy - (h if va == "top" else 0)
    return left, bottom, left + w, bottom + h


def _label_places(markers_pt, labels, fontsize: float, picture_pt: float, radius_pt: float = 5.5):
    """Where to put each marker's label, (dx, dy, ha, va) in offset points: greedily, of _LABEL_SPOTS
    the first that covers the fewest other markers and labels placed so far (and stays in the picture).
    ``markers_pt``: (N, 2) marker positions in points, y up, the picture spanning 0..picture_pt in x and
    -picture_pt..0 in y."""
    markers_pt = np.asarray(markers_pt, dtype=float)
    boxes, places = [], []
    for k, label in enumerate(labels):
        costs = []
        for spot in _LABEL_SPOTS:
            left, bottom, right, top = box = _label_box(markers_pt[k], spot, 0.64 * fontsize * len(label), fontsize)
            nearest = np.clip(markers_pt, [left, bottom], [right, top])  # each marker's nearest point of the box
            hits = np.flatnonzero(np.linalg.norm(nearest - markers_pt, axis=1) < radius_pt)
            overlaps = sum(left < b[2] and b[0] < right and bottom < b[3] and b[1] < top for b in boxes)
            outside = left < 0 or right > picture_pt or bottom < -picture_pt or top > 0
            costs.append((10 * (len(hits[hits != k]) + overlaps) + 5 * outside, box))
        best = int(np.argmin([c for c, _ in costs]))
        boxes.append(costs[best][1])
        places.append(_LABEL_SPOTS[best])
    return places


def sub_anatomy_figure(image: sitk.Image | None, schema, landmarks, sub_anatomy: str, curves=None, row=None,
                       window=None, msp_normal=None, note: str = ""):
    """One sub-anatomy's figure (a matplotlib Figure; save it with ``save``): the image sampled on the
    sub-anatomy's plane (sub_anatomy_plane; no image: a dark plane with the points only), its placed
    points at their in-plane positions (primaries round, secondaries diamonds, labelled with their
    numbers, and names of up to 6 letters) coloured by signed distance from the plane (colour bar in mm,
    the planarity warn and fail limits marked), the drawn boundary curves projected onto the plane, a
    10 mm scale bar and the
    patient directions at the edges; beside it the list of points with their distances. ``row`` (an
    annotation.QaRow) puts the QA status and measures in the title; ``window``: the display range
    (default intensity_window(image)); ``note``: a last title line (a file name, "illustration: ...")."""
    import textwrap
    from matplotlib import colors as mcolors
    from matplotlib.cm import ScalarMappable
    from matplotlib.lines import Line2D

    from .annotation import as_curves
    from .errors import LandmarkError

    try:
        sub = schema.sub_anatomy(sub_anatomy)
    except StopIteration:
        raise LandmarkError(schema.source or schema.name, f"no sub-anatomy {sub_anatomy!r}") from None
    points_all = np.asarray(landmarks, dtype=float)
    if points_all.shape != (len(schema), 3):
        raise LandmarkError(None, f"expected ({len(schema)}, 3) landmarks of schema '{schema.name}', "
                                  f"got shape {points_all.shape}")
    indices = np.array(schema.indices_of(sub.name))
    points = points_all[indices]
    placed = np.isfinite(points).all(axis=1)
    roles = np.array([schema.landmarks[i].role for i in indices])
    drawn = as_curves(curves, schema).get(sub.name, [])
    plane = sub_anatomy_plane(points[placed], sub.plane, msp_normal)
    limits = schema.qa_thresholds.planarity_max_mm

    figure = plt.figure(figsize=(10.5, 7.6))
    grid = figure.add_gridspec(1, 4, width_ratios=[1.0, 0.035, 0.1, 0.5], wspace=0.06,
                               left=0.02, right=0.99, top=0.83, bottom=0.1)
    ax, bar_ax, list_ax = (figure.add_subplot(grid[0, k]) for k in (0, 1, 3))
    list_ax.axis("off")
    distances = np.full(len(indices), np.nan)
    how = "no point placed"
    if plane is None:
        ax.axis("off")
        bar_ax.axis("off")
        ax.text(0.5, 0.5, "no point of this sub-anatomy is placed", ha="center", va="center", fontsize=11)
    else:
        centre, normal, how = plane
        distances[placed] = (points[placed] - centre) @ normal
        view, u, v = plane_picture_axes(normal)
        framed = [points[placed], *(c.points for c in drawn)]  # the picture holds all of them
        in_plane = np.vstack([(p - centre) @ np.stack([u, v]).T for p in framed])
        low, high = in_plane.min(axis=0), in_plane.max(axis=0)
        middle = centre + ((low + high) / 2) @ np.stack([u, v])
        half = max(QA_MIN_HALF_WIDTH_MM, float((high - low).max()) / 2 + QA_MARGIN_MM)
        pixel = max(2 * half / QA_PICTURE_PIXELS, 0.25)
        width = max(2, int(np.ceil(2 * half / pixel - 1e-9))) * pixel
        if image is not None:
            picture = plane_slice(image, middle, u, v, width, pixel)
            low_i, high_i = window or intensity_window(image)
            ax.imshow(picture, cmap="gray", vmin=low_i, vmax=high_i, extent=(0, width, width, 0),
                      interpolation="bilinear")
        else:
            ax.set_facecolor("0.12")
            ax.text(width / 2, 0.08 * width, "no image given: points only", color="0.8", ha="center", fontsize=8)

        def picture_xy(p):
            d = np.asarray(p, dtype=float) - middle
            return d @ u + width / 2, d @ v + width / 2

        for curve in drawn:
            xy = curve.points if not curve.closed else np.vstack([curve.points, curve.points[:1]])
            ax.plot(*picture_xy(xy), color="#ffe14d", lw=1.8, alpha=0.9, zorder=3)
        limit = max(1.25 * limits[1], float(np.nanmax(np.abs(distances), initial=0.0)) * 1.05)
        norm, cmap = mcolors.Normalize(-limit, limit), plt.get_cmap("RdBu_r")
        x, y = picture_xy(points)
        outline = [patheffects.withStroke(linewidth=2.0, foreground="black")]
        for role, marker, size in (("primary", "o", 95), ("secondary", "D", 50)):
            chosen = placed & (roles == role)
            ax.scatter(x[chosen], y[chosen], c=distances[chosen], cmap=cmap, norm=norm, marker=marker, s=size,
                       edgecolors="black", linewidths=1.1, zorder=4)
        shown = np.flatnonzero(placed)
        labels = [f"{lm.number} {lm.name}" if len(lm.name) <= 6 else str(lm.number)  # short names: AC, PC
                  for lm in (schema.landmarks[indices[k]] for k in shown)]
        box = ax.get_position()
        points_per_mm = 72 * min(box.width * figure.get_figwidth(), box.height * figure.get_figheight()) / width
        places = _label_places(np.column_stack([x[shown], -y[shown]]) * points_per_mm, labels, 8.0,
                               width * points_per_mm)
        for k, label, (dx, dy, ha, va) in zip(shown, labels, places):
            ax.annotate(label, (x[k], y[k]), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                        fontsize=8, color="white", fontweight="bold", path_effects=outline, zorder=5)
        bar = figure.colorbar(ScalarMappable(norm, cmap), cax=bar_ax)
        toward = _SIDE_WORDS[direction_letter(normal)]
        bar.set_label(f"signed distance to the plane (mm), + towards {toward}\n"
                      "QA limits of the farthest point: warn (dashed), fail (solid)", fontsize=8.5)
        bar.ax.tick_params(labelsize=7)
        for limit_mm, style in zip(limits, ("--", "-")):
            for sign in (-1, 1):
                bar.ax.axhline(sign * limit_mm, color="black", lw=0.9, ls=style)
        x0, y0 = 0.05 * width, 0.95 * width  # 10 mm scale bar, bottom left
        ax.plot([x0, x0 + 10], [y0, y0], color="white", lw=2.5, path_effects=outline, zorder=5)
        ax.text(x0 + 5, y0 - 0.015 * width, "10 mm", color="white", fontsize=7, ha="center", va="bottom",
                path_effects=outline)
        orientation_labels(ax, view, width, fontsize=10)
        ax.set_xlim(0, width)
        ax.set_ylim(width, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        handles = [Line2D([], [], ls="", marker="o", markersize=8, markerfacecolor="white", markeredgecolor="black",
                          label="primary point"),
                   Line2D([], [], ls="", marker="D", markersize=6, markerfacecolor="white", markeredgecolor="black",
                          label="secondary point")]
        if drawn:
            handles.append(Line2D([], [], color="#ffe14d", lw=1.8, label="boundary curve (projected)"))
        ax.legend(handles=handles, loc="lower right", fontsize=8, framealpha=0.85)

    name_width = min(30, max(len(schema.landmarks[i].name) for i in indices))
    lines = [f"  #  {'name':<{name_width}}  role       mm"]
    for k, i in enumerate(indices):
        lm = schema.landmarks[i]
        where = f"{distances[k]:+6.2f}" if np.isfinite(distances[k]) else "missing"
        lines.append(f"{lm.number:>3}  {lm.name[:name_width]:<{name_width}}  {lm.role:<9} {where}")
    list_ax.text(0.0, 1.0, "\n".join(lines), family="monospace", va="top", ha="left",
                 fontsize=7.8 if len(lines) <= 24 else 6.3, transform=list_ax.transAxes)
    list_ax.set_title("points: number, name, role, mm from the plane", fontsize=8, loc="left")

    status = row.overall if row is not None else None
    headline = f"{sub.name} ({sub.plane} guideline)" + (f": QA {status.upper()}" if status else "")
    figure.text(0.02, 0.975, headline, fontsize=13, fontweight="bold", va="top", ha="left",
                color="black" if status is None else "white",
                bbox=None if status is None else {"facecolor": STATUS_COLORS[status], "edgecolor": "none", "pad": 4})
    details = qa_row_text(row) if row is not None else f"{int(placed.sum())} of {len(indices)} points placed"
    figure.text(0.02, 0.925, details + (f"\n{note}" if note else ""), fontsize=9, va="top", ha="left")
    if plane is None:
        slice_text = "Slice: none (no point placed)."
    else:
        slice_text = (f"Slice: {how}, {'sampled from the image' if image is not None else 'no image given'}; "
                      "picture in the radiological convention of the nearest view, with the patient directions "
                      "at its edges.")
    footer = f"{slice_text}\nGuideline: {sub.guideline}"
    figure.text(0.02, 0.085, "\n".join(textwrap.fill(part, 150) for part in footer.split("\n")), fontsize=7.5,
                va="top", ha="left", color="0.25")
    return figure


def qa_overview_figure(result, note: str = ""):
    """Every sub-anatomy's QA (an annotation.QaResult) as a table figure: the columns of
    annotation.COLUMNS, each check's cell filled by its status (pass / warn / fail / n/a), with the
    warn and fail limits under the column names and what is wrong listed below."""
    import textwrap
    from matplotlib.patches import Patch, Rectangle

    from .annotation import COLUMNS

    t = result.thresholds
    limits = {"rms mm": t.planarity_rms_mm, "max mm": t.planarity_max_mm, "angle deg": t.plane_angle_deg,
              "spacing CV": t.spacing_cv}
    headers = [f"{c}\nwarn > {limits[c][0]:g}\nfail > {limits[c][1]:g}" if c in limits else c for c in COLUMNS]
    headers[COLUMNS.index("duplicates")] = f"duplicates\n(< {t.duplicate_mm:g} mm\napart)"
    cells = result.table()
    statuses = [r.cell_statuses() for r in result.rows]
    chars = [max(len(line) for text in [h, *(c[k] for c in cells)] for line in text.split("\n"))
             for k, h in enumerate(headers)]
    widths = np.array(chars, dtype=float) + 2.0
    details = [f"{r.sub_anatomy}: {line}" for r in result.rows for line in r.details()]
    shown = [textwrap.fill(d, 150, subsequent_indent="    ") for d in details[:14]]
    if len(details) > 14:
        shown.append(f"... and {len(details) - 14} more (see the text report)")
    detail_lines = sum(s.count("\n") + 1 for s in shown)
    width_in = max(8.0, 0.085 * widths.sum() + 0.6)
    height_in = 1.3 + 0.34 * (len(cells) + 2.2) + 0.18 * detail_lines
    figure = plt.figure(figsize=(width_in, height_in))
    ax = figure.add_axes((0.02, 0.18 * detail_lines / height_in + 0.45 / height_in, 0.96,
                          0.34 * (len(cells) + 2.2) / height_in))
    edges = np.concatenate([[0.0], np.cumsum(widths)])
    header_h = 2.2
    for k, text in enumerate(headers):
        ax.add_patch(Rectangle((edges[k], 0), widths[k], header_h, facecolor="0.85", edgecolor="white"))
        ax.text(edges[k] + widths[k] / 2, header_h / 2, text, ha="center", va="center", fontsize=8.5,
                fontweight="bold")
    for r, (row_cells, row_status) in enumerate(zip(cells, statuses)):
        top = header_h + r
        for k, (text, status) in enumerate(zip(row_cells, row_status)):
            ax.add_patch(Rectangle((edges[k], top), widths[k], 1, facecolor=_STATUS_FILLS[status], edgecolor="white"))
            strong = COLUMNS[k] == "status"
            ax.text(edges[k] + (widths[k] / 2 if k else 0.6), top + 0.5, text.upper() if strong else text,
                    ha="center" if k else "left", va="center", fontsize=9,
                    fontweight="bold" if strong or k == 0 else "normal",
                    color=STATUS_COLORS[status] if strong else "black")
    ax.set_xlim(0, edges[-1])
    ax.set_ylim(header_h + len(cells), 0)
    ax.axis("off")
    figure.suptitle(f"Annotation QA: overall {result.status.upper()} (schema {result.schema})"
                    + (f"\n{note}" if note else ""), fontsize=12, fontweight="bold", y=1 - 0.12 / height_in,
                    va="top", color=STATUS_COLORS[result.status])
    handles = [Patch(facecolor=_STATUS_FILLS[s], edgecolor="0.5", label=s) for s in ("pass", "warn", "fail", "n/a")]
    figure.legend(handles=handles, loc="upper right", ncol=4, fontsize=9, frameon=False,
                  bbox_to_anchor=(0.99, 1 - 0.5 / height_in))
    if shown:
        figure.text(0.02, (0.18 * detail_lines + 0.25) / height_in, "\n".join(shown), fontsize=8.5, va="top",
                    ha="left")
    return figure


def qa_figure_paths(folder, schema) -> dict:
    """The files write_qa_figures writes: {sub-anatomy name: qa_NN_<name>.png} in schema order, then
    {"": qa_overview.png}."""
    from pathlib import Path

    from .fileio import safe_name

    folder = Path(folder)
    paths = {sub.name: folder / f"qa_{k:02d}_{safe_name(sub.name)}.png"
             for k, sub in enumerate(schema.sub_anatomies, start=1)}
    paths[""] = folder / "qa_overview.png"
    return paths


def write_qa_figures(folder, image: sitk.Image | None, schema, landmarks, result, curves=None, msp_normal=None,
                     note: str = "", image_path=None) -> list:
    """Write one sub_anatomy_figure per sub-anatomy (with its row of ``result``, an annotation.QaResult)
    and the qa_overview_figure into ``folder`` (names from qa_figure_paths), each atomically; inside a
    fileio.written_together() block they land together or not at all. A landmark outside the image is a
    LandmarkError naming ``image_path``, raised before anything is drawn."""
    if image is not None:
        check_landmarks_inside(image, landmarks, schema.names, image_path)
    window = intensity_window(image) if image is not None else None
    paths = qa_figure_paths(folder, schema)
    for sub in schema.sub_anatomies:
        save(sub_anatomy_figure(image, schema, landmarks, sub.name, curves, result.row(sub.name), window,
                                msp_normal, note), paths[sub.name])
    save(qa_overview_figure(result, note), paths[""])
    return list(paths.values())
