"""Run the MedDiffSeg Slicer module on real MRML (slicer-core) without the desktop application.

What is real: ``import slicer`` from the slicer-core wheel - the MRML scene, volume/segmentation/
colour nodes, storage nodes (NRRD, NIfTI, DICOM file lists), the Volumes, Segmentations and Colors
logics, the application logic, and the whole ``slicer/util.py``. :func:`bootstrap_mrml` wires them
up as the application does at start-up (see docs/DESIGN.md "Testing the Slicer side without the
desktop app"): a bare ``vtkMRMLScene`` cannot hold segmentations.

What is stood in for - only the names the wheel lacks because they need Qt or the application:
``qt``, ``ctk``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``,
``slicer.i18n`` and ``slicer.app``. The stand-ins are just enough for ``MedDiffSeg.py`` to import
and for its Logic and self-test to run; the Widget is never executed here (it is checked
structurally against the ``.ui`` file by the structure tests).

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


class _QtStandIn:
    """Any attribute, any call: enough for module-level references to qt/ctk names to resolve."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _QtStandIn()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _QtStandIn()

    def connect(self, *args, **kwargs):
        return True


def _qt_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = f"test stand-in for {name} (no Qt in slicer-core)"

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (_QtStandIn,), {})

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
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
            self.parent = parent
            self.moduleName = self.__class__.__name__[: -len("Widget")]

        def setup(self):
            raise RuntimeError("the Widget needs Qt; it is not run in the slicer-core test harness")

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
    lists the fields (name -> (type hint, default)), as the structure tests need; ``connectGui`` is
    inert (no Qt here).
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

        def connectGui(self, gui):
            return object()

        def disconnectGui(self, tag):
            pass

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
