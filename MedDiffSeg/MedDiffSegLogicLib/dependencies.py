"""Python dependencies of the module inside Slicer's Python (no Qt; the one dialog is the caller's).

- **MedDiffSegLib** is found beside the module: in an installed extension (and in the build tree)
  it is copied next to the module file; in a source checkout (module path added in Slicer's
  settings) it is the repository's ``MedDiffSegLib/``, one folder up, which
  :func:`ensureLibraryOnPath` puts on ``sys.path``. Listing and installing models needs nothing
  else (``MedDiffSegLib.registry`` reads ``model.json`` without torch).
- **PyTorch** comes from the PyTorch extension (``PyTorchUtils``), which picks the build for the
  machine's GPU/CUDA; plain pip would pull a CPU or wrong-CUDA wheel. At least
  :data:`MINIMUM_TORCH` is required; an older one is upgraded through the same extension.
- **The library's other requirements** (``Resources/requirements.txt``) are installed with pip
  under a *constraints file* that pins the packages Slicer bundles (:data:`BUNDLED`: numpy,
  SimpleITK, pydicom) and the installed torch to their installed versions, so that no
  requirement's dependency upgrades them (e.g. the newest highdicom would upgrade pydicom; under
  the constraint pip picks a highdicom that works with Slicer's pydicom). Slicer >= 5.11 installs
  with ``slicer.packaging.pip_ensure`` (``slicer.pydeps`` in 5.11 previews) and its ``constraints``
  argument; older Slicer with ``slicer.util.pip_install`` and pip's ``-c``.

:func:`planDependencies` says what is missing without importing anything heavy (torch is looked
for with ``importlib``, never imported: MedDiffSeg does not import torch in Slicer's process).
:func:`ensureDependencies` asks **once** (``confirm(question)``), installs PyTorch and then the
rest, and returns a :class:`DependencyResult` that is false, with a message for the user, when
something is missing afterwards, failed, or the user declined (nothing is installed then).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

REQUIREMENTS_NAME = "requirements.txt"
MINIMUM_TORCH = "2.2"
REQUESTER = "MedDiffSeg"
#: Distributions Slicer ships with its Python: never upgraded or replaced by MedDiffSeg's installs.
BUNDLED = ("numpy", "SimpleITK", "pydicom")


# -- where things are ------------------------------------------------------------------------------------


def libraryRoot(moduleDir: str | Path) -> Path | None:
    """The folder that holds ``MedDiffSegLib/`` for this module (installed, build tree or source checkout)."""
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


# -- what is installed -------------------------------------------------------------------------------------


def installedVersion(distribution: str) -> str | None:
    """The installed version of a distribution (from its metadata; nothing is imported), None when absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versionAtLeast(version: str, minimum: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return Version(version).release >= Version(minimum).release
        except InvalidVersion:
            pass
    except ImportError:  # pragma: no cover - packaging ships with pip
        pass
    numbers = lambda v: tuple(int(p) for p in re.findall(r"\d+", v.split("+", 1)[0])[:3])  # noqa: E731
    return numbers(version) >= numbers(minimum)


def missingRequirements(requirements: list[str]) -> list[str]:
    """The requirements not satisfied in this Python (by installed version when ``packaging`` is there)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip/setuptools
        Requirement = None  # type: ignore[assignment]
    missing = []
    for text in requirements:
        if Requirement is not None:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate():
                continue
        version = installedVersion(_requirementName(text))
        if version is None:
            missing.append(text)
            continue
        if Requirement is not None and req.specifier and not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def torchVersion() -> str | None:
    """The version of the torch this Python would import, found without importing it; None when there is none."""
    if "torch" not in sys.modules:
        try:
            if importlib.util.find_spec("torch") is None:
                return None
        except (ImportError, ValueError):
            return None
    return installedVersion("torch") or getattr(sys.modules.get("torch"), "__version__", None) or "unknown"


def torchAvailable() -> bool:
    """Whether a torch of at least :data:`MINIMUM_TORCH` is installed (not imported)."""
    version = torchVersion()
    return version is not None and (version == "unknown" or _versionAtLeast(version, MINIMUM_TORCH))


# -- the plan ----------------------------------------------------------------------------------------------


@dataclass
class DependencyPlan:
    """What :func:`ensureDependencies` would install, and what it keeps as it is."""

    requirements: list[str]
    missing: list[str]
    torchVersion: str | None                      # installed torch (None: none)
    kept: dict[str, str] = field(default_factory=dict)  # bundled distribution -> its installed version

    @property
    def torchTooOld(self) -> bool:
        return self.torchVersion not in (None, "unknown") and not _versionAtLeast(self.torchVersion, MINIMUM_TORCH)

    @property
    def needsTorch(self) -> bool:
        return self.torchVersion is None or self.torchTooOld

    @property
    def satisfied(self) -> bool:
        return not self.missing and not self.needsTorch

    def items(self) -> list[str]:
        """One line per thing to install, for the question and the log."""
        lines = []
        if self.torchVersion is None:
            lines.append(f"PyTorch >= {MINIMUM_TORCH}, through the PyTorch extension (the build for this computer's GPU)")
        elif self.torchTooOld:
            lines.append(f"PyTorch >= {MINIMUM_TORCH} instead of the installed {self.torchVersion}, through the PyTorch extension")
        return lines + list(self.missing)

    def question(self) -> str:
        """The one question asked before anything is installed."""
        text = ("MedDiffSeg needs these Python packages in Slicer's Python. They will now be downloaded and "
                "installed (PyTorch with GPU support is several GB; this can take some minutes):\n\n"
                + "\n".join(f"  - {item}" for item in self.items()))
        if self.kept:
            text += ("\n\nSlicer's own " + ", ".join(f"{name} {version}" for name, version in self.kept.items())
                     + " are kept as they are.")
        return text + "\n\nInstall them now?"

    def reason(self) -> str:
        """Why the module cannot segment yet ("" when it can)."""
        if self.satisfied:
            return ""
        return "MedDiffSeg's Python packages are not installed yet: " + "; ".join(self.items())


def planDependencies(moduleDir: str | Path) -> DependencyPlan:
    ensureLibraryOnPath(moduleDir)
    path = requirementsFile(moduleDir)
    requirements = readRequirements(path) if path else []
    kept = {name: v for name in BUNDLED if (v := installedVersion(name)) is not None}
    return DependencyPlan(requirements=requirements, missing=missingRequirements(requirements),
                          torchVersion=torchVersion(), kept=kept)


def constraintsText(pinned: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in pinned.items())


def writeConstraints(pinned: dict[str, str], folder: str | Path | None = None) -> Path:
    """A pip constraints file pinning ``pinned`` (distribution -> version)."""
    handle = tempfile.NamedTemporaryFile("w", prefix="MedDiffSeg-constraints-", suffix=".txt", delete=False,
                                         dir=None if folder is None else str(folder), encoding="utf-8")
    with handle:
        handle.write("# Packages MedDiffSeg must not change in Slicer's Python (bundled with Slicer, or PyTorch\n"
                     "# from the PyTorch extension): pip may only pick versions that work with these.\n")
        handle.write(constraintsText(pinned))
    return Path(handle.name)


# -- installing ----------------------------------------------------------------------------------------------


class DependencyError(RuntimeError):
    """An installation step failed; the message is for the user."""


@dataclass
class DependencyResult:
    ok: bool
    declined: bool = False
    message: str = ""          # for the user ("" when ok)
    details: str = ""          # for the log
    installed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok


def installTorch(requirement: str) -> None:
    """Install (or upgrade) PyTorch through the PyTorch extension, without a dialog of its own."""
    try:
        import PyTorchUtils  # the SlicerPyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        raise DependencyError("PyTorch is not installed and the PyTorch extension is missing: install 'PyTorch' from "
                              "the Extensions Manager, restart Slicer, then click Segment again.") from None
    logic = PyTorchUtils.PyTorchUtilsLogic()
    torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=requirement)
    if torch is None:
        raise DependencyError("the PyTorch extension did not install PyTorch (see the Python console)")


def pipInstall(requirements: list[str], constraints: Path) -> None:
    """Install ``requirements`` under ``constraints`` with the best tool this Slicer has (no dialog: asked already)."""
    for moduleName in ("slicer.packaging", "slicer.pydeps"):  # Slicer >= 5.11
        try:
            module = importlib.import_module(moduleName)
        except ImportError:
            continue
        ensure = getattr(module, "pip_ensure", None)
        if ensure is not None:
            try:
                ensure(list(requirements), constraints=str(constraints), prompt_install=False, requester=REQUESTER)
            except TypeError as exc:  # a 5.11 preview without prompt_install: it asks once more itself
                if "prompt_install" not in str(exc):
                    raise
                ensure(list(requirements), constraints=str(constraints), requester=REQUESTER)
            return
    import slicer  # Slicer <= 5.10: pip_install(list) passes each item to pip as one argument

    slicer.util.pip_install(["-c", str(constraints), *requirements])


def ensureDependencies(moduleDir: str | Path, confirm: Callable[[str], bool] | None = None, *,
                       torchInstaller: Callable[[str], None] = installTorch,
                       pipInstaller: Callable[[list[str], Path], None] = pipInstall,
                       workDir: str | Path | None = None) -> DependencyResult:
    """Everything the module needs to segment, installed on first use; see the module docstring.

    ``confirm(question)`` is asked once before anything is installed (None: install without asking).
    """
    plan = planDependencies(moduleDir)
    if plan.satisfied:
        return DependencyResult(True)
    if confirm is not None and not confirm(plan.question()):
        return DependencyResult(False, declined=True, message=(
            "Nothing was installed. MedDiffSeg needs these Python packages to segment: "
            + "; ".join(plan.items()) + ". Click Segment again to install them."))
    installed = []
    constraints = None
    try:
        if plan.needsTorch:
            if "torch" in sys.modules and plan.torchTooOld:
                raise DependencyError(f"PyTorch {plan.torchVersion} is already loaded in Slicer and older than the "
                                      f"{MINIMUM_TORCH} MedDiffSeg needs: upgrade it in the PyTorch Utils module, "
                                      "restart Slicer, then click Segment again.")
            log.info("MedDiffSeg: installing PyTorch >= %s through the PyTorch extension", MINIMUM_TORCH)
            torchInstaller(f">={MINIMUM_TORCH}")
            importlib.invalidate_caches()
            installed.append("PyTorch")
        version = torchVersion()
        if version is None or not torchAvailable():
            raise DependencyError(f"PyTorch >= {MINIMUM_TORCH} is still not available after installing it "
                                  f"(found: {version or 'none'}); see the Python console")
        missing = missingRequirements(plan.requirements)
        if missing:
            pinned = dict(plan.kept)
            if version != "unknown":
                pinned["torch"] = version  # a local version (2.3.1+cu121) pins that very build
            constraints = writeConstraints(pinned, workDir)
            log.info("MedDiffSeg: installing %s with constraints %s", missing, pinned)
            pipInstaller(missing, constraints)
            importlib.invalidate_caches()
            installed += missing
        still = missingRequirements(plan.requirements)
        if still:
            raise DependencyError("these packages are still missing after installing them: " + ", ".join(still)
                                  + " (see the Python console; in Slicer's testing mode nothing is installed)")
        changed = {name: v for name, v in plan.kept.items() if installedVersion(name) != v}
        if changed:
            log.warning("MedDiffSeg: Slicer's bundled packages changed while installing: %s", changed)
    except DependencyError as exc:
        return DependencyResult(False, message=str(exc), installed=installed)
    except Exception as exc:  # pip or the PyTorch extension failed: say so, keep the panel usable
        log.exception("MedDiffSeg: installing Python packages failed")
        return DependencyResult(False, message=f"Installing MedDiffSeg's Python packages failed: {exc}",
                                details=f"{type(exc).__name__}: {exc}", installed=installed)
    finally:
        if constraints is not None:
            constraints.unlink(missing_ok=True)
    return DependencyResult(True, installed=installed)
