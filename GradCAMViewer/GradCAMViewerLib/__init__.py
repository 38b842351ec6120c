"""The GradCAMViewer module's scene logic, free of Qt so it is tested against real MRML (slicer-core):
reading the ``gradcam`` command's output into cached volume nodes, overlay display settings, the
landmark marker and the focus table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LandmarkDetectionLib import mrml
from LandmarkDetectionLib.fileio import safe_name  # the file-name form the gradcam command writes


class CamCache:
    """Grad-CAM volume nodes by (model label, landmark name): switching landmarks reuses them."""

    def __init__(self, scene):
        self.scene = scene
        self.nodes: dict[tuple[str, str], object] = {}
        self.focus_tables: dict[str, object] = {}

    def get(self, label: str, landmark: str):
        return self.nodes.get((label, landmark))

    def missing(self, labels, landmarks) -> list[str]:
        """Landmarks not yet computed for every one of the models."""
        return [name for name in landmarks if any((label, name) not in self.nodes for label in labels)]

    def load(self, output_dir: Path, stem: str, labels: list[str], landmarks: list[str], folder=None) -> list:
        """Read the CAM files of ``landmarks`` (one model: STEM_gradcam_NAME; two: STEM_modelA_gradcam_NAME
        and STEM_modelB_...) into volume nodes. Everything is read before any node is added."""
        images = {}
        for index, label in enumerate(labels):
            prefix = stem if len(labels) == 1 else f"{stem}_model{'AB'[index]}"
            for name in landmarks:
                path = Path(output_dir) / f"{prefix}_gradcam_{safe_name(name)}.nii.gz"
                if not path.exists():
                    raise FileNotFoundError(f"{path}: the gradcam command did not write it")
                images[(label, name)] = sitk.ReadImage(str(path), sitk.sitkFloat32)
        added = []
        for (label, name), image in images.items():
            old = self.nodes.pop((label, name), None)
            if old is not None:
                self.scene.RemoveNode(old)
            node = mrml.add_gradcam_volume(self.scene, image, f"{name} Grad-CAM ({label})", folder,
                                           "vtkMRMLColorTableNodeFileInferno.txt")
            node.SetAttribute("GradCAMViewer.Model", label)
            node.SetAttribute("GradCAMViewer.Landmark", name)
            self.nodes[(label, name)] = node
            added.append(node)
        focus = Path(output_dir) / f"{stem}_gradcam_focus.csv"
        if focus.exists():  # one focus table per volume, replaced by each run (not one more per run)
            old = self.focus_tables.pop(stem, None)
            if old is not None and self.scene.IsNodePresent(old):
                self.scene.RemoveNode(old)
            self.focus_tables[stem] = focus_table(self.scene, focus, folder)
        return added


def has_evidence(node) -> bool:
    """Whether a Grad-CAM map holds any positive value: Grad-CAM keeps only what raises the landmark's
    heatmap peak, so a network that finds a landmark by what it is not can leave its map empty."""
    values = mrml.volume_to_image(node)  # kept alive: an array view of a temporary image reads freed memory
    return float(sitk.GetArrayViewFromImage(values).max()) > 0


EMPTY_MAP_NOTE = ("no positive evidence at this layer (Grad-CAM keeps only what raises the landmark's heatmap "
                  "peak); 'landmark-detection gradcam --target coordinate' shows what moves it either way")


def configure_overlay(node, opacity: float, threshold: float) -> None:
    """Show values above ``threshold`` (a fraction of the map's maximum) in the node's colour map."""
    display = node.GetDisplayNode()
    values = mrml.volume_to_image(node)
    top = float(sitk.GetArrayViewFromImage(values).max()) or 1.0
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(threshold * top)
    display.SetUpperThreshold(top)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(threshold * top, top)
    node.SetAttribute("GradCAMViewer.Opacity", f"{opacity:.3f}")


def landmark_marker(scene, name: str, ras, folder=None):
    """A single locked point showing where the model put the landmark."""
    node = scene.GetFirstNodeByName("Grad-CAM landmark") or scene.AddNewNodeByClass(
        "vtkMRMLMarkupsFiducialNode", "Grad-CAM landmark")
    node.RemoveAllControlPoints()
    node.AddControlPoint(*np.asarray(ras, dtype=float), name)
    node.SetLocked(True)
    if folder is not None:
        mrml.place(scene, node, folder)
    return node


def focus_table(scene, csv_path: Path, folder=None):
    """The focus metrics CSV of the gradcam command as a table node. A column with an empty map's missing
    centre (NaN in the CSV) shows the word "empty" there, as the command's printed table does."""
    import vtk

    rows = list(csv.DictReader(Path(csv_path).open(encoding="utf-8")))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "Grad-CAM focus")
    for column_name in rows[0].keys():
        numeric = column_name not in ("landmark", "sub_anatomy") and not column_name.startswith("max_overlap_with")
        values = [float(row[column_name]) if numeric else row[column_name] for row in rows]
        if numeric and any(np.isnan(values)):
            numeric, values = False, ["empty" if np.isnan(v) else row[column_name] for v, row in zip(values, rows)]
        column = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        column.SetName(column_name)
        for value in values:
            column.InsertNextValue(value)
        table.AddColumn(column)
    if folder is not None:
        mrml.place(scene, table, folder)
    return table
