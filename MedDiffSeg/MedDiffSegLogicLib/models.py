"""Model packages for the panel: the list, one package's details, and installs that run in a thread (no Qt).

Everything here reads ``model.json`` through :mod:`MedDiffSegLib.registry`'s torch-free functions
(``list_package_infos``, ``package_info``, ``install_package(full_check=False)``,
``update_package``, ``remove_package``), so the panel lists and manages models in a fresh Slicer
before PyTorch is installed, and never imports torch in Slicer's process. Which packages exist is
read from the folders, never from a list of names in the code.

:class:`ModelInstallJob` runs an install or update (from a zip or an http(s) URL, with the zip's
sha256, or a package of the model catalogue by name) in a background thread; the Widget polls it
from a timer for the progress bar and can cancel it (the download stops at its next block; nothing
is left in the models folder).

The model list groups the packages by method (:func:`groupByMethod`) and offers the catalogue's
packages that are not installed (:func:`catalogueChoices`, read from
``MedDiffSegLib/registry/catalogue.json``; their zips come from the catalogue's base URL, which
``$MEDDIFFSEG_CATALOGUE_URL`` or the setting in ``$MEDDIFFSEG_HOME/settings.json`` points at a mirror).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRow:
    """One line of the panel's model table."""

    name: str
    version: str
    modality: str
    origin: str          # "built-in" or "user"
    default: bool        # the default model for its modality
    shadows: bool        # a user package hiding a built-in one of the same name
    removable: bool

    def cells(self) -> list[str]:
        where = self.origin + (" (replaces the built-in)" if self.shadows else "")
        modality = self.modality + (" (default)" if self.default else "")
        return [self.name, self.version, modality, where]


HEADERS = ["Model", "Version", "Modality", "Where"]


def modelRows() -> list[ModelRow]:
    """The installed packages as table rows (broken folders are logged and skipped)."""
    from MedDiffSegLib.modality import MODALITIES, pick_default
    from MedDiffSegLib.registry import package_origin, scan_package_infos

    scan = scan_package_infos()
    for b in scan.broken:
        log.warning("MedDiffSeg: skipping model folder %s: %s", b.path, b.reason)
    installed = {p.name: p.modality for p in scan.packages}
    defaults = {pick_default(m, installed) for m in MODALITIES} - {None}
    shadowed = {p.name for p in scan.shadowed}
    rows = []
    for p in scan.packages:
        origin = package_origin(p)
        rows.append(ModelRow(p.name, p.version, p.modality, origin, p.name in defaults, p.name in shadowed,
                             origin == "user"))
    return rows


def describe(name: str) -> str:
    """A few lines about an installed package: what it segments, how it was made, its scores, where it is."""
    from MedDiffSegLib.registry import package_info, package_origin
    from MedDiffSegLib.registry.card import data_text

    from .presets import scoreSummary

    info = package_info(name)
    lines = [f"{info.name} {info.version} - {info.description or 'no description'}",
             f"Method {info.method_name}, {info.modality}; organs: {', '.join(o.display_name for o in info.organs)}."]
    scores = scoreSummary(info.metrics)
    if scores:
        lines.append(scores[0].upper() + scores[1:] + ".")
    trained = data_text(info.provenance)
    if trained:
        lines.append(f"Trained on: {trained}.")
    lines.append(f"{package_origin(info).capitalize()} package in {info.path}; weights sha256 {info.weights_sha256[:16]}...")
    return "\n".join(lines)


def groupByMethod(packages: Sequence[Any]) -> list[tuple[str, list[Any]]]:
    """``[(method, its packages by name), ...]`` by method name; a package whose method is unknown goes under "?"."""
    groups: dict[str, list[Any]] = {}
    for package in packages:
        groups.setdefault(str(getattr(package, "method_name", "") or "?"), []).append(package)
    return [(method, sorted(groups[method], key=lambda p: p.name)) for method in sorted(groups)]


@dataclass(frozen=True)
class CatalogueChoice:
    """A package of the model catalogue that is not installed, as the model list offers it."""

    name: str
    version: str
    method: str
    modality: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.method}, {self.modality}, {self.size / 1e6:.1f} MB)"


def catalogueChoices(installedNames: Sequence[str]) -> list[CatalogueChoice]:
    """The catalogue's packages that are not installed, by method then name ([] when the catalogue is unreadable)."""
    from MedDiffSegLib.registry.catalogue import load_catalogue

    try:
        entries = load_catalogue().entries
    except Exception as exc:  # a broken catalogue must not break the model list
        log.warning("MedDiffSeg: cannot read the model catalogue: %s", exc)
        return []
    installed = set(installedNames)
    return sorted((CatalogueChoice(e.name, e.version, e.method, e.modality, e.size) for e in entries
                   if e.name not in installed), key=lambda c: (c.method, c.name))


class ModelInstallJob:
    """Install (``update=None``) or update (``update="name"``) a package from ``source`` in a thread; with
    ``catalogue="name"`` install that package of the model catalogue (``source`` is then its name).

    ``poll()`` -> the latest ``(stage, fraction, message)``; ``finished``; ``result`` (the
    PackageInfo installed) or ``error`` (the message for the user); ``cancel()``.
    """

    def __init__(self, source: str, sha256: str | None = None, *, force: bool = False, update: str | None = None,
                 allowDowngrade: bool = False, catalogue: str | None = None):
        self.source = source
        self.catalogue = catalogue
        self.sha256 = sha256 or None
        self.force = force
        self.update = update
        self.allowDowngrade = allowDowngrade
        self.result: Any = None
        self.previous: Any = None
        self.error = ""
        self.cancelled = False
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[str, float, str] = ("start", 0.0, "")
        self._thread = threading.Thread(target=self._run, name="MedDiffSeg-model-install", daemon=True)
        self.started = 0.0

    def start(self) -> "ModelInstallJob":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _report(self, stage: str, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (stage, float(fraction), str(message))

    def _run(self) -> None:
        from MedDiffSegLib.errors import Cancelled, MedDiffSegError
        from MedDiffSegLib.registry import install_from_catalogue, install_package, update_package

        try:
            if self.catalogue:
                self.result = install_from_catalogue(self.catalogue, force=self.force, progress=self._report,
                                                     should_cancel=self._cancel.is_set, full_check=False)
            elif self.update:
                self.previous, self.result = update_package(
                    self.update, self.source, sha256=self.sha256, allow_downgrade=self.allowDowngrade,
                    progress=self._report, should_cancel=self._cancel.is_set, full_check=False)
            else:
                self.result = install_package(self.source, sha256=self.sha256, force=self.force, progress=self._report,
                                              should_cancel=self._cancel.is_set, full_check=False)
        except Cancelled:
            self.cancelled = True
            self.error = "Cancelled; nothing was installed."
        except MedDiffSegError as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug: keep the message, log the traceback
            log.exception("MedDiffSeg: installing a model failed")
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def finished(self) -> bool:
        return self.started > 0 and not self._thread.is_alive()

    def poll(self) -> tuple[str, float, str]:
        with self._lock:
            return self._progress

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()
