"""``meddiffseg batch``: segment a cohort, resumable, on Ray workers or one after another in-process.

:func:`run_batch` is the whole command without its argument parsing and printing:

1. the studies (:func:`~.inputs.discover`), the output folder (created; locked against a second
   batch writing to it at the same time; what an interrupted batch left there tidied up);
2. the model named by ``--model`` is resolved and the organs checked here, before any worker
   starts; a study whose ``DIR/<id>/summary.json`` records the same model sha256 and settings, with
   all its outputs present, is ``skipped`` (:func:`~.segmenter.completed`), so a crashed or cancelled
   batch resumes where it stopped and a finished one is not redone;
3. the other studies go to the engine: Ray actors (:mod:`.ray_engine`), each loading the model
   once, or, without Ray, a :class:`~.segmenter.StudySegmenter` in this process;
4. ``DIR/batch.csv`` (:mod:`.table`) is rewritten atomically as studies finish (at most once a
   second, and at the end whatever happens), so it is always a complete, valid table.

A study's error is that study's row; an error that would fail every study (the model cannot be
loaded, the device is missing) stops the batch and is raised after the table is written.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import Cancelled, MedDiffSegError, OutputError
from . import table as table_mod
from .inputs import Study, discover
from .segmenter import BatchSettings, StudySegmenter, completed, expected_record, read_summary, recover_leftovers

EventFn = Callable[[str, dict], None]
LOCK_FILE = ".batch.lock"
#: Seconds between two rewrites of batch.csv while studies finish (it is always written at the end).
TABLE_INTERVAL_S = 1.0


@dataclass
class BatchReport:
    """What :func:`run_batch` did: ``rows`` are ``batch.csv``'s rows, ``counts`` per status."""

    out_dir: Path
    table: Path
    rows: list[dict[str, str]]
    engine: str
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)  # worker -> studies segmented, model loads
    cancelled: bool = False
    seconds: float = 0.0

    @property
    def counts(self) -> Counter:
        return Counter(r["status"] for r in self.rows)


# -- the output folder ----------------------------------------------------------------------------


def _prepare_out_dir(inputs: Path, out_dir: Path) -> None:
    if inputs.is_dir():
        try:
            inside = out_dir.resolve().is_relative_to(inputs.resolve())
        except OSError:
            inside = False
        if inside:
            raise OutputError(f"output folder {out_dir} is inside the input folder {inputs}: its study folders would "
                              "be read as studies on the next run; choose a folder outside it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output folder {out_dir} exists and is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out_dir} is not writable")


class _Lock:
    """An exclusive lock on ``DIR/.batch.lock`` (POSIX; elsewhere no lock is taken)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK_FILE
        self._fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        try:
            self._fh = open(self.path, "a+")
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            self._fh = None
            raise OutputError(f"another 'meddiffseg batch' is writing to {self.path.parent}; wait for it to finish "
                              "(or choose another --out)") from None
        except OSError as exc:
            raise OutputError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc):
        if self._fh is not None:
            self._fh.close()  # closing releases the lock; the file stays (removing it would race)
        return False


# -- what is done already -------------------------------------------------------------------------


class _Expectations:
    """The outcome each study should have (:func:`expected_record`), from the packages as the driver sees them."""

    def __init__(self, settings: BatchSettings):
        from ..registry.store import resolve_model

        self._by_modality: dict[str, Any] = {}
        self.package = resolve_model(settings.model) if settings.model is not None else None
        if self.package is not None:
            self._model_record = expected_record(self.package, settings)  # an unknown organ fails here
            # Workers find an installed model by its name; a package folder by its absolute path (their
            # working folder may differ). They check that their copy has the sha256 the driver saw.
            found_by_name = self.package.name == os.fspath(settings.model)
            settings = replace(settings, model=settings.model if found_by_name else str(self.package.path.absolute()),
                               model_sha256=self.package.weights_sha256)
        self.settings = settings
        if self.package is None and settings.modality is not None:
            self._record_for(settings.modality)  # likewise for the default model of --modality

    def _record_for(self, modality: str):
        from ..registry.store import default_model_for

        if modality not in self._by_modality:
            self._by_modality[modality] = expected_record(default_model_for(modality), self.settings)
        return self._by_modality[modality]

    def done(self, study: Study, out_dir: Path) -> dict | None:
        """The summary of ``study``'s complete outputs matching this batch, or None."""
        study_dir = out_dir / study.id
        if self.package is not None:
            return completed(study_dir, self._model_record)
        summary = read_summary(study_dir)
        if summary is None:
            return None
        modality = study.modality or self.settings.modality or (summary.get("input") or {}).get("modality")
        if modality is None:
            return None
        try:
            return completed(study_dir, self._record_for(modality))
        except MedDiffSegError:
            return None


