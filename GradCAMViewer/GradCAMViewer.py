"""GradCAMViewer: 3D Grad-CAM per landmark, to see where a landmark model looked and to compare two
models side by side. Computation runs in a separate ``PythonSlicer -m LandmarkDetectionLib gradcam``
process; results are cached volume nodes shown as coloured overlays."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin
from typing import Annotated


class GradCAMViewer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Grad-CAM Viewer"
        self.parent.categories = ["Landmark Detection"]
        self.parent.dependencies = ["LandmarkDetection"]
        self.parent.contributors = ["The LandmarkDetection developers"]
        self.parent.helpText = (
            "Compute 3D Grad-CAM maps per landmark (Patel et al.) and show them as coloured overlays, to see "
            "where a model looked. Two models are compared side by side in linked views, with focus metrics "
            "(CAM mass near the landmark, centre-of-mass distance, overlap between landmarks).")
        self.parent.acknowledgementText = "Grad-CAM: Selvaraju et al.; 3D landmark use: Patel et al."


@parameterNodeWrapper
class GradCAMViewerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: Path = Path()
    compareModelPath: Path = Path()
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 0.95)] = 0.2
    volumeRendering: bool = False


class GradCAMViewerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GradCAMViewer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GradCAMViewerLogic()
        self.ui.computeButton.connect("clicked(bool)", self.onCompute)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.landmarkTreeWidget.connect("currentItemChanged(QTreeWidgetItem*,QTreeWidgetItem*)", self.onLandmarkChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.populateLandmarks)
        self.ui.exportScreenshotButton.connect("clicked(bool)", self.onExportScreenshot)
        self.ui.exportVolumesButton.connect("clicked(bool)", self.onExportVolumes)
        self.setParameterNode(self.logic.getParameterNode())
        self.populateLandmarks()

    def cleanup(self) -> None:
        if self._process is not None:
            self._process.cancel()
        self.removeObservers()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
            self.onParametersChanged()

    def onParametersChanged(self, caller=None, event=None) -> None:
        running = self._process is not None
        self.ui.computeButton.enabled = bool(self._parameterNode.inputVolume) and not running
        self.ui.cancelButton.enabled = running
        self.showCurrent()

    def populateLandmarks(self, *_):
        """Landmarks of the model's schema, grouped by sub-anatomy, checkable."""
        tree = self.ui.landmarkTreeWidget
        tree.clear()
        try:
            schema = self.logic.schema(self._parameterNode)
        except Exception as error:  # an unreadable model file: say so, keep the tree empty
            self.ui.statusLabel.text = str(error)
            return
        for sub in schema.sub_anatomies:
            group = qt.QTreeWidgetItem(tree, [sub.name])
            group.setFlags(group.flags() | qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsAutoTristate)
            group.setCheckState(0, qt.Qt.Unchecked)
            for i in schema.indices_of(sub.name):
                item = qt.QTreeWidgetItem(group, [schema.landmarks[i].name])
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(0, qt.Qt.Unchecked)
                item.setToolTip(0, schema.landmarks[i].definition)

    def checkedLandmarks(self) -> list[str]:
        tree, names = self.ui.landmarkTreeWidget, []
        for g in range(tree.topLevelItemCount):
            group = tree.topLevelItem(g)
            names += [group.child(c).text(0) for c in range(group.childCount())
                      if group.child(c).checkState(0) == qt.Qt.Checked]
        return names

    def onCompute(self) -> None:
        from LandmarkDetectionGUI import ensure_dependencies

        landmarks = self.checkedLandmarks()
        if not landmarks and self.currentLandmark():
            landmarks = [self.currentLandmark()]
        if not landmarks:
            slicer.util.warningDisplay("Check the landmarks to compute (or select one).")
            return
        if not ensure_dependencies():
            return
        todo = self.logic.cache.missing(self.logic.modelLabels(self._parameterNode), landmarks)
        if not todo:
            self.showCurrent()
            return
        self.ui.progressBar.visible = True
        self.ui.progressBar.maximum = 0  # busy
        self.ui.statusLabel.text = f"Computing Grad-CAM for {len(todo)} landmark(s)..."
        self._process = self.logic.start(self._parameterNode, todo, self.onProgress, self.onFinished)
        self.onParametersChanged()

    def onCancel(self) -> None:
        if self._process is not None:
            self._process.cancel()

    def onProgress(self, record) -> None:
        if "message" in record:
            self.ui.statusLabel.text = record["message"]

    def onFinished(self, ok: bool, message: str) -> None:
        process, self._process = self._process, None
        self.ui.progressBar.visible = False
        try:
            if ok:
                self.logic.finish(process, self._parameterNode)
                self.ui.focusTableView.setMRMLTableNode(self.logic.cache.focus_tables.get(process.stem))
                self.ui.statusLabel.text = "Done. Click a landmark to show its map."
                self.showCurrent()
            else:
                self.ui.statusLabel.text = f"Grad-CAM failed: {message}"
                if message != "Cancelled.":
                    slicer.util.errorDisplay(f"Grad-CAM failed:\n{message}")
        finally:
            self.logic.cleanup(process)
            self.onParametersChanged()

    def currentLandmark(self):
        item = self.ui.landmarkTreeWidget.currentItem()
        return item.text(0) if item is not None and item.parent() is not None else None

    def onLandmarkChanged(self, current, previous) -> None:
        self.showCurrent()

    def showCurrent(self) -> None:
        name = self.currentLandmark()
        if name and self._parameterNode is not None:
            self.logic.show(self._parameterNode, name)

    def onExportScreenshot(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Save screenshot", "gradcam.png", "PNG (*.png)")
        if path:
            slicer.util.forceRenderAllViews()
            slicer.app.layoutManager().viewport().grab().save(path)

    def onExportVolumes(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Save Grad-CAM volumes to folder")
        if folder:
            with slicer.util.tryWithErrorDisplay("Saving failed.", waitCursor=True):
                paths = self.logic.exportVolumes(Path(folder))
                self.ui.statusLabel.text = f"Saved {len(paths)} volume(s) to {folder}"


class GradCAMViewerLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from GradCAMViewerLib import CamCache

        self.cache = CamCache(slicer.mrmlScene)
        self.positions = {}

    def getParameterNode(self):
        return GradCAMViewerParameterNode(super().getParameterNode())

    @staticmethod
    def _path(value):
        return Path(value) if value and str(value) not in ("", ".") else None

    def modelPaths(self, parameters) -> list[Path]:
        from LandmarkDetectionLib.resources import bundled_model_path

        paths = [self._path(parameters.modelPath) or bundled_model_path()]
        if self._path(parameters.compareModelPath):
            paths.append(self._path(parameters.compareModelPath))
        return paths

    def modelLabels(self, parameters) -> list[str]:
        return [p.stem for p in self.modelPaths(parameters)]

    def schema(self, parameters):
        from LandmarkDetectionLib.modelheader import read_header  # no torch: works before dependencies
        from LandmarkDetectionLib.schema import schema_from_dict

        return schema_from_dict(read_header(self.modelPaths(parameters)[0]).schema)

    def start(self, parameters, landmarks, onProgress, onFinished):
        import SimpleITK as sitk
        from LandmarkDetectionGUI import BackendProcess
        from LandmarkDetectionLib.mrml import volume_to_image

        work = Path(tempfile.mkdtemp(prefix="GradCAMViewer-"))
        stem = "volume"
        sitk.WriteImage(volume_to_image(parameters.inputVolume), str(work / f"{stem}.nrrd"), True)
        models = [str(p) for p in self.modelPaths(parameters)]
        selection = ["--compare", *models] if len(models) == 2 else ["--model", models[0]]
        arguments = ["gradcam", *selection, "--input", str(work / f"{stem}.nrrd"), "--output", str(work / "out"),
                     "--landmarks", ",".join(landmarks)]
        process = BackendProcess(arguments, onProgress, onFinished)
        process.work, process.stem, process.landmarks = work, stem, landmarks
        process.start()
        return process

    def finish(self, process, parameters) -> None:
        import csv

        self.cache.load(process.work / "out", process.stem, self.modelLabels(parameters), process.landmarks)
        focus = process.work / "out" / f"{process.stem}_gradcam_focus.csv"
        for row in csv.DictReader(focus.open(encoding="utf-8")):
            self.positions[row["landmark"]] = [float(row[k]) for k in ("x", "y", "z")]

    def cleanup(self, process) -> None:
        if process is not None:
            shutil.rmtree(process.work, ignore_errors=True)

    def show(self, parameters, landmark: str) -> None:
        """Cached maps of ``landmark``: one model in every slice view, or two side by side in linked views."""
        from GradCAMViewerLib import configure_overlay, landmark_marker

        labels = self.modelLabels(parameters)
        nodes = [self.cache.get(label, landmark) for label in labels]
        if any(node is None for node in nodes):
            return
        for node in nodes:
            configure_overlay(node, parameters.opacity, parameters.threshold)
        layout = slicer.app.layoutManager()
        if len(nodes) == 2:
            layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
            for view, node in zip(("Red", "Yellow"), nodes):
                composite = layout.sliceWidget(view).sliceLogic().GetSliceCompositeNode()
                composite.SetBackgroundVolumeID(parameters.inputVolume.GetID())
                composite.SetForegroundVolumeID(node.GetID())
                composite.SetForegroundOpacity(parameters.opacity)
                composite.SetLinkedControl(True)
        else:
            slicer.util.setSliceViewerLayers(background=parameters.inputVolume, foreground=nodes[0],
                                             foregroundOpacity=parameters.opacity)
        if landmark in self.positions:
            landmark_marker(slicer.mrmlScene, landmark, self.positions[landmark])
            slicer.modules.markups.logic().JumpSlicesToLocation(*self.positions[landmark], True)
        rendering = slicer.modules.volumerendering.logic()
        for node in self.cache.nodes.values():
            display = rendering.GetFirstVolumeRenderingDisplayNode(node)
            if display is not None:
                display.SetVisibility(False)
        if parameters.volumeRendering:
            display = rendering.GetFirstVolumeRenderingDisplayNode(nodes[0]) or \
                rendering.CreateDefaultVolumeRenderingNodes(nodes[0])
            display.SetVisibility(True)

    def exportVolumes(self, folder: Path) -> list[Path]:
        paths = []
        for (label, name), node in self.cache.nodes.items():
            path = folder / f"{label}_{name}_gradcam.nii.gz"
            if slicer.util.saveNode(node, str(path)):
                paths.append(path)
        return paths


class GradCAMViewerTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_ComputeAndShow()

    def test_ComputeAndShow(self):
        from LandmarkDetectionGUI import backend_command, dependencies_missing

        if dependencies_missing():
            self.delayDisplay(f"Skipped: missing Python packages {dependencies_missing()}")
            return
        import subprocess

        import LandmarkDetection

        logic = GradCAMViewerLogic()
        parameters = logic.getParameterNode()
        parameters.inputVolume = LandmarkDetection.LandmarkDetectionLogic().loadSample()
        work = Path(tempfile.mkdtemp())
        import SimpleITK as sitk
        from LandmarkDetectionLib.mrml import volume_to_image

        sitk.WriteImage(volume_to_image(parameters.inputVolume), str(work / "volume.nrrd"))
        result = subprocess.run(backend_command("gradcam", "--model", str(logic.modelPaths(parameters)[0]), "--input",
                                                str(work / "volume.nrrd"), "--output", str(work / "out"),
                                                "--landmarks", "AC,PC"), capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)

        class Finished:
            pass

        process = Finished()
        process.work, process.stem, process.landmarks = work, "volume", ["AC", "PC"]
        logic.finish(process, parameters)
        logic.show(parameters, "AC")
        self.assertIsNotNone(logic.cache.get(logic.modelLabels(parameters)[0], "PC"))
        shutil.rmtree(work, ignore_errors=True)
        self.delayDisplay("Grad-CAM computed and shown for AC and PC")
