"""MRML adapters: volume nodes <-> SimpleITK images with geometry, landmark markups, uncertainty
ellipsoid models, result tables, Grad-CAM volume nodes, and their subject-hierarchy folder.

The only backend module that imports ``slicer``, and only its MRML API (as provided by Slicer itself or
by the ``slicer-core`` wheel): no Qt and nothing of the Slicer application, so it is tested outside it.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .geometry import LPS_TO_RAS
from .schema import Schema

FOLDER_ATTRIBUTE = "LandmarkDetection.Results"


# ------------------------------------------------------------------------------------------------- volumes
def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_to_image(volume_node, keep_type: bool = False) -> sitk.Image:
    """The node's voxels as a float32 SimpleITK image (``keep_type``: in the node's own voxel type, e.g. a
    scan saved to a dataset or written for the backend, which reads it as float32 itself) with its world
    geometry (a linear parent transform included), so backend results land where the node is shown."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    matrix = _matrix(ijk_to_ras)
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"{volume_node.GetName()}: harden its non-linear transform before detection")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = _matrix(to_world) @ matrix
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    voxels = slicer.util.arrayFromVolume(volume_node)
    image = sitk.GetImageFromArray(voxels if keep_type else voxels.astype(np.float32))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((LPS_TO_RAS @ (matrix[:3, :3] / spacing)).ravel()))
    image.SetOrigin(tuple(LPS_TO_RAS @ matrix[:3, 3]))
    return image


def image_to_volume(scene, image: sitk.Image, name: str):
    """A new scalar volume node holding ``image`` with its geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    spacing = np.asarray(image.GetSpacing())
    direction_ras = LPS_TO_RAS @ np.asarray(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction_ras * spacing
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin())
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    node.CreateDefaultDisplayNodes()
    return node


def first_scalar_volume(scene):
    """The first plain scalar volume of the scene (a scan), or None: label maps, vector, DWI and tensor
    volumes are scalar volume nodes too (subclasses), and are not scans to detect or annotate."""
    nodes = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for k in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(k)
        if node.GetClassName() == "vtkMRMLScalarVolumeNode":
            return node
    return None


# ------------------------------------------------------------------------------------- subject hierarchy
def results_folder(scene, volume_node, name: str) -> int:
    """A subject-hierarchy folder for results, under the volume's study (or wherever the volume is)."""
    hierarchy = scene.GetSubjectHierarchyNode()
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    parent = hierarchy.GetItemParent(volume_item) if volume_item else hierarchy.GetSceneItemID()
    folder = hierarchy.CreateFolderItem(parent, name)
    hierarchy.SetItemAttribute(folder, FOLDER_ATTRIBUTE, "1")
    return folder


def item_exists(scene, item: int) -> bool:
    """Whether a subject-hierarchy item (e.g. a results folder) is still in the scene's hierarchy."""
    hierarchy = scene.GetSubjectHierarchyNode()
    items = vtk.vtkIdList()
    hierarchy.GetItemChildren(hierarchy.GetSceneItemID(), items, True)
    return items.IsId(item) >= 0


def place(scene, node, folder: int) -> None:
    hierarchy = scene.GetSubjectHierarchyNode()
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)
    hierarchy.SetItemParent(item, folder)


# ------------------------------------------------------------------------------------------------ markups
def add_landmarks(scene, schema: Schema, coords_ras: np.ndarray, folder: int | None = None, prefix: str = "",
                  locked: bool = True, to_place: bool = False) -> list:
    """One markups point-list node per sub-anatomy (add_landmark_list), in schema order."""
    return [add_landmark_list(scene, schema, sub.name, coords_ras, folder, prefix, locked, to_place)
            for sub in schema.sub_anatomies]