# -- the table ------------------------------------------------------------------------------------


class _Table:
    def __init__(self, out_dir: Path, organs: tuple[str, ...], rows: list[dict[str, str]]):
        self.out_dir, self.organs, self.rows = out_dir, organs, rows
        self._last = 0.0
        self._dirty = False

    def set(self, index: int, row: dict[str, str]) -> None:
        self.rows[index] = row
        self._dirty = True
        if time.monotonic() - self._last >= TABLE_INTERVAL_S:
            self.write()

    def write(self) -> Path:
        path = table_mod.write_table(self.out_dir, self.rows, self.organs)
        self._last, self._dirty = time.monotonic(), False
        return path


# -- engines --------------------------------------------------------------------------------------


class SequentialEngine:
    """All studies one after another in this process, with one :class:`StudySegmenter` (model loaded once)."""

    name = "in-process"

    def __init__(self, settings: BatchSettings, out_dir: Path, should_cancel: Callable[[], bool] | None = None):
        self._segmenter = StudySegmenter(settings, out_dir, label="local", should_cancel=should_cancel)
        self.workers = 1

    def run(self, studies: list[Study], on_start: Callable[[Study, str, int], None]) -> Iterator[dict]:
        for study in studies:
            if self._segmenter.cancelled():
                return
            on_start(study, self._segmenter.worker, os.getpid())
            outcome = self._segmenter.segment(study)
            outcome["attempts"] = 1
            yield outcome

    def cancel(self) -> None:
        self._segmenter.cancel()

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        info = self._segmenter.info()
        return {info["worker"]: {"studies": info["studies"], "model_loads": info["model_loads"]}}

    def close(self) -> None:
        pass


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _wants_ray(use_ray: bool | None, address: str | None) -> bool:
    """Whether the batch runs on Ray; an error, before anything is written, when it must and cannot."""
    have_ray = ray_available()
    if use_ray is None:
        use_ray = have_ray or address is not None
    if use_ray and not have_ray:
        raise MedDiffSegError("Ray is not installed, so " + ("--address cannot join a cluster" if address else
                              "no Ray workers can run") + ": install it with pip install 'meddiffseg[cluster]'")
    if address is not None and not use_ray:
        raise MedDiffSegError("--address needs Ray; it cannot be combined with running in-process (--no-ray)")
    if address is not None:
        _probe(address)
    return bool(use_ray)


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast (Ray itself retries for minutes) when a ``host:port`` or ``ray://host:port`` address
    does not answer; ``auto`` and other forms are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    text = address if "://" in address else f"tcp://{address}"
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        return
    if not host or port is None:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise MedDiffSegError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _engine(settings, out_dir, *, n_studies, use_ray, address, workers, cpus_per_worker, gpus_per_worker, retries,
            should_cancel, notify):
    if not use_ray:
        if ray_available():
            notify(f"running the {n_studies} studies one after another in this process (Ray not used)")
        else:
            notify(f"Ray is not installed (pip install 'meddiffseg[cluster]'): running the {n_studies} studies one "
                   "after another in this process")
        if workers not in (None, 1):
            notify(f"--workers {workers} is ignored without Ray")
        return SequentialEngine(settings, out_dir, should_cancel)
    from .ray_engine import RayEngine

    return RayEngine(settings, out_dir, n_studies=n_studies, address=address, workers=workers,
                     cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, retries=retries,
                     should_cancel=should_cancel, notify=notify)


# -- the batch ------------------------------------------------------------------------------------


