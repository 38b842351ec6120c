"""GradCAMViewer: 3D Grad-CAM per landmark, to see where a landmark model looked and to compare two
models side by side. Computation runs in a separate ``PythonSlicer -m LandmarkDetectionLib gradcam``
process (a BackendJob of the shared app layer); results are cached volume nodes shown as coloured
overlays."""

from __future__ import annotations

import time
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
    modelPath: str = ""  # empty: the bundled model (str: an empty Path would show as ".")
    compareModelPath: str = ""
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
        self._job = None
        self._timer = None

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
        # The model paths are synced by hand (see onModelPathChanged): the tree is then built from the path
        # just chosen, whatever order Qt calls the slots in.
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.compareModelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.exportScreenshotButton.connect("clicked(bool)", self.onExportScreenshot)
        self.ui.exportVolumesButton.connect("clicked(bool)", self.onExportVolumes)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.setParameterNode(self.logic.getParameterNode())
        self.populateLandmarks()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def onSceneStartClose(self, caller, event) -> None:
        """The scene's nodes go away with it: so do the cached maps, positions and the focus table view."""
        self.logic.clear()
        self.ui.focusTableView.setMRMLTableNode(None)

    def onModelPathChanged(self, *_) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.modelPath = self.ui.modelPathLineEdit.currentPath
        self._parameterNode.compareModelPath = self.ui.compareModelPathLineEdit.currentPath
        self.populateLandmarks()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
        self._parameterNode = parameterNode
        if self._parameterNode:
            from LandmarkDetectionAppLib.gui import connect_parameters

            self._parameterNodeGuiTag = connect_parameters(self._parameterNode, self.ui)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self.ui.compareModelPathLineEdit.currentPath = self._parameterNode.compareModelPath
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
            self.onParametersChanged()

    def onParametersChanged(self, caller=None, event=None) -> None:
        running = self._job is not None
        self.ui.computeButton.enabled = bool(self._parameterNode.inputVolume) and not running
        self.ui.cancelButton.enabled = running
        self.showCurrent(recentre=False)  # opacity or threshold changed: keep the views where they are

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
        from LandmarkDetectionAppLib.dependencies import ensure_dependencies
        from LandmarkDetectionAppLib.gui import poll_job

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
        job = self.logic.start(self._parameterNode, todo, self.onProgress, self.onFinished)
        if not job.finished:  # a job that could not start has already reported it through onFinished
            self._job, self._timer = job, poll_job(job)
        self.onParametersChanged()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def onProgress(self, record) -> None:
        if "message" in record:
            self.ui.statusLabel.text = record["message"]

    def onFinished(self, job, outcome) -> None:
        self._job = None
        self.ui.progressBar.visible = False
        try:
            if outcome.ok:
                with slicer.util.tryWithErrorDisplay("Could not load the Grad-CAM maps."):
                    table = self.logic.finish(job)
                    self.ui.focusTableView.setMRMLTableNode(table)
                    self.ui.statusLabel.text = "Done. Click a landmark to show its map."
                    self.showCurrent()
            else:
                self.ui.statusLabel.text = f"Grad-CAM failed: {outcome.message}"
                if outcome.message != "Cancelled.":
                    slicer.util.errorDisplay(f"Grad-CAM failed:\n{outcome.message}")
        except Exception:  # noqa: BLE001 - shown by tryWithErrorDisplay; the UI must not stay stuck
            self.ui.statusLabel.text = "Could not load the Grad-CAM maps; see the Python console."
        finally:
            self.onParametersChanged()

    def currentLandmark(self):
        item = self.ui.landmarkTreeWidget.currentItem()
        return item.text(0) if item is not None and item.parent() is not None else None

    def onLandmarkChanged(self, current, previous) -> None:
        self.showCurrent()

    def showCurrent(self, recentre: bool = True) -> None:
        from GradCAMViewerLib import EMPTY_MAP_NOTE

        name = self.currentLandmark()
        if name and self._parameterNode is not None:
            self.logic.show(self._parameterNode, name, recentre)
            empty = self.logic.emptyMaps(self._parameterNode, name)
            if empty:
                self.ui.statusLabel.text = f"{name}: the map of {' and '.join(empty)} is empty: {EMPTY_MAP_NOTE}"

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

    def clear(self) -> None:
        """Forget cached maps and positions (their nodes left with the scene)."""
        from GradCAMViewerLib import CamCache

        self.cache = CamCache(slicer.mrmlScene)
        self.positions = {}

    def getParameterNode(self):
        return GradCAMViewerParameterNode(super().getParameterNode())

    def modelPaths(self, parameters) -> list[Path]:
        from LandmarkDetectionLib.resources import bundled_model_path

        paths = [Path(parameters.modelPath) if parameters.modelPath else bundled_model_path()]
        if parameters.compareModelPath:
            paths.append(Path(parameters.compareModelPath))
        return paths

    def modelLabels(self, parameters) -> list[str]:
        return [p.stem for p in self.modelPaths(parameters)]

    def schema(self, parameters):
        from LandmarkDetectionLib.modelheader import read_header  # no torch: works before dependencies
        from LandmarkDetectionLib.schema import schema_from_dict

        return schema_from_dict(read_header(self.modelPaths(parameters)[0]).schema)

    def start(self, parameters, landmarks, onProgress, onFinished, processFactory=None):
        """Compute Grad-CAM of ``landmarks`` in a BackendJob; ``onFinished(job, outcome)`` at the end."""
        import SimpleITK as sitk
        from LandmarkDetectionAppLib.job import BackendJob, TreeProcess
        from LandmarkDetectionLib.mrml import volume_to_image

        snapshot = {"inputVolume": parameters.inputVolume, "models": [str(p) for p in self.modelPaths(parameters)],
                    "labels": self.modelLabels(parameters), "landmarks": list(landmarks)}

        def arguments(job):
            models = snapshot["models"]
            selection = ["--compare", *models] if len(models) == 2 else ["--model", models[0]]
            return ["gradcam", *selection, "--input", str(job.input_path("volume")), "--output", str(job.output_dir),
                    "--landmarks", ",".join(snapshot["landmarks"])]

        def export(job):
            sitk.WriteImage(volume_to_image(snapshot["inputVolume"]), str(job.input_path("volume")), True)

        job = BackendJob(arguments, onProgress, lambda outcome: onFinished(job, outcome), snapshot,
                         processFactory or TreeProcess)
        job.start(export)
        return job

    def finish(self, job):
        """Load a finished job's maps into the cache; returns the run's focus table node."""
        import csv

        snapshot = job.parameters
        self.cache.load(job.output_dir, "volume", snapshot["labels"], snapshot["landmarks"])
        focus = job.output_dir / "volume_gradcam_focus.csv"
        for row in csv.DictReader(focus.open(encoding="utf-8")):
            self.positions[row["landmark"]] = [float(row[k]) for k in ("x", "y", "z")]
        return self.cache.focus_tables.get("volume")

    def show(self, parameters, landmark: str, recentre: bool = True) -> None:
        """Cached maps of ``landmark``: one model in every slice view, or two side by side in linked views
        (both views axial, so the same anatomy faces the same way); ``recentre`` jumps to the landmark."""
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
                layout.sliceWidget(view).mrmlSliceNode().SetOrientation("Axial")
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
            if recentre:
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

    def emptyMaps(self, parameters, landmark: str) -> list[str]:
        """The model labels whose cached map of ``landmark`` holds no positive evidence."""
        from GradCAMViewerLib import has_evidence

        labels = self.modelLabels(parameters)
        nodes = [self.cache.get(label, landmark) for label in labels]
        return [label for label, node in zip(labels, nodes) if node is not None and not has_evidence(node)]

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
        from LandmarkDetectionAppLib.dependencies import dependencies_missing

        if dependencies_missing():
            self.delayDisplay(f"Skipped: missing Python packages {dependencies_missing()}")
            return
        import LandmarkDetection

        logic = GradCAMViewerLogic()
        parameters = logic.getParameterNode()
        parameters.inputVolume = LandmarkDetection.LandmarkDetectionLogic().loadSample()
        outcomes = []

        def finished(job, outcome):
            outcomes.append(outcome)
            if outcome.ok:
                logic.finish(job)

        job = logic.start(parameters, ["AC", "PC"], lambda record: None, finished)
        while not job.finished:
            job.poll()
            time.sleep(0.1)
        self.assertTrue(outcomes[0].ok, outcomes[0].message)
        logic.show(parameters, "AC")
        self.assertIsNotNone(logic.cache.get(logic.modelLabels(parameters)[0], "PC"))
        self.delayDisplay("Grad-CAM computed and shown for AC and PC")
