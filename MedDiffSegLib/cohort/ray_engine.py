"""The batch on Ray: one actor per worker, each loading the model once and segmenting many studies.

Imported only when Ray is installed (``pip install 'meddiffseg[cluster]'``).

- **Cluster.** Without an address a local Ray instance is started for the batch (``address="local"``:
  never an unrelated cluster found on the machine) and shut down at the end; with one, the batch
  joins that cluster (its nodes need MedDiffSeg and the model installed, and the studies and the
  output folder at the same paths: a shared file system). A process that already called
  ``ray.init`` keeps its instance.
- **Workers.** Each actor (:class:`_Worker`) asks for ``cpus_per_worker`` CPUs (Ray sets its torch
  threads to that) and ``gpus_per_worker`` GPUs, and wraps a :class:`~.segmenter.StudySegmenter`.
  The driver gives each ready actor one study at a time, so no study waits behind a slow one.
- **Supervision.** Actors are created with ``max_restarts=0``: a worker process that dies (killed,
  out of memory, its node lost) fails its study's call with ``RayActorError``; the driver replaces
  the actor by a fresh one and gives the study to the next free worker, at most ``retries`` more
  times, then records it as an error. A replacement loads the model again; nothing else is shared.
- **Cancel.** The actors are threaded (two calls at once) so that :meth:`_Worker.cancel` reaches a
  running study, which stops at its next window batch and leaves nothing; actors still busy
  :data:`CANCEL_GRACE_S` seconds later are killed.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import DeviceError, MedDiffSegError
from .inputs import Study
from .segmenter import BatchSettings, StudySegmenter

#: Seconds a cancelled batch waits for running studies to stop before it kills their workers.
CANCEL_GRACE_S = 30.0
#: Seconds without any worker started (and nothing running) before the batch gives up.
START_TIMEOUT_S = 600.0
#: Object store of a local instance: only study descriptions and result summaries travel through it.
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20


class _Worker:
    """The actor: a StudySegmenter in its own process (made remote by :class:`RayEngine`)."""

    def __init__(self, settings: BatchSettings, out_dir: str, label: str):
        self._segmenter = StudySegmenter(settings, out_dir, label=label, capture_warnings=True)

    def info(self) -> dict[str, Any]:
        return self._segmenter.info()

    def segment(self, study: Study) -> dict[str, Any]:
        return self._segmenter.segment(study)

    def cancel(self) -> None:
        self._segmenter.cancel()


@dataclass
class _Slot:
    handle: Any
    label: str
    info_ref: Any = None
    ready: bool = False
    worker: str = ""
    pid: int = 0
    task: Any = None
    study: Study | None = None
    started: float = 0.0


class RayEngine:
    name = "ray"

    def __init__(self, settings: BatchSettings, out_dir: Path, *, n_studies: int, address: str | None,
                 workers: int | None, cpus_per_worker: float, gpus_per_worker: float, retries: int,
                 should_cancel: Callable[[], bool] | None, notify: Callable[[str], None]):
        import ray

        self._ray = ray
        self.settings, self.out_dir = settings, out_dir
        self.cpus, self.gpus, self.retries = float(cpus_per_worker), float(gpus_per_worker), int(retries)
        self._should_cancel, self._notify = should_cancel, notify
        self._started_here = False
        self._cancelling_since: float | None = None
        self._slots: dict[int, _Slot] = {}
        self._next_label = 0
        self._stats: dict[str, dict[str, Any]] = {}
        self._connect(address, workers)
        self.workers = self._count_workers(workers, n_studies)
        self._remote = ray.remote(_Worker).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0, max_concurrency=2)

    # -- cluster ----------------------------------------------------------------------------------
    def _connect(self, address: str | None, workers: int | None) -> None:
        ray = self._ray
        if ray.is_initialized():
            if address is not None:
                self._notify("this process is already connected to a Ray cluster: --address is not used")
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves a hospital network
        common = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if address is not None:
                ray.init(address=address, **common)
            else:
                cores = os.cpu_count() or 1
                wanted = math.ceil((workers or 0) * self.cpus)
                if wanted > cores:
                    self._notify(f"{workers} workers of {self.cpus:g} CPU on {cores} cores: they share the cores")
                ray.init(address="local", num_cpus=max(cores, wanted), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                         **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise MedDiffSegError(f"cannot start or join {where}: {exc}") from None
        self._started_here = True

    def _count_workers(self, workers: int | None, n_studies: int) -> int:
        resources = self._ray.cluster_resources()
        cpu, gpu = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        fits = math.floor(cpu / self.cpus + 1e-9)
        if self.gpus > 0:
            fits = min(fits, math.floor(gpu / self.gpus + 1e-9))
        if fits < 1:
            self.close()
            raise DeviceError(f"the Ray cluster ({cpu:g} CPUs, {gpu:g} GPUs) has no room for one worker of "
                              f"{self.cpus:g} CPU(s) and {self.gpus:g} GPU(s) (--cpus-per-worker, --gpus-per-worker)")
        if workers is not None and workers > fits:
            self._notify(f"{workers} workers asked for, {fits} fit the cluster now; the others start when it has room")
        return max(1, min(workers or fits, n_studies))

    # -- actors -----------------------------------------------------------------------------------
    def _new_actor(self, slot: int) -> None:
        self._next_label += 1
        label = f"w{self._next_label}"
        handle = self._remote.remote(self.settings, str(self.out_dir), label)
        self._slots[slot] = _Slot(handle=handle, label=label, info_ref=handle.info.remote(), started=time.monotonic())

    def _retire(self, slot: int, *, replace: bool) -> None:
        s = self._slots.pop(slot)
        try:
            self._ray.kill(s.handle, no_restart=True)
        except Exception:  # already gone
            pass
        if replace:
            self._new_actor(slot)

    def _record(self, outcome: dict[str, Any]) -> None:
        st = self._stats.setdefault(outcome.get("worker", "?"), {"studies": 0, "model_loads": 0})
        st["studies"] += outcome.get("status") == "ok"
        st["model_loads"] = max(st["model_loads"], int(outcome.get("model_loads") or 0))

    # -- running ----------------------------------------------------------------------------------
    def cancel(self) -> None:
        if self._cancelling_since is not None:
            return
        self._cancelling_since = time.monotonic()
        for s in self._slots.values():
            if s.task is not None:
                s.handle.cancel.remote()

    def run(self, studies: list[Study], on_start: Callable[[Study, str, int], None]) -> Iterator[dict[str, Any]]:
        ray = self._ray
        from ray.exceptions import RayActorError, RayError

        pending = deque(studies)
        attempts: Counter = Counter()
        idle_deaths = 0
        last_death = ""
        waiting_since = time.monotonic()
        for slot in range(self.workers):
            self._new_actor(slot)
        while True:
            if self._cancelling_since is None and self._should_cancel is not None and self._should_cancel():
                self.cancel()
            cancelling = self._cancelling_since is not None
            if not cancelling:
                for slot, s in self._slots.items():
                    if s.ready and s.task is None and pending:
                        study = pending.popleft()
                        attempts[study.id] += 1
                        s.task, s.study = s.handle.segment.remote(study), study
                        on_start(study, s.worker, s.pid)
            busy = [s for s in self._slots.values() if s.task is not None]
            if not busy and (cancelling or not pending):
                return
            if cancelling and time.monotonic() - self._cancelling_since > CANCEL_GRACE_S:
                for slot in [k for k, s in self._slots.items() if s.task is not None]:
                    study, worker = self._slots[slot].study, self._slots[slot].worker
                    self._retire(slot, replace=False)
                    yield _outcome(study, "cancelled", "cancelled: its worker was stopped", worker, attempts[study.id])
                return
            if any(s.ready for s in self._slots.values()) or busy:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > START_TIMEOUT_S:
                raise MedDiffSegError(f"no Ray worker started in {START_TIMEOUT_S:.0f} s: the cluster has no room for "
                                      "them, or its nodes cannot run MedDiffSeg" + (f" ({last_death})" if last_death else ""))
            refs = {}
            for slot, s in self._slots.items():
                if s.task is not None:
                    refs[s.task] = slot
                elif not s.ready and s.info_ref is not None:
                    refs[s.info_ref] = slot
            if not refs:
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.25)
            for ref in ready:
                slot = refs[ref]
                s = self._slots[slot]
                if ref is s.info_ref:
                    s.info_ref = None
                    try:
                        info = ray.get(ref)
                    except RayError as exc:  # the actor could not start (or died at once)
                        idle_deaths += 1
                        last_death = _first_line(exc)
                        if idle_deaths > 2 * self.workers + 2:
                            raise MedDiffSegError(f"Ray workers keep failing to start: {last_death}") from None
                        self._retire(slot, replace=not cancelling)
                        continue
                    s.ready, s.worker, s.pid = True, info["worker"], int(info["pid"])
                    self._stats.setdefault(s.worker, {"studies": 0, "model_loads": 0})
                    continue
                study = s.study
                s.task, s.study = None, None
                try:
                    outcome = ray.get(ref)
                except RayActorError as exc:  # the worker process died during this study
                    last_death = _first_line(exc)
                    worker = s.worker
                    self._retire(slot, replace=not cancelling)
                    if cancelling:
                        yield _outcome(study, "cancelled", "cancelled: its worker stopped", worker, attempts[study.id])
                    elif attempts[study.id] <= self.retries:
                        self._notify(f"worker {worker} died while segmenting {study.id} (attempt {attempts[study.id]} "
                                     f"of {self.retries + 1}); it is replaced and the study tried again")
                        pending.appendleft(study)
                    else:
                        yield _outcome(study, "error", f"its worker died {attempts[study.id]} times while segmenting it "
                                       f"(the last time: {last_death})", worker, attempts[study.id])
                    continue
                except RayError as exc:
                    outcome = _outcome(study, "error", f"Ray: {_first_line(exc)}", s.worker, attempts[study.id])
                outcome["attempts"] = attempts[study.id]
                self._record(outcome)
                yield outcome

    def worker_stats(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._stats.items()}

    def close(self) -> None:
        for slot in list(self._slots):
            self._retire(slot, replace=False)
        if self._started_here and self._ray.is_initialized():
            self._ray.shutdown()
            self._started_here = False


def _outcome(study: Study, status: str, error: str, worker: str, attempts: int) -> dict[str, Any]:
    return {"id": study.id, "status": status, "error": error, "error_kind": "" if status != "error" else "WorkerDied",
            "fatal": False, "summary": None, "warnings": [], "traceback": "", "seconds": None, "worker": worker,
            "model_loads": 0, "attempts": attempts}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
