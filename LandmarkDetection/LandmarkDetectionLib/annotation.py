"""Guided annotation without Qt: boundary-curve geometry, live QA per sub-anatomy and the one-click fix.

The Slicer module calls these functions on every edit; the ``qa`` command runs them on a landmark file.
Everything is RAS mm; landmarks are a (K, 3) array in schema order with NaN rows for points not (yet)
placed.

Boundary curves
    The annotator may draw, per sub-anatomy, the boundary the secondary points lie on (a Slicer curve;
    pass its dense interpolated points, or the control points read from a file). A ``Curve`` is a
    polyline of (N, 3) points in drawing order, open or closed. For a secondary landmark with
    ``between=[A, B]`` and ``fraction=f`` (schema.Landmark) the guideline position is:

    - sA and sB are the arc lengths (from the curve's first point) of the curve points closest to A
      and to B;
    - the portion runs from sA to sB along the curve: on an open curve in whichever direction that is,
      on a closed curve the shorter way round;
    - the landmark sits at arc length sA + f * (signed length of the portion).

    With n secondaries sharing one (A, B) pair and fractions 1/(n+1), ..., n/(n+1) the points A', the
    secondaries and B' (A', B' the closest curve points) are equally spaced along the curve.

Checks (annotation_qa), each graded pass / warn / fail (n/a where it does not apply) against the
schema's QaThresholds:
    missing       points not placed (warn)
    duplicates    two landmarks closer than duplicate_mm (fail)
    planarity     RMS and max distance (mm) of a sub-anatomy's points to their least-squares plane, for
                  the sub-anatomies that have a plane (planes.plane_spec: the schema's list)
    plane angle   degrees between that plane and the plane the schema expects (expected_normal);
                  none for oblique sub-anatomies
    spacing       coefficient of variation of the spacing of A, the secondaries in fraction order, and
                  B, each gap divided by its expected fraction gap (so unequal fractions count as
                  intended); the worst (A, B) pair of the sub-anatomy. With a curve the gaps are arc
                  lengths along it, without one straight-line distances.
    order         whether the secondaries follow their fractions from A to B: along the curve, or
                  without one along the line A -> B (right for boundary portions up to a half turn)

The one-click fix (fix_annotation) returns new positions: each sub-anatomy's points projected onto
their best-fit plane, and the secondaries re-placed at their fractions between A and B along the curve
projected onto that plane (without a curve: along the polyline through A, the secondaries sorted along
A -> B, and B). The input is never changed; the moves say what changed, and ``previous`` undoes it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from .errors import LandmarkError
from .geometry import LPS_TO_RAS
from .planes import _is_planar, fit_plane, plane_distances, plane_spec
from .schema import QaThresholds, Schema

PASS, WARN, FAIL, NA = "pass", "warn", "fail", "n/a"
_RANK = {NA: 0, PASS: 1, WARN: 2, FAIL: 3}
MEASURES = ("missing", "duplicates", "planarity_rms", "planarity_max", "plane_angle", "spacing", "order")
CURVE_REACH_MM = 10.0  # a drawn curve serves a primary pair only if it passes this close to both points
_AXES = {"sagittal": (1.0, 0.0, 0.0), "mid-sagittal": (1.0, 0.0, 0.0), "coronal": (0.0, 1.0, 0.0),
         "axial": (0.0, 0.0, 1.0)}


# ---------------------------------------------------------------------------------------------- planes
def project_to_plane(points: np.ndarray, centre: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Orthogonal projections of points (..., 3) onto the plane through ``centre`` with ``normal``."""
    normal = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    points = np.asarray(points, dtype=float)
    return points - plane_distances(points, centre, normal)[..., None] * normal


def expected_normal(plane: str, msp_normal: np.ndarray | None = None) -> np.ndarray | None:
    """Unit RAS normal of the plane a sub-anatomy's guideline expects (schema plane kind), or None for
    ``oblique`` (no expectation).

    Without ``msp_normal`` the scanner's planes: sagittal and mid-sagittal +R, coronal +A, axial +S.
    With the scan's mid-sagittal normal, sagittal and mid-sagittal planes are expected parallel to the
    MSP, and axial and coronal ones to contain its normal (their axis made orthogonal to it): a head
    turned in the scanner about its A or S axis then counts as no tilt (a nod about R still does; the
    MSP cannot tell it).
    """
    if plane not in _AXES:
        return None
    axis = np.array(_AXES[plane])
    if msp_normal is None:
        return axis
    msp = np.asarray(msp_normal, dtype=float) / np.linalg.norm(msp_normal)
    if plane in ("sagittal", "mid-sagittal"):
        return msp
    axis = axis - (axis @ msp) * msp
    return axis / np.linalg.norm(axis)


def plane_angle(normal: np.ndarray, reference: np.ndarray) -> float:
    """Angle in degrees (0 to 90) between two planes given by their normals (either sign)."""
    a, b = np.asarray(normal, dtype=float), np.asarray(reference, dtype=float)
    cosine = abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(min(1.0, cosine))))


