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
    # Resample onto a one-slice image whose rows and columns run along u and v.
    reference = sitk.Image([n, n, 1], sitk.sitkFloat32)
    direction = np.column_stack([LPS_TO_RAS @ u, LPS_TO_RAS @ v, LPS_TO_RAS @ np.cross(u, v)])
    reference.SetDirection(tuple(direction.ravel()))
    reference.SetSpacing((pixel_mm, pixel_mm, 1.0))
    reference.SetOrigin(tuple(LPS_TO_RAS @ corner))
    background = float(sitk.GetArrayViewFromImage(image).min())
    plane = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(plane)[0], (c, u, v, half_width_mm)


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
    for name, x, y in zip(labels or (), semi_axes, errors):
        ax.annotate(name, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
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
    save(figure, path)
