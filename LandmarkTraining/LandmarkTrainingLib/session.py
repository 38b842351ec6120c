"""A guided annotation session of one scan in the MRML scene, without Qt (tested on real MRML).

The session walks the schema's sub-anatomies in order. Each has one markups point list (mrml.add_landmarks:
labels are landmark names) whose primary points not yet placed are *undefined*, so that Slicer's place
mode asks for them one after the other in schema order, and whose secondary points not yet placed are
*missing*, so that place mode skips them: they come from the boundary curve.

Planes (``plane``)
    mid-sagittal sub-anatomies: the mid-sagittal plane (MSP): the scan's left-right symmetry plane
    (planes.symmetry_plane), refined from the placed midline points (the schema's mid-sagittal landmarks):
    through their centroid, and with at least three of them spanning a plane, their robust best-fit plane.
    Other sub-anatomies: with at least three placed points spanning a plane, their best-fit plane; else
    the plane the schema expects (annotation.expected_normal: axial and coronal contain the MSP normal,
    sagittal is parallel to the MSP; an oblique sub-anatomy starts axial) through the placed points, or
    through the MSP's centre while none is placed. ``reformat`` shows it in a slice view the way Slicer
    shows its own axial, sagittal and coronal views (mrml.reformat_slice), turned with the head.

Placing (``update``, called after every edit; the widget throttles it)
    A primary point the annotator has just placed is projected onto its sub-anatomy's plane computed
    from the points placed before it; the first point of a sub-anatomy that is not mid-sagittal sets the
    plane's level and is not moved (an oblique one's plane needs three points). Secondary points not yet
    placed are put at their fractions of the arc length between their primaries along the boundary
    curve drawn for the sub-anatomy (annotation.place_secondaries: the curve passing nearest both
    primaries, the one the QA measures their spacing along). Points put there follow the curve and the
    primaries while the annotator leaves them alone; one the annotator moves is the annotator's. Then the
    QA (annotation.annotation_qa) fills the QA table node.

Curves loaded with a saved version (``add_curve`` with points) are the polyline the QA measured when it was
saved: linear, one curve point per control point, so the QA of the loaded annotation is the QA it was
saved with.

Edits the session makes to placed points (the one-click fix, re-placing secondaries) are ``Edit`` records
on an undo stack: ``undo`` restores the previous positions exactly, and is refused (naming them) when points
it would put back were moved since the edit. Nothing is changed silently: a fix is computed first (``fix``),
shown, and applied only as it was shown (``apply_fix``).

The session lives in its scene: a point list the annotator deletes (in the Data module) comes back empty,
its points to place again (``nodes``; ``UpdateReport.restored`` names it), so a deleted list is missing points
and is never saved as it was; once the scan leaves the scene (the scene is closed, or the volume deleted) the
session is ``closed`` and refuses to read or change points. A deleted QA table comes back at the next update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from LandmarkDetectionLib import mrml
from LandmarkDetectionLib.annotation import (COLUMNS, Curve, Move, annotation_qa, assistance_record, expected_normal,
                                             fix_annotation, place_secondaries, project_to_plane, suggestion_order)
from LandmarkDetectionLib.errors import LandmarkError
from LandmarkDetectionLib.planes import fit_plane, fit_plane_robust, head_axes, plane_spec, symmetry_plane
from LandmarkDetectionLib.schema import Schema

from .tables import fill_table

SUB_ANATOMY_ATTRIBUTE = "LandmarkTraining.SubAnatomy"  # on point lists and boundary curves
SPANS_PLANE = 0.1  # points span a plane when their 2nd singular value is at least this fraction of the 1st
SAME_MM = 1e-6  # positions closer than this are the same (MRML stores doubles: what is set is read back)


@dataclass
class MidSagittal:
    centre: np.ndarray  # (3,) RAS
    normal: np.ndarray  # (3,) unit RAS, toward the scan's right
    source: str  # how it was found, for the annotator


@dataclass
class SessionPlane:
    """The plane a sub-anatomy is annotated on, as a slice view shows it, and how it was found."""

    name: str
    kind: str
    centre: np.ndarray  # (3,) RAS
    normal: np.ndarray  # (3,) unit RAS, out of the screen
    axes: np.ndarray  # (2, 3) unit RAS in the plane: to the screen's right, and up
    how: str


@dataclass
class Edit:
    """One change the session made to placed points; ``previous`` (K, 3) (NaN: not placed) undoes it while
    its points are still where it put them, ``written`` (K, 3)."""

    description: str
    indices: list[int]
    previous: np.ndarray
    moves: list[Move] = field(default_factory=list)
    following: dict = field(default_factory=dict)  # the curve-following points before the edit
    written: np.ndarray | None = None

    def text(self) -> str:
        lines = [f"{self.description}: {len(self.moves)} landmark(s) moved"]
        return "\n".join(lines + [f"  {m.landmark:<36} {m.distance_mm:7.2f} mm  {m.reason}" for m in self.moves])


@dataclass
class UpdateReport:
    projected: list[tuple[str, float]]  # (landmark, mm moved onto the plane)
    placed: list[str]  # secondaries put on (or moved along) the boundary curve
    qa: object  # annotation.QaResult
    restored: list[str] = field(default_factory=list)  # sub-anatomies whose deleted point list came back empty


@dataclass
class ReviewItem:
    """A model suggestion to review: where it is and how uncertain the model was."""

    index: int
    landmark: str
    sub_anatomy: str
    position: np.ndarray
    max_semi_axis_mm: float


def _spans_plane(points: np.ndarray) -> bool:
    if len(points) < 3:
        return False
    singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    return bool(singular[0] > 0 and singular[1] >= SPANS_PLANE * singular[0])


class AnnotationSession:
    """Guided annotation of ``volume`` following ``schema``: point lists, boundary curves and a QA table in
    a subject-hierarchy folder under the volume. ``coords`` (K, 3) RAS (NaN: not placed) starts from an
    existing annotation; ``name`` prefixes the node names (default: the volume's)."""

    def __init__(self, scene, schema: Schema, volume, coords: np.ndarray | None = None, name: str | None = None):
        self.scene, self.schema, self.volume = scene, schema, volume
        self.name = name or volume.GetName()
        self.folder = mrml.results_folder(scene, volume, f"{self.name} annotation")
        coords = np.full((len(schema), 3), np.nan) if coords is None else np.asarray(coords, dtype=float)
        if coords.shape != (len(schema), 3):
            raise LandmarkError(None, f"expected ({len(schema)}, 3) coordinates of schema '{schema.name}', got "
                                      f"{coords.shape}")
        self.secondary = np.array([lm.role == "secondary" for lm in schema.landmarks])
        self._where = {}  # landmark index -> (point list, control point number)
        self._nodes = [self._add_list(sub.name, coords) for sub in schema.sub_anatomies]
        self.restored: list[str] = []  # sub-anatomies whose deleted list came back, until update() reports them
        self.curve_nodes: dict[str, list] = {}
        self.qa_table = self._add_qa_table()
        self.current = 0  # index of the sub-anatomy being annotated
        self.undo_stack: list[Edit] = []
        self.following: dict[int, np.ndarray] = {}  # secondaries put on the curve, where they were put
        self.symmetry: tuple[np.ndarray, np.ndarray] | None = None  # (centre, normal) from the scan
        self.suggested: np.ndarray | None = None  # a model's suggestions (K, 3), NaN where it gave none
        self.model = ""
        self.review: list[int] = []  # suggestions to review, most uncertain first
        self.uncertainty: np.ndarray | None = None  # (K,) longest ellipsoid semi-axis (mm) of each suggestion
        self.dataset = None  # (folder, case) when loaded from a dataset
        self._defined = self._finite(coords)

    # ---------------------------------------------------------------------------------------- landmarks
    @staticmethod
    def _finite(coords: np.ndarray) -> np.ndarray:
        return np.isfinite(coords).all(axis=1)

    def _add_list(self, sub: str, coords: np.ndarray):
        """The point list of a sub-anatomy holding its landmarks of ``coords`` (NaN: to place)."""
        node = mrml.add_landmark_list(self.scene, self.schema, sub, coords, self.folder, prefix=f"{self.name} ",
                                      locked=False, to_place=True)
        node.SetAttribute(SUB_ANATOMY_ATTRIBUTE, sub)
        for n in range(node.GetNumberOfControlPoints()):
            index = self.schema.lookup(node.GetNthControlPointLabel(n))
            self._where[index] = (node, n)
            if self.secondary[index] and not np.isfinite(coords[index]).all():
                node.SetNthControlPointPositionMissing(n)  # not placed: place mode skips it (see _clear)
        # place mode ends when every undefined point is placed, and adds none of its own
        node.SetFixedNumberOfControlPoints(True)
        return node

    def _add_qa_table(self):
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.name} QA")
        mrml.place(self.scene, table, self.folder)
        return table

    @property
    def closed(self) -> bool:
        """Whether the scan left the session's scene (the scene was closed, or the volume deleted)."""
        return self.volume.GetScene() is not self.scene

    @property
    def nodes(self) -> list:
        """The point list of each sub-anatomy, in schema order (``restore_lists``)."""
        return self.restore_lists()

    def restore_lists(self) -> list:
        """The point lists, each in the scene: one the annotator deleted comes back empty (its points to place
        again) and is named in ``restored``. Refused once the session is ``closed``."""
        if self.closed:
            raise LandmarkError(None, f"the annotation '{self.name}' is closed: its scan is no longer in the scene")
        for k, node in enumerate(self._nodes):
            if node.GetScene() is not self.scene:
                if not mrml.item_exists(self.scene, self.folder):  # the annotation's folder was deleted too
                    self.folder = mrml.results_folder(self.scene, self.volume, f"{self.name} annotation")
                sub = self.schema.sub_anatomies[k].name
                self._nodes[k] = self._add_list(sub, np.full((len(self.schema), 3), np.nan))
                self.restored.append(sub)
        return self._nodes

    def coordinates(self) -> np.ndarray:
        """(K, 3) RAS in schema order; NaN for points not placed."""
        return mrml.landmarks_from_markups(self.nodes, self.schema)

    def _point(self, index: int) -> tuple:
        """(point list, control point number) of a landmark; a list deleted meanwhile comes back first."""
        self.restore_lists()
        return self._where[int(index)]

    def _set(self, index: int, position) -> None:
        node, n = self._point(index)
        node.SetNthControlPointPositionWorld(n, *(float(v) for v in position))

    def _clear(self, index: int) -> None:
        """Not placed: a primary undefined (place mode asks for it), a secondary missing (it skips it)."""
        node, n = self._point(index)
        if self.secondary[index]:
            node.SetNthControlPointPositionMissing(n)
        else:
            node.UnsetNthControlPointPosition(n)

    def _write(self, coords: np.ndarray, indices) -> None:
        for i in indices:
            if np.isfinite(coords[i]).all():
                self._set(i, coords[i])
            else:
                self._clear(i)

    # -------------------------------------------------------------------------------------- sub-anatomies
    @property
    def sub_anatomy(self):
        return self.schema.sub_anatomies[self.current]

    def go_to(self, position: int | str):
        """Make a sub-anatomy (index or name) the current one; returns it."""
        names = [s.name for s in self.schema.sub_anatomies]
        index = names.index(position) if isinstance(position, str) else int(position)
        if not 0 <= index < len(names):
            raise IndexError(f"sub-anatomy {position} is out of range (0 to {len(names) - 1})")
        self.current = index
        return self.sub_anatomy

    def next(self):
        """The next sub-anatomy in schema order (the last one stays)."""
        return self.go_to(min(self.current + 1, len(self.schema.sub_anatomies) - 1))

    def previous(self):
        return self.go_to(max(self.current - 1, 0))

    def node(self, sub: str | None = None):
        """The point list of a sub-anatomy (default: the current one)."""
        name = sub or self.sub_anatomy.name
        return self.nodes[[s.name for s in self.schema.sub_anatomies].index(name)]

    def to_place(self, sub: str | None = None) -> list[str]:
        """The primary points of a sub-anatomy still to place, in schema order."""
        coords = self.coordinates()
        return [self.schema.names[i] for i in self.schema.indices_of(sub or self.sub_anatomy.name)
                if not self.secondary[i] and not np.isfinite(coords[i]).all()]

    def instructions(self, sub: str | None = None) -> str:
        """The sub-anatomy's guideline, its plane, and each landmark's definition (placed ones ticked)."""
        sub = self.schema.sub_anatomy(sub) if sub else self.sub_anatomy
        coords = self.coordinates()
        lines = [f"{sub.name} ({sub.plane} plane). {sub.guideline}"]
        if sub.plane_definition:
            lines.append(f"Plane: {sub.plane_definition}")
        for i in self.schema.indices_of(sub.name):
            lm = self.schema.landmarks[i]
            mark = "[x]" if np.isfinite(coords[i]).all() else "[ ]"
            where = f" (on the boundary between {lm.between[0]} and {lm.between[1]})" if lm.between else ""
            lines.append(f"{mark} {lm.name}{where}: {lm.definition}")
        return "\n".join(lines)

    # --------------------------------------------------------------------------------------------- planes
    def set_symmetry_plane(self, centre, normal) -> None:
        normal = np.asarray(normal, dtype=float)
        self.symmetry = (np.asarray(centre, dtype=float), normal / np.linalg.norm(normal))

    def estimate_symmetry_plane(self) -> tuple[np.ndarray, np.ndarray]:
        """The scan's left-right symmetry plane (planes.symmetry_plane, about a second for a brain scan),
        kept for the session: (centre, normal)."""
        plane = symmetry_plane(mrml.volume_to_image(self.volume), source=self.volume.GetName())
        self.set_symmetry_plane(plane.centre, plane.normal)
        return self.symmetry

    def _volume_centre(self) -> np.ndarray:
        bounds = [0.0] * 6
        self.volume.GetRASBounds(bounds)
        return np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])

    def mid_sagittal(self, coords: np.ndarray | None = None, exclude=()) -> MidSagittal | None:
        """The MSP from the scan's symmetry refined by the placed midline points (leaving out ``exclude``),
        or None while there is neither."""
        coords = self.coordinates() if coords is None else coords
        names = plane_spec(self.schema).mid_sagittal or ()
        midline = [i for i in (self.schema.lookup(n) for n in names)
                   if i not in exclude and np.isfinite(coords[i]).all()]
        points = coords[midline]
        reference = self.symmetry[1] if self.symmetry is not None else np.array([1.0, 0.0, 0.0])
        if _spans_plane(points):
            centre, normal, inliers = fit_plane_robust(points)
            normal = normal if normal @ reference >= 0 else -normal
            left_out = f", {int((~inliers).sum())} left out" if not inliers.all() else ""
            return MidSagittal(centre, normal, f"fitted to {len(points)} placed midline points{left_out}")
        if self.symmetry is None:
            return None if not midline else MidSagittal(points.mean(axis=0), reference,
                                                        f"scanner sagittal through {len(points)} midline point(s)")
        if midline:
            return MidSagittal(points.mean(axis=0), reference,
                               f"scan symmetry, through {len(points)} placed midline point(s)")
        return MidSagittal(self.symmetry[0], reference, "scan symmetry")

    def _head_axes(self, coords: np.ndarray) -> np.ndarray:
        """Rows right, anterior, superior: right from the MSP (scanner +R without one), anterior from the
        schema's anterior pair (else PC -> AC) when both are placed, scanner +A otherwise."""
        msp = self.mid_sagittal(coords)
        right = msp.normal if msp is not None else np.array([1.0, 0.0, 0.0])
        spec = plane_spec(self.schema)
        anterior = np.array([0.0, 1.0, 0.0])
        pair = spec.anterior or ((spec.pc, spec.ac) if spec.ac else None)
        if pair:
            start, end = (coords[self.schema.lookup(n)] for n in pair)
            if np.isfinite([start, end]).all() and abs((end - start) @ right) < 0.95 * np.linalg.norm(end - start):
                anterior = end - start
        return head_axes(right, anterior)

    def _plane(self, sub, coords: np.ndarray, exclude=()) -> tuple[np.ndarray, np.ndarray, str, bool]:
        """(centre, normal, how, determined): ``determined`` when placed points (or the scan, for the MSP)
        fix the plane, rather than a default position."""
        msp = self.mid_sagittal(coords, exclude)
        if sub.plane == "mid-sagittal":
            if msp is None:
                return self._volume_centre(), np.array([1.0, 0.0, 0.0]), "the scanner's sagittal plane", False
            return msp.centre, msp.normal, f"mid-sagittal plane: {msp.source}", True
        placed = [i for i in self.schema.indices_of(sub.name) if i not in exclude and np.isfinite(coords[i]).all()]
        points = coords[placed]
        if _spans_plane(points):
            centre, normal = fit_plane(points)
            return centre, normal, f"best fit to the {len(points)} placed points", True
        kind = "axial" if sub.plane == "oblique" else sub.plane
        normal = expected_normal(kind, None if msp is None else msp.normal)
        frame = "the mid-sagittal plane" if msp is not None else "the scanner axes"
        if placed:
            return (points.mean(axis=0), normal, f"{kind}, from {frame}, through the placed points",
                    sub.plane != "oblique")
        centre = msp.centre if msp is not None else self._volume_centre()
        return centre, normal, f"{kind}, from {frame}; scroll to the level of the first point", False

    def plane(self, sub: str | None = None) -> SessionPlane:
        """The plane the sub-anatomy is annotated on (see the module docstring), oriented as a slice view
        shows it (mrml.slice_frame)."""
        sub = self.schema.sub_anatomy(sub) if sub else self.sub_anatomy
        coords = self.coordinates()
        centre, normal, how, _ = self._plane(sub, coords)
        frame = mrml.slice_frame(normal, self._head_axes(coords))
        return SessionPlane(sub.name, sub.plane, np.asarray(centre, dtype=float), frame[:, 2], frame[:, :2].T, how)

    def reformat(self, slice_node, sub: str | None = None) -> SessionPlane:
        """Show the sub-anatomy's plane in a slice view (a vtkMRMLSliceNode) the way Slicer shows its own
        views, turned with the head, centred on the plane (mrml.reformat_slice); returns the plane."""
        plane = self.plane(sub)
        mrml.reformat_slice(slice_node, plane.centre, plane.normal, self._head_axes(self.coordinates()))
        return plane

    # --------------------------------------------------------------------------------------------- curves
    def add_curve(self, sub: str | None = None, closed: bool = False, points=None):
        """A new boundary curve for a sub-anatomy: empty (draw it with place mode), or, with (N, 3) RAS
        ``points`` (a saved version's), exactly that polyline (mrml.set_curve_points). A sub-anatomy may have
        several (e.g. one per temporal lobe: each pair of primaries uses the curve nearest both)."""
        sub = self.schema.sub_anatomy(sub) if sub else self.sub_anatomy
        count = len(self.curves_of(sub.name)) + 1
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode" if closed else "vtkMRMLMarkupsCurveNode",
                                            f"{self.name} {sub.name} boundary {count}")
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(sub.rgb)
        node.GetDisplayNode().SetColor(sub.rgb)
        node.SetAttribute(SUB_ANATOMY_ATTRIBUTE, sub.name)
        mrml.place(self.scene, node, self.folder)
        if points is not None:
            mrml.set_curve_points(node, points)
        self.curve_nodes.setdefault(sub.name, []).append(node)
        return node

    def curves_of(self, sub: str) -> list:
        """The sub-anatomy's curve nodes still in the scene (the annotator may delete one)."""
        nodes = [n for n in self.curve_nodes.get(sub, []) if n.GetScene() is self.scene]
        self.curve_nodes[sub] = nodes
        return nodes

    def curves(self) -> dict[str, list[Curve]]:
        """{sub-anatomy: [Curve]} of every drawn boundary with at least two distinct points."""
        result = {}
        for sub in list(self.curve_nodes):
            for node in self.curves_of(sub):
                points = mrml.curve_points(node)
                if len(points) >= 2 and np.ptp(points, axis=0).max() > 0:
                    closed = node.IsA("vtkMRMLMarkupsClosedCurveNode")
                    result.setdefault(sub, []).append(Curve(points, closed, node.GetName()))
        return result

    # ---------------------------------------------------------------------------------------------- update
    def update(self) -> UpdateReport:
        """After edits: project primaries just placed onto their plane, put secondaries on the boundary
        curve, refresh the QA table (see the module docstring); report the point lists that came back."""
        coords = self.coordinates()
        finite = self._finite(coords)
        projected = []
        pending = {int(i) for i in np.flatnonzero(finite & ~self._defined & ~self.secondary)}
        for i in sorted(pending):  # in schema order, as place mode asks for them
            pending.discard(i)
            sub = self.schema.sub_anatomy(self.schema.landmarks[i].sub_anatomy)
            centre, normal, _, determined = self._plane(sub, coords, exclude=pending | {i})  # of earlier points
            if not determined:
                continue
            target = project_to_plane(coords[i], centre, normal)
            distance = float(np.linalg.norm(target - coords[i]))
            if distance > SAME_MM:
                self._set(i, target)
                coords[i] = target
            projected.append((self.schema.names[i], distance))
        placed = []
        for i, target in place_secondaries(self.schema, coords, self.curves()).items():
            if i in self.following and not np.allclose(coords[i], self.following[i], atol=SAME_MM):
                del self.following[i]  # the annotator moved it: theirs now
            if np.isfinite(coords[i]).all() and i not in self.following:
                continue
            if not np.allclose(coords[i], target, atol=SAME_MM):
                self._set(i, target)
                coords[i] = target
                placed.append(self.schema.names[i])
            self.following[i] = target
        self._defined = self._finite(coords)
        restored, self.restored = self.restored, []
        return UpdateReport(projected, placed, self.update_qa(coords), restored)

    def qa(self, coords: np.ndarray | None = None):
        coords = self.coordinates() if coords is None else coords
        msp = self.mid_sagittal(coords)
        return annotation_qa(self.schema, coords, self.curves(), None if msp is None else msp.normal,
                             self.schema.qa_thresholds)

    def update_qa(self, coords: np.ndarray | None = None):
        """Run the QA and show it in the QA table node (annotation.COLUMNS; a new one if the annotator
        deleted it); returns the QaResult."""
        result = self.qa(coords)
        if self.qa_table.GetScene() is not self.scene:
            self.qa_table = self._add_qa_table()
        fill_table(self.qa_table, COLUMNS, result.table())
        return result

    # ------------------------------------------------------------------------------------- fix and undo
    def fix(self, sub_anatomies=None):
        """The one-click fix, computed and not applied (annotation.fix_annotation): show it, then
        ``apply_fix``."""
        return fix_annotation(self.schema, self.coordinates(), self.curves(), sub_anatomies)

    def apply_fix(self, fix) -> Edit:
        """Apply a fix exactly as it was computed; refused when the points moved since."""
        coords = self.coordinates()
        if not np.allclose(coords, fix.previous, atol=SAME_MM, equal_nan=True):
            raise LandmarkError(None, "the landmarks changed since this fix was computed; compute the fix again")
        return self._apply(fix.positions, [m.index for m in fix.moves], "fix", fix.moves)

    def place_secondaries(self, sub: str | None = None) -> Edit:
        """Put every secondary of a sub-anatomy (default: the current one) back on the boundary curve at its
        fraction, including points the annotator moved (undoable)."""
        sub = sub or self.sub_anatomy.name
        coords = self.coordinates()
        targets = place_secondaries(self.schema, coords, self.curves(), [sub])
        if not targets:
            raise LandmarkError(None, f"{sub}: place the primary points and draw the boundary curve through them "
                                      "first")
        new = coords.copy()
        moves = []
        for i, target in targets.items():
            new[i] = target
            if not np.allclose(coords[i], target, atol=SAME_MM, equal_nan=True):
                moves.append(Move(i, self.schema.names[i], sub, coords[i].copy(), target.copy(),
                                  "re-spaced along the boundary"))
        edit = self._apply(new, [m.index for m in moves], "secondaries re-placed", moves)
        self.following.update(targets)
        return edit

    def _apply(self, new: np.ndarray, indices: list[int], description: str, moves) -> Edit:
        edit = Edit(description, list(indices), self.coordinates(), list(moves), dict(self.following))
        self._write(new, indices)
        edit.written = self.coordinates()
        self.undo_stack.append(edit)
        self._defined = self._finite(edit.written)
        return edit

    def undo(self) -> Edit | None:
        """Undo the last edit: its points back exactly where they were (or not placed). Refused, changing
        nothing, when any of them was moved since the edit put it there (undoing would discard that move)."""
        if not self.undo_stack:
            return None
        edit = self.undo_stack[-1]
        coords = self.coordinates()
        moved = [self.schema.names[i] for i in edit.indices
                 if not np.allclose(coords[i], edit.written[i], atol=SAME_MM, equal_nan=True)]
        if moved:
            raise LandmarkError(None, f"the {edit.description} was not undone: {', '.join(moved)} moved since it was "
                                      "applied, and undoing it would put them back where they were before it")
        self.undo_stack.pop()
        self._write(edit.previous, edit.indices)
        self.following = dict(edit.following)
        self._defined = self._finite(self.coordinates())
        return edit

    # ------------------------------------------------------------------------------ model-assisted annotation
    def prefill(self, suggested: np.ndarray, max_semi_axis_mm: np.ndarray, model: str) -> int:
        """Pre-fill the points not yet placed with a model's suggestions (placed points are the annotator's
        and stay); they are then reviewed most uncertain first (``next_suggestion``). Returns how many."""
        suggested = np.asarray(suggested, dtype=float)
        coords = self.coordinates()
        fill = self._finite(suggested) & ~self._finite(coords)
        for i in np.flatnonzero(fill):
            self._set(i, suggested[i])
        self.suggested = np.where(fill[:, None], suggested, np.nan)
        self.uncertainty = np.asarray(max_semi_axis_mm, dtype=float)
        self.model = model
        self.review = [int(i) for i in suggestion_order(np.where(fill, self.uncertainty, np.nan)) if fill[i]]
        self._defined = self._finite(self.coordinates())
        return int(fill.sum())

    def next_suggestion(self) -> ReviewItem | None:
        """The most uncertain suggestion not yet reviewed (its sub-anatomy becomes the current one); one the
        annotator has removed (not placed now) is skipped."""
        coords = self.coordinates()
        while self.review:
            index = self.review.pop(0)
            if np.isfinite(coords[index]).all():
                lm = self.schema.landmarks[index]
                self.go_to(lm.sub_anatomy)
                return ReviewItem(index, lm.name, lm.sub_anatomy, coords[index], float(self.uncertainty[index]))
        return None

    def assistance(self) -> list[dict] | None:
        """Per landmark: suggestion accepted, moved (how far), removed or added; None without a model."""
        if self.suggested is None:
            return None
        return assistance_record(self.schema, self.suggested, self.coordinates())

    @property
    def provenance(self) -> str:
        return f"model-assisted:{self.model}" if self.suggested is not None else "manual"
