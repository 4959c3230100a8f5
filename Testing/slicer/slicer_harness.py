"""Run the MedDiffSeg Slicer module on real MRML (slicer-core) without the desktop application.

What is real: ``import slicer`` from the slicer-core wheel - the MRML scene, volume/segmentation/
colour nodes, storage nodes (NRRD, NIfTI, DICOM file lists), the Volumes, Segmentations and Colors
logics, the application logic, and the whole ``slicer/util.py``. :func:`bootstrap_mrml` wires them
up as the application does at start-up (see docs/DESIGN.md "Testing the Slicer side without the
desktop app"): a bare ``vtkMRMLScene`` cannot hold segmentations.

What is stood in for - only the names the wheel lacks because they need Qt or the application:
``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``,
``slicer.i18n`` and ``slicer.app``. ``qt``/``ctk`` are :mod:`qtfake`: the PythonQt widgets the
Widget uses, with Qt's signal behaviour, and a ``.ui`` loader; :class:`GuiSession` puts the
loader and scripted answers to the dialogs into ``slicer.util`` (``loadUI``, ``childWidgetVariables``,
``confirmOkCancelDisplay``, ``errorDisplay``...), so that the Widget's ``setup()`` and its button
handlers run on real MRML (Testing/slicer/test_slicer_widget.py). What the Widget shows is read
back from those widgets; what it asked the user is recorded.

The folder holding this file is named ``slicer``. ``slicer/__init__.py`` of the wheel extends its
package path with every ``slicer`` folder on ``sys.path`` and imports all modules found there, and
pytest puts ``Testing/`` on ``sys.path`` - so :func:`import_slicer` hides ``Testing/`` while
importing, and keeps this folder out of ``slicer.__path__``.
"""

from __future__ import annotations

import importlib
import logging
import sys
import tempfile
import types
import typing
import unittest
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TESTING = REPO / "Testing"
MODULE_DIR = REPO / "MedDiffSeg"

log = logging.getLogger(__name__)


# -- importing the real slicer package -------------------------------------------------------------


def _shadows(entry: str) -> bool:
    try:
        return (Path(entry or ".") / "slicer").resolve() == HERE
    except OSError:
        return False