def add_landmark_list(scene, schema: Schema, sub_anatomy: str, coords_ras: np.ndarray, folder: int | None = None,
                      prefix: str = "", locked: bool = True, to_place: bool = False):
    """The markups point-list node of one sub-anatomy, coloured by it, with its landmarks of (K, 3) RAS
    ``coords_ras`` (schema order): labels are landmark names, descriptions the sub-anatomy; locked against
    accidental moves (unlock to correct). A landmark without coordinates is marked missing, or with
    ``to_place`` left undefined so that Slicer's place mode places the sub-anatomy's points one after the
    other in schema order (guided annotation)."""
    sub = schema.sub_anatomy(sub_anatomy)
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{prefix}{sub.name}")
    node.CreateDefaultDisplayNodes()
    for i in schema.indices_of(sub.name):
        point = np.asarray(coords_ras[i], dtype=float)
        n = node.AddControlPoint(*(point if np.isfinite(point).all() else (0.0, 0.0, 0.0)), schema.landmarks[i].name)
        node.SetNthControlPointDescription(n, sub.name)
        if not np.isfinite(point).all():
            if to_place:
                node.UnsetNthControlPointPosition(n)
            else:
                node.SetNthControlPointPositionMissing(n)
    node.SetLocked(locked)
    node.SetDescription(sub.guideline)
    display = node.GetDisplayNode()
    display.SetSelectedColor(sub.rgb)
    display.SetColor(sub.rgb)
    if folder is not None:
        place(scene, node, folder)
    return node


def landmarks_from_markups(nodes, schema: Schema) -> np.ndarray:
    """(K, 3) RAS in schema order from markups nodes, matched by label; missing points are NaN."""
    coords = np.full((len(schema), 3), np.nan)
    for node in nodes:
        for n in range(node.GetNumberOfControlPoints()):
            index = schema.lookup(node.GetNthControlPointLabel(n))
            if index is not None and node.GetNthControlPointPositionStatus(n) == node.PositionDefined:
                node.GetNthControlPointPositionWorld(n, coords[index])
    return coords


def set_landmark_positions(nodes, schema: Schema, coords_ras: np.ndarray, indices) -> None:
    """Move the given landmarks (schema indices) of markups nodes to ``coords_ras[index]``, matched by
    label: applies an annotation fix, and undoes it with the previous positions."""
    wanted = set(int(i) for i in indices)
    for node in nodes:
        for n in range(node.GetNumberOfControlPoints()):
            index = schema.lookup(node.GetNthControlPointLabel(n))
            if index in wanted and np.isfinite(coords_ras[index]).all():
                node.SetNthControlPointPositionWorld(n, *(float(v) for v in coords_ras[index]))


def curve_points(curve_node) -> np.ndarray:
    """The (N, 3) RAS points of a markups curve as drawn (its interpolated curve, not only the control
    points): the boundary along which secondary landmarks are spaced."""
    points = curve_node.GetCurvePointsWorld()
    if points is None or points.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    return np.array([points.GetPoint(i) for i in range(points.GetNumberOfPoints())], dtype=float)


def set_curve_points(curve_node, points_ras) -> None:
    """Make a markups curve exactly the polyline through (N, 3) RAS points, in order (curve_points then
    gives them back): linear, one curve point per control point. How a saved boundary comes back."""
    points = vtk.vtkPoints()
    for point in np.asarray(points_ras, dtype=float):
        points.InsertNextPoint(*(float(v) for v in point))
    curve_node.SetCurveTypeToLinear()
    curve_node.SetNumberOfPointsPerInterpolatingSegment(1)
    curve_node.SetControlPointPositionsWorld(points)


# --------------------------------------------------------------------------------------------- ellipsoids
def ellipsoid_polydata(center, semi_axes, axes, resolution: int = 24):
    """A triangulated ellipsoid: the unit sphere scaled by the semi-axes along the axis directions
    (columns of ``axes``), centred at ``center`` (RAS)."""
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(1.0)
    sphere.SetThetaResolution(resolution)
    sphere.SetPhiResolution(resolution)
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(axes, float) @ np.diag(np.maximum(np.asarray(semi_axes, float), 1e-3))
    matrix[:3, 3] = center
    transform = vtk.vtkTransform()
    transform.SetMatrix(slicer.util.vtkMatrixFromArray(matrix))
    shaped = vtk.vtkTransformPolyDataFilter()
    shaped.SetInputConnection(sphere.GetOutputPort())
    shaped.SetTransform(transform)
    shaped.Update()
    return shaped.GetOutput()


def uncertainty_color(max_semi_axis_mm: float, flag_mm: float):
    """Green (certain) through yellow to red (at or beyond the flag threshold)."""
    t = float(np.clip(max_semi_axis_mm / max(flag_mm, 1e-6), 0.0, 1.0))
    return (min(1.0, 2 * t), min(1.0, 2 * (1 - t)), 0.0)


