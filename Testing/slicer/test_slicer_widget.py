"""The Widget itself: ``setup()`` and button clicks on real MRML, with Qt stood in (qtfake.py).

The main test is a **fresh install**: Slicer with only the PyTorch extension, before the first
Segment. torch and the library's other requirements that Slicer does not bundle are made
unimportable (a meta-path blocker; their metadata reads as absent); the module is imported afresh;
``PyTorchUtils`` (the PyTorch extension) and ``slicer.packaging`` (Slicer's installer) are stand-ins
that record what they are asked and then "install" by making the hidden packages importable
again. The panel must open, list the shipped models from their model.json, ask once on the first
Segment, install PyTorch through the extension with the minimum version, install the rest under
constraints that keep Slicer's numpy/SimpleITK/pydicom, and then segment (in a real worker process);
declining must leave a message and a working panel. Slicer's process must never import torch for
any of this.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import slicer_harness
from slicer_harness import GuiSession, blocked_import_finder

REPO = Path(__file__).resolve().parents[2]
#: Packages of Resources/requirements.txt that Slicer does not bundle (pydicom and scipy come with Slicer).
NOT_BUNDLED = ("monai", "diffusers", "safetensors", "tqdm", "einops", "highdicom", "pynetdicom")
HIDDEN = ("torch", *NOT_BUNDLED)
OURS = ("MedDiffSeg", "MedDiffSegLib", "MedDiffSegLogicLib")
#: Library modules that import torch: none of them may be loaded in Slicer's process by the panel.
TORCH_MODULES = ("MedDiffSegLib.registry.package", "MedDiffSegLib.preprocessing.spec", "MedDiffSegLib.inference.device",
                 "MedDiffSegLib.inference.engine", "MedDiffSegLib.io.geometry", "MedDiffSegLib.methods.base")
WORKER_TIMEOUT = 240


def shipped_model_names() -> list[str]:
    """The built-in packages, read the way a user would: every MedDiffSegLib/models/*/model.json."""
    return sorted(json.loads(p.read_text())["name"] for p in (REPO / "MedDiffSegLib" / "models").glob("*/model.json"))


def _top(name: str) -> str:
    return name.split(".", 1)[0]


class FreshSlicer:
    """Hides torch and the non-bundled requirements, imports the module afresh, stands in for the installers."""

    def __init__(self, slicer, monkeypatch):
        self.slicer = slicer
        self.saved = {k: v for k, v in sys.modules.items() if _top(k) in HIDDEN + OURS}
        for key in self.saved:
            del sys.modules[key]
        self.blocker = blocked_import_finder(HIDDEN)
        sys.meta_path.insert(0, self.blocker)
        self.installed: set[str] = set()
        self.torch_calls: list[dict] = []
        self.pip_calls: list[dict] = []
        self.module = slicer_harness.load_module(slicer)
        deps = sys.modules["MedDiffSegLogicLib.dependencies"]
        real = deps.installedVersion

        def installed_version(distribution: str):
            name = distribution.lower().replace("_", "-")
            if name in HIDDEN and name not in self.installed:
                return None
            return real(distribution)

        monkeypatch.setattr(deps, "installedVersion", installed_version)
        self.deps = deps
        fresh = self

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
                fresh.torch_calls.append({"askConfirmation": askConfirmation, "requirement": torchVersionRequirement})
                fresh.make_installed("torch")
                return sys.modules["torch"]  # the real extension imports torch once it is installed

        monkeypatch.setitem(sys.modules, "PyTorchUtils",
                            types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic, __name__="PyTorchUtils"))

        def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                       requester=None, **kwargs):
            fresh.pip_calls.append({"requirements": [str(r) for r in requirements], "constraints": constraints,
                                    "constraints_text": Path(constraints).read_text() if constraints else "",
                                    "skip_packages": skip_packages, "prompt_install": prompt_install,
                                    "requester": requester})
            for r in requirements:
                fresh.make_installed(str(r).split(">")[0].split("<")[0].split("=")[0].strip().lower())

        packaging = types.ModuleType("slicer.packaging")
        packaging.pip_ensure = pip_ensure
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
        monkeypatch.setattr(slicer, "packaging", packaging, raising=False)

    def make_installed(self, name: str) -> None:
        self.installed.add(name)
        self.blocker.prefixes.discard(name)
        for key, value in self.saved.items():
            if _top(key) == name:
                sys.modules.setdefault(key, value)

    def torch_free(self) -> list[str]:
        """Library modules that import torch and were loaded in this process (must be none)."""
        return [m for m in TORCH_MODULES if m in sys.modules]

    def restore(self) -> None:
        if self.blocker in sys.meta_path:
            sys.meta_path.remove(self.blocker)
        for key in [k for k in sys.modules if _top(k) in OURS]:
            del sys.modules[key]
        sys.modules.update(self.saved)