# ---------------------------------------------------------------------------------------------- curves
class _Polyline:
    """A curve's vertices without repeats (closed: ending back at the start) and its arc lengths,
    computed once per curve."""

    def __init__(self, points, closed: bool):
        points = np.asarray(points, dtype=float)
        if points.ndim != 2 or points.shape[1] != 3 or len(points) < 2 or not np.isfinite(points).all():
            raise ValueError(f"a curve needs (N >= 2, 3) finite points, got shape {points.shape}")
        if closed:
            points = np.vstack([points, points[:1]])
        keep = np.ones(len(points), dtype=bool)
        keep[1:] = np.linalg.norm(np.diff(points, axis=0), axis=1) > 0  # zero-length segments go
        self.vertices = points[keep]
        if len(self.vertices) < 2:
            raise ValueError("a curve needs at least two distinct points")
        self.closed = closed
        self.segments = np.diff(self.vertices, axis=0)  # (S, 3)
        self.lengths2 = (self.segments ** 2).sum(axis=1)
        self.cumulative = np.concatenate([[0.0], np.cumsum(np.sqrt(self.lengths2))])
        self.total = float(self.cumulative[-1])


@dataclass(frozen=True, eq=False)
class Curve:
    """A boundary curve: (N, 3) RAS points in drawing order, a polyline; ``closed`` joins last to first.
    The curve functions below take a Curve (which brings its own ``closed``) or an (N, 3) array."""

    points: np.ndarray
    closed: bool = False
    name: str = ""

    @cached_property
    def polyline(self) -> _Polyline:
        return _Polyline(self.points, self.closed)


def _polyline(curve, closed: bool) -> _Polyline:
    if isinstance(curve, _Polyline):
        return curve
    return curve.polyline if isinstance(curve, Curve) else _Polyline(curve, closed)


def arc_lengths(curve, closed: bool = False) -> np.ndarray:
    """Cumulative arc length (mm) at each vertex from the first (a closed curve: one more, the full loop)."""
    return _polyline(curve, closed).cumulative.copy()


