"""One worker's side of a batch: load the model once, segment study after study, never raise.

:class:`StudySegmenter` is what runs in a Ray actor (:mod:`.ray_engine`) or, without Ray, in
the command's own process (:mod:`.batch`). It calls :func:`~MedDiffSegLib.inference.pipeline.run_segment`,
the function behind ``meddiffseg segment``, with the network it loaded once (``method=``), so a
study's outputs are exactly those of ``segment`` with the same options and seed.

Per study (:meth:`StudySegmenter.segment`):

1. a study whose folder already holds complete outputs made with the same model (sha256) and
   settings is not run again (:func:`completed`; a study retried after its worker died may have
   finished just before);
2. a study larger than ``max_voxels`` (read from its header) is refused;
3. ``run_segment`` writes into a fresh hidden folder ``DIR/.partial.<random>.<id>``, which is
   renamed to ``DIR/<id>`` only when complete, so ``DIR/<id>`` always holds a complete set of
   outputs or nothing; an existing ``DIR/<id>`` is set aside (``.replaced.<random>.<id>``) for the
   instant of the swap and then removed, and only when it holds nothing but ``segment`` outputs;
4. the outcome is a plain dict (:meth:`StudySegmenter.segment`'s docstring): every error becomes
   the study's error; those that would fail every study (the model or the device) are ``fatal``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import Cancelled, DeviceError, InputError, MedDiffSegError, ModelError, OutputError
from .inputs import Study

#: Default refusal threshold for a study's voxel count (a 512×512×4000 CT): far above any abdominal
#: CT or MR, low enough that a mislabelled giant (a whole-body 0.5 mm scan) fails fast, not by memory.
DEFAULT_MAX_VOXELS = 2**30
PARTIAL_PREFIX = ".partial."
REPLACED_PREFIX = ".replaced."


@dataclass(frozen=True)
class BatchSettings:
    """What every study is segmented with: the options of ``meddiffseg segment`` plus ``max_voxels``.

    ``model``: an installed name or a package folder (absolute), or None for the default model of
    each study's modality; ``modality``: what the studies are when neither the CSV nor a DICOM
    tag says. The others are :func:`~MedDiffSegLib.inference.pipeline.run_segment`'s.
    """

    organs: tuple[str, ...]
    model: str | None = None
    modality: str | None = None
    samples: int | None = None
    steps: int | None = None
    seed: int = 0
    device: str = "auto"
    scheduler: str | None = None
    staple: bool = False
    largest_component: bool | None = None  # None: the package's per-organ choice
    save_probabilities: bool = False
    dicom_seg: str | None = None
    allow_modality_mismatch: bool = False
    adaptive: bool = True
    crop_body: bool | None = None
    precision: str = "auto"
    max_voxels: int | None = DEFAULT_MAX_VOXELS
    model_sha256: str | None = None  # set by the batch: the sha256 of ``model`` as the driver found it

    def segment_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``run_segment`` that are the same for every study."""
        return {"samples": self.samples, "steps": self.steps, "seed": self.seed, "device": self.device,
                "scheduler": self.scheduler, "staple": self.staple, "largest_component": self.largest_component,
                "save_probabilities": self.save_probabilities, "dicom_seg": self.dicom_seg,
                "allow_modality_mismatch": self.allow_modality_mismatch, "adaptive": self.adaptive,
                "crop_body": self.crop_body, "precision": self.precision}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["organs"] = list(self.organs)
        return d


# -- is a study done? -------------------------------------------------------------------------------


def expected_record(package, settings: BatchSettings) -> dict[str, Any]:
    """What ``summary.json`` records for a run of ``package`` with ``settings`` (raises ModelError for an
    organ the package does not know)."""
    from ..inference.engine import largest_component_organs

    inf = package.inference
    samples = settings.samples if settings.samples is not None else int(inf.get("samples", 1))
    organs = [package.organs[i].name for i in package.organ_ids(list(settings.organs))]
    keep = largest_component_organs(package, organs, settings.largest_component)
    return {
        "sha256": package.weights_sha256,
        "organs": organs,
        "samples": samples,
        "steps": settings.steps if settings.steps is not None else int(inf.get("steps", 1)),
        "scheduler": settings.scheduler or inf.get("scheduler"),
        "seed": int(settings.seed),
        "staple": bool(settings.staple),
        "largest_component_organs": [o for o, k in zip(organs, keep) if k],
        "precision": None if settings.precision == "auto" else settings.precision,
        "adaptive": bool(settings.adaptive and samples > 1),
        "crop_body": settings.crop_body if settings.crop_body is not None else bool(inf.get("body_crop", False)),
        "probabilities": bool(settings.save_probabilities),
        "dicom_seg": settings.dicom_seg.upper() if settings.dicom_seg else None,
        "allow_modality_mismatch": bool(settings.allow_modality_mismatch),
    }