@pytest.fixture
def fresh(slicer, mrml, monkeypatch, tiny_package):
    env = FreshSlicer(slicer, monkeypatch)
    try:
        yield env
    finally:
        env.restore()


@pytest.fixture
def gui(slicer, monkeypatch):
    session = GuiSession(slicer, monkeypatch)
    yield session
    session.close()


def body_volume(slicer, name="patient"):
    """A small CT-like volume (air around a soft-tissue ellipse, in HU) for a fast run of the tiny model."""
    z, y, x = np.mgrid[0:4, 0:40, 0:48]
    array = np.where(((x - 24) / 18.0) ** 2 + ((y - 20) / 14.0) ** 2 < 1, 40, -1000).astype(np.int16)
    array[:, 18:22, 20:28] = -100  # some fat
    node = slicer.util.addVolumeFromArray(array, name=name)
    node.SetSpacing(8.0, 8.0, 8.0)
    return node


def install_user_package(package_path) -> None:
    from MedDiffSegLib.registry.store import user_models_dir

    dest = user_models_dir() / Path(package_path).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(package_path, dest)


def run_until_done(widget, timeout=WORKER_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while widget._job is not None:
        assert time.monotonic() < deadline, "the segmentation did not finish in time"
        widget._timer.fire()
        time.sleep(0.05)


# -- a fresh install -----------------------------------------------------------------------------------------------


def test_fresh_install_opens_lists_models_asks_once_installs_and_segments(fresh, gui, slicer, mrml, tiny_package):
    module = fresh.module
    install_user_package(tiny_package.path)
    volume = body_volume(slicer)
    mrml.add_slice_views()
    widget = gui.open(module)  # the module panel opens (setup()): no torch, no error

    listed = [data for _text, data in widget.ui.modelComboBox.items()]
    assert listed[-1] == "__install_from_file__"
    assert sorted(listed[:-1]) == sorted(shipped_model_names() + ["tiny-guided"])
    assert [r[0] for r in widget.ui.modelsTableWidget.rows()] == sorted(shipped_model_names() + ["tiny-guided"])
    assert "PyTorch" in widget.ui.statusLabel.text  # the panel says what the first Segment installs
    assert fresh.blocker.attempts == [], f"torch was imported at setup: {fresh.blocker.attempts} {fresh.blocker.stacks}"

    combo = widget.ui.modelComboBox
    combo.activate(combo.findData("tiny-guided"))
    assert [widget.ui.organsListWidget.item(i).text() for i in range(widget.ui.organsListWidget.count)] == ["Liver", "Spleen"]
    widget.ui.selectAllOrgansButton.click()
    assert widget._parameterNode.inputVolume is volume
    widget._parameterNode.samples = 2
    assert widget.ui.segmentButton.enabled, widget.ui.segmentButton.toolTip

    # Declining: one question, nothing installed, a clear message, the panel still works.
    gui.answer(False)
    widget.ui.segmentButton.click()
    assert len(gui.questions) == 1 and "PyTorch >= 2.2" in gui.questions[0] and "monai" in gui.questions[0]
    assert "numpy" in gui.questions[0] and "kept as they are" in gui.questions[0]
    assert "Nothing was installed" in widget.ui.statusLabel.text and not gui.errors
    assert fresh.torch_calls == [] and fresh.pip_calls == [] and widget._job is None
    assert widget.ui.segmentButton.enabled and widget.ui.segmentButton.text == "Segment"
    assert fresh.blocker.attempts == [] and fresh.torch_free() == []

    # Accepting: one more question (one per click), PyTorch through the extension, the rest with constraints.
    gui.answer(True)
    widget.ui.segmentButton.click()
    assert len(gui.questions) == 2, gui.questions
    assert fresh.torch_calls == [{"askConfirmation": False, "requirement": ">=2.2"}]
    (pip,) = fresh.pip_calls
    assert sorted(r.split(">")[0] for r in pip["requirements"]) == sorted(NOT_BUNDLED)
    assert pip["prompt_install"] is False and pip["skip_packages"] is None and pip["requester"] == "MedDiffSeg"
    pins = dict(line.split("==") for line in pip["constraints_text"].splitlines() if "==" in line)
    for bundled in ("numpy", "SimpleITK", "pydicom", "torch"):
        assert pins[bundled] == importlib.metadata.version(bundled), pip["constraints_text"]
    assert not Path(pip["constraints"]).exists(), "the constraints file is removed afterwards"
    assert fresh.blocker.attempts == [], "torch was looked for by an import before it was installed"
    assert widget._job is not None and widget.ui.segmentButton.text == "Cancel", gui.errors
    assert widget.ui.statusLabel.text.startswith("No GPU available: the CPU") or "Device:" in widget.ui.statusLabel.text

    run_until_done(widget)
    assert not gui.errors, gui.errors
    assert "Done in" in widget.ui.statusLabel.text
    rows = widget.ui.resultsTableWidget.rows()
    assert [r[:2] for r in rows] == [["patient", "Liver"], ["patient", "Spleen"]]
    assert widget._parameterNode.resultSegmentation is widget._lastResult.segmentationNode
    assert fresh.torch_free() == [], f"Slicer's process imported {fresh.torch_free()}"


def test_the_extension_missing_is_said_and_the_panel_keeps_working(fresh, gui, slicer, mrml, tiny_package, monkeypatch):
    monkeypatch.delitem(sys.modules, "PyTorchUtils")
    install_user_package(tiny_package.path)
    body_volume(slicer)
    widget = gui.open(fresh.module)
    widget.ui.modelComboBox.activate(widget.ui.modelComboBox.findData("tiny-guided"))
    widget.ui.selectAllOrgansButton.click()
    gui.answer(True)
    widget.ui.segmentButton.click()
    (error, _details), = gui.errors
    assert "PyTorch extension is missing" in error and "Extensions Manager" in error
    assert widget._job is None and widget.ui.segmentButton.enabled and fresh.pip_calls == []


def test_install_from_file_works_without_torch(fresh, gui, slicer, mrml, tiny_package, tmp_path, monkeypatch):
    from MedDiffSegLib.registry import export_zip

    zip_path = tmp_path / "tiny.zip"
    export_zip(read_info(tiny_package.path), zip_path)  # hashing and zipfile only: works without torch too
    widget = gui.open(fresh.module)
    monkeypatch.setattr(fresh.module.qt.QFileDialog, "getOpenFileName", staticmethod(lambda *a: str(zip_path)))
    combo = widget.ui.modelComboBox
    combo.activate(combo.findData("__install_from_file__"))
    deadline = time.monotonic() + 60
    while widget._modelJob is not None:
        assert time.monotonic() < deadline
        widget._modelTimer.fire()
        time.sleep(0.02)
    assert not gui.errors, gui.errors
    assert combo.currentData == "tiny-guided"
    assert "Installed model tiny-guided 0.0.1" in widget.ui.modelDetailsLabel.text
    assert fresh.blocker.attempts == [] and fresh.torch_free() == []


def read_info(path):
    from MedDiffSegLib.registry import read_package_info

    return read_package_info(path)


# -- managing models in the panel ---------------------------------------------------------------------------------


def wait_model_job(widget, timeout=60):
    deadline = time.monotonic() + timeout
    while widget._modelJob is not None:
        assert time.monotonic() < deadline, "the model installation did not finish"
        widget._modelTimer.fire()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny_zips(tiny_package, tmp_path_factory):
    """The tiny package as a zip, and a newer version of it (same name and weights, version 0.0.2)."""
    from MedDiffSegLib.registry import export_zip, read_package_info

    root = tmp_path_factory.mktemp("panel_zips")
    newer = root / "newer" / "tiny-guided"
    shutil.copytree(tiny_package.path, newer)
    meta = json.loads((newer / "model.json").read_text())
    meta["version"] = "0.0.2"
    (newer / "model.json").write_text(json.dumps(meta))
    return {"0.0.1": export_zip(read_package_info(tiny_package.path), root / "tiny-0.0.1.zip"),
            "0.0.2": export_zip(read_package_info(newer), root / "tiny-0.0.2.zip")}


def test_models_are_installed_from_a_url_updated_and_removed_in_the_panel(fresh, gui, slicer, mrml, tiny_zips):
    from localserver import LocalFileServer

    from MedDiffSegLib.registry import sha256_file

    widget = gui.open(fresh.module)
    ui = widget.ui
    shipped = shipped_model_names()
    assert [r[0] for r in ui.modelsTableWidget.rows()] == shipped
    with LocalFileServer({"/tiny.zip": tiny_zips["0.0.1"].read_bytes(), "/new.zip": tiny_zips["0.0.2"].read_bytes()},
                         chunk_size=8192) as server:
        # a wrong hash: refused, said, nothing installed
        ui.modelUrlLineEdit.text = server.url("/tiny.zip")
        ui.modelSha256LineEdit.text = "0" * 64
        ui.installModelUrlButton.click()
        assert ui.modelInstallProgressBar.visible and ui.installModelUrlButton.text == "Cancel download"
        wait_model_job(widget)
        (error, _), = gui.errors
        assert "does not match the expected sha256" in error and not ui.modelInstallProgressBar.visible
        assert [r[0] for r in ui.modelsTableWidget.rows()] == shipped
        # the right hash: downloaded with progress, installed, listed, selected in the model list
        ui.modelSha256LineEdit.text = sha256_file(tiny_zips["0.0.1"])
        seen = []
        ui.installModelUrlButton.click()
        while widget._modelJob is not None:
            widget._modelTimer.fire()
            seen.append(ui.modelInstallProgressBar.value)
            time.sleep(0.01)
        assert len(gui.errors) == 1, gui.errors
        assert "Installed model tiny-guided 0.0.1" in ui.modelDetailsLabel.text
        assert seen == sorted(seen) or max(seen) <= 1000
        rows = {r[0]: r for r in ui.modelsTableWidget.rows()}
        assert rows["tiny-guided"][1:] == ["0.0.1", "CT", "user"]
        assert ui.modelComboBox.currentData == "tiny-guided"
        # details, and the buttons follow the selection: a built-in cannot be removed, a user package can
        row = sorted(rows).index(shipped[0])
        ui.modelsTableWidget.selectRow(row)
        ui.modelsTableWidget.emit("cellClicked", row, 0)
        assert shipped[0] in ui.modelDetailsLabel.text and not ui.removeModelButton.enabled
        assert "built into MedDiffSeg" in ui.removeModelButton.toolTip
        row = sorted(rows).index("tiny-guided")
        ui.modelsTableWidget.selectRow(row)
        ui.modelsTableWidget.emit("cellClicked", row, 0)
        assert "Method guided, CT; organs: Liver, Spleen" in ui.modelDetailsLabel.text
        assert ui.removeModelButton.enabled and ui.updateModelButton.enabled
        # update the selected model from a URL to its newer version
        ui.modelUrlLineEdit.text = server.url("/new.zip")
        ui.modelSha256LineEdit.text = sha256_file(tiny_zips["0.0.2"])
        ui.updateModelButton.click()
        wait_model_job(widget)
        assert "Updated tiny-guided from 0.0.1 to 0.0.2" in ui.modelDetailsLabel.text, ui.modelDetailsLabel.text
        assert {r[0]: r[1] for r in ui.modelsTableWidget.rows()}["tiny-guided"] == "0.0.2"
    # remove: asked first; declining keeps it
    row = [r[0] for r in ui.modelsTableWidget.rows()].index("tiny-guided")
    ui.modelsTableWidget.selectRow(row)
    ui.modelsTableWidget.emit("cellClicked", row, 0)
    gui.answer(False)
    ui.removeModelButton.click()
    assert "tiny-guided" in [r[0] for r in ui.modelsTableWidget.rows()]
    gui.answer(True)
    ui.removeModelButton.click()
    assert [r[0] for r in ui.modelsTableWidget.rows()] == shipped
    assert "tiny-guided" not in [d for _, d in ui.modelComboBox.items()]
    assert fresh.blocker.attempts == [] and fresh.torch_free() == []


def test_a_download_can_be_cancelled_from_the_panel(gui, slicer, mrml, module, tiny_zips):
    from localserver import LocalFileServer

    from MedDiffSegLib.registry import sha256_file, user_models_dir

    widget = gui.open(module)
    ui = widget.ui
    with LocalFileServer({"/tiny.zip": tiny_zips["0.0.1"].read_bytes()}, chunk_size=1024, chunk_delay=0.02) as server:
        ui.modelUrlLineEdit.text = server.url("/tiny.zip")
        ui.modelSha256LineEdit.text = sha256_file(tiny_zips["0.0.1"])
        ui.installModelUrlButton.click()
        deadline = time.monotonic() + 20
        while widget._modelJob.poll()[0] != "download" or widget._modelJob.poll()[1] <= 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ui.installModelUrlButton.click()  # "Cancel download"
        wait_model_job(widget)
    assert ui.modelDetailsLabel.text == "Cancelled; nothing was installed." and not gui.errors
    assert not (user_models_dir() / "tiny-guided").exists()
    assert not [p for p in user_models_dir().iterdir()] if user_models_dir().is_dir() else True


# -- cancel, the self-test ------------------------------------------------------------------------------------------


def test_cancel_in_the_panel_returns_within_a_second(gui, slicer, mrml, module, tiny_package, monkeypatch):
    """Segment, then Cancel: the click returns at once although the worker ignores SIGTERM; the process tree
    is ended in the background, nothing enters the scene."""
    import textwrap

    import MedDiffSegLogicLib.segmentation as segmentation

    stubborn = textwrap.dedent("""
        import json, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"type": "start", "protocol": 1}), flush=True)
        print(json.dumps({"type": "progress", "stage": "network", "fraction": 0.1, "message": "sampling"}), flush=True)
        time.sleep(120)
    """)
    monkeypatch.setattr(segmentation, "workerCommand", lambda request, python=None: [sys.executable, "-c", stubborn])
    monkeypatch.setattr(module.MedDiffSegLogic, "_deviceCache", {"auto": {"device": "cpu: stand-in", "gpu": False}})
    install_user_package(tiny_package.path)
    body_volume(slicer)
    widget = gui.open(module)
    widget.ui.modelComboBox.activate(widget.ui.modelComboBox.findData("tiny-guided"))
    widget.ui.selectAllOrgansButton.click()
    before = mrml.node_count()
    widget.ui.segmentButton.click()
    job = widget._job
    assert job is not None and widget.ui.segmentButton.text == "Cancel"
    deadline = time.monotonic() + 30
    while job.tracker.stage != "network":
        assert time.monotonic() < deadline
        widget._timer.fire()
        time.sleep(0.05)
    t0 = time.monotonic()
    widget.ui.segmentButton.click()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"Cancel took {elapsed:.2f} s"
    assert widget._job is None and widget.ui.segmentButton.text == "Segment"
    assert "Cancelled" in widget.ui.statusLabel.text
    assert job.waitStopped(5) and job.runner.poll() is not None and job.tempDir is None
    assert mrml.node_count() == before


def test_the_self_test_skips_with_a_reason_when_it_cannot_install(slicer, mrml, module, monkeypatch):
    import unittest

    deps = sys.modules["MedDiffSegLogicLib.dependencies"]
    plan = deps.DependencyPlan(requirements=["monai>=1.4"], missing=["monai>=1.4"], torchVersion=None)
    monkeypatch.setattr(deps, "planDependencies", lambda moduleDir: plan)
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: True, raising=False)
    shown = []
    test = module.MedDiffSegTest()
    monkeypatch.setattr(test, "delayDisplay", lambda text, *a: shown.append(text))
    test.runTest()  # Slicer's "Reload and Test": a message, no error
    assert shown and "skipped" in shown[-1] and "PyTorch" in shown[-1] and "testing mode" in shown[-1]
    with pytest.raises(unittest.SkipTest, match="testing mode"):
        test.test_SegmentSyntheticVolume()
    # outside testing mode it installs after asking; declining skips with the message
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: False, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False)
    with pytest.raises(unittest.SkipTest, match="Nothing was installed"):
        test.test_SegmentSyntheticVolume()