def closest_on_curve(curve, points, closed: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For points (M, 3): the arc length of each one's closest curve point, and its distance (mm)."""
    line = _polyline(curve, closed)
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    start = line.vertices[:-1]
    relative = points[:, None] - start  # (M, S, 3)
    t = np.clip(np.einsum("msj,sj->ms", relative, line.segments) / line.lengths2, 0.0, 1.0)
    gap2 = ((relative - t[..., None] * line.segments) ** 2).sum(axis=-1)
    k = gap2.argmin(axis=1)
    m = np.arange(len(points))
    return line.cumulative[k] + t[m, k] * np.sqrt(line.lengths2[k]), np.sqrt(gap2[m, k])


def point_at_arc(curve, s, closed: bool = False) -> np.ndarray:
    """Curve points (M, 3) at arc lengths s (mm from the first point; clipped to an open curve's ends,
    taken round a closed one)."""
    line = _polyline(curve, closed)
    s = np.asarray(s, dtype=float).reshape(-1)
    s = np.mod(s, line.total) if line.closed else np.clip(s, 0.0, line.total)
    return np.stack([np.interp(s, line.cumulative, line.vertices[:, k]) for k in range(3)], axis=-1)


def resample_polyline(curve, n: int, closed: bool = False) -> np.ndarray:
    """n points (n, 3) at equal arc-length spacing: an open curve from its first to its last point, both
    included (spacing L / (n - 1)); a closed one from its first point round (spacing L / n)."""
    line = _polyline(curve, closed)
    s = np.arange(n) * line.total / n if line.closed else np.linspace(0.0, line.total, n)
    return point_at_arc(line, s, line.closed)


def equal_fractions(n: int) -> np.ndarray:
    """1/(n+1), ..., n/(n+1): the fractions that space n secondaries equally between their primaries."""
    return np.arange(1, n + 1) / (n + 1)


def _portion(line: _Polyline, a, b, points=None) -> tuple[float, float, np.ndarray]:
    """(sA, signed length of the portion A -> B, arc lengths of ``points``) on a polyline."""
    queries = np.vstack([a, b] if points is None else [a, b, points])
    s, _ = closest_on_curve(line, queries)
    length = s[1] - s[0]
    if line.closed:  # the shorter way round
        forward = length % line.total
        length = forward if forward <= line.total / 2 else forward - line.total
    return float(s[0]), float(length), s[2:]


def points_between(curve, a, b, fractions, closed: bool = False) -> np.ndarray:
    """Points (len(fractions), 3) at arc-length ``fractions`` of the curve portion from A's closest
    curve point to B's (see the module docstring): where secondaries between A and B belong."""
    line = _polyline(curve, closed)
    start, length, _ = _portion(line, a, b)
    return point_at_arc(line, start + np.asarray(fractions, dtype=float) * length)


def arc_fractions(curve, a, b, points, closed: bool = False) -> np.ndarray:
    """Where points (M, 3) lie along the portion A -> B: the arc-length fraction of each one's closest
    curve point (0 at A's, 1 at B's; outside 0..1 beyond them; NaN if A and B meet on the curve). The
    inverse of points_between."""
    line = _polyline(curve, closed)
    start, length, s = _portion(line, a, b, np.asarray(points, dtype=float).reshape(-1, 3))
    if abs(length) < 1e-9:
        return np.full(len(s), np.nan)
    offset = s - start
    if line.closed:  # measured in the portion's direction, centred on it
        offset = np.mod(offset * np.sign(length), line.total)
        offset = np.where(offset > (line.total + abs(length)) / 2, offset - line.total, offset)
        return offset / abs(length)
    return offset / length


def as_curves(curves, schema: Schema) -> dict[str, list[Curve]]:
    """{sub-anatomy: [Curve, ...]} from a mapping whose values are a Curve, an (N, 3) array (open) or a
    list of them; keys must be the schema's sub-anatomy names."""
    result = {}
    names = {s.name for s in schema.sub_anatomies}
    for name, value in (curves or {}).items():
        if name not in names:
            raise ValueError(f"curves: {name!r} is not a sub-anatomy of schema '{schema.name}'")
        if isinstance(value, Curve) or (isinstance(value, np.ndarray) and value.ndim == 2):
            value = [value]
        result[name] = [c if isinstance(c, Curve) else Curve(np.asarray(c, dtype=float)) for c in value]
    return result


def _nearest_curve(curves: list[Curve], a, b) -> Curve | None:
    """The curve passing closest to both A and B (the smallest of their larger distances), or None when
    none passes within CURVE_REACH_MM of both (e.g. only one of two temporal lobes has a curve)."""
    best, best_gap = None, CURVE_REACH_MM
    for curve in curves:
        _, gap = closest_on_curve(curve, np.vstack([a, b]))
        if gap.max() <= best_gap:
            best, best_gap = curve, gap.max()
    return best


def place_secondaries(schema: Schema, landmarks: np.ndarray, curves, sub_anatomies=None) -> dict[int, np.ndarray]:
    """Where secondary landmarks belong on their drawn boundary: {landmark index: (3,) RAS} for every (A, B)
    pair of placed primaries that a curve of the sub-anatomy serves, at the secondaries' schema fractions
    (points_between). The curve is the one the QA measures the pair's spacing along: the curve nearest both
    primaries, within CURVE_REACH_MM. ``landmarks``: (K, 3) RAS, NaN where not placed; ``curves`` as
    annotation_qa takes them; ``sub_anatomies``: names to place (default all). Nothing is moved here: the
    caller decides which points take their targets (the module leaves points the annotator moved alone)."""
    points = _points(schema, landmarks)
    curves = as_curves(curves, schema)
    chosen = None if sub_anatomies is None else set(sub_anatomies)
    targets = {}
    for sub in _layout(schema):
        if (chosen is not None and sub.name not in chosen) or not curves.get(sub.name):
            continue
        for group in sub.groups:
            a, b = points[group.a], points[group.b]
            curve = _nearest_curve(curves[sub.name], a, b) if np.isfinite([a, b]).all() else None
            if curve is not None:
                targets.update(zip(group.secondaries.tolist(), points_between(curve, a, b, group.fractions)))
    return targets


# -------------------------------------------------------------------------------------- schema layout
@dataclass(frozen=True, eq=False)
class _Group:
    """The secondaries between one pair of primaries, in fraction order."""
    a: int
    b: int
    secondaries: np.ndarray  # landmark indices
    fractions: np.ndarray


@dataclass(frozen=True, eq=False)
class _Sub:
    name: str
    plane: str  # the schema's plane kind
    indices: np.ndarray
    planar: bool  # whether it has a best-fit plane of its own
    groups: tuple[_Group, ...]


@lru_cache(maxsize=16)
def _layout(schema: Schema) -> tuple[_Sub, ...]:
    """Per sub-anatomy: its landmarks and secondary groups (computed once per schema: QA runs live)."""
    planar = set(plane_spec(schema).sub_anatomies or ())
    subs = []
    for sub in schema.sub_anatomies:
        pairs: dict[tuple[int, int], list[tuple[float, int]]] = {}
        for i in schema.indices_of(sub.name):
            lm = schema.landmarks[i]
            if lm.role == "secondary":
                key = (schema.lookup(lm.between[0]), schema.lookup(lm.between[1]))
                pairs.setdefault(key, []).append((lm.fraction, i))
        groups = tuple(_Group(a, b, np.array([i for _, i in sorted(members)]),
                              np.array([f for f, _ in sorted(members)])) for (a, b), members in pairs.items())
        subs.append(_Sub(sub.name, sub.plane, np.array(schema.indices_of(sub.name)), sub.name in planar, groups))
    return tuple(subs)


def _points(schema: Schema, landmarks) -> np.ndarray:
    points = np.asarray(landmarks, dtype=float)
    if points.shape != (len(schema), 3):
        raise LandmarkError(None, f"expected {len(schema)} landmarks of schema '{schema.name}' as a "
                                  f"({len(schema)}, 3) array, got shape {points.shape}")
    return points


# ------------------------------------------------------------------------------------------------- QA
def _grade(value: float, limits: tuple[float, float]) -> str:
    if not np.isfinite(value):
        return NA
    return FAIL if value > limits[1] else WARN if value > limits[0] else PASS


def _worst(statuses) -> str:
    return max(statuses, key=_RANK.__getitem__, default=NA)


def _spacing(points: np.ndarray, group: _Group, finite: np.ndarray, curve: Curve | None):
    """(CV of the normalised gaps, indices of its secondaries if they are out of order, else []) for one
    group whose primaries are placed."""
    placed = finite[group.secondaries]
    secondaries, fractions = group.secondaries[placed], group.fractions[placed]
    a, b = points[group.a], points[group.b]
    along = arc_fractions(curve, a, b, points[secondaries]) if curve is not None else None
    if along is not None and np.isfinite(along).all():
        positions = np.concatenate([[0.0], along, [1.0]])
        gaps = np.abs(np.diff(positions))
    else:  # no curve (or A and B meet on it): straight lines
        chain = points[np.concatenate([[group.a], secondaries, [group.b]])]
        gaps = np.linalg.norm(np.diff(chain, axis=0), axis=1)
        chord = b - a
        along = (points[secondaries] - a) @ chord / max(chord @ chord, 1e-12)
        positions = np.concatenate([[0.0], along, [1.0]])
    gaps = gaps / np.diff(np.concatenate([[0.0], fractions, [1.0]]))
    cv = float(gaps.std() / gaps.mean()) if len(gaps) >= 2 and gaps.mean() > 0 else math.nan
    ordered = bool(np.all(np.diff(positions) > 0))
    return cv, ([] if ordered else [int(i) for i in secondaries])


@dataclass
class QaRow:
    """The checks of one sub-anatomy (NaN / empty where a check does not apply)."""

    sub_anatomy: str
    points: int
    missing: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)  # "A = B (0.12 mm)"
    rms_mm: float = math.nan
    max_mm: float = math.nan
    farthest: str = ""  # the landmark farthest from the plane
    angle_deg: float = math.nan
    expected_plane: str = ""  # e.g. "axial (scanner)", "mid-sagittal (MSP)"; "" when none is expected
    spacing_cv: float = math.nan
    out_of_order: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: dict[str, str] = field(default_factory=dict)  # measure (MEASURES) -> pass / warn / fail / n/a

    @property
    def overall(self) -> str:
        """The worst of its checks (pass when none applies)."""
        worst = _worst(self.status.values())
        return PASS if worst == NA else worst

    def cells(self) -> list[str]:
        """The row's cells as text, one per COLUMNS entry."""
        order = {NA: "-", PASS: "ok"}.get(self.status.get("order"), f"{len(self.out_of_order)} wrong")
        return [self.sub_anatomy, self.overall, str(self.points), str(len(self.missing)), _num(self.rms_mm, 2),
                _num(self.max_mm, 2), self.farthest or "-", _num(self.angle_deg, 1), self.expected_plane or "-",
                _num(self.spacing_cv, 3), order, str(len(self.duplicates))]

    def cell_statuses(self) -> list[str]:
        """Per cell, the status that colours it ("" for plain cells), parallel to cells()."""
        s = self.status
        return [self.overall, self.overall, "", s["missing"], s["planarity_rms"], s["planarity_max"], "",
                s["plane_angle"], "", s["spacing"], s["order"], s["duplicates"]]

    def details(self) -> list[str]:
        """Readable lines for what is wrong (a tooltip, or the text report)."""
        lines = []
        if self.missing:
            lines.append(f"missing: {', '.join(self.missing)}")
        if self.duplicates:
            lines.append(f"duplicates: {'; '.join(self.duplicates)}")
        if self.out_of_order:
            lines.append(f"out of order along the boundary: {', '.join(self.out_of_order)}")
        return lines + self.notes

    def csv_values(self) -> list[str]:
        s = self.status
        return [self.sub_anatomy, self.overall, str(self.points), ";".join(self.missing), s["missing"],
                _num(self.rms_mm, 4, ""), s["planarity_rms"], _num(self.max_mm, 4, ""), s["planarity_max"],
                self.farthest, _num(self.angle_deg, 3, ""), s["plane_angle"], self.expected_plane,
                _num(self.spacing_cv, 4, ""), s["spacing"], ";".join(self.out_of_order), s["order"],
                ";".join(self.duplicates), s["duplicates"], ";".join(self.notes)]

    def to_dict(self) -> dict:
        return {"sub_anatomy": self.sub_anatomy, "status": self.overall, "points": self.points,
                "missing": self.missing, "duplicates": self.duplicates, "planarity_rms_mm": _json(self.rms_mm),
                "planarity_max_mm": _json(self.max_mm), "farthest": self.farthest or None,
                "plane_angle_deg": _json(self.angle_deg), "expected_plane": self.expected_plane or None,
                "spacing_cv": _json(self.spacing_cv), "out_of_order": self.out_of_order, "notes": self.notes,
                "checks": dict(self.status)}


