"""LandmarkDetection: one-click detection of every landmark of a loaded MRI volume, with uncertainty
ellipsoids and scan planes, in 3D Slicer. The widget is thin; the Logic works without a GUI; the heavy
lifting runs in a separate ``PythonSlicer -m LandmarkDetectionLib detect`` process (a BackendJob of the
shared app layer, LandmarkDetectionAppLib) so the GUI never freezes."""

from __future__ import annotations

import logging
import time
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
OTHER_MODEL = "Other file..."  # the model list's last item: any model file, chosen by path
PATH_DELAY_MS = 800  # the models-folder field is read once typing pauses


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
    """Register the sample brain in the Sample Data module. Its button downloads through the backend's
    fetch (pip, SHA-256 checked), so it works before 'Load sample' was ever clicked. Imports nothing
    heavy (no SimpleITK, no torch): this runs at every Slicer start."""
    import SampleData

    from LandmarkDetectionLib.sample_data import cache_dir, manifest

    member, digest = manifest()["files"]["t1w"]
    name = Path(member).name
    # uris and fileNames are required by SampleDataSource even with a custom downloader (Slicer 5.6-main).
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="Landmark Detection", sampleName=SAMPLE_NAME, customDownloader=_sampleDataButton,
        thumbnailFileName=str(Path(__file__).parent / "Resources" / "Icons" / "LandmarkDetection.png"),
        uris=(cache_dir() / "sample" / name).as_uri(), fileNames=name, nodeNames=SAMPLE_NAME,
        checksums=f"SHA256:{digest}")


def downloadSample():
    """Fetch the sample T1w template (cached after the first time) and load it as a volume node."""
    from LandmarkDetectionLib.sample_data import fetch_sample

    node = slicer.util.loadVolume(str(fetch_sample().t1w))
    node.SetName(SAMPLE_NAME)
    return node


def _sampleDataButton(source):
    """The Sample Data module's button (it calls its custom downloader with the source)."""
    with slicer.util.tryWithErrorDisplay("Could not download the sample brain.", waitCursor=True):
        downloadSample()


@parameterNodeWrapper
class LandmarkDetectionParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: str = ""  # empty: the bundled model (a str: an empty Path would show as "." in the GUI)
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
    volume: Optional[object] = None  # the volume node the landmarks belong to
    schema: Optional[object] = None


class LandmarkDetectionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = None
        self._modelsFolderTimer = None
        self._results = None
        self._models = []  # training.ModelEntry of the model list, in its order (then OTHER_MODEL)
        self._modelShown = None  # the parameter node's modelPath the model list shows (or the GUI wrote)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LandmarkDetection.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LandmarkDetectionLogic()

        from LandmarkDetectionAppLib.gui import single_shot_timer

        self._modelsFolderTimer = single_shot_timer(PATH_DELAY_MS, self.onModelsFolderChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.showEllipsoidsCheckBox.connect("toggled(bool)", self.onShowEllipsoids)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onTableClicked)
        self.ui.reformatButton.connect("clicked(bool)", self.onReformat)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        # A ctkPathLineEdit says currentPathChanged only for acceptable text, never when it is emptied:
        # validInputChanged too, and the fields are read again before they are used.
        for signal in ("currentPathChanged(QString)", "validInputChanged(bool)"):
            self.ui.modelPathLineEdit.connect(signal, self.onModelPathChanged)
            self.ui.modelsFolderLineEdit.connect(signal, self.onModelsFolderEdited)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onModelsFolderChanged)
        self.refreshModels()
        self.showModelsFolder()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """The widget goes away (module reload, Slicer closing): nothing of it may run afterwards."""
        for timer in (self._timer, self._modelsFolderTimer):
            if timer is not None:
                timer.stop()
        if self._job is not None:
            self._job.abandon()
            self._job = None
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.refreshModels()  # a model trained or installed meanwhile appears
        self.showModelsFolder()
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()  # its results would go to a volume the close removes
        self.setParameterNode(None)
        self._results = None
        self.ui.planeComboBox.clear()
        self.ui.planeComboBox.enabled = self.ui.reformatButton.enabled = self.ui.exportButton.enabled = False

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from LandmarkDetectionLib.mrml import first_scalar_volume

        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = first_scalar_volume(slicer.mrmlScene)
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        """Connect the GUI to a parameter node once, and again only when the node changes (entering the
        module gives a new wrapper of the same node: connecting it would leak an observer before 5.12)."""
        from LandmarkDetectionAppLib.gui import connect_parameters, same_parameter_node

        if same_parameter_node(inputParameterNode, self._parameterNode):
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)
        self._parameterNode = inputParameterNode
        self._parameterNodeGuiTag = None
        self._modelShown = None
        if self._parameterNode:
            self._parameterNodeGuiTag = connect_parameters(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanDetect)
            self._checkCanDetect()

    # -- the models folder: a user setting (training.models_folder), shown in its field, read from it once
    # typing pauses (or on Refresh); the field is written only when it does not already name the folder.
    def showModelsFolder(self) -> None:
        from LandmarkDetectionAppLib.training import models_folder, models_folder_of

        folder = models_folder(slicer.app.userSettings())
        field = self.ui.modelsFolderLineEdit
        if models_folder_of(field.currentPath) != folder:
            wasBlocked = field.blockSignals(True)
            field.currentPath = str(folder)
            field.blockSignals(wasBlocked)

    def onModelsFolderEdited(self, *_) -> None:
        self._modelsFolderTimer.start()  # restarts: read once typing pauses

    def onModelsFolderChanged(self, *_) -> None:
        """Remember the folder the field names (empty: the default) and list its models; a folder that does
        not exist (yet) changes nothing."""
        from LandmarkDetectionAppLib.training import models_folder_of, set_models_folder

        self._modelsFolderTimer.stop()
        text = self.ui.modelsFolderLineEdit.currentPath
        if models_folder_of(text).is_dir() or not text.strip():
            set_models_folder(slicer.app.userSettings(), text)
        self.refreshModels()

    # -- the model list: the bundled models, then the models folder's (training.available_models), then
    # OTHER_MODEL with the path line edit. The parameter node's modelPath is the chosen file ("" for the
    # default bundled model, so a saved scene does not name this installation's folder); "Other file..."
    # without a file leaves it as it was, and Detect says to choose a file.
    def refreshModels(self) -> None:
        from LandmarkDetectionAppLib.gui import report_errors
        from LandmarkDetectionAppLib.training import available_models, models_folder

        with report_errors("Could not list the models"):
            self._models = available_models(models_folder(slicer.app.userSettings()))
            combo = self.ui.modelComboBox
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for index, entry in enumerate(self._models):
                combo.addItem(entry.name if entry.usable else f"{entry.name} (unusable)")
                combo.setItemData(index, entry.description or f"{entry.path}: {entry.problem}", qt.Qt.ToolTipRole)
            combo.addItem(OTHER_MODEL)
            combo.setItemData(len(self._models), "A .safetensors model file anywhere, chosen below.",
                              qt.Qt.ToolTipRole)
            combo.blockSignals(wasBlocked)
            self._modelShown = None  # the list changed: show the parameter node's model in it again
            self._checkCanDetect()

    @staticmethod
    def _modelValue(entry) -> str:
        return "" if entry.default else str(entry.path)

    def _modelIndex(self, path: str):
        """The list index of the model file ``path`` ("" = the default bundled model), or None."""
        if not path:
            return next((i for i, entry in enumerate(self._models) if entry.default), None)
        target = Path(path).resolve()
        return next((i for i, entry in enumerate(self._models) if entry.path.resolve() == target), None)

    def _otherChosen(self) -> bool:
        return self.ui.modelComboBox.currentIndex == len(self._models)

    def _useModel(self, value) -> None:
        """The GUI's choice into the parameter node: a path, "" (the default bundled model), or None
        ("Other file..." without a file: the node is left as it is, and Detect says to choose a file)."""
        if self._parameterNode is None:
            return
        if value is not None:
            self._modelShown = value
            if self._parameterNode.modelPath != value:
                self._parameterNode.modelPath = value  # _checkCanDetect follows: it observes the node
                return
        self._checkCanDetect()

    def onModelChosen(self, index: int) -> None:
        if index < 0:
            return
        self.ui.modelPathLineEdit.visible = self._otherChosen()
        if self._otherChosen():
            self.onModelPathChanged()
        else:
            self._useModel(self._modelValue(self._models[index]))

    def onModelPathChanged(self, *_) -> None:
        if self._otherChosen():
            self._useModel(self.ui.modelPathLineEdit.currentPath.strip() or None)

    def _showModel(self) -> None:
        """Show the parameter node's model when it changed elsewhere (a scene loaded, a script): its list
        item, else OTHER_MODEL with its path. A value the GUI wrote itself is shown already."""
        path = self._parameterNode.modelPath
        if path != self._modelShown:
            self._modelShown = path
            combo, index = self.ui.modelComboBox, self._modelIndex(path)
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = len(self._models) if index is None else index
            combo.blockSignals(wasBlocked)
            if index is None:
                wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
                self.ui.modelPathLineEdit.currentPath = path
                self.ui.modelPathLineEdit.blockSignals(wasBlocked)
        self.ui.modelPathLineEdit.visible = self._otherChosen()

    def _modelProblem(self) -> str:
        """Why the chosen model cannot be used, or ""."""
        index = self.ui.modelComboBox.currentIndex
        if 0 <= index < len(self._models):
            entry = self._models[index]
            return "" if entry.usable else f"{entry.name}: {entry.problem}"
        path = self.ui.modelPathLineEdit.currentPath.strip()
        if not path:
            return "Choose a model file."
        return "" if Path(path).is_file() else f"{path}: no such model file."

    def _checkCanDetect(self, caller=None, event=None) -> None:
        if self._parameterNode:
            self._showModel()
        running = self._job is not None
        problem = "" if self._parameterNode and self._parameterNode.inputVolume else "Select an input volume."
        problem = problem or self._modelProblem()
        self.ui.detectButton.enabled = not problem and not running
        self.ui.detectButton.toolTip = problem or "Detect every landmark of the input volume."
        self.ui.cancelButton.enabled = running

    # -- actions
    def onLoadSample(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not load the sample brain.", waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadSample()

    def onDetect(self) -> None:
        from LandmarkDetectionAppLib.dependencies import ensure_dependencies
        from LandmarkDetectionAppLib.gui import poll_job, report_errors

        self.onModelPathChanged()  # the path field as it reads now
        if not self.ui.detectButton.enabled:
            self.ui.statusLabel.text = self.ui.detectButton.toolTip
            return
        if not ensure_dependencies():
            return
        self.ui.progressBar.visible = True
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Detecting..."
        job = None
        with report_errors("Could not start the detection"):
            job = self.logic.startDetection(self._parameterNode, self.onProgress, self.onFinished)
        if job is None:  # it raised before anything ran
            self.ui.progressBar.visible = False
            self.ui.statusLabel.text = "Detection did not start."
        elif not job.finished:  # a job that could not start has already reported it through onFinished
            self._job, self._timer = job, poll_job(job)
        self._checkCanDetect()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def onProgress(self, record: dict) -> None:
        if "message" in record:
            self.ui.statusLabel.text = record["message"]
        elif record.get("total"):
            self.ui.progressBar.maximum = int(record["total"])
            self.ui.progressBar.value = int(record["step"])

    def onFinished(self, job, outcome) -> None:
        """The job ended: load its results into the scene (for the volume and model it ran with), or say why
        not. The UI is reset whatever happens."""
        from LandmarkDetectionAppLib.gui import report_errors

        self._job = None
        self.ui.progressBar.visible = False
        try:
            if not outcome.ok:
                self.ui.statusLabel.text = f"Detection failed: {outcome.message}"
                if outcome.message != "Cancelled.":
                    logging.error("LandmarkDetection: %s", outcome.message)
                    slicer.util.errorDisplay(f"Landmark detection failed:\n{outcome.message}")
            elif job.parameters["inputVolume"].GetScene() is not slicer.mrmlScene:
                self.ui.statusLabel.text = "Detection results not loaded: the volume is no longer in the scene."
            else:
                self.ui.statusLabel.text = "Could not load the detection results."
                with report_errors("Could not load the detection results"):
                    self._results = self.logic.loadJobResults(job)
                    self.showResults()
        finally:
            self._checkCanDetect()

    def showResults(self) -> None:
        results = self._results
        self.ui.resultsTableView.setMRMLTableNode(results.table)
        self.ui.exportButton.enabled = True
        self.ui.planeComboBox.clear()
        for name in (results.planes.planes if results.planes else {}):
            self.ui.planeComboBox.addItem(name)
        self.ui.planeComboBox.enabled = self.ui.reformatButton.enabled = self.ui.planeComboBox.count > 0
        flagged = sum(1 for i in range(results.table.GetNumberOfRows()) if results.table.GetCellText(i, 6) == "1")
        self.ui.statusLabel.text = (f"Detected {results.table.GetNumberOfRows()} landmarks; "
                                    f"{flagged} flagged as uncertain.")

    def onShowEllipsoids(self, visible: bool) -> None:
        if self._results is not None:
            from LandmarkDetectionLib.mrml import set_visibility

            set_visibility(self._results.ellipsoids, visible)

    def onTableClicked(self, index) -> None:
        """Centre the slice views on the clicked row's landmark, where it is now (it may have been moved)."""
        if self._results is None:
            return
        from LandmarkDetectionLib.mrml import landmarks_from_markups, table_row, table_row_landmark

        view = self.ui.resultsTableView
        row = table_row(self._results.table, view.sortFilterProxyModel().mapToSource(index).row())
        if row < 0:
            return
        index = self._results.schema.lookup(table_row_landmark(self._results.table, row))
        if index is not None:
            r, a, s = landmarks_from_markups(self._results.markups, self._results.schema)[index]
            slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)

    def onReformat(self) -> None:
        if self._results is None or self._results.planes is None:
            return
        plane = self._results.planes.planes.get(self.ui.planeComboBox.currentText)
        if plane is None:
            return
        from LandmarkDetectionLib.mrml import reformat_slice

        centre = plane.fov_centre if plane.fov_centre is not None else plane.centre
        for name in ("Red", "Yellow", "Green"):
            widget = slicer.app.layoutManager().sliceWidget(name)
            if widget is not None:  # as Slicer shows its own views, turned with the head
                reformat_slice(widget.mrmlSliceNode(), centre, plane.normal, self._results.planes.head_axes)

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

        return Path(parameters.modelPath) if parameters.modelPath else bundled_model_path()

    def loadSample(self):
        """Fetch the sample brain (pip, SHA-256 checked) and load it."""
        return downloadSample()

    def snapshot(self, parameters) -> dict:
        """What a run uses, fixed when it starts: results attach to this volume and model."""
        return {"inputVolume": parameters.inputVolume, "modelPath": self.modelPath(parameters),
                "device": parameters.device, "uncertaintyPasses": parameters.uncertaintyPasses,
                "confidenceLevel": parameters.confidenceLevel, "flagThresholdMm": parameters.flagThresholdMm,
                "showEllipsoids": parameters.showEllipsoids}

    @staticmethod
    def detectionArguments(snapshot: dict, inputPath: Path, outputDir: Path) -> list[str]:
        return ["detect", "--model", str(snapshot["modelPath"]), "--input", str(inputPath), "--output",
                str(outputDir), "--device", snapshot["device"], "--uncertainty", str(snapshot["uncertaintyPasses"]),
                "--level", str(snapshot["confidenceLevel"]), "--flag-mm", str(snapshot["flagThresholdMm"])]

    def startDetection(self, parameters, onProgress, onFinished, processFactory=None):
        """Start detection in a separate process; returns the BackendJob (``cancel()`` stops it, ``poll()``
        delivers progress and, at the end, ``onFinished(job, outcome)``)."""
        import SimpleITK as sitk
        from LandmarkDetectionAppLib.job import BackendJob, TreeProcess
        from LandmarkDetectionLib.mrml import volume_to_image

        snapshot = self.snapshot(parameters)
        name = snapshot["inputVolume"].GetName()

        def export(job):  # uncompressed, in the scan's voxel type: quick, on the GUI thread
            sitk.WriteImage(volume_to_image(snapshot["inputVolume"], keep_type=True), str(job.input_path(name)), False)

        job = BackendJob(lambda job: self.detectionArguments(snapshot, job.input_path(name), job.output_dir),
                         onProgress, lambda outcome: onFinished(job, outcome), snapshot,
                         processFactory or TreeProcess)
        job.start(export)
        return job

    def runDetection(self, parameters) -> DetectionResults:
        """The same detection, blocking (self-test, scripts)."""
        results, failure = [], []

        def finished(job, outcome):
            if outcome.ok:
                results.append(self.loadJobResults(job))
            else:
                failure.append(outcome.message)

        job = self.startDetection(parameters, lambda record: None, finished)
        while not job.finished:
            job.poll()
            time.sleep(0.1)
        if failure:
            raise RuntimeError(failure[0])
        return results[0]

    def loadJobResults(self, job) -> DetectionResults:
        name = job.input_path(job.parameters["inputVolume"].GetName()).name[: -len(".nrrd")]
        return self.loadResults(job.parameters, job.output_dir, name)

    def loadResults(self, snapshot: dict, outputDir: Path, name: str) -> DetectionResults:
        """Read everything first, then add nodes: a failure leaves the scene unchanged."""
        from LandmarkDetectionLib import mrml
        from LandmarkDetectionLib.errors import LandmarkError
        from LandmarkDetectionLib.fileio import read_landmarks
        from LandmarkDetectionLib.modelheader import read_header
        from LandmarkDetectionLib.schema import schema_from_dict

        schema = schema_from_dict(read_header(snapshot["modelPath"]).schema)
        coords = read_landmarks(outputDir / f"{name}.mrk.json", schema)
        uncertainty = None
        if (outputDir / f"{name}.uncertainty.json").exists():
            from LandmarkDetectionLib.uncertainty import read_uncertainty

            uncertainty, _ = read_uncertainty(outputDir / f"{name}.uncertainty.json")
        volume = snapshot["inputVolume"]
        scene = volume.GetScene()
        if scene is None:
            raise LandmarkError(None, f"{volume.GetName()}: the volume is no longer in the scene; results not loaded")
        folder = mrml.results_folder(scene, volume, f"{volume.GetName()} landmarks")
        results = DetectionResults(folder, volume=volume)
        results.markups = mrml.add_landmarks(scene, schema, coords, folder, prefix=f"{volume.GetName()} ")
        if uncertainty is not None:
            results.ellipsoids = mrml.add_ellipsoids(scene, schema, uncertainty, snapshot["flagThresholdMm"], folder,
                                                     prefix=f"{volume.GetName()} ")
            mrml.set_visibility(results.ellipsoids, snapshot["showEllipsoids"])
        results.table = mrml.add_results_table(scene, schema, coords, uncertainty, snapshot["flagThresholdMm"],
                                               folder, f"{volume.GetName()} landmarks")
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
        name = results.volume.GetName()
        paths = [folder / f"{name}.mrk.json", folder / f"{name}.csv"]
        for path in paths:
            if path.exists() and not slicer.util.confirmOkCancelDisplay(f"{path} exists. Replace it?"):
                return []
        write_markups_json(paths[0], results.schema, coords, name=f"{name} landmarks")
        atomic_write_text(paths[1], landmarks_csv_text(results.schema, coords))
        return paths


class LandmarkDetectionTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: loads the sample brain and detects its AFIDs with the bundled model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectSampleBrain()

    def test_DetectSampleBrain(self):
        from LandmarkDetectionAppLib.dependencies import dependencies_missing

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