def summary_mismatch(summary: dict, expected: dict[str, Any]) -> str | None:
    """Why ``summary`` is not the outcome ``expected`` describes (:func:`expected_record`); None if it is."""
    from ..inference.pipeline import SUMMARY_FORMAT

    try:
        if summary.get("format") != SUMMARY_FORMAT:
            return f"summary format {summary.get('format')!r}"
        if summary["model"]["weights_sha256"] != expected["sha256"]:
            return "made with another model (weights sha256)"
        if [o["name"] for o in summary["organs"]] != expected["organs"]:
            return "other organs"
        s = summary["settings"]
        for key in ("samples", "steps", "scheduler", "seed", "staple", "largest_component_organs"):
            if s.get(key) != expected[key]:
                return f"another {key} ({s.get(key)!r}, now {expected[key]!r})"
        if expected["precision"] is not None and s.get("precision") != expected["precision"]:
            return f"another precision ({s.get('precision')!r}, now {expected['precision']!r})"
        sampling = summary.get("sampling") or {}
        if bool(sampling.get("adaptive")) != expected["adaptive"]:
            return "another adaptive sampling setting"
        if not expected["crop_body"] and sampling.get("body_box") is not None:
            return "windows were cut to the body (body crop), now not"
        outputs = summary["outputs"]
        if bool(outputs.get("probabilities")) != expected["probabilities"]:
            return "probability maps " + ("missing" if expected["probabilities"] else "not asked for now")
        if outputs.get("dicom_seg_type") != expected["dicom_seg"]:
            return "another DICOM-SEG setting"
        if (summary.get("modality_check") or {}).get("overridden") and not expected["allow_modality_mismatch"]:
            return "a modality mismatch was overridden then, not now"
    except (KeyError, TypeError, AttributeError) as exc:
        return f"summary without {exc}"
    return None


def _output_files(summary: dict) -> list[str]:
    outputs = summary.get("outputs") or {}
    names = [outputs.get("segmentation"), outputs.get("uncertainty"), *(outputs.get("probabilities") or {}).values(),
             outputs.get("dicom_seg"), outputs.get("uncertainty_pmap")]
    return [n for n in names if n]