def add_ellipsoids(scene, schema: Schema, uncertainty, flag_mm: float, folder: int | None = None,
                   prefix: str = "") -> list:
    """One model node per landmark: its confidence ellipsoid, coloured by uncertainty."""
    nodes = []
    for i, (semi, axes) in enumerate(uncertainty.ellipsoids()):
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", f"{prefix}{schema.landmarks[i].name} ellipsoid")
        node.SetAndObservePolyData(ellipsoid_polydata(uncertainty.mean[i], semi, axes))
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetColor(uncertainty_color(semi[0], flag_mm))
        display.SetOpacity(0.5)
        display.SetVisibility2D(True)
        node.SetAttribute("LandmarkDetection.MaxSemiAxisMm", f"{semi[0]:.3f}")
        if folder is not None:
            place(scene, node, folder)
        nodes.append(node)
    return nodes


def set_visibility(nodes, visible: bool) -> None:
    for node in nodes:
        display = node.GetDisplayNode()
        if display is not None:
            display.SetVisibility(visible)


# ------------------------------------------------------------------------------------------------- tables
TABLE_COLUMNS = ("Landmark", "Sub-anatomy", "R", "A", "S", "Max semi-axis (mm)", "Flagged")


def add_results_table(scene, schema: Schema, coords_ras: np.ndarray, uncertainty=None, flag_mm: float = 5.0,
                      folder: int | None = None, name: str = "Landmarks"):
    """A table node with one row per landmark (coordinates, uncertainty), flagged rows first."""
    semi = uncertainty.max_semi_axis() if uncertainty is not None else np.full(len(schema), np.nan)
    flagged = semi > flag_mm
    order = sorted(range(len(schema)), key=lambda i: (not flagged[i], -np.nan_to_num(semi[i]), i))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = []
    for title in TABLE_COLUMNS:
        column = vtk.vtkStringArray() if title in ("Landmark", "Sub-anatomy") else (
            vtk.vtkIntArray() if title == "Flagged" else vtk.vtkDoubleArray())
        column.SetName(title)
        columns.append(column)
        table.AddColumn(column)
    for i in order:
        lm = schema.landmarks[i]
        values = (lm.name, lm.sub_anatomy, *coords_ras[i], semi[i], int(flagged[i]))
        for column, value in zip(columns, values):
            column.InsertNextValue(value)
    # Column titles as the view's header (Slicer 5.8 renamed the setter), so view rows are table rows;
    # locked: a results table is read, not edited.
    (getattr(table, "SetUseColumnTitleAsColumnHeader", None) or table.SetUseColumnNameAsColumnHeader)(True)
    table.SetLocked(True)
    table.Modified()
    if folder is not None:
        place(scene, table, folder)
    return table


def table_row(table, view_row: int) -> int:
    """The table row shown in row ``view_row`` of a (non-transposed) qMRMLTableView: without column titles as
    the header, the view's first row holds the column names."""
    titles = (getattr(table, "GetUseColumnTitleAsColumnHeader", None) or table.GetUseColumnNameAsColumnHeader)()
    return view_row if titles else view_row - 1


def table_row_landmark(table, row: int) -> str:
    return table.GetCellText(row, 0)


# ---------------------------------------------------------------------------------------------- Grad-CAM
def add_gradcam_volume(scene, cam: sitk.Image, name: str, folder: int | None = None, colormap_id: str | None = None):
    """A scalar volume node for a Grad-CAM map (the input's geometry), window set to its range."""
    node = image_to_volume(scene, cam, name)
    display = node.GetDisplayNode()
    if display is not None:
        if colormap_id and scene.GetNodeByID(colormap_id) is not None:
            display.SetAndObserveColorNodeID(colormap_id)
        values = sitk.GetArrayViewFromImage(cam)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(float(values.min()), float(max(values.max(), values.min() + 1e-6)))
    if folder is not None:
        place(scene, node, folder)
    return node