def import_slicer():
    """``import slicer`` (the real wheel) without picking up this test folder; None when not installed."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "vtkMRMLScene"):
        module = sys.modules["slicer"]
    else:
        saved = list(sys.path)
        sys.path[:] = [p for p in sys.path if not _shadows(p)]
        try:
            module = importlib.import_module("slicer")
        except ImportError:
            return None
        finally:
            sys.path[:] = saved
    module.__path__[:] = [p for p in module.__path__ if Path(p).resolve() != HERE]
    if not hasattr(module, "vtkMRMLScene"):
        return None  # some other package called "slicer" (never install the PyPI package "slicer")
    return module


# -- stand-ins for the Qt-bound names ---------------------------------------------------------------


def _qt_module(name: str) -> types.ModuleType:
    import qtfake

    module = qtfake.make_module(name)
    module.__doc__ = f"test stand-in for {name} (no Qt in slicer-core): see Testing/slicer/qtfake.py"
    return module


def _i18n_module() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text  # type: ignore[attr-defined]
    module.translate = lambda context, text: text  # type: ignore[attr-defined]
    return module


def _scripted_loadable_module(slicer) -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

        def resourcePath(self, filename: str) -> str:
            return str(MODULE_DIR / "Resources" / filename)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else types.SimpleNamespace(isEntered=True)
            self.moduleName = self.__class__.__name__[: -len("Widget")]
            self.layout = None

        def setup(self):
            import qtfake

            self.layout = qtfake.QVBoxLayout()  # Slicer gives the module panel's layout here

        def resourcePath(self, filename: str) -> str:
            return str(MODULE_DIR / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        """As in Slicer: one vtkMRMLScriptedModuleNode per module, tagged with the module name."""

        def __init__(self, parent=None):
            name = self.__class__.__name__
            self.moduleName = name[: -len("Logic")] if name.endswith("Logic") else name
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            scene = slicer.mrmlScene
            nodes = scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
            for i in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(i)
                if node.GetAttribute("ModuleName") == self.moduleName:
                    return node
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetSingletonTag(self.moduleName)
            node.SetHideFromEditors(True)
            return scene.AddNode(node)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=1000):
            log.info(message)

        def runTest(self):  # pragma: no cover - overridden by the module's test
            pass

    module.ScriptedLoadableModule = ScriptedLoadableModule  # type: ignore[attr-defined]
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget  # type: ignore[attr-defined]
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic  # type: ignore[attr-defined]
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest  # type: ignore[attr-defined]
    return module


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Minimum:
    def __init__(self, minimum):
        self.minimum = minimum


class Maximum:
    def __init__(self, maximum):
        self.maximum = maximum


class Default:
    def __init__(self, value):
        self.value = value


_MISSING = object()


def _base_type(hint):
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def parameterNodeWrapper(cls):
    """Stand-in for Slicer's decorator: typed attributes stored in a vtkMRMLScriptedModuleNode.

    Node-typed fields are node references; other values are stored as repr-able text. ``allParameters``
    lists the fields (name -> (type hint, default)), as the structure tests need; ``connectGui`` binds
    the qtfake widgets that name a parameter (``SlicerParameterName``) as the real wrapper does: the
    widget shows the value, and the user's changes are written back; observers go to the node.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: (hint, cls.__dict__.get(name, _MISSING)) for name, hint in hints.items()}

    def is_node_type(hint) -> bool:
        base = _base_type(hint)
        return isinstance(base, type) and base.__name__.startswith("vtkMRML")

    class Wrapper:
        allParameters = fields

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(name)
            hint, default = fields[name]
            node = self.parameterNode
            if is_node_type(hint):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            if not text:
                if default is _MISSING:
                    return [] if typing.get_origin(_base_type(hint)) is list else None
                return default
            import ast

            return ast.literal_eval(text)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            hint, _ = fields[name]
            if is_node_type(hint):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, repr(value))

        # As the real wrapper: observers go to the parameter node (the Widget watches it for changes).
        def AddObserver(self, *args):
            return self.parameterNode.AddObserver(*args)

        def RemoveObserver(self, *args):
            return self.parameterNode.RemoveObserver(*args)

        def HasObserver(self, *args):
            return self.parameterNode.HasObserver(*args)

        def connectGui(self, gui):
            """As the real wrapper, for the widgets that name a parameter (``SlicerParameterName``): show the
            parameter's value, and write the widget's changes back (GUI -> parameter; a parameter changed in
            code is not pushed to the widget again here)."""
            connected = []
            for widget in vars(gui).values():
                name = getattr(widget, "SlicerParameterName", None)
                if name not in fields:
                    continue
                hint, _default = fields[name]
                value = getattr(self, name)
                kind = type(widget).__name__

                def setter(v, name=name, cast=None):
                    setattr(self, name, cast(v) if cast else v)

                if kind == "QCheckBox":
                    widget.checked = bool(value)
                    signal, slot = "toggled(bool)", (lambda v, f=setter: f(bool(v)))
                elif kind in ("ctkSliderWidget", "QSpinBox", "QDoubleSpinBox"):
                    base = _base_type(hint)
                    for meta in typing.get_args(hint)[1:]:
                        if isinstance(meta, WithinRange) and kind != "ctkSliderWidget":
                            widget.minimum, widget.maximum = meta.minimum, meta.maximum
                    widget.value = value
                    signal, slot = "valueChanged(double)", (lambda v, f=setter, b=base: f(b(v)))
                elif kind == "QComboBox":
                    for meta in typing.get_args(hint)[1:]:
                        if isinstance(meta, Choice) and widget.count == 0:
                            widget.addItems([str(c) for c in meta.choices])
                    widget.currentText = str(value)
                    signal, slot = "currentTextChanged(QString)", (lambda v, f=setter: f(str(v)))
                elif kind == "qMRMLNodeComboBox":
                    widget.setCurrentNode(value)
                    signal, slot = "currentNodeChanged(vtkMRMLNode*)", (lambda v, f=setter: f(v))
                else:
                    continue
                widget.connect(signal, slot)
                connected.append((widget, signal, slot))
            return connected

        def disconnectGui(self, tag):
            for widget, signal, slot in tag or []:
                widget.disconnect(signal, slot)

        def isCached(self, name):
            return False

    Wrapper.__name__ = cls.__name__
    Wrapper.__qualname__ = cls.__qualname__
    Wrapper.__doc__ = cls.__doc__
    Wrapper.__annotations__ = dict(cls.__annotations__)
    return Wrapper


def _parameter_node_wrapper_module() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")
    for obj in (parameterNodeWrapper, Choice, WithinRange, Minimum, Maximum, Default):
        setattr(module, obj.__name__, obj)
    return module


class _AppStandIn:
    """``slicer.app`` stand-in: the application logic and a temporary folder, nothing with a window."""

    def __init__(self, env: "MRMLEnvironment"):
        self._env = env
        self.temporaryPath = tempfile.gettempdir()
        self.commandOptions = types.SimpleNamespace(noMainWindow=True)

    def applicationLogic(self):
        return self._env.appLogic

    def mrmlScene(self):
        return self._env.scene

    def processEvents(self, *args):
        pass

    def connect(self, *args):
        return True


# -- the MRML environment ------------------------------------------------------------------------------


