"""Python dependencies of the module inside Slicer's Python (no Qt; dialogs are the caller's).

- **MedDiffSegLib** is found beside the module: in an installed extension it is copied next to the
  module file; in a source checkout (module path added in Slicer's settings) it is the repository's
  ``MedDiffSegLib/``, one folder up, which :func:`ensureLibraryOnPath` puts on ``sys.path``.
- **PyTorch** comes from the SlicerPyTorch extension (``PyTorchUtils``), which picks the build
  for the machine's GPU/CUDA; plain pip would pull a CPU or wrong-CUDA wheel.
- **The library's other requirements** (``Resources/requirements.txt``) are installed with
  ``slicer.pydeps.pip_ensure`` (Slicer >= 5.11; ``slicer.packaging.pip_ensure`` in some builds)
  or, on older Slicer, ``slicer.util.pip_install`` for the missing ones only.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

REQUIREMENTS_NAME = "requirements.txt"
MINIMUM_TORCH = "2.2"
REQUESTER = "MedDiffSeg"


def libraryRoot(moduleDir: str | Path) -> Path | None:
    """The folder that holds ``MedDiffSegLib/`` for this module (installed or source checkout)."""
    moduleDir = Path(moduleDir)
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / "MedDiffSegLib" / "__init__.py").is_file():
            return candidate
    return None


def ensureLibraryOnPath(moduleDir: str | Path) -> Path | None:
    """Make ``import MedDiffSegLib`` work; returns the folder added (or already holding it)."""
    root = libraryRoot(moduleDir)
    if root is not None and str(root) not in sys.path:
        try:
            found = importlib.util.find_spec("MedDiffSegLib") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            sys.path.insert(0, str(root))
    return root


def requirementsFile(moduleDir: str | Path) -> Path | None:
    """``Resources/requirements.txt``: beside the installed module, or at the top of a source checkout."""
    moduleDir = Path(moduleDir)
    for candidate in (moduleDir / "Resources" / REQUIREMENTS_NAME, moduleDir.parent / "Resources" / REQUIREMENTS_NAME):
        if candidate.is_file():
            return candidate
    return None


def readRequirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file (comments, blanks and pip options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _requirementName(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0]


def missingRequirements(requirements: list[str]) -> list[str]:
    """The requirements not satisfied in this Python (by installed version when ``packaging`` is there)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        Requirement = None  # type: ignore[assignment]
    missing = []
    for text in requirements:
        name = _requirementName(text)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if Requirement is not None:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate():
                continue
            if req.specifier and not req.specifier.contains(version, prereleases=True):
                missing.append(text)
    return missing


def torchAvailable() -> bool:
    try:
        importlib.import_module("torch")
    except ImportError:
        return False
    return True


def ensureTorch(askConfirmation: bool = True) -> bool:
    """Install PyTorch through SlicerPyTorch when missing; False when that is not possible."""
    if torchAvailable():
        return True
    try:
        import PyTorchUtils  # the SlicerPyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        log.error("PyTorch is not installed and the PyTorch extension is missing: install 'PyTorch' "
                  "from the Extensions Manager, restart Slicer, then try again")
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=f">={MINIMUM_TORCH}")
        if torch is None:
            return False
    return torchAvailable()


def pipEnsure(requirements: list[str]) -> None:
    """Install what is missing with Slicer's own tools (newest API first)."""
    missing = missingRequirements(requirements)
    if not missing:
        return
    import slicer

    for moduleName in ("slicer.pydeps", "slicer.packaging"):
        try:
            module = importlib.import_module(moduleName)
        except ImportError:
            continue
        ensure = getattr(module, "pip_ensure", None)
        if ensure is None:
            continue
        try:
            from packaging.requirements import Requirement

            reqs = [Requirement(r) for r in missing]
        except ImportError:  # pragma: no cover
            reqs = missing
        # torch comes from SlicerPyTorch and SimpleITK from Slicer itself: never let pip replace them
        ensure(reqs, skip_packages=["torch", "SimpleITK"], requester=REQUESTER)
        return
    slicer.util.pip_install(missing)


def ensureDependencies(moduleDir: str | Path, askConfirmation: bool = True,
                       confirm: Callable[[str], bool] | None = None) -> bool:
    """Everything the module needs, installed on first use. Returns True when all is available.

    ``confirm(message)`` is asked before anything is installed (the Widget shows a dialog).
    """
    ensureLibraryOnPath(moduleDir)
    path = requirementsFile(moduleDir)
    requirements = readRequirements(path) if path else []
    missing = missingRequirements(requirements)
    needTorch = not torchAvailable()
    if not missing and not needTorch:
        return True
    what = (["PyTorch (through the PyTorch extension)"] if needTorch else []) + missing
    if confirm is not None and not confirm("MedDiffSeg needs these Python packages, which will now be installed:\n\n"
                                           + "\n".join(f"  - {w}" for w in what)):
        return False
    if needTorch and not ensureTorch(askConfirmation=askConfirmation):
        return False
    pipEnsure(requirements)
    return not missingRequirements(requirements) and torchAvailable()