def read_summary(study_dir: Path) -> dict | None:
    """The study folder's ``summary.json``, or None when there is none (or it cannot be read)."""
    from ..inference.pipeline import SUMMARY

    try:
        data = json.loads((study_dir / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def completed(study_dir: Path, expected: dict[str, Any]) -> dict | None:
    """The summary of ``study_dir`` when it holds complete outputs matching ``expected``, else None."""
    summary = read_summary(study_dir)
    if summary is None or summary_mismatch(summary, expected) is not None:
        return None
    if not all((study_dir / name).is_file() for name in _output_files(summary)):
        return None
    return summary


# -- the output folder ------------------------------------------------------------------------------


def _is_segment_output(name: str) -> bool:
    from ..inference import pipeline

    return name in (pipeline.SEGMENTATION, pipeline.UNCERTAINTY, pipeline.SUMMARY, pipeline.DICOM_SEG,
                    pipeline.UNCERTAINTY_PMAP) or bool(re.fullmatch(r"probability_[A-Za-z0-9_.-]+\.nii\.gz", name))


def check_replaceable(study_dir: Path) -> None:
    """Raise OutputError unless ``study_dir`` is absent or a folder holding nothing but ``segment`` outputs."""
    if not (study_dir.exists() or study_dir.is_symlink()):
        return
    if study_dir.is_symlink() or not study_dir.is_dir():
        raise OutputError(f"{study_dir} exists and is not a folder; move it away (the study was not written)")
    foreign = sorted(p.name for p in study_dir.iterdir() if not _is_segment_output(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{study_dir} holds files that are not MedDiffSeg outputs ({shown}); it is not replaced: "
                          "move them away (the study was not written)")


def _fresh_folder(out_dir: Path, prefix: str, study_id: str) -> Path:
    while True:  # mkdir (not mkdtemp): the folder gets the umask's permissions, as segment's output folder does
        path = out_dir / f"{prefix}{secrets.token_hex(4)}.{study_id}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def place(staged: Path, study_dir: Path) -> None:
    """Rename the complete ``staged`` folder to ``study_dir``; an existing one is swapped out, then removed."""
    check_replaceable(study_dir)
    aside = None
    try:
        if study_dir.exists():
            aside = study_dir.parent / f"{REPLACED_PREFIX}{secrets.token_hex(4)}.{study_dir.name}"
            os.rename(study_dir, aside)
        os.rename(staged, study_dir)
    except OSError as exc:
        if aside is not None and not study_dir.exists():
            os.rename(aside, study_dir)  # put the earlier outputs back
            aside = None
        raise OutputError(f"cannot move the outputs into {study_dir}: {exc.strerror or exc}") from None
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def recover_leftovers(out_dir: Path) -> None:
    """Tidy what an interrupted batch left in ``out_dir`` (call when no worker writes there): partial
    study folders are removed; a study folder set aside for a swap that did not complete is put back."""
    if not out_dir.is_dir():
        return
    for entry in sorted(out_dir.iterdir(), key=lambda p: p.name):
        if not entry.is_dir() or entry.is_symlink():
            continue
        if entry.name.startswith(PARTIAL_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(REPLACED_PREFIX):
            study_id = entry.name[len(REPLACED_PREFIX):].split(".", 1)[-1]
            target = out_dir / study_id
            if study_id and not target.exists():
                os.rename(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)


# -- the worker -------------------------------------------------------------------------------------


class _Fatal(Exception):
    """An error that fails every study (the model cannot be loaded, the device is missing)."""

    def __init__(self, error: MedDiffSegError):
        super().__init__(str(error))
        self.error = error


class _WarningsCollector(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


class StudySegmenter:
    """Segments studies one at a time into ``out_dir`` with models loaded once (one per package used).

    ``label`` names the worker in the table (``<label>@<host>:<pid>``). ``should_cancel()`` is polled
    as ``run_segment`` polls it (before every window batch); :meth:`cancel` has the same effect from
    another thread. ``capture_warnings``: return the library's warnings with each study instead of
    leaving them to the process's log (a Ray worker's stderr does not reach the user).
    """

    def __init__(self, settings: BatchSettings, out_dir: str | os.PathLike, *, label: str = "local",
                 should_cancel: Callable[[], bool] | None = None, capture_warnings: bool = False):
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.worker = f"{label}@{socket.gethostname()}:{os.getpid()}"
        self.model_loads = 0
        self.studies_done = 0
        self._should_cancel = should_cancel
        self._cancel = threading.Event()
        self._capture = capture_warnings
        self._device = None
        self._packages: dict[Any, Any] = {}
        self._methods: dict[tuple[str, str], Any] = {}

    def cancel(self) -> None:
        """Stop the study that runs (it ends as ``cancelled``, leaving nothing) and refuse further ones."""
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set() or (self._should_cancel is not None and bool(self._should_cancel()))

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker, "pid": os.getpid(), "model_loads": self.model_loads,
                "studies": self.studies_done}

    # -- models, once ---------------------------------------------------------------------------
    def _torch_device(self):
        if self._device is None:
            from ..inference.device import resolve_device

            try:
                self._device = resolve_device(self.settings.device)
            except MedDiffSegError as exc:
                raise _Fatal(exc) from None
        return self._device

    def _package_for(self, study: Study):
        """The study's package (read from model.json, not loaded): ``--model``, else the default model
        for its modality; None when no modality is known (``run_segment`` then says so)."""
        from ..registry.store import default_model_for, resolve_model

        if self.settings.model is not None:
            if "model" not in self._packages:
                try:
                    package = resolve_model(self.settings.model)
                except MedDiffSegError as exc:
                    raise _Fatal(exc) from None
                wanted = self.settings.model_sha256
                if wanted is not None and package.weights_sha256 != wanted:
                    raise _Fatal(ModelError(
                        f"model {package.name!r} on {socket.gethostname()} has weights sha256 "
                        f"{package.weights_sha256[:16]}…, the batch's {wanted[:16]}…: install the same model on "
                        "every node"))
                self._packages["model"] = package
            return self._packages["model"]
        from ..modality import dicom_modality, input_modality

        info = input_modality(dicom_tag=dicom_modality(study.path), declared=study.modality or self.settings.modality,
                              allow_mismatch=self.settings.allow_modality_mismatch, shown=str(study.path))
        if info.modality is None:
            return None
        if info.modality not in self._packages:
            self._packages[info.modality] = default_model_for(info.modality)
        return self._packages[info.modality]

    def _method_for(self, package):
        key = (str(package.path), package.weights_sha256)
        if key not in self._methods:
            device = self._torch_device()
            try:
                method = package.load_method(str(device))  # checks the sha256: once per worker and package
            except MedDiffSegError as exc:
                raise _Fatal(exc) from None
            except Exception as exc:
                raise _Fatal(ModelError(f"model {package.name!r} cannot be loaded: {type(exc).__name__}: {exc}")) from None
            self._methods[key] = method
            self.model_loads += 1
        return self._methods[key]

    # -- one study ------------------------------------------------------------------------------
    def segment(self, study: Study | dict) -> dict[str, Any]:
        """Segment ``study`` into ``out_dir/<id>``. Never raises; returns a dict with ``id``, ``status``
        (``ok``, ``skipped`` when its outputs were already complete, ``error`` or ``cancelled``),
        ``error`` and ``error_kind`` (the exception class), ``fatal`` (the error fails every study),
        ``seconds``, ``worker``, ``summary`` (``summary.json``'s content; None unless ok/skipped),
        ``warnings``, ``model_loads`` (this worker's, so far) and ``traceback`` (for a bug)."""
        if isinstance(study, dict):
            study = Study.from_dict(study)
        t0 = time.perf_counter()
        outcome: dict[str, Any] = {"id": study.id, "status": "error", "error": "", "error_kind": "", "fatal": False,
                                   "summary": None, "warnings": [], "traceback": ""}
        collector = _WarningsCollector() if self._capture else None
        logger = logging.getLogger("MedDiffSegLib")
        if collector is not None:
            logger.addHandler(collector)
        try:
            outcome["status"], outcome["summary"] = self._segment(study)
            if outcome["status"] == "ok":
                self.studies_done += 1
        except Cancelled:
            outcome["status"] = "cancelled"
            outcome["error"] = "cancelled; nothing was written for this study"
        except _Fatal as exc:
            outcome.update(error=str(exc.error), error_kind=type(exc.error).__name__, fatal=True)
        except MedDiffSegError as exc:
            outcome.update(error=str(exc) or type(exc).__name__, error_kind=type(exc).__name__)
        except MemoryError:
            outcome.update(error="out of memory while segmenting this study (lower --max-voxels to refuse such "
                                 "studies early, or give each worker more memory)", error_kind="MemoryError")
        except Exception as exc:  # a bug: the study fails with its traceback, the batch goes on
            outcome.update(error=f"{type(exc).__name__}: {exc}", error_kind=type(exc).__name__,
                           traceback=traceback.format_exc())
        finally:
            if collector is not None:
                logger.removeHandler(collector)
                outcome["warnings"] = collector.messages
        outcome["seconds"] = time.perf_counter() - t0
        outcome["worker"] = self.worker
        outcome["model_loads"] = self.model_loads
        return outcome

    def _segment(self, study: Study) -> tuple[str, dict | None]:
        from ..inference.pipeline import run_segment

        if self.cancelled():
            raise Cancelled("cancelled before it started")
        study_dir = self.out_dir / study.id
        package = self._package_for(study)
        if package is not None:
            summary = completed(study_dir, expected_record(package, self.settings))
            if summary is not None:
                return "skipped", summary
        check_replaceable(study_dir)
        limit = self.settings.max_voxels
        if limit is not None:
            from ..io.volume import read_size

            size = read_size(study.path)
            if size is not None and math.prod(size) > limit:
                raise InputError(f"{study.path} is too large: {'×'.join(map(str, size))} = {math.prod(size):,} voxels, "
                                 f"more than the batch's limit of {limit:,} (--max-voxels)")
        method = self._method_for(package) if package is not None else None
        staged = _fresh_folder(self.out_dir, PARTIAL_PREFIX, study.id)
        try:
            summary = run_segment(
                study.path, staged, list(self.settings.organs), model=package, method=method,
                modality=study.modality or self.settings.modality, should_cancel=self.cancelled,
                **{**self.settings.segment_kwargs(),
                   **({"device": str(self._torch_device())} if method is not None else {})},
            )
            place(staged, study_dir)  # complete: kept even when a cancel arrived meanwhile
        except DeviceError as exc:
            raise _Fatal(exc) from None
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)
        return "ok", summary