def run_batch(
    inputs: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: BatchSettings,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    retries: int = 2,
    use_ray: bool | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_event: EventFn | None = None,
    notify: Callable[[str], None] | None = None,
) -> BatchReport:
    """Segment every study of ``inputs`` into ``out_dir/<id>/`` and write ``out_dir/batch.csv``.

    ``use_ray``: None uses Ray when it is installed (or ``address`` is given), True requires it,
    False runs in this process. ``address``: join that Ray cluster (``auto``: the one ``ray start``
    runs on this machine); without it a local Ray instance is started (and stopped at the end)
    unless this process already has one. ``workers``: Ray actors (default: as many as the
    cluster's CPUs, or GPUs with ``gpus_per_worker``, allow, at most one per study), each with
    ``cpus_per_worker`` CPUs (its torch threads) and ``gpus_per_worker`` GPUs. ``retries``: how
    often a study whose worker died is given to a fresh worker before it is recorded as an error.

    ``on_event(kind, data)``: ``"plan"`` (``studies``, ``to_run``, ``skipped``, ``engine``,
    ``workers``) once, ``"started"`` (``id``, ``worker``, ``pid``) and ``"finished"`` (``row``,
    ``outcome``) per study. ``notify(text)`` receives notes for the user. ``should_cancel()`` is
    polled throughout: when true, running studies stop (leaving nothing), the rest stay ``pending``,
    and the report says ``cancelled``. Raises for a bad ``inputs``/``out_dir``/model (before
    anything runs) and for an error that fails every study (after writing the table).
    """
    t0 = time.perf_counter()
    notify = notify or (lambda text: None)
    emit = on_event or (lambda kind, data: None)
    if retries < 0:
        raise MedDiffSegError(f"retries must be 0 or more, got {retries}")
    if workers is not None and workers < 1:
        raise MedDiffSegError(f"workers must be at least 1, got {workers}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise MedDiffSegError("cpus per worker must be above 0 and GPUs per worker 0 or more")
    use_ray = _wants_ray(use_ray, address)
    inputs_path = Path(inputs).expanduser().absolute()
    studies = discover(inputs_path)
    expectations = _Expectations(settings)
    settings = expectations.settings  # with the model as the workers find it, and its sha256
    out = Path(out_dir).expanduser().absolute()
    _prepare_out_dir(inputs_path, out)
    organs = tuple(settings.organs)

    with _Lock(out):
        recover_leftovers(out)
        previous = table_mod.read_table(out)
        rows: list[dict[str, str]] = []
        to_run: list[Study] = []
        for study in studies:
            summary = expectations.done(study, out)
            if summary is None:
                rows.append(table_mod.row(study, organs, status="pending"))
                to_run.append(study)
                continue
            before = previous.get(study.id) or {}
            carried = before.get("status") in ("ok", "skipped") and before.get("path") == str(study.path)
            rows.append(table_mod.row(
                study, organs, status="skipped", summary=summary,
                seconds=float(before["seconds"]) if carried and before.get("seconds") else None,
                worker=before.get("worker", "") if carried else "",
                attempts=int(before["attempts"]) if carried and (before.get("attempts") or "").isdigit() else None))
        tab = _Table(out, organs, rows)
        tab.write()
        index = {s.id: i for i, s in enumerate(studies)}
        by_id = {s.id: s for s in studies}
        report = BatchReport(out_dir=out, table=out / table_mod.TABLE, rows=rows, engine="none")
        if not to_run:
            emit("plan", {"studies": len(studies), "to_run": 0, "skipped": len(studies), "engine": "none", "workers": 0})
            report.seconds = time.perf_counter() - t0
            return report

        engine = None
        running: dict[str, str] = {}  # study id -> worker, while it runs
        fatal: MedDiffSegError | None = None
        try:
            engine = _engine(settings, out, n_studies=len(to_run), use_ray=use_ray, address=address, workers=workers,
                             cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, retries=retries,
                             should_cancel=should_cancel, notify=notify)
            report.engine = engine.name
            emit("plan", {"studies": len(studies), "to_run": len(to_run), "skipped": len(studies) - len(to_run),
                          "engine": engine.name, "workers": engine.workers})

            def on_start(study: Study, worker: str, pid: int) -> None:
                running[study.id] = worker
                emit("started", {"id": study.id, "worker": worker, "pid": pid})

            for outcome in engine.run(to_run, on_start):
                sid = outcome["id"]
                running.pop(sid, None)
                status = outcome["status"]
                r = table_mod.row(by_id[sid], organs, status=status, error=outcome.get("error", ""),
                                  seconds=outcome.get("seconds"), worker=outcome.get("worker", ""),
                                  attempts=outcome.get("attempts"), summary=outcome.get("summary"))
                tab.set(index[sid], r)
                emit("finished", {"row": r, "outcome": outcome})
                if outcome.get("fatal") and fatal is None:
                    fatal = _rebuild_error(outcome)
                    engine.cancel()
            if should_cancel is not None and should_cancel():
                report.cancelled = True
        except KeyboardInterrupt:
            report.cancelled = True
            raise
        finally:
            if engine is not None:
                report.workers = engine.worker_stats()
                engine.close()
            for sid in running:  # still running when the batch stopped: nothing of them was kept
                tab.rows[index[sid]] = table_mod.row(by_id[sid], organs, status="cancelled",
                                                     error="the batch stopped while it ran", worker=running[sid])
            recover_leftovers(out)  # partial folders of workers that were stopped or died
            tab.write()
            report.seconds = time.perf_counter() - t0
        if fatal is not None:
            raise fatal
        return report


def _rebuild_error(outcome: dict) -> MedDiffSegError:
    """The fatal error of a worker's outcome as the same MedDiffSegError class (so the exit code matches)."""
    from .. import errors

    cls = getattr(errors, outcome.get("error_kind") or "", None)
    if not (isinstance(cls, type) and issubclass(cls, MedDiffSegError)) or cls is Cancelled:
        cls = MedDiffSegError
    return cls(outcome.get("error") or "a worker failed")