COLUMNS = ("sub-anatomy", "status", "points", "missing", "rms mm", "max mm", "farthest", "angle deg",
           "expected plane", "spacing CV", "order", "duplicates")
CSV_COLUMNS = ("sub_anatomy", "status", "points", "missing", "missing_status", "planarity_rms_mm",
               "planarity_rms_status", "planarity_max_mm", "planarity_max_status", "farthest", "plane_angle_deg",
               "plane_angle_status", "expected_plane", "spacing_cv", "spacing_status", "out_of_order",
               "order_status", "duplicates", "duplicates_status", "notes")


def _num(value: float, digits: int, none: str = "-") -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else none


def _json(value: float):
    return float(value) if np.isfinite(value) else None


@dataclass
class QaResult:
    """The QA of one landmark set: a row per sub-anatomy and the overall status."""

    schema: str
    rows: list[QaRow]
    thresholds: QaThresholds
    distances: np.ndarray  # (K,) signed mm of each landmark from its sub-anatomy's plane (NaN: none)

    @property
    def status(self) -> str:
        """fail if any check fails, else warn if any warns, else pass."""
        worst = _worst(row.overall for row in self.rows)
        return PASS if worst == NA else worst

    def row(self, sub_anatomy: str) -> QaRow:
        return next(r for r in self.rows if r.sub_anatomy == sub_anatomy)

    def table(self) -> list[list[str]]:
        """Rows of cells (COLUMNS), for a Qt table or text."""
        return [row.cells() for row in self.rows]

    def text(self) -> str:
        """The table as aligned text, then what is wrong per sub-anatomy, then the overall status."""
        cells = [list(COLUMNS), *self.table()]
        widths = [max(len(r[k]) for r in cells) for k in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        for row in self.rows:
            lines += [f"{row.sub_anatomy}: {line}" for line in row.details()]
        lines.append(f"overall: {self.status.upper()} (schema {self.schema})")
        return "\n".join(lines)

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(row.csv_values() for row in self.rows)
        return out.getvalue()

    def to_dict(self) -> dict:
        return {"format": "LandmarkDetectionLib.annotation-qa", "version": 1, "schema": self.schema,
                "status": self.status, "thresholds": self.thresholds.to_dict(),
                "sub_anatomies": [row.to_dict() for row in self.rows]}


def annotation_qa(schema: Schema, landmarks: np.ndarray, curves=None, msp_normal: np.ndarray | None = None,
                  thresholds: QaThresholds | None = None) -> QaResult:
    """The QA of every sub-anatomy of ``landmarks`` ((K, 3) RAS, NaN rows for points not placed).

    ``curves``: {sub-anatomy: Curve, (N, 3) array or a list of them}, the drawn boundaries (each (A, B)
    pair uses the curve nearest to both); ``msp_normal``: the scan's mid-sagittal normal (see
    expected_normal); ``thresholds``: default the schema's. Fast enough to run on every edit.
    """
    points = _points(schema, landmarks)
    thresholds = thresholds or schema.qa_thresholds
    curves = as_curves(curves, schema)
    names = schema.names
    finite = np.isfinite(points).all(axis=1)
    distances = np.full(len(schema), np.nan)

    # duplicates: every pair of placed landmarks closer than duplicate_mm
    placed = np.flatnonzero(finite)
    gaps = np.linalg.norm(points[placed, None] - points[None, placed], axis=-1)
    close_i, close_j = np.nonzero(np.triu(gaps < thresholds.duplicate_mm, k=1))
    close = [(placed[i], placed[j], gaps[i, j]) for i, j in zip(close_i, close_j)]

    rows = []
    for sub in _layout(schema):
        row = QaRow(sub.name, len(sub.indices))
        row.missing = [names[i] for i in sub.indices if not finite[i]]
        members = set(sub.indices.tolist())
        row.duplicates = [f"{names[i]} = {names[j]} ({d:.2f} mm)" for i, j, d in close if i in members or j in members]

        kept = sub.indices[finite[sub.indices]]
        if sub.planar and len(kept) >= 3 and _is_planar(points[kept]):
            centre, normal = fit_plane(points[kept])
            distance = plane_distances(points[kept], centre, normal)
            distances[kept] = distance
            row.rms_mm = float(np.sqrt((distance ** 2).mean()))
            row.max_mm = float(np.abs(distance).max())
            row.farthest = names[kept[np.abs(distance).argmax()]]
            expected = expected_normal(sub.plane, msp_normal)
            if expected is not None:
                row.angle_deg = plane_angle(normal, expected)
                row.expected_plane = f"{sub.plane} ({'MSP' if msp_normal is not None else 'scanner'})"
        elif sub.planar:
            row.notes.append("no plane: the placed points lie on one line" if len(kept) >= 3 else
                             f"no plane: only {len(kept)} point(s) placed")

        cvs, checked = [], 0
        for group in sub.groups:
            pair = f"{names[group.a]} -> {names[group.b]}"
            if not finite[[group.a, group.b]].all():
                row.notes.append(f"{pair}: a primary point is missing; spacing and order not checked")
                continue
            curve = None
            if curves.get(sub.name):
                curve = _nearest_curve(curves[sub.name], points[group.a], points[group.b])
                if curve is None:
                    row.notes.append(f"{pair}: no drawn curve passes within {CURVE_REACH_MM:g} mm of both; "
                                     "spacing measured in straight lines")
            cv, wrong = _spacing(points, group, finite, curve)
            cvs.append(cv)
            checked += 1
            row.out_of_order += [names[i] for i in wrong]
        row.spacing_cv = max((c for c in cvs if np.isfinite(c)), default=math.nan)

        row.status = {
            "missing": WARN if row.missing else PASS,
            "duplicates": FAIL if row.duplicates else PASS,
            "planarity_rms": _grade(row.rms_mm, thresholds.planarity_rms_mm),
            "planarity_max": _grade(row.max_mm, thresholds.planarity_max_mm),
            "plane_angle": _grade(row.angle_deg, thresholds.plane_angle_deg),
            "spacing": _grade(row.spacing_cv, thresholds.spacing_cv),
            "order": NA if not checked else FAIL if row.out_of_order else PASS,
        }
        rows.append(row)
    return QaResult(schema.name, rows, thresholds, distances)


# ------------------------------------------------------------------------------ model-assisted annotation
ACCEPTED_WITHIN_MM = 0.5  # a suggestion moved less than this counts as accepted as it was


def suggestion_order(max_semi_axis_mm: np.ndarray) -> np.ndarray:
    """Schema indices of a model's suggestions to review, most uncertain first (undetermined last)."""
    values = np.asarray(max_semi_axis_mm, float)
    return np.argsort(np.where(np.isfinite(values), -values, np.inf), kind="stable")


def assistance_record(schema: Schema, suggested: np.ndarray, final: np.ndarray) -> list[dict]:
    """Per landmark, what the annotator did with a model's suggestion: accepted (moved less than
    ACCEPTED_WITHIN_MM), moved (by how many mm), removed (marked missing) or added (no suggestion)."""
    records = []
    for i, landmark in enumerate(schema.landmarks):
        had, has = np.isfinite(suggested[i]).all(), np.isfinite(final[i]).all()
        moved = float(np.linalg.norm(final[i] - suggested[i])) if had and has else None
        action = ("accepted" if moved < ACCEPTED_WITHIN_MM else "moved") if moved is not None else (
            "removed" if had else "added" if has else "missing")
        records.append({"landmark": landmark.name, "sub_anatomy": landmark.sub_anatomy, "action": action,
                        "moved_mm": None if moved is None else round(moved, 3)})
    return records


ASSISTANCE_ACTIONS = ("accepted", "moved", "removed", "added", "missing")


def assistance_document(model: str, records: list[dict]) -> dict:
    """The model-assistance record of one annotation version (datasets stores it beside the version as
    v<N>.assistance.json): the model, how many suggestions each action had, and the per-landmark records
    of assistance_record."""
    counts = {action: sum(r["action"] == action for r in records) for action in ASSISTANCE_ACTIONS}
    return {"format": "LandmarkDetectionLib.assistance", "version": 1, "model": model, "counts": counts,
            "landmarks": list(records)}


# -------------------------------------------------------------------------------------------- the fix
@dataclass
class Move:
    """One landmark the fix moved."""

    index: int
    landmark: str
    sub_anatomy: str
    old: np.ndarray  # (3,) RAS
    new: np.ndarray
    reason: str  # "projected onto the plane" and/or "re-spaced along the boundary"

    @property
    def distance_mm(self) -> float:
        return float(np.linalg.norm(self.new - self.old))


@dataclass
class FixResult:
    """New positions from fix_annotation; ``previous`` (a copy of the input) undoes them."""

    positions: np.ndarray  # (K, 3) RAS
    previous: np.ndarray  # (K, 3) RAS
    moves: list[Move]
    notes: list[str]

    def text(self) -> str:
        lines = [f"fix: {len(self.moves)} landmark(s) moved"]
        lines += [f"  {m.landmark:<36} {m.distance_mm:7.2f} mm  {m.reason}" for m in self.moves]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def fix_annotation(schema: Schema, landmarks: np.ndarray, curves=None, sub_anatomies=None,
                   min_move_mm: float = 1e-6) -> FixResult:
    """New landmark positions with each sub-anatomy's points projected onto their best-fit plane and its
    secondaries re-placed at their schema fractions between their primaries along the boundary (see the
    module docstring). ``sub_anatomies``: names to fix (default all). Missing points stay missing; the
    input is not modified. Moves smaller than ``min_move_mm`` are not listed."""
    points = _points(schema, landmarks)
    curves = as_curves(curves, schema)
    names = schema.names
    new = points.copy()
    finite = np.isfinite(points).all(axis=1)
    reasons: dict[int, list[str]] = {}
    notes = []
    chosen = None if sub_anatomies is None else set(sub_anatomies)
    for sub in _layout(schema):
        if chosen is not None and sub.name not in chosen:
            continue
        boundaries = curves.get(sub.name, [])
        kept = sub.indices[finite[sub.indices]]
        if sub.planar and len(kept) >= 3 and _is_planar(points[kept]):
            centre, normal = fit_plane(points[kept])
            new[kept] = project_to_plane(points[kept], centre, normal)
            for i in kept:
                reasons.setdefault(int(i), []).append("projected onto the plane")
            # the boundary comes along onto the plane, so re-spaced points stay on it
            boundaries = [Curve(project_to_plane(c.points, centre, normal), c.closed, c.name) for c in boundaries]
        elif sub.planar:
            notes.append(f"{sub.name}: too few placed points off one line to define a plane; not projected")
        for group in sub.groups:
            if not (finite[group.a] and finite[group.b]):
                notes.append(f"{sub.name}: {names[group.a]} or {names[group.b]} is missing; "
                             "its secondaries were not re-spaced")
                continue
            a, b = new[group.a], new[group.b]
            placed = finite[group.secondaries]
            secondaries, fractions = group.secondaries[placed], group.fractions[placed]
            if not len(secondaries):
                continue
            curve = _nearest_curve(boundaries, a, b) if boundaries else None
            if curve is None:
                if boundaries:
                    notes.append(f"{sub.name}: no drawn curve passes within {CURVE_REACH_MM:g} mm of "
                                 f"{names[group.a]} and {names[group.b]}; re-spaced along the points themselves")
                # the polyline through A, the secondaries between A and B sorted along A -> B, and B
                along = (new[secondaries] - a) @ (b - a)
                inside = (along > 0) & (along < (b - a) @ (b - a))
                curve = Curve(np.vstack([a, new[secondaries[inside][np.argsort(along[inside])]], b]))
            new[secondaries] = points_between(curve, a, b, fractions)
            for i in secondaries:
                reasons.setdefault(int(i), []).append("re-spaced along the boundary")
    moves = [Move(i, names[i], schema.landmarks[i].sub_anatomy, points[i].copy(), new[i].copy(),
                  " and ".join(dict.fromkeys(reasons[i])))
             for i in sorted(reasons) if np.linalg.norm(new[i] - points[i]) > min_move_mm]
    return FixResult(new, points.copy(), moves, notes)


# ----------------------------------------------------------------------------------------- curve files
def _key(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _sub_anatomy_named(text: str, schema: Schema) -> str | None:
    """The sub-anatomy a curve's name starts with ('Temporal Lobe right' -> 'Temporal Lobe'); the
    longest match wins; case, spaces and punctuation are ignored."""
    key = _key(text)
    matches = [s.name for s in schema.sub_anatomies if _key(s.name) and key.startswith(_key(s.name))]
    return max(matches, key=len, default=None)


def read_curves(path: str | Path, schema: Schema) -> tuple[dict[str, list[Curve]], list[Path]]:
    """Boundary curves from a Slicer markups file (one or more Curve / ClosedCurve markups) or a folder
    of them (every ``*.json`` in it): ({sub-anatomy: [Curve, ...]}, the files read). A curve belongs to
    the sub-anatomy its markup name starts with, else the one its file name starts with. The curve is
    the polyline through its control points (RAS)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.lower().endswith(".json") and p.is_file())
        if not files:
            raise LandmarkError(path, "holds no .mrk.json curve files")
    elif path.is_file():
        files = [path]
    else:
        raise LandmarkError(path, "does not exist")
    curves: dict[str, list[Curve]] = {}
    for file in files:
        try:
            markups = json.loads(file.read_text(encoding="utf-8-sig"))["markups"]
            if not isinstance(markups, list):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise LandmarkError(file, "not a Slicer markups JSON file (no 'markups' list)") from None
        for markup in markups:
            name, curve = _read_curve(markup, file)
            sub = _sub_anatomy_named(name, schema) or _sub_anatomy_named(file.name.split(".")[0], schema)
            if sub is None:
                raise LandmarkError(file, f"curve {name!r}: neither its name nor the file name starts with a "
                                          f"sub-anatomy of schema '{schema.name}' "
                                          f"({', '.join(s.name for s in schema.sub_anatomies)})")
            curves.setdefault(sub, []).append(curve)
    return curves, files


def _read_curve(markup, file: Path) -> tuple[str, Curve]:
    if not isinstance(markup, dict):
        raise LandmarkError(file, "a markup is not an object")
    name, kind = str(markup.get("name", "")), markup.get("type")
    if kind not in ("Curve", "ClosedCurve"):
        raise LandmarkError(file, f"markup {name!r} is a {kind!r}; expected a Curve or ClosedCurve")
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise LandmarkError(file, f"curve {name!r}: unknown coordinateSystem {system!r}")
    positions = []
    for point in markup.get("controlPoints") or []:
        if not isinstance(point, dict) or point.get("positionStatus", "defined") in ("missing", "undefined"):
            continue
        try:
            xyz = np.array([float(v) for v in point["position"]], dtype=float)
        except (KeyError, TypeError, ValueError):
            raise LandmarkError(file, f"curve {name!r}: a control point has no numeric position") from None
        if xyz.shape != (3,) or not np.isfinite(xyz).all():
            raise LandmarkError(file, f"curve {name!r}: bad control point position {point.get('position')!r}")
        positions.append(LPS_TO_RAS @ xyz if system == "LPS" else xyz)
    if len(positions) < 2 or np.ptp(np.array(positions), axis=0).max() == 0:
        raise LandmarkError(file, f"curve {name!r} needs at least two distinct control points")
    return name, Curve(np.array(positions), kind == "ClosedCurve", name)


def curves_for_qa(landmarks: str | Path, curves: str | Path | None, schema: Schema):
    """The boundary curves the ``qa`` command measures spacing and order along, and the files read: those of
    ``curves`` (--curves), else the ones a dataset stored with the landmark file's version
    (datasets.version_curves: qa on annotations/<case>/<annotator>/v<N>.mrk.json uses v<N>.curves), else none."""
    from .datasets import version_curves

    path = curves or version_curves(landmarks)
    return read_curves(path, schema) if path else ({}, [])


def read_msp_normal(path: str | Path) -> np.ndarray:
    """The unit RAS normal of a ``mid-sagittal.plane.json`` written by the ``planes`` command."""
    path = Path(path)
    try:
        normal = np.array([float(v) for v in json.loads(path.read_text(encoding="utf-8"))["normal_ras"]])
    except FileNotFoundError:
        raise LandmarkError(path, "does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise LandmarkError(path, "not a plane file (a JSON object with 'normal_ras', from the planes command)") from None
    if normal.shape != (3,) or not np.isfinite(normal).all() or not np.linalg.norm(normal) > 0:
        raise LandmarkError(path, "'normal_ras' must be three finite numbers, not all zero")
    return normal / np.linalg.norm(normal)


# ------------------------------------------------------------------------------------------------- CLI
def add_qa_command(subparsers) -> argparse.ArgumentParser:
    """Define ``qa`` on an argparse subparsers object; its handler is ``args.handler(args)``."""
    p = subparsers.add_parser(
        "qa", help="annotation QA per sub-anatomy: planarity, plane angle, spacing, order, missing and duplicates",
        description="Annotation QA of a landmark file, one row per sub-anatomy (thresholds from the schema's "
                    "qa_thresholds). Exit code 0 when every check passes or only warns, 1 when a check fails, "
                    "2 for bad input.")
    p.add_argument("--landmarks", required=True, help="landmark file (.mrk.json, .fcsv or .csv)")
    p.add_argument("--schema", default=None, help="schema name or JSON file (default: the built-in schema whose "
                                                   "landmarks the file holds)")
    p.add_argument("--curves", default=None, help="boundary curves: a markups .mrk.json of Curve/ClosedCurve markups, "
                                                  "or a folder of them, each named after its sub-anatomy (markup or "
                                                  "file name); spacing and order are then measured along them "
                                                  "(default: for a dataset's annotation version, the curves stored "
                                                  "with it)")
    p.add_argument("--msp", default=None, metavar="PLANE_JSON",
                   help="mid-sagittal.plane.json from the planes command: expected planes follow the scan's "
                        "mid-sagittal plane instead of the scanner axes")
    p.add_argument("--output", default=None, metavar="CSV", help="also write the table as CSV")
    p.add_argument("--fix", default=None, metavar="FIXED_MRK_JSON",
                   help="write the one-click fix (points projected onto their planes, secondaries re-spaced) "
                        "to this .mrk.json; the input is never changed")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.set_defaults(handler=run_qa)
    return p


def run_qa(args) -> int:
    """The ``qa`` command: read, check, write the CSV / fixed landmarks, print the table; 1 if a check fails."""
    from .fileio import atomic_write_text, check_outputs, read_landmarks, write_markups_json, written_together
    from .schema import load_schema, schema_of_labels

    if args.output and not args.output.lower().endswith(".csv"):
        raise LandmarkError(args.output, "--output must be a .csv file")
    if args.fix and not args.fix.lower().endswith(".json"):
        raise LandmarkError(args.fix, "--fix must be a .mrk.json file")
    if args.output and args.fix and Path(args.output).resolve() == Path(args.fix).resolve():
        raise LandmarkError(args.output, "--output and --fix name the same file")
    schema = load_schema(args.schema) if args.schema else schema_of_labels(args.landmarks)
    landmarks = read_landmarks(args.landmarks, schema)
    curves, curve_files = curves_for_qa(args.landmarks, args.curves, schema)
    msp = read_msp_normal(args.msp) if args.msp else None
    inputs = [args.landmarks, args.msp, *curve_files,
              schema.source if args.schema and Path(schema.source).exists() else None]
    check_outputs([p for p in (args.output, args.fix) if p], inputs, args.overwrite)

    result = annotation_qa(schema, landmarks, curves, msp)
    fixed = fix_annotation(schema, landmarks, curves) if args.fix else None
    with written_together():
        if args.output:
            atomic_write_text(args.output, result.csv_text())
        if fixed is not None:
            write_markups_json(args.fix, schema, fixed.positions)
    print(f"{args.landmarks}: schema {schema.name}")
    if curve_files and not args.curves:
        print(f"boundary curves stored with this version: {curve_files[0].parent}")
    print(result.text())
    if fixed is not None:
        print(fixed.text())
        print(f"after the fix: {annotation_qa(schema, fixed.positions, curves, msp).status.upper()} ({args.fix})")
    return 1 if result.status == FAIL else 0