class MRMLEnvironment:
    """A scene wired to real logics the way Slicer's application does it."""

    def __init__(self, slicer):
        import vtk

        self.slicer = slicer
        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        self.appLogic.SetSliceLogics(vtk.vtkCollection())
        self.appLogic.SetViewLogics(vtk.vtkCollection())
        self.colorLogic = slicer.vtkSlicerColorLogic()
        self.colorLogic.SetMRMLApplicationLogic(self.appLogic)
        self.appLogic.SetColorLogic(self.colorLogic)
        self.appLogic.SetModuleLogic("Colors", self.colorLogic)
        self.appLogic.SetMRMLScene(self.scene)
        self.colorLogic.SetMRMLScene(self.scene)  # adds the default colour nodes
        if self.scene.GetFirstNodeByClass("vtkMRMLColorTableNode") is None:
            self.colorLogic.AddDefaultColorNodes()
        self.volumesLogic = slicer.vtkSlicerVolumesLogic()
        self.segmentationsLogic = slicer.vtkSlicerSegmentationsModuleLogic()
        for name, logic in (("Volumes", self.volumesLogic), ("Segmentations", self.segmentationsLogic)):
            logic.SetMRMLApplicationLogic(self.appLogic)
            logic.SetMRMLScene(self.scene)
            self.appLogic.SetModuleLogic(name, logic)

    def activate(self) -> "MRMLEnvironment":
        """Make this scene ``slicer.mrmlScene`` with its ``slicer.modules`` and ``slicer.app``."""
        s = self.slicer
        s.mrmlScene = self.scene
        s.modules = types.SimpleNamespace(
            volumes=types.SimpleNamespace(logic=lambda: self.volumesLogic),
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentationsLogic),
            colors=types.SimpleNamespace(logic=lambda: self.colorLogic),
        )
        s.app = _AppStandIn(self)
        return self

    def node_count(self) -> int:
        return self.scene.GetNumberOfNodes()

    def add_slice_views(self, names=("Red", "Yellow", "Green")) -> list:
        """Slice nodes + slice composite nodes as the layout manager would create them (pure MRML)."""
        created = []
        for name in names:
            sliceNode = self.slicer.vtkMRMLSliceNode()
            sliceNode.SetName(name)
            sliceNode.SetLayoutName(name)
            sliceNode.SetSingletonTag(name)
            self.scene.AddNode(sliceNode)
            composite = self.slicer.vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(name)
            composite.SetSingletonTag(name)
            self.scene.AddNode(composite)
            created.append((sliceNode, composite))
        return created


def install_standins(slicer) -> None:
    """Register the stand-ins for the Qt-bound names (idempotent)."""
    for name in ("qt", "ctk"):
        if name not in sys.modules or not getattr(sys.modules[name], "__file__", None):
            sys.modules[name] = _qt_module(name)
    for attr, factory in (("i18n", _i18n_module), ("parameterNodeWrapper", _parameter_node_wrapper_module)):
        full = f"slicer.{attr}"
        if full not in sys.modules:
            sys.modules[full] = factory()
        setattr(slicer, attr, sys.modules[full])
    if "slicer.ScriptedLoadableModule" not in sys.modules:
        sys.modules["slicer.ScriptedLoadableModule"] = _scripted_loadable_module(slicer)
    slicer.ScriptedLoadableModule = sys.modules["slicer.ScriptedLoadableModule"]


def load_module(slicer) -> Any:
    """Import ``MedDiffSeg.py`` (the scripted module) as Slicer would, with the stand-ins installed."""
    install_standins(slicer)
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return importlib.import_module("MedDiffSeg")


# -- shared test data helpers ------------------------------------------------------------------------------

#: Settings of the reference run on the real CT shared by the Logic and worker tests.
ORGANS = ["liver", "spleen"]
SEED = 0
SAMPLES = 2


def load_through_storage_node(slicer, scene, path, name):
    """A scalar volume node read from ``path`` by a storage node (as Slicer's Add Data does)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    assert storage.ReadData(node), f"could not read {path}"
    return node


def _ijk_to_ras(volume_node):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return m


def scene_state(mrml, volume_node):
    """Everything a run must not change: node IDs, the input's voxels, geometry and modification time."""
    scene = mrml.scene
    ids = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    return {
        "count": scene.GetNumberOfNodes(), "ids": ids,
        "classes": [scene.GetNodeByID(i).GetClassName() for i in ids],
        "voxels": np.array(mrml.slicer.util.arrayFromVolume(volume_node)),
        "ijkToRas": mrml.slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume_node)),
        "imageMTime": volume_node.GetImageData().GetMTime(),
    }


def assert_scene_unchanged(before, mrml, volume_node):
    after = scene_state(mrml, volume_node)
    assert after["count"] == before["count"]
    assert after["ids"] == before["ids"]
    assert after["classes"] == before["classes"]
    assert np.array_equal(after["voxels"], before["voxels"])
    assert np.array_equal(after["ijkToRas"], before["ijkToRas"])
    assert after["imageMTime"] == before["imageMTime"]


