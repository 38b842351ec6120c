"""LandmarkDetection: one-click detection of every landmark of a loaded MRI volume, with uncertainty
ellipsoids, in 3D Slicer. The widget is thin; the Logic works without a GUI; the heavy lifting runs in a
separate ``PythonSlicer -m LandmarkDetectionLib detect`` process so the GUI never freezes."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

SAMPLE_NAME = "MNI152NLin2009cAsym_AFIDs"


class LandmarkDetection(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Landmark Detection"
        self.parent.categories = ["Landmark Detection"]
        self.parent.dependencies = []
        self.parent.contributors = ["The LandmarkDetection developers"]
        self.parent.helpText = (
            "Detect anatomical landmarks of a brain MRI in one click, each with a confidence ellipsoid from "
            "test-time noise injection. Results go into a subject-hierarchy folder under the volume's study: one "
            "point list per sub-anatomy (locked; unlock to correct), ellipsoid models, and a table with flagged "
            "landmarks first. Research use only.")
        self.parent.acknowledgementText = (
            "Methods: Patel et al. (88 landmarks, HighRes3DNet, realistic MRI augmentation, Grad-CAM); Ma, Gupta "
            "and Sabuncu (multi-scale Loc-Net, test-time noise injection). Sample: MNI ICBM 2009c template "
            "(McConnell Brain Imaging Centre) with AFIDs annotations (CC-BY-4.0) from the autoafids wheel.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the sample brain in the SampleData module, checked by the same SHA-256 as the backend's.
    The file is fetched with pip into the backend's cache; SampleData copies it from there."""
    import SampleData

    from LandmarkDetectionLib.sample_data import cache_dir, manifest

    member, digest = manifest()["files"]["t1w"]
    name = Path(member).name
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Landmark Detection", sampleName=SAMPLE_NAME,
        thumbnailFileName=str(Path(__file__).parent / "Resources" / "Icons" / "LandmarkDetection.png"),
        uris=(cache_dir() / "sample" / name).as_uri(), fileNames=name, nodeNames=SAMPLE_NAME,
        checksums=f"SHA256:{digest}")


@parameterNodeWrapper
class LandmarkDetectionParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: Path = Path()  # empty: the bundled demo model
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    uncertaintyPasses: Annotated[int, WithinRange(0, 1000)] = 50
    confidenceLevel: Annotated[float, WithinRange(0.5, 0.999)] = 0.9
    flagThresholdMm: Annotated[float, WithinRange(0.1, 100.0)] = 5.0
    showEllipsoids: bool = True


@dataclass
class DetectionResults:
    folder: int
    markups: list = field(default_factory=list)
    ellipsoids: list = field(default_factory=list)
    table: Optional[object] = None
    planes: Optional[object] = None  # planes.PlaneSet computed from the landmarks
    planeNodes: list = field(default_factory=list)
    acpcTransform: Optional[object] = None  # subject -> AC-PC transform node, for the user to apply


class LandmarkDetectionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None
        self._results = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LandmarkDetection.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LandmarkDetectionLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.showEllipsoidsCheckBox.connect("toggled(bool)", self.onShowEllipsoids)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onTableClicked)
        self.ui.reformatButton.connect("clicked(bool)", self.onReformat)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._process is not None:
            self._process.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)
            self._checkCanDetect()

    def _checkCanDetect(self, caller=None, event=None) -> None:
        running = self._process is not None
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.detectButton.enabled = ready and not running
        self.ui.detectButton.toolTip = "Detect every landmark of the input volume." if ready else "Select an input volume."
        self.ui.cancelButton.enabled = running

    # -- actions
    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not load the sample brain.", waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadSample()

    def onDetect(self) -> None:
        from LandmarkDetectionGUI import ensure_dependencies

        if not ensure_dependencies():
            return
        parameters = self._parameterNode
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Detecting..."
        self._process = self.logic.startDetection(parameters, self.onProgress, self.onFinished)
        self._checkCanDetect()

    def onCancel(self) -> None:
        if self._process is not None:
            self._process.cancel()

    def onProgress(self, record: dict) -> None:
        if "message" in record:
            self.ui.statusLabel.text = record["message"]
        elif record.get("total"):
            self.ui.progressBar.maximum = int(record["total"])
            self.ui.progressBar.value = int(record["step"])
        slicer.app.processEvents()

    def onFinished(self, ok: bool, message: str) -> None:
        process, self._process = self._process, None
        self.ui.progressBar.visible = False
        try:
            if ok:
                self._results = self.logic.finishDetection(process, self._parameterNode)
                self.ui.resultsTableView.setMRMLTableNode(self._results.table)
                self.ui.exportButton.enabled = True
                self.ui.planeComboBox.clear()
                for name in (self._results.planes.planes if self._results.planes else {}):
                    self.ui.planeComboBox.addItem(name)
                self.ui.planeComboBox.enabled = self.ui.reformatButton.enabled = self.ui.planeComboBox.count > 0
                flagged = sum(1 for i in range(self._results.table.GetNumberOfRows())
                              if self._results.table.GetCellText(i, 6) == "1")
                self.ui.statusLabel.text = (f"Detected {self._results.table.GetNumberOfRows()} landmarks; "
                                            f"{flagged} flagged as uncertain.")
            else:
                self.ui.statusLabel.text = f"Detection failed: {message}"
                if message != "Cancelled.":
                    logging.error("LandmarkDetection: %s", message)
                    slicer.util.errorDisplay(f"Landmark detection failed:\n{message}")
        except Exception as error:  # reading results failed: report it, the scene stays as it was
            logging.exception("LandmarkDetection: loading results failed")
            slicer.util.errorDisplay(f"Could not load the detection results:\n{error}")
        finally:
            self.logic.cleanup(process)
            self._checkCanDetect()

    def onShowEllipsoids(self, visible: bool) -> None:
        if self._results is not None:
            from LandmarkDetectionLib.mrml import set_visibility

            set_visibility(self._results.ellipsoids, visible)

    def onTableClicked(self, index) -> None:
        if self._results is None:
            return
        table = self._results.table
        r, a, s = (float(table.GetCellText(index.row(), column)) for column in (2, 3, 4))
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)

    def onReformat(self) -> None:
        if self._results is None or self._results.planes is None:
            return
        plane = self._results.planes.planes.get(self.ui.planeComboBox.currentText)
        if plane is None:
            return
        from LandmarkDetectionLib.mrml import reformat_slice

        for name in ("Red", "Yellow", "Green"):
            widget = slicer.app.layoutManager().sliceWidget(name)
            if widget is not None:
                reformat_slice(widget.mrmlSliceNode(), plane)

    def onExport(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, "Export landmarks to folder")
        if folder and self._results is not None:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                paths = self.logic.exportLandmarks(self._results, self._parameterNode, Path(folder))
                self.ui.statusLabel.text = f"Exported {', '.join(p.name for p in paths)} to {folder}"


