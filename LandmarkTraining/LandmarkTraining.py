"""LandmarkTraining: guided landmark annotation with live QA, model-assisted pre-filling, versioned annotation
datasets, inter-annotator agreement and training, in 3D Slicer.

The widget is thin. The Logic works without a GUI on LandmarkTrainingLib (Qt-free, tested against real MRML)
and the backend; long work (detection for a pre-fill, agreement, training) runs in a separate process, a
BackendJob of the shared app layer (LandmarkDetectionAppLib), so the GUI never freezes."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

SETTINGS = "LandmarkTraining/"  # user settings keys: Annotator, Dataset, LastRun
UPDATE_DELAY_MS = 250  # edits within this time are checked together (QA runs once)
PATH_DELAY_MS = 600  # a path field is read once typing pauses (a dataset is not read at every keystroke)
# The path fields, by parameter. A ctkPathLineEdit says currentPathChanged only for acceptable text, never
# when it is emptied: the fields are read when they signal anything (validInputChanged too) and again by
# every action before it uses them (readFields).
PATH_FIELDS = (("datasetFolder", "datasetPathLineEdit"), ("modelPath", "modelPathLineEdit"),
               ("initFrom", "initFromPathLineEdit"), ("runFolder", "runPathLineEdit"))


class LandmarkTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Landmark Training"
        self.parent.categories = ["Landmark Detection"]
        self.parent.dependencies = ["LandmarkDetection"]
        self.parent.contributors = ["The LandmarkDetection developers"]
        self.parent.helpText = (
            "Annotate landmarks sub-anatomy by sub-anatomy following the schema's guidelines, on slice views "
            "reformatted to each sub-anatomy's plane; secondary points are spaced along the boundary curve you "
            "draw. Live QA with an undoable one-click fix; pre-fill a case with a model and review its most "
            "uncertain points first; save versioned annotations into a dataset; measure inter-annotator "
            "agreement; train or fine-tune a model on the dataset. Research use only.")
        self.parent.acknowledgementText = (
            "Annotation guidelines (planarity, equidistant secondary points): Patel et al. Uncertainty-guided "
            "review: Ma, Gupta and Sabuncu.")


@parameterNodeWrapper
class LandmarkTrainingParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    schemaName: str = "brain-88"  # used when no dataset is chosen (a dataset brings its own schema)
    datasetFolder: str = ""  # str, not Path: an empty Path would show as "." in the GUI
    annotator: str = ""
    status: Annotated[str, Choice(["draft", "complete", "reviewed"])] = "complete"  # datasets.STATUSES
    fixAll: bool = False
    modelPath: str = ""  # empty: the bundled model of the schema, when there is one
    uncertaintyPasses: Annotated[int, WithinRange(2, 1000)] = 20
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"  # training.DEVICES
    recipe: str = ""
    epochs: Annotated[int, WithinRange(0, 10000)] = 0  # 0: the recipe's
    initFrom: str = ""
    runFolder: str = ""


def reportErrors(what: str):
    """One dialog for any failure of a slot, which then returns normally (gui.report_errors)."""
    from LandmarkDetectionAppLib.gui import report_errors

    return report_errors(what)


def requiredPath(value: str, what: str) -> Path:
    """A path the user must have chosen (an empty one would be the current folder)."""
    from LandmarkDetectionLib.errors import LandmarkError

    if not value:
        raise LandmarkError(None, f"choose the {what} first")
    return Path(value)


class LandmarkTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updateTimer = self._pathsTimer = None
        self._job = self._jobTimer = None  # a pre-fill or agreement run
        self._trainJob = self._trainTimer = self._training = None
        self._agreementFolder = None
        self._sessionObservations = []  # (node, tag) of the session's point lists and curves
        self._placing = None  # placing.PersistentPlacing
        self._showing = False  # while parameters are being shown, the widgets' signals change nothing

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LandmarkTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LandmarkTrainingLogic()

        from LandmarkDetectionAppLib.gui import single_shot_timer
        from LandmarkDetectionAppLib.training import RECIPE_NAMES, describe_recipe
        from LandmarkDetectionLib.schema import builtin_schemas
        from LandmarkTrainingLib.placing import PersistentPlacing

        self._updateTimer = single_shot_timer(UPDATE_DELAY_MS, self.onSessionUpdate)
        self._pathsTimer = single_shot_timer(PATH_DELAY_MS, self.readFields)
        self._placing = PersistentPlacing(slicer.app.applicationLogic().GetInteractionNode())
        with reportErrors("Could not list the landmark schemas"):  # an incomplete installation
            for name in builtin_schemas():
                self.ui.schemaComboBox.addItem(name)
        for name in RECIPE_NAMES:
            self.ui.recipeComboBox.addItem(name)
            self.ui.recipeComboBox.setItemData(self.ui.recipeComboBox.count - 1, describe_recipe(name),
                                               qt.Qt.ToolTipRole)

        connections = [
            (self.ui.schemaComboBox, "currentIndexChanged(int)", self.readFields),
            (self.ui.recipeComboBox, "currentIndexChanged(int)", self.readFields),
            (self.ui.caseComboBox, "currentIndexChanged(int)", self.onCaseChanged),
            (self.ui.caseAnnotatorComboBox, "currentIndexChanged(int)", self.onCaseAnnotatorChanged),
            (self.ui.createDatasetButton, "clicked(bool)", self.onCreateDataset),
            (self.ui.startButton, "clicked(bool)", self.onStart),
            (self.ui.loadCaseButton, "clicked(bool)", self.onLoadCase),
            (self.ui.previousButton, "clicked(bool)", self.onPrevious),
            (self.ui.nextButton, "clicked(bool)", self.onNext),
            (self.ui.subAnatomyComboBox, "activated(int)", self.onSubAnatomyChosen),
            (self.ui.reformatButton, "clicked(bool)", self.onReformat),
            (self.ui.placeButton, "clicked(bool)", self.onPlace),
            (self.ui.drawCurveButton, "clicked(bool)", self.onDrawCurve),
            (self.ui.replaceSecondariesButton, "clicked(bool)", self.onReplaceSecondaries),
            (self.ui.fixButton, "clicked(bool)", self.onFix),
            (self.ui.undoButton, "clicked(bool)", self.onUndo),
            (self.ui.prefillButton, "clicked(bool)", self.onPrefill),
            (self.ui.nextSuggestionButton, "clicked(bool)", self.onNextSuggestion),
            (self.ui.saveButton, "clicked(bool)", self.onSave),
            (self.ui.agreementButton, "clicked(bool)", self.onAgreement),
            (self.ui.openAgreementButton, "clicked(bool)", self.onOpenAgreement),
            (self.ui.cancelButton, "clicked(bool)", self.onCancel),
            (self.ui.trainButton, "clicked(bool)", self.onTrain),
            (self.ui.resumeButton, "clicked(bool)", self.onResume),
            (self.ui.cancelTrainingButton, "clicked(bool)", self.onCancelTraining),
        ]
        for _, name in PATH_FIELDS:
            connections += [(getattr(self.ui, name), "currentPathChanged(QString)", self.onPathEdited),
                            (getattr(self.ui, name), "validInputChanged(bool)", self.onPathEdited)]
        for widget, signal, slot in connections:
            widget.connect(signal, slot)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # a point list or the scan deleted (Data module): the session brings the list back, or ends
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSessionEdited)
        self.initializeParameterNode()
        self.showSession()

    def cleanup(self) -> None:
        """The widget goes away (module reload, Slicer closing): nothing of it may run afterwards."""
        for timer in (self._updateTimer, self._pathsTimer, self._jobTimer, self._trainTimer):
            if timer is not None:
                timer.stop()
        for job in (self._job, self._trainJob):
            if job is not None:
                job.abandon()
        self._job = self._trainJob = None
        if self._placing is not None:
            self._placing.stop()
        self.unobserveSession()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._placing is not None:
            self._placing.stop()  # Slicer's place-mode persistence as it was: other modules place their own way

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and "session" in self._job.parameters:
            self._job.cancel()  # a pre-fill: its suggestions would go to point lists the close removes
        self.setParameterNode(None)
        self.setSession(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from LandmarkDetectionLib.mrml import first_scalar_volume

        self.setParameterNode(self.logic.getParameterNode())
        settings = slicer.app.userSettings()
        if not self._parameterNode.annotator:
            self._parameterNode.annotator = str(settings.value(SETTINGS + "Annotator", ""))
        if not self._parameterNode.datasetFolder:
            self._parameterNode.datasetFolder = str(settings.value(SETTINGS + "Dataset", ""))
        if not self._parameterNode.runFolder:
            self._parameterNode.runFolder = str(settings.value(SETTINGS + "LastRun", ""))
        if not self._parameterNode.inputVolume:
            first = first_scalar_volume(slicer.mrmlScene)
            if first:
                self._parameterNode.inputVolume = first
        self.showParameters()

    def setParameterNode(self, parameterNode) -> None:
        """Connect the GUI to a parameter node once, and again only when the node changes (entering the
        module gives a new wrapper of the same node: connecting it would leak an observer before 5.12)."""
        from LandmarkDetectionAppLib.gui import connect_parameters, same_parameter_node

        if same_parameter_node(parameterNode, self._parameterNode):
            return
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        self._parameterNodeGuiTag = None
        if self._parameterNode:
            self._parameterNodeGuiTag = connect_parameters(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    def showParameters(self) -> None:
        """The path fields and dynamic lists are synced by hand (connectors would show an empty path as '.')."""
        p = self._parameterNode
        self._showing = True
        try:
            for parameter, name in PATH_FIELDS:
                widget, value = getattr(self.ui, name), getattr(p, parameter)
                if widget.currentPath != value:
                    widget.currentPath = value
            for combo, value in ((self.ui.schemaComboBox, p.schemaName), (self.ui.recipeComboBox, p.recipe)):
                if combo.findText(value) >= 0:
                    combo.currentIndex = combo.findText(value)
        finally:
            self._showing = False
        self._pathsTimer.stop()
        self.refreshDataset()
        self.readFields()  # a value the lists do not hold becomes the one shown

    def onPathEdited(self, *_) -> None:
        self._pathsTimer.start()  # restarts: the fields are read once typing pauses

    def readFields(self, *_) -> None:
        """Read the path fields (as they show, empty included) and the lists into the parameter node: when
        they change (a path once typing pauses), and first thing in every action, so that it uses what the
        fields show."""
        if self._parameterNode is None or self._showing:
            return
        self._pathsTimer.stop()
        p = self._parameterNode
        paths = {parameter: getattr(self.ui, name).currentPath.strip() for parameter, name in PATH_FIELDS}
        datasetChanged = p.datasetFolder != paths["datasetFolder"]
        initFromChanged = p.initFrom != paths["initFrom"]
        for parameter, value in paths.items():
            if getattr(p, parameter) != value:
                setattr(p, parameter, value)
        p.schemaName = self.ui.schemaComboBox.currentText
        p.recipe = self.ui.recipeComboBox.currentText
        if datasetChanged:
            slicer.app.userSettings().setValue(SETTINGS + "Dataset", p.datasetFolder)
            self.refreshDataset()
        if initFromChanged:
            self.suggestRecipe(p.initFrom)
        self.updateButtons()

    def suggestRecipe(self, modelPath: str) -> None:
        """A fine-tune starts with the recipe the model was trained with (its augmentation and schedule; the
        model's architecture, network options and input grid are the run's in any case)."""
        from LandmarkDetectionAppLib.training import model_recipe

        if modelPath and Path(modelPath).is_file():
            with reportErrors("Could not read the model"):
                recipe = model_recipe(Path(modelPath))
                if recipe and self.ui.recipeComboBox.findText(recipe) >= 0:
                    self.ui.recipeComboBox.currentIndex = self.ui.recipeComboBox.findText(recipe)

    def updateButtons(self, caller=None, event=None) -> None:
        session = self.logic.session
        p = self._parameterNode
        if p is None:
            return
        from LandmarkDetectionLib.datasets import is_dataset

        dataset = bool(p.datasetFolder) and is_dataset(p.datasetFolder)
        busy = self._job is not None
        self.ui.startButton.enabled = bool(p.inputVolume)
        self.ui.loadCaseButton.enabled = dataset and self.ui.caseComboBox.count > 0
        self.ui.createDatasetButton.enabled = bool(p.datasetFolder) and not dataset
        for widget in (self.ui.previousButton, self.ui.nextButton, self.ui.subAnatomyComboBox, self.ui.reformatButton,
                       self.ui.placeButton, self.ui.drawCurveButton, self.ui.replaceSecondariesButton,
                       self.ui.fixButton):
            widget.enabled = session is not None
        self.ui.undoButton.enabled = session is not None and bool(session.undo_stack)
        self.ui.prefillButton.enabled = session is not None and not busy
        self.ui.nextSuggestionButton.enabled = session is not None and bool(session.review)
        self.ui.saveButton.enabled = session is not None and dataset and bool(p.annotator.strip())
        self.ui.agreementButton.enabled = dataset and not busy
        self.ui.openAgreementButton.enabled = self._agreementFolder is not None
        self.ui.cancelButton.enabled = busy
        training = self._trainJob is not None
        self.ui.trainButton.enabled = dataset and not training
        from LandmarkDetectionAppLib.training import can_resume

        self.ui.resumeButton.enabled = bool(p.runFolder) and can_resume(Path(p.runFolder)) and not training
        self.ui.cancelTrainingButton.enabled = training

    # --------------------------------------------------------------------------------------------- datasets
    def refreshDataset(self) -> None:
        """The dataset's cases (and their annotators and versions) in the case lists."""
        from LandmarkDetectionLib import datasets

        folder = self._parameterNode.datasetFolder if self._parameterNode else ""
        self.ui.caseComboBox.clear()
        self.ui.datasetInfoLabel.text = ""
        if folder and datasets.is_dataset(folder):
            with reportErrors("Could not read the dataset"):
                schema = datasets.dataset_schema(folder)
                cases = datasets.list_cases(folder)
                for case in cases:
                    self.ui.caseComboBox.addItem(case)
                self.ui.datasetInfoLabel.text = (f"Schema {schema.name}, {len(cases)} case(s), annotators: "
                                                 f"{', '.join(datasets.list_annotators(folder)) or 'none yet'}")
                recipe = self.logic.recipeFor(schema.name, self.ui.recipeComboBox.currentText)
                self.ui.recipeComboBox.currentIndex = self.ui.recipeComboBox.findText(recipe)
        elif folder:
            self.ui.datasetInfoLabel.text = "Not a dataset yet: 'Create dataset' makes one here."
        self.onCaseChanged()

    def onCaseChanged(self, *_) -> None:
        from LandmarkDetectionLib import datasets

        self.ui.caseAnnotatorComboBox.clear()
        case = self.ui.caseComboBox.currentText
        if case:
            with reportErrors("Could not read the dataset"):
                annotators = datasets.list_annotators(self._parameterNode.datasetFolder, case)
                for name in annotators:
                    self.ui.caseAnnotatorComboBox.addItem(name)
                if self._parameterNode.annotator in annotators:
                    self.ui.caseAnnotatorComboBox.currentIndex = annotators.index(self._parameterNode.annotator)
        self.onCaseAnnotatorChanged()

    def onCaseAnnotatorChanged(self, *_) -> None:
        from LandmarkDetectionLib import datasets

        self.ui.versionComboBox.clear()
        case, annotator = self.ui.caseComboBox.currentText, self.ui.caseAnnotatorComboBox.currentText
        if case and annotator:
            with reportErrors("Could not read the dataset"):
                versions = datasets.list_versions(self._parameterNode.datasetFolder, case, annotator)
                for version in reversed(versions):  # newest first: the default
                    self.ui.versionComboBox.addItem(f"v{version.number} {version.status} {version.created}",
                                                    version.number)
        self.updateButtons()

    def onCreateDataset(self) -> None:
        self.readFields()
        with reportErrors("Could not create the dataset"):
            self.logic.createDataset(requiredPath(self._parameterNode.datasetFolder, "dataset folder"),
                                     self._parameterNode.schemaName)
            self.refreshDataset()
        self.updateButtons()

    # ---------------------------------------------------------------------------------------------- session
    def onStart(self) -> None:
        self.readFields()
        p = self._parameterNode
        if self.logic.session is not None and not slicer.util.confirmOkCancelDisplay(
                "Start a new annotation? The current one stays in the scene (save it first to keep it in the "
                "dataset)."):
            return
        with reportErrors("Could not start the annotation"), slicer.util.WaitCursor():
            schema = self.logic.schema(p.datasetFolder, p.schemaName)
            self.setSession(self.logic.startSession(p.inputVolume, schema))

    def onLoadCase(self) -> None:
        self.readFields()
        p = self._parameterNode
        version = self.ui.versionComboBox.currentData
        with reportErrors("Could not load the case"), slicer.util.WaitCursor():
            session = self.logic.loadCase(requiredPath(p.datasetFolder, "dataset folder"),
                                          self.ui.caseComboBox.currentText, self.ui.caseAnnotatorComboBox.currentText,
                                          int(version) if version is not None else None)
            p.inputVolume = session.volume
            slicer.util.setSliceViewerLayers(background=session.volume, fit=True)
            self.setSession(session)

    def setSession(self, session) -> None:
        """Show a session and watch its points and curves (or none)."""
        self.unobserveSession()
        self._placing.stop()
        self.logic.session = session
        self.ui.subAnatomyComboBox.clear()
        if session is not None:
            for sub in session.schema.sub_anatomies:
                self.ui.subAnatomyComboBox.addItem(sub.name)
            self.observeSession()
            self.ui.qaTableView.setMRMLTableNode(session.qa_table)
            self.statusText(self.logic.sessionNote or "")
            self.showSubAnatomy()
            self.onSessionUpdate()
        else:
            self.ui.qaTableView.setMRMLTableNode(None)
        self.showSession()

    def observeSession(self) -> None:
        """Watch the session's point lists and boundary curves (a loaded version's too), again from scratch: a
        list the annotator deleted comes back as a new node."""
        self.unobserveSession()
        session = self.logic.session
        for node in session.nodes + [curve for sub in list(session.curve_nodes) for curve in session.curves_of(sub)]:
            self.observe(node)

    def observe(self, node) -> None:
        """Our own (node, tag) list, not VTKObservationMixin's, which keeps every node it ever observed."""
        from slicer import vtkMRMLMarkupsNode

        for event in (vtkMRMLMarkupsNode.PointModifiedEvent, vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                      vtkMRMLMarkupsNode.PointPositionUndefinedEvent, vtkMRMLMarkupsNode.PointAddedEvent,
                      vtkMRMLMarkupsNode.PointRemovedEvent, vtkMRMLMarkupsNode.PointEndInteractionEvent):
            self._sessionObservations.append((node, node.AddObserver(event, self.onSessionEdited)))

    def unobserveSession(self) -> None:
        for node, tag in self._sessionObservations:
            node.RemoveObserver(tag)
        self._sessionObservations = []

    def onSessionEdited(self, caller=None, event=None) -> None:
        if self.logic.session is not None:
            self._updateTimer.start()  # restarts: a drag is checked once it pauses

    def onSessionUpdate(self) -> None:
        session = self.logic.session
        if session is None:
            return
        if session.closed:
            self.setSession(None)
            self.statusText("The annotation ended: its scan is no longer in the scene.")
            return
        with reportErrors("Could not update the annotation"):
            report = session.update()
            notes = [f"{name} projected {mm:.1f} mm onto the plane" for name, mm in report.projected if mm > 0.05]
            if report.placed:
                notes.append(f"{len(report.placed)} secondary point(s) put on the boundary curve")
            if report.restored:
                self.observeSession()
                notes.append(f"point list(s) of {', '.join(report.restored)} deleted: its points are to place again")
            if self.ui.qaTableView.mrmlTableNode() is not session.qa_table:  # deleted, and made again
                self.ui.qaTableView.setMRMLTableNode(session.qa_table)
            if notes:
                self.statusText("; ".join(notes))
            row = report.qa.row(session.sub_anatomy.name)
            self.ui.qaDetailsLabel.text = "\n".join([f"{row.sub_anatomy}: {row.overall.upper()}", *row.details(),
                                                     f"All sub-anatomies: {report.qa.status.upper()}"])
            self.showSession()

    def showSession(self) -> None:
        session = self.logic.session
        if session is None:
            self.ui.instructionsTextEdit.setPlainText("Annotate a volume, or load a saved case of the dataset.")
            self.ui.planeLabel.text = ""
        else:
            self.ui.instructionsTextEdit.setPlainText(session.instructions())
            self.ui.planeLabel.text = f"Plane: {session.plane().how}"
            left = session.to_place()
            self.ui.placeButton.text = f"Place points ({len(left)} to place)" if left else "Place points (all placed)"
        self.updateButtons()

    def showSubAnatomy(self) -> None:
        session = self.logic.session
        self.ui.subAnatomyComboBox.currentIndex = session.current
        slicer.modules.markups.logic().SetActiveList(session.node())
        self.onReformat()
        self.showSession()

    def onPrevious(self) -> None:
        with reportErrors("Could not go to the previous sub-anatomy"):
            self.logic.session.previous()
            self.showSubAnatomy()

    def onNext(self) -> None:
        with reportErrors("Could not go to the next sub-anatomy"):
            self.logic.session.next()
            self.showSubAnatomy()

    def onSubAnatomyChosen(self, index: int) -> None:
        with reportErrors("Could not go to the sub-anatomy"):
            self.logic.session.go_to(index)
            self.showSubAnatomy()

    def onReformat(self) -> None:
        with reportErrors("Could not reformat the slice view"):
            widget = slicer.app.layoutManager().sliceWidget("Red")
            if widget is not None and self.logic.session is not None:
                self.logic.session.reformat(widget.mrmlSliceNode())

    def startPlacing(self, node) -> None:
        """Place mode for a point list or curve: it stays on until every point is placed (a point list of
        fixed size) or the user leaves it (a curve); then Slicer's persistence setting is as it was."""
        slicer.modules.markups.logic().SetActiveList(node)  # also makes its class the one placed
        self._placing.start()

    def onPlace(self) -> None:
        with reportErrors("Could not start placing points"):
            session = self.logic.session
            if not session.to_place():
                self.statusText("Every primary point of this sub-anatomy is placed; drag points to correct them.")
                return
            self.startPlacing(session.node())
            self.statusText(f"Click to place, in order: {', '.join(session.to_place())}")

    def onDrawCurve(self) -> None:
        with reportErrors("Could not start the boundary curve"):
            curve = self.logic.session.add_curve()
            self.observe(curve)
            self.startPlacing(curve)
            self.statusText("Click along the boundary through the primary points; right-click or Esc to finish. "
                            "Secondary points follow the curve until you move them.")

    def onReplaceSecondaries(self) -> None:
        with reportErrors("Could not re-place the secondary points"):
            self.showEdit("Applied", self.logic.session.place_secondaries())

    def onFix(self) -> None:
        with reportErrors("Could not fix the annotation"):
            session = self.logic.session
            fix = session.fix(None if self._parameterNode.fixAll else [session.sub_anatomy.name])
            if not fix.moves:
                self.ui.editTextEdit.setPlainText("\n".join(["The fix moves nothing.", *fix.notes]))
                return
            self.ui.editTextEdit.setPlainText("Proposed (nothing changed yet):\n" + fix.text())
            if not slicer.util.confirmOkCancelDisplay(f"Apply the fix? {len(fix.moves)} landmark(s) move, as listed in "
                                                      "the Quality panel (Undo restores them).", "Fix annotation",
                                                      detailedText=fix.text()):
                self.ui.editTextEdit.setPlainText("Not applied:\n" + fix.text())
                return
            self.showEdit("Applied", session.apply_fix(fix), fix.notes)

    def onUndo(self) -> None:
        with reportErrors("Could not undo"):
            edit = self.logic.session.undo()
            if edit is not None:
                self.showEdit("Undone", edit)

    def showEdit(self, what: str, edit, notes=()) -> None:
        self.ui.editTextEdit.setPlainText("\n".join([f"{what}: {edit.text()}", *[f"note: {n}" for n in notes]]))
        self.onSessionUpdate()

    # -------------------------------------------------------------------------------------- model assistance
    def onPrefill(self) -> None:
        from LandmarkDetectionAppLib.dependencies import ensure_dependencies

        self.readFields()
        if not ensure_dependencies():
            return
        with reportErrors("Could not pre-fill with the model"):
            p = self._parameterNode
            job = self.logic.startPrefill(p.modelPath, p.uncertaintyPasses, p.device, self.onProgress,
                                          self.onPrefillFinished)
            self.watchJob(job, "Detecting with the model...")

    def onPrefillFinished(self, job, outcome) -> None:
        self.jobDone()
        if not outcome.ok:
            return self.jobFailed("Pre-fill", outcome)
        if job.parameters["session"].closed:
            self.statusText("The model's suggestions were not used: their annotation is no longer in the scene.")
            return
        with reportErrors("Could not read the model's suggestions"):
            filled = self.logic.finishPrefill(job)
            self.statusText(f"{filled} point(s) pre-filled by the model; 'Next suggestion' visits them most "
                            "uncertain first.")
            self.onSessionUpdate()

    def onNextSuggestion(self) -> None:
        with reportErrors("Could not go to the next suggestion"):
            item = self.logic.session.next_suggestion()
            if item is None:
                self.ui.reviewLabel.text = "No suggestion left to review."
            else:
                self.showSubAnatomy()
                slicer.modules.markups.logic().JumpSlicesToLocation(*(float(v) for v in item.position), True)
                self.ui.reviewLabel.text = (f"{item.landmark} ({item.sub_anatomy}): ellipsoid up to "
                                            f"{item.max_semi_axis_mm:.1f} mm. Leave it if right, drag it if not. "
                                            f"{len(self.logic.session.review)} left.")
        self.updateButtons()

    # ---------------------------------------------------------------------------------------------- saving
    def onSave(self) -> None:
        self.readFields()
        p = self._parameterNode
        slicer.app.userSettings().setValue(SETTINGS + "Annotator", p.annotator.strip())
        with reportErrors("Could not save the annotation"), slicer.util.WaitCursor():
            saved = self.logic.save(requiredPath(p.datasetFolder, "dataset folder"), p.annotator.strip(), p.status)
            text = (f"Saved {saved.entry.case} by {saved.entry.annotator} as version {saved.entry.version} "
                    f"({saved.entry.landmarks})")
            if saved.assistance is not None:
                text += f"; model assistance: {saved.assistance.name}"
            self.ui.saveResultLabel.text = text
            self.refreshDataset()

    # ------------------------------------------------------------------------------------------- agreement
    def onAgreement(self) -> None:
        from LandmarkDetectionAppLib.dependencies import ensure_dependencies

        self.readFields()
        if not ensure_dependencies():  # the box plots need matplotlib
            return
        with reportErrors("Could not start the agreement"):
            job = self.logic.startAgreement(requiredPath(self._parameterNode.datasetFolder, "dataset folder"),
                                            self.onProgress, self.onAgreementFinished)
            self.watchJob(job, "Measuring inter-annotator agreement...")

    def onAgreementFinished(self, job, outcome) -> None:
        self.jobDone()
        if not outcome.ok:
            return self.jobFailed("Agreement", outcome)
        with reportErrors("Could not load the agreement results"):
            results = self.logic.finishAgreement(job)
            self._agreementFolder = job.parameters["output"]
            self.ui.agreementTableView.setMRMLTableNode(results.tables.get("agreement_summary.csv"))
            self.ui.agreementLabel.text = "\n".join([f"Results in {self._agreementFolder}:",
                                                     *[str(path) for path in results.figures]])
        self.updateButtons()

    def onOpenAgreement(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl(Path(self._agreementFolder).resolve().as_uri()))

    # --------------------------------------------------------------------------------------------- training
    def onTrain(self) -> None:
        from LandmarkDetectionAppLib.dependencies import ensure_dependencies

        self.readFields()
        p = self._parameterNode
        if not ensure_dependencies():
            return
        with reportErrors("Could not start training"):
            self.watchTraining(self.logic.startTraining(
                requiredPath(p.datasetFolder, "dataset folder"), p.recipe, p.epochs or None, p.device,
                Path(p.initFrom) if p.initFrom else None, self.onTrainingProgress, self.onTrainingFinished))

    def onResume(self) -> None:
        from LandmarkDetectionAppLib.dependencies import ensure_dependencies

        self.readFields()
        p = self._parameterNode
        if not ensure_dependencies():
            return
        with reportErrors("Could not resume training"):
            self.watchTraining(self.logic.resumeTraining(requiredPath(p.runFolder, "run folder"), p.epochs or None,
                                                         p.device, self.onTrainingProgress, self.onTrainingFinished))

    def watchTraining(self, started) -> None:
        """Show a training run's chart in the layout and its progress here; remember its folder (Resume)."""
        from LandmarkDetectionAppLib.gui import poll_job

        job, self._training, chart = started
        if job.finished:  # it could not start, and has said why through its onFinished
            return
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        output = str(self._training.output)
        self.ui.runPathLineEdit.currentPath = output
        self.readFields()
        slicer.app.userSettings().setValue(SETTINGS + "LastRun", output)
        self.ui.trainingProgressBar.visible = True
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingLabel.text = "Starting training..."
        self._trainJob, self._trainTimer = job, poll_job(job, 500)
        self.updateButtons()

    def onTrainingProgress(self, record: dict) -> None:
        self.ui.trainingProgressBar.value = int(100 * self._training.fraction())
        self.ui.trainingLabel.text = self._training.status()

    def onTrainingFinished(self, job, outcome) -> None:
        self._trainJob = None
        self.ui.trainingProgressBar.visible = False
        try:
            if not outcome.ok:
                self.ui.trainingLabel.text = f"Training stopped: {outcome.message}"
                if outcome.message != "Cancelled.":
                    slicer.util.errorDisplay(f"Training failed:\n{outcome.message}")
                return
            with reportErrors("Could not install the trained model"):
                path = self.logic.finishTraining(job)
                self.ui.trainingLabel.text = (f"{self._training.status()}. Model installed: {path} (choose it in "
                                              "Landmark Detection).")
        finally:
            self.updateButtons()

    def onCancelTraining(self) -> None:
        if self._trainJob is not None:
            self._trainJob.cancel()

    # ------------------------------------------------------------------------------------------------ jobs
    def watchJob(self, job, text: str) -> None:
        from LandmarkDetectionAppLib.gui import poll_job

        if job.finished:  # it could not start, and has said why through its onFinished
            return
        self.ui.progressBar.visible = True
        self.ui.progressBar.maximum = 0  # busy until the backend says how far it is
        self.statusText(text)
        self._job, self._jobTimer = job, poll_job(job)
        self.updateButtons()

    def onProgress(self, record: dict) -> None:
        if "message" in record:
            self.statusText(record["message"])
        elif record.get("total"):
            self.ui.progressBar.maximum = int(record["total"])
            self.ui.progressBar.value = int(record["step"])

    def jobDone(self) -> None:
        self._job = None
        self.ui.progressBar.visible = False
        self.updateButtons()

    def jobFailed(self, what: str, outcome) -> None:
        self.statusText(f"{what} stopped: {outcome.message}")
        if outcome.message != "Cancelled.":
            slicer.util.errorDisplay(f"{what} failed:\n{outcome.message}")

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def statusText(self, text: str) -> None:
        self.ui.statusLabel.text = text