# -- a scripted user for the Widget ------------------------------------------------------------------------


class GuiSession:
    """The parts of ``slicer.util`` that open windows, replaced by a scripted user (use with monkeypatch).

    ``answer(True, False, ...)`` queues the replies to the next questions (confirmOkCancelDisplay /
    confirmYesNoDisplay); a question nobody scripted fails the test, so a test also checks *how many*
    times the user was asked. Everything shown is recorded: ``questions``, ``errors``, ``warnings``,
    ``infos``, ``statusMessages``.
    """

    def __init__(self, slicer, monkeypatch):
        import contextlib

        import qtfake

        self.slicer = slicer
        self.answers: list[bool] = []
        self.questions: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.infos: list[str] = []
        self.statusMessages: list[str] = []
        util = slicer.util
        monkeypatch.setattr(util, "loadUI", qtfake.load_ui)
        monkeypatch.setattr(util, "childWidgetVariables", qtfake.child_widget_variables)
        monkeypatch.setattr(util, "confirmOkCancelDisplay", self._ask)
        monkeypatch.setattr(util, "confirmYesNoDisplay", self._ask)
        monkeypatch.setattr(util, "errorDisplay", lambda text, *a, **kw: self.errors.append((text, kw.get("detailedText", ""))))
        monkeypatch.setattr(util, "warningDisplay", lambda text, *a, **kw: self.warnings.append(text))
        monkeypatch.setattr(util, "infoDisplay", lambda text, *a, **kw: self.infos.append(text))
        monkeypatch.setattr(util, "showStatusMessage", lambda text, *a, **kw: self.statusMessages.append(text))
        monkeypatch.setattr(util, "delayDisplay", lambda text, *a, **kw: self.infos.append(text))
        monkeypatch.setattr(util, "mainWindow", lambda *a: None)
        monkeypatch.setattr(util, "WaitCursor", contextlib.nullcontext)
        qtfake.timers.clear()
        qtfake._pending.clear()
        qtfake.shortcuts.clear()

    def open(self, module):
        """The module panel as Slicer opens it: a Widget whose ``setup()`` ran (closed by :meth:`close`)."""
        widget = module.MedDiffSegWidget()
        self.widgets = getattr(self, "widgets", []) + [widget]
        widget.setup()
        return widget

    def close(self) -> None:
        """What Slicer does when the module is torn down: the Widget's cleanup (timers, observers, jobs)."""
        for widget in getattr(self, "widgets", []):
            widget.cleanup()
            job = getattr(widget, "_job", None)
            if job is not None:
                job.waitStopped(10)
            for refine in getattr(widget, "_refineStopping", []):  # Refine mode's worker, stopped in the background
                refine.waitStopped(10)
        self.widgets = []

    def answer(self, *answers: bool) -> "GuiSession":
        self.answers.extend(answers)
        return self

    def _ask(self, text, *args, **kwargs) -> bool:
        detail = kwargs.get("detailedText") or ""
        self.questions.append(text + ("\n" + detail if detail else ""))
        if not self.answers:
            raise AssertionError(f"the Widget asked a question the test did not expect: {text!r}")
        return self.answers.pop(0)

    @staticmethod
    def process_events() -> None:
        import qtfake

        qtfake.process_events()

    @staticmethod
    def press(keys: str) -> int:
        """The user presses ``keys`` (e.g. ``"Ctrl+Z"``); returns how many shortcuts answered."""
        import qtfake

        return qtfake.press(keys)


def blocked_import_finder(prefixes):
    """A meta-path finder that makes the top-level packages ``prefixes`` unimportable (as before they are
    installed). Records every ``import`` of them in ``.attempts``; a mere look-up
    (``importlib.util.find_spec``, which says whether a package is there without importing it) goes to
    ``.lookups``."""

    class Blocker:
        def __init__(self):
            self.stacks: list[str] = []
            self.attempts: list[str] = []
            self.lookups: list[str] = []
            self.prefixes = set(prefixes)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.prefixes:
                frame = sys._getframe(1)
                lookup = False
                while frame is not None:
                    filename = frame.f_code.co_filename.replace("\\", "/")
                    if frame.f_code.co_name == "find_spec" and filename.endswith(("importlib/util.py", "importlib.util>")):
                        lookup = True
                        break
                    frame = frame.f_back
                (self.lookups if lookup else self.attempts).append(name)
                if not lookup:  # where it came from, for the failure message
                    import traceback

                    self.stacks.append("".join(traceback.format_stack(limit=12)))
                raise ModuleNotFoundError(f"No module named {name!r} (not installed in this simulated fresh Slicer)",
                                          name=name)
            return None

    return Blocker()