# --------------------------------------------------------------------------------------------------- planes
def add_planes(scene, planes, folder: int | None = None, prefix: str = "") -> list:
    """One markups plane node per plane of a ``planes.PlaneSet``: centred on its field of view, sized to it,
    in-plane axes as computed; red when the plane is not trustworthy. Locked: planes are results."""
    nodes = []
    for plane in planes.planes.values():
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsPlaneNode", f"{prefix}{plane.name} plane")
        node.SetSizeMode(node.SizeModeAbsolute)  # before SetSize, or the size follows the (absent) points
        centre = plane.fov_centre if plane.fov_centre is not None else plane.centre
        u, v = plane.axes
        node.SetAxesWorld(tuple(u), tuple(v), tuple(plane.normal))
        node.SetCenterWorld(tuple(float(c) for c in centre))
        if plane.fov_mm is not None:
            node.SetSize(float(plane.fov_mm[0]), float(plane.fov_mm[1]))
        trustworthy = plane.uncertainty is None or plane.uncertainty.trustworthy
        node.SetDescription(f"{plane.kind} plane from {len(plane.landmarks)} landmarks"
                            + ("" if trustworthy else f"; not trustworthy: {plane.uncertainty.reason}"))
        node.SetLocked(True)
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor((0.2, 0.8, 0.3) if trustworthy else (0.9, 0.2, 0.2))
        node.GetDisplayNode().SetOpacity(0.3)
        if folder is not None:
            place(scene, node, folder)
        nodes.append(node)
    return nodes


def add_acpc_transform(scene, frame, name: str = "AC-PC transform", folder: int | None = None):
    """A linear transform node holding subject RAS -> AC-PC RAS: placing a volume under it (or hardening
    it) shows the scan in the AC-PC aligned frame."""
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(frame.matrix))
    if folder is not None:
        place(scene, node, folder)
    return node


# Slicer's slice-view presets (vtkMRMLSliceNode::Get{Sagittal,Coronal,Axial}SliceToRASMatrix with the patient's
# right on the screen's left, the default, Slicer 5.6 to main), by the head axis (0 R, 1 A, 2 S) nearest the
# plane's normal: the head axes shown to the screen's right, upward and out of it, each as (axis, sign).
# Sagittal P, S, L; coronal L, S, A; axial L, A, S.
SLICE_PRESETS = {0: ((1, -1), (2, 1), (0, -1)), 1: ((0, -1), (2, 1), (1, 1)), 2: ((0, -1), (1, 1), (2, 1))}


def slice_frame(normal, head_axes=None) -> np.ndarray:
    """(3, 3) RAS columns: the screen's right, up and out of it, for a slice view showing the plane with
    ``normal`` as Slicer shows the preset view nearest to it (SLICE_PRESETS), turned with the head.

    ``head_axes``: rows right, anterior, superior (unit RAS; default the scanner's), e.g. planes.PlaneSet's
    head_axes. The normal's sign is the preset's; right and up are the preset's made orthogonal to it (and
    to each other). Like Slicer's, the axial frame is a mirror (right x up = -out). With the scanner's axes
    and a normal along one of them this is exactly Slicer's preset matrix."""
    axes = np.eye(3) if head_axes is None else np.asarray(head_axes, dtype=float)
    normal = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    (r, r_sign), (u, u_sign), (n, n_sign) = SLICE_PRESETS[int(np.abs(axes @ normal).argmax())]
    out = normal if normal @ axes[n] * n_sign > 0 else -normal
    right = r_sign * axes[r] - (r_sign * axes[r] @ out) * out
    right /= np.linalg.norm(right)
    up = u_sign * axes[u] - (u_sign * axes[u] @ out) * out - (u_sign * axes[u] @ right) * right
    return np.stack([right, up / np.linalg.norm(up), out], axis=1)


def reformat_slice(slice_node, centre, normal, head_axes=None) -> np.ndarray:
    """Show the plane through ``centre`` with ``normal`` (RAS) in a slice view (a vtkMRMLSliceNode) the way
    Slicer shows its own axial, sagittal and coronal views, turned with the head (slice_frame), centred on
    ``centre``. Returns the frame (columns right, up, out of the screen)."""
    frame = slice_frame(normal, head_axes)
    # set in place, then UpdateMatrices: vtkMRMLSliceNode's documented way of changing SliceToRAS
    matrix = slice_node.GetSliceToRAS()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, float(frame[row, column]))
        matrix.SetElement(row, 3, float(centre[row]))
    slice_node.UpdateMatrices()
    return frame