class LandmarkDetectionLogic(ScriptedLoadableModuleLogic):
    """Works without the GUI: the widget, the self-test and scripts use the same steps."""

    def getParameterNode(self):
        return LandmarkDetectionParameterNode(super().getParameterNode())

    @staticmethod
    def modelPath(parameters) -> Path:
        from LandmarkDetectionLib.resources import bundled_model_path

        path = Path(parameters.modelPath) if parameters.modelPath and str(parameters.modelPath) not in ("", ".") else None
        return path or bundled_model_path()

    def loadSample(self):
        """Fetch the sample brain (pip, SHA-256 checked) and load it through the SampleData module."""
        import SampleData

        from LandmarkDetectionLib.sample_data import fetch_sample

        fetch_sample()
        registerSampleData()
        return SampleData.downloadSample(SAMPLE_NAME)

    def detectionArguments(self, parameters, inputPath: Path, outputDir: Path) -> list[str]:
        return ["detect", "--model", str(self.modelPath(parameters)), "--input", str(inputPath), "--output",
                str(outputDir), "--device", parameters.device, "--uncertainty", str(parameters.uncertaintyPasses),
                "--level", str(parameters.confidenceLevel), "--flag-mm", str(parameters.flagThresholdMm)]

    def _prepare(self, volumeNode):
        """Write the volume (with its world geometry) to a temporary folder for the backend process."""
        import SimpleITK as sitk

        from LandmarkDetectionLib.mrml import volume_to_image

        work = Path(tempfile.mkdtemp(prefix="LandmarkDetection-"))
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in volumeNode.GetName()) or "volume"
        inputPath = work / f"{name}.nrrd"
        sitk.WriteImage(volume_to_image(volumeNode), str(inputPath), True)
        return work, inputPath

    def startDetection(self, parameters, onProgress, onFinished):
        """Start detection in a separate process (GUI use); returns the process, which ``cancel()`` stops."""
        from LandmarkDetectionGUI import BackendProcess

        work, inputPath = self._prepare(parameters.inputVolume)
        process = BackendProcess(self.detectionArguments(parameters, inputPath, work / "out"), onProgress, onFinished)
        process.work, process.inputPath = work, inputPath
        process.start()
        return process

    def runDetection(self, parameters) -> DetectionResults:
        """The same detection, blocking (self-test, scripts)."""
        from LandmarkDetectionGUI import backend_command

        work, inputPath = self._prepare(parameters.inputVolume)
        try:
            result = subprocess.run(backend_command(*self.detectionArguments(parameters, inputPath, work / "out")),
                                    capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])})
            if result.returncode != 0:
                raise RuntimeError((result.stderr.strip().splitlines() or ["detection failed"])[-1])
            return self.loadResults(parameters, work / "out", inputPath.name[: -len(".nrrd")])
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def finishDetection(self, process, parameters) -> DetectionResults:
        return self.loadResults(parameters, process.work / "out", process.inputPath.name[: -len(".nrrd")])

    def cleanup(self, process) -> None:
        if process is not None and getattr(process, "work", None):
            shutil.rmtree(process.work, ignore_errors=True)

    def loadResults(self, parameters, outputDir: Path, name: str) -> DetectionResults:
        """Read everything first, then add nodes: a failure leaves the scene unchanged."""
        from LandmarkDetectionLib import mrml
        from LandmarkDetectionLib.fileio import read_landmarks
        from LandmarkDetectionLib.modelheader import read_header
        from LandmarkDetectionLib.schema import schema_from_dict

        schema = schema_from_dict(read_header(self.modelPath(parameters)).schema)
        coords = read_landmarks(outputDir / f"{name}.mrk.json", schema)
        uncertainty = None
        if (outputDir / f"{name}.uncertainty.json").exists():
            from LandmarkDetectionLib.uncertainty import read_uncertainty

            uncertainty, _ = read_uncertainty(outputDir / f"{name}.uncertainty.json")
        volume = parameters.inputVolume
        scene = volume.GetScene()
        folder = mrml.results_folder(scene, volume, f"{volume.GetName()} landmarks")
        results = DetectionResults(folder)
        results.markups = mrml.add_landmarks(scene, schema, coords, folder, prefix=f"{volume.GetName()} ")
        if uncertainty is not None:
            results.ellipsoids = mrml.add_ellipsoids(scene, schema, uncertainty, parameters.flagThresholdMm, folder,
                                                     prefix=f"{volume.GetName()} ")
            mrml.set_visibility(results.ellipsoids, parameters.showEllipsoids)
        results.table = mrml.add_results_table(scene, schema, coords, uncertainty, parameters.flagThresholdMm, folder,
                                               f"{volume.GetName()} landmarks")
        results.schema = schema
        self.addPlanes(results, schema, coords, uncertainty, volume)
        return results

    @staticmethod
    def addPlanes(results: DetectionResults, schema, coords, uncertainty, volume) -> None:
        """Planes from the landmarks (uncertainty from their covariance): plane nodes and, where the schema
        names AC and PC, the AC-PC transform node. A schema that declares no planes gets none."""
        from LandmarkDetectionLib import mrml
        from LandmarkDetectionLib.planes import compute_planes

        if schema.planes is None:
            return
        covariance = uncertainty.covariance if uncertainty is not None else None
        results.planes = compute_planes(schema, coords, covariance)
        scene = volume.GetScene()
        results.planeNodes = mrml.add_planes(scene, results.planes, results.folder, prefix=f"{volume.GetName()} ")
        if results.planes.acpc is not None:
            results.acpcTransform = mrml.add_acpc_transform(scene, results.planes.acpc,
                                                            f"{volume.GetName()} to AC-PC", results.folder)

    def exportLandmarks(self, results: DetectionResults, parameters, folder: Path) -> list[Path]:
        """The current (possibly corrected) landmark positions as .mrk.json and CSV."""
        from LandmarkDetectionLib.fileio import atomic_write_text, landmarks_csv_text, write_markups_json
        from LandmarkDetectionLib.mrml import landmarks_from_markups

        coords = landmarks_from_markups(results.markups, results.schema)
        name = parameters.inputVolume.GetName()
        paths = [folder / f"{name}.mrk.json", folder / f"{name}.csv"]
        for path in paths:
            if path.exists() and not slicer.util.confirmOkCancelDisplay(f"{path} exists. Replace it?"):
                return []
        write_markups_json(paths[0], results.schema, coords, name=f"{name} landmarks")
        atomic_write_text(paths[1], landmarks_csv_text(results.schema, coords))
        return paths


class LandmarkDetectionTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: loads the sample brain and detects its AFIDs with the bundled demo model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectSampleBrain()

    def test_DetectSampleBrain(self):
        from LandmarkDetectionGUI import dependencies_missing

        if dependencies_missing():
            self.delayDisplay(f"Skipped: missing Python packages {dependencies_missing()}")
            return
        logic = LandmarkDetectionLogic()
        parameters = logic.getParameterNode()
        parameters.inputVolume = logic.loadSample()
        parameters.uncertaintyPasses = 10
        results = logic.runDetection(parameters)
        points = sum(node.GetNumberOfControlPoints() for node in results.markups)
        self.assertEqual(points, 32)
        self.assertEqual(results.table.GetNumberOfRows(), 32)
        self.assertEqual(len(results.ellipsoids), 32)
        from LandmarkDetectionLib.fileio import read_landmarks
        from LandmarkDetectionLib.metrics import radial_errors
        from LandmarkDetectionLib.mrml import landmarks_from_markups
        from LandmarkDetectionLib.sample_data import fetch_sample

        truth = read_landmarks(fetch_sample().afids, results.schema)
        error = radial_errors(landmarks_from_markups(results.markups, results.schema), truth).mean()
        self.assertLess(error, 5.0)
        self.delayDisplay(f"Detected 32 AFIDs on the sample brain, mean radial error {error:.2f} mm")