class LandmarkTrainingLogic(ScriptedLoadableModuleLogic):
    """Works without the GUI (the widget, the self-test and scripts use the same steps): a thin layer over
    LandmarkTrainingLib and the backend. ``session`` is the annotation being edited."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self.sessionNote = ""  # why the scan gave no symmetry plane, when it did not

    def getParameterNode(self):
        return LandmarkTrainingParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------------- annotation
    @staticmethod
    def schema(datasetFolder: str, schemaName: str):
        """The dataset's schema when a dataset is chosen, else the named one."""
        from LandmarkDetectionLib import datasets
        from LandmarkDetectionLib.schema import load_schema

        if datasetFolder and datasets.is_dataset(datasetFolder):
            return datasets.dataset_schema(datasetFolder)
        return load_schema(schemaName)

    def _withSymmetryPlane(self, session):
        """Estimate the scan's mid-sagittal plane by symmetry; without one, the placed midline points
        (or the scanner axes) give the planes."""
        self.sessionNote = ""
        try:
            session.estimate_symmetry_plane()
        except Exception as error:  # noqa: BLE001 - the annotation goes on without it
            logging.warning("LandmarkTraining: no symmetry plane: %s", error)
            self.sessionNote = f"No symmetry plane from the scan ({error}); planes follow the placed points."
        self.session = session
        return session

    def startSession(self, volume, schema):
        from LandmarkDetectionLib.errors import LandmarkError
        from LandmarkTrainingLib.session import AnnotationSession

        if volume is None:
            raise LandmarkError(None, "choose the volume to annotate")
        return self._withSymmetryPlane(AnnotationSession(volume.GetScene(), schema, volume))

    def loadCase(self, folder: Path, case: str, annotator: str, version: int | None = None):
        from LandmarkTrainingLib.store import load_case

        return self._withSymmetryPlane(load_case(slicer.mrmlScene, folder, case, annotator, version))

    @staticmethod
    def createDataset(folder: Path, schemaName: str) -> Path:
        from LandmarkDetectionLib.datasets import create_dataset

        return create_dataset(folder, schemaName)

    def save(self, folder: Path, annotator: str, status: str = "complete"):
        from LandmarkDetectionLib.errors import LandmarkError
        from LandmarkTrainingLib.store import save_session

        if not annotator:
            raise LandmarkError(None, "enter the annotator's name before saving")
        return save_session(self.session, folder, annotator, status)

    # ------------------------------------------------------------------------------------ backend jobs
    def modelPath(self, modelPath: str) -> Path:
        from LandmarkDetectionLib.resources import bundled_model_path

        return Path(modelPath) if modelPath else bundled_model_path(self.session.schema.name)

    def startPrefill(self, modelPath: str, passes: int, device: str, onProgress, onFinished, processFactory=None):
        """Detect the session's landmarks with a model in a BackendJob (``onFinished(job, outcome)``; then
        ``finishPrefill``)."""
        import SimpleITK as sitk
        from LandmarkDetectionAppLib.job import BackendJob, TreeProcess
        from LandmarkDetectionLib.mrml import volume_to_image
        from LandmarkTrainingLib.store import check_model_schema, detection_arguments

        session = self.session
        model = self.modelPath(modelPath)
        check_model_schema(model, session.schema)
        snapshot = {"session": session, "model": model}

        def export(job):  # uncompressed, in the scan's voxel type: quick, on the GUI thread
            sitk.WriteImage(volume_to_image(session.volume, keep_type=True), str(job.input_path("scan")), False)

        job = BackendJob(lambda job: detection_arguments(model, job.input_path("scan"), job.output_dir, passes, device),
                         onProgress, lambda outcome: onFinished(job, outcome), snapshot, processFactory or TreeProcess)
        job.start(export)
        return job

    @staticmethod
    def finishPrefill(job) -> int:
        from LandmarkTrainingLib.store import read_suggestions

        session = job.parameters["session"]
        coords, semi = read_suggestions(job.output_dir, "scan", session.schema)
        return session.prefill(coords, semi, job.parameters["model"].stem)

    def startAgreement(self, folder: Path, onProgress, onFinished, processFactory=None):
        """Inter-annotator agreement of a dataset into <dataset>/agreement/<time> (``finishAgreement`` loads it)."""
        from LandmarkDetectionAppLib.job import BackendJob, TreeProcess
        from LandmarkTrainingLib.store import agreement_arguments, agreement_output

        output = agreement_output(folder)
        job = BackendJob(lambda job: agreement_arguments(folder, output), onProgress,
                         lambda outcome: onFinished(job, outcome), {"output": output},
                         processFactory or TreeProcess)
        job.start()
        return job

    @staticmethod
    def finishAgreement(job):
        from LandmarkTrainingLib.store import load_agreement

        return load_agreement(slicer.mrmlScene, job.parameters["output"])

    @staticmethod
    def recipeFor(schemaName: str, current: str) -> str:
        """The recipe to train a schema's dataset with: the current one unless it is another schema's, then
        the first for this schema, else none (the train command's defaults)."""
        from LandmarkDetectionAppLib.training import NO_RECIPE, RECIPE_NAMES
        from LandmarkDetectionLib.recipes import RECIPES

        fitting = [name for name in RECIPE_NAMES if RECIPES.get(name, {}).get("schema") == schemaName]
        return current if current == NO_RECIPE or current in fitting else (fitting or [NO_RECIPE])[0]

    @staticmethod
    def modelsFolder() -> Path:
        from LandmarkDetectionAppLib.training import models_folder

        return models_folder(slicer.app.userSettings())

    def _trainingJob(self, arguments, output: Path, onProgress, onFinished, processFactory=None):
        """(BackendJob, TrainingProgress, chart node) of a training run into ``output``."""
        from LandmarkDetectionAppLib.job import BackendJob, TreeProcess
        from LandmarkDetectionAppLib.training import TrainingProgress, setup_progress_plot

        table, chart = setup_progress_plot(slicer.mrmlScene, f"Training {output.name}")
        progress = TrainingProgress(output, table)

        def consume(record):
            progress.consume(record)  # the table (and chart) follow the run's log
            onProgress(record)

        job = BackendJob(lambda job: arguments, consume, lambda outcome: onFinished(job, outcome),
                         {"output": output}, processFactory or TreeProcess)
        job.start()
        return job, progress, chart

    def startTraining(self, dataset: Path, recipe: str, epochs, device: str, initFrom, onProgress, onFinished,
                      processFactory=None):
        """Train on a dataset in a new run folder under the models folder (``runs/<dataset>-<time>``)."""
        from LandmarkDetectionAppLib.training import TrainingRequest, training_arguments
        from LandmarkDetectionLib.datasets import dataset_schema
        from LandmarkDetectionLib.fileio import safe_name

        dataset_schema(dataset)  # a dataset, or one clear line
        output = self.modelsFolder() / "runs" / f"{safe_name(dataset.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
        request = TrainingRequest(dataset, output, recipe or None, epochs, device, initFrom)
        return self._trainingJob(training_arguments(request), output, onProgress, onFinished, processFactory)

    def resumeTraining(self, output: Path, epochs, device: str, onProgress, onFinished, processFactory=None):
        from LandmarkDetectionAppLib.training import resume_arguments

        return self._trainingJob(resume_arguments(output, epochs, device), output, onProgress, onFinished,
                                 processFactory)

    def finishTraining(self, job) -> Path:
        """Copy the run's best model into the models folder (never replacing one); returns its path."""
        from LandmarkDetectionAppLib.training import finished_model, install_model

        return install_model(finished_model(job.parameters["output"]), self.modelsFolder())


class LandmarkTrainingTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the sample brain and its AFIDs: the session's planes, projection, QA, fix and
    undo, and two saved versions of a dataset loaded back."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnnotateSaveAndLoad()

    def test_AnnotateSaveAndLoad(self):
        import numpy as np
        from LandmarkDetection import LandmarkDetectionLogic
        from LandmarkDetectionLib import datasets
        from LandmarkDetectionLib.annotation import plane_angle
        from LandmarkDetectionLib.fileio import read_landmarks
        from LandmarkDetectionLib.planes import compute_planes
        from LandmarkDetectionLib.sample_data import fetch_sample
        from LandmarkDetectionLib.schema import load_schema

        logic = LandmarkTrainingLogic()
        volume = LandmarkDetectionLogic().loadSample()
        schema = load_schema("afids-32")
        truth = read_landmarks(fetch_sample().afids, schema)
        session = logic.startSession(volume, schema)
        msp = compute_planes(schema, truth).planes["mid-sagittal"]
        self.assertLess(plane_angle(session.mid_sagittal().normal, msp.normal), 3.0)
        self.delayDisplay("Mid-sagittal plane from the scan's symmetry")

        midline = schema.indices_of("Midline")
        node = session.node("Midline")
        for n, i in enumerate(midline):  # the annotator places the midline points, 2 mm off the plane
            node.SetNthControlPointPositionWorld(n, *(truth[i] + 2.0 * msp.normal))
            session.update()
        self.assertLess(abs(msp.distances(session.coordinates()[midline[0]][None])[0]), 1.0)
        if slicer.app.layoutManager() is not None:  # none without the main window
            session.reformat(slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode())
        self.assertEqual(session.qa_table.GetNumberOfRows(), len(schema.sub_anatomies))

        before = session.coordinates()
        fix = session.fix(["Midline"])
        if fix.moves:
            session.apply_fix(fix)
            session.undo()
        np.testing.assert_array_equal(session.coordinates(), before)
        self.delayDisplay("Projection, QA, fix and undo")

        with tempfile.TemporaryDirectory() as folder:
            logic.createDataset(Path(folder) / "dataset", "afids-32")
            first = logic.save(Path(folder) / "dataset", "tester")
            node.SetNthControlPointPositionWorld(0, *(truth[midline[0]] + 1.0))
            second = logic.save(Path(folder) / "dataset", "tester")
            self.assertEqual((first.entry.version, second.entry.version), (1, 2))
            versions = datasets.list_versions(Path(folder) / "dataset", first.entry.case, "tester")
            self.assertEqual(len(versions), 2)
            loaded = logic.loadCase(Path(folder) / "dataset", first.entry.case, "tester", 1)
            np.testing.assert_allclose(loaded.coordinates(), before, atol=1e-3)
        self.delayDisplay("Two versions saved and version 1 loaded back")
