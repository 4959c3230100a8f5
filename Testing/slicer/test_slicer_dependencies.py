"""Installing the module's Python packages into Slicer's Python (MedDiffSegLogicLib.dependencies).

The installers are stand-ins that record their arguments (nothing is installed here); what is
missing is simulated through ``installedVersion`` / ``torchVersion``. The end-to-end path through the
Widget (one question, PyTorchUtils, slicer.packaging) is in test_slicer_widget.py.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import types
from pathlib import Path

import pytest

from MedDiffSegLogicLib import dependencies

MODULE_DIR = Path(__file__).resolve().parents[2] / "MedDiffSeg"


@pytest.fixture
def missing(monkeypatch):
    """Simulate a fresh Slicer: the named distributions (and torch, unless given a version) are absent."""
    state = {"absent": {"monai", "highdicom"}, "torch": None}
    real = dependencies.installedVersion
    monkeypatch.setattr(dependencies, "installedVersion",
                        lambda name: None if name.lower() in state["absent"] else real(name))
    monkeypatch.setattr(dependencies, "torchVersion", lambda: state["torch"])
    return state


def test_the_plan_names_what_is_installed_and_what_is_kept(missing):
    plan = dependencies.planDependencies(MODULE_DIR)
    assert plan.needsTorch and not plan.satisfied
    assert sorted(r.split(">")[0] for r in plan.missing) == ["highdicom", "monai"]
    assert plan.kept == {name: importlib.metadata.version(name) for name in ("numpy", "SimpleITK", "pydicom")}
    question = plan.question()
    assert "PyTorch >= 2.2, through the PyTorch extension" in question and "monai" in question
    assert f"numpy {plan.kept['numpy']}" in question and "kept as they are" in question
    missing["torch"] = "2.1.2+cu118"
    plan = dependencies.planDependencies(MODULE_DIR)
    assert plan.torchTooOld and "instead of the installed 2.1.2+cu118" in plan.question()
    missing["torch"], missing["absent"] = "2.3.0", set()
    assert dependencies.planDependencies(MODULE_DIR).satisfied


def test_one_question_then_torch_then_the_rest_under_constraints(missing, tmp_path):
    calls = []

    def torch_installer(requirement):
        calls.append(("torch", requirement))
        missing["torch"] = "2.4.1"

    def pip_installer(requirements, constraints):
        calls.append(("pip", list(requirements), Path(constraints).read_text()))
        missing["absent"] = set()

    questions = []
    result = dependencies.ensureDependencies(MODULE_DIR, confirm=lambda q: questions.append(q) or True,
                                             torchInstaller=torch_installer, pipInstaller=pip_installer, workDir=tmp_path)
    assert result and result.installed[0] == "PyTorch" and len(questions) == 1
    assert calls[0] == ("torch", ">=2.2")
    _, requirements, constraints = calls[1]
    assert sorted(r.split(">")[0] for r in requirements) == ["highdicom", "monai"]
    pins = dict(line.split("==") for line in constraints.splitlines() if "==" in line)
    assert pins["torch"] == "2.4.1" and pins["pydicom"] == importlib.metadata.version("pydicom")
    assert pins["numpy"] == importlib.metadata.version("numpy") and pins["SimpleITK"] == importlib.metadata.version("SimpleITK")
    assert list(tmp_path.iterdir()) == [], "the constraints file is removed"
    # nothing missing any more: no question at all
    assert dependencies.ensureDependencies(MODULE_DIR, confirm=lambda q: pytest.fail("asked again"))


def test_declining_or_failing_installs_leave_a_message(missing):
    declined = dependencies.ensureDependencies(MODULE_DIR, confirm=lambda q: False,
                                               torchInstaller=lambda r: pytest.fail("installed after a refusal"))
    assert not declined and declined.declined and "Nothing was installed" in declined.message

    def broken_pip(requirements, constraints):
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    def torch_installer(requirement):
        missing["torch"] = "2.4.1"

    failed = dependencies.ensureDependencies(MODULE_DIR, confirm=lambda q: True, torchInstaller=torch_installer,
                                             pipInstaller=broken_pip)
    assert not failed and not failed.declined and "Installing MedDiffSeg's Python packages failed" in failed.message
    assert failed.installed == ["PyTorch"]
    # pip "succeeded" but left something missing (e.g. Slicer's testing mode): said, not ignored
    still = dependencies.ensureDependencies(MODULE_DIR, confirm=lambda q: True, torchInstaller=torch_installer,
                                            pipInstaller=lambda r, c: None)
    assert not still and "still missing" in still.message


def test_an_old_torch_already_loaded_needs_a_restart(missing, monkeypatch):
    missing["torch"] = "2.0.1"
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.0.1"))
    result = dependencies.ensureDependencies(MODULE_DIR, confirm=lambda q: True,
                                             torchInstaller=lambda r: pytest.fail("upgraded a loaded torch"))
    assert not result and "restart Slicer" in result.message and "2.0.1" in result.message


def test_pip_install_uses_slicers_installer_with_the_constraints(slicer, monkeypatch, tmp_path):
    constraints = tmp_path / "c.txt"
    constraints.write_text("pydicom==2.4.4\n")
    # Slicer >= 5.11: slicer.packaging.pip_ensure with constraints, no second question
    calls = []
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda reqs, **kw: calls.append((reqs, kw))
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    dependencies.pipInstall(["highdicom>=0.22,<1"], constraints)
    assert calls == [(["highdicom>=0.22,<1"], {"constraints": str(constraints), "prompt_install": False,
                                               "requester": "MedDiffSeg"})]
    # Slicer 5.10 and older: slicer.util.pip_install, pip's -c
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)
    installed = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda args: installed.append(args))
    dependencies.pipInstall(["highdicom>=0.22,<1"], constraints)
    assert installed == [["-c", str(constraints), "highdicom>=0.22,<1"]]


def test_torch_is_found_without_being_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    before = set(sys.modules)
    version = dependencies.torchVersion()
    assert version == importlib.metadata.version("torch")
    assert "torch" not in set(sys.modules) - before
