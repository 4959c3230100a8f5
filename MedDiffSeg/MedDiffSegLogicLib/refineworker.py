"""The persistent refine worker, seen from the module: start it, send commands, poll its events (no Qt, no torch).

:class:`RefineWorker` starts ``python -m MedDiffSegLib.interactive.worker`` (see that module for the
protocol) through a :class:`~.process.ProcessRunner` with a stdin pipe. The volume, the label map and
the uncertainty map go to the worker once, as ``.npy`` files in a private temporary folder
(``mkdtemp``: readable by this user only) with the geometry in the request; every correction then
travels as one JSON line each way, and its result as two small ``.npy`` files (the corrected organ's
mask and the uncertainty on the slices it reached), read with ``allow_pickle=False`` and checked
against the volume's shape before anything uses them.

Commands are answered in order; :meth:`RefineWorker.poll` (called from the Widget's timer, or a test
loop) returns the events that arrived. A worker that exits without being asked to (a crash, killed
for memory) turns into the state ``failed`` with its exit status and the tail of its stderr, and
every command still waiting is answered as failed: the caller is told, it never waits for ever.
The first command is a ``ping``: a worker that is ready but has not answered it within
:attr:`RefineWorker.PING_TIMEOUT_S` does not receive its commands (a launcher that does not pass its
standard input on), and is ended with that message instead of leaving every click unanswered.

:func:`refineAvailability` says, from a package's ``model.json`` alone, whether its model can refine.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .process import ProcessRunner, SubprocessRunner, protocolEvents, refineWorkerCommand, workerEnvironment
from .progress import parseJsonEvent

log = logging.getLogger(__name__)

#: The prompt channels of an interactive model (``MedDiffSegLib.interactive.prompts.PROMPT_CHANNELS``;
#: not imported here: that module imports torch).
PROMPT_CHANNELS = 4
EVENT_TYPES = ("start", "device", "progress", "ready", "reply", "suggestions", "stopped", "error")
REQUEST_FILE = "session.json"


# -- can this model refine? ---------------------------------------------------------------------------


def refineAvailability(modelPath: str | os.PathLike | None, modelName: str = "") -> tuple[bool, str]:
    """``(True, "")`` when the package in ``modelPath`` was trained for interactive correction (prompt
    channels and a click radius in its ``model.json``), else ``(False, why, for the user)``."""
    label = modelName or (Path(modelPath).name if modelPath else "the model")
    if not modelPath or not (Path(modelPath) / "model.json").is_file():
        return False, (f"Refine needs the model that made this result ({label}), which is not installed here. "
                       "Install it, or segment again with an installed model.")
    try:
        meta = json.loads((Path(modelPath) / "model.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, f"Cannot read the model {label}: {exc}"
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    inference = meta.get("inference") if isinstance(meta.get("inference"), dict) else {}
    name = f"{meta.get('name', label)} {meta.get('version', '')}".strip()
    try:
        channels = int(config.get("prompt_channels", 0) or 0)
        radius = float(inference.get("click_radius_mm", 0.0) or 0.0)
    except (TypeError, ValueError):
        channels, radius = 0, 0.0
    if channels != PROMPT_CHANNELS or radius <= 0:
        return False, (f"The model {name} was not trained with clicks, so it cannot refine a result. Segment with "
                       "a model trained for interactive correction (one whose description mentions clicks, e.g. "
                       "abdomen-ct 2.0) to refine with points and boxes.")
    return True, ""


# -- the protocol -------------------------------------------------------------------------------------------


def parseRefineLine(line: str | bytes) -> dict[str, Any] | None:
    """The event of one line of the refine worker, or None when the line is not a protocol message."""
    event = parseJsonEvent(line, EVENT_TYPES)
    if event is None:
        return None
    if event["type"] == "error":
        event["message"] = str(event.get("message") or "the refine worker failed")
    if event["type"] == "reply":
        event["ok"] = bool(event.get("ok"))
        if not event["ok"]:
            event["message"] = str(event.get("message") or "the command failed")
    return event


class RefineWorker:
    """One persistent worker process for one result (see the module docstring).

    States: ``created`` → ``starting`` → ``ready`` → ``stopped`` | ``failed``. :attr:`pending` maps
    the ids of the commands not answered yet to their command names.
    """

    #: Seconds a ready worker may take to answer the first command before it is deemed deaf.
    PING_TIMEOUT_S = 15.0

    def __init__(self, *, runner: ProcessRunner | None = None, python: str | None = None,
                 pythonPath: Sequence[str] = (), tempRoot: str | None = None,
                 command: Callable[[str], list[str]] | None = None):
        self.runner = runner or SubprocessRunner(keepInput=True)
        self.python = python
        self.pythonPath = list(pythonPath)
        self.tempRoot = tempRoot
        self.command = command or (lambda requestPath: refineWorkerCommand(requestPath, self.python))
        self.state = "created"
        self.folder: Path | None = None
        self.shape: tuple[int, ...] | None = None
        self.pending: dict[int, str] = {}
        self.progress: dict[str, Any] = {}
        self.device = ""
        self.errorMessage = ""
        self.errorKind = ""
        self.errorDetails = ""
        self.exitCode: int | None = None
        self.logLines: list[str] = []
        self.canUndo = False
        self.canRedo = False
        self._nextId = 1
        self._stopping = False
        self._pingId: int | None = None
        self._readyAt: float | None = None

    # -- starting ---------------------------------------------------------------------------------------
    def start(self, image: np.ndarray, labels: np.ndarray, uncertainty: np.ndarray | None, geometry: dict[str, Any],
              organs: Sequence[str], model: str, *, device: str = "auto", samples: int | None = None, seed: int = 0,
              locked: Sequence[str] = (), interactions: Sequence[dict] = (), suggestions: int = 3,
              encodeAhead: bool = True, watchPid: int | None = None) -> None:
        """Write the arrays and the request into a new private folder and start the worker.

        ``image``, ``labels`` (label ``i`` = ``organs[i-1]``) and ``uncertainty`` are ``[K, J, I]`` arrays
        of one volume; ``geometry`` its ``spacing``, ``origin`` and ``direction`` in LPS. Errors are raised
        here, with nothing left behind."""
        if self.state != "created":
            raise RuntimeError(f"this worker was already started (state {self.state})")
        image = np.asarray(image)
        if image.ndim != 3 or np.asarray(labels).shape != image.shape or (
                uncertainty is not None and np.asarray(uncertainty).shape != image.shape):
            raise ValueError(f"the image, label map and uncertainty map must be 3D arrays of one shape, got "
                             f"{image.shape}, {np.asarray(labels).shape}, "
                             f"{None if uncertainty is None else np.asarray(uncertainty).shape}")
        self.folder = Path(tempfile.mkdtemp(prefix="MedDiffSeg-refine-", dir=self.tempRoot))
        try:
            np.save(self.folder / "image.npy", image, allow_pickle=False)
            np.save(self.folder / "labels.npy", np.asarray(labels, dtype=np.uint8), allow_pickle=False)
            if uncertainty is not None:
                np.save(self.folder / "uncertainty.npy", np.asarray(uncertainty, dtype=np.float32), allow_pickle=False)
            request = {
                "folder": str(self.folder), "image": "image.npy", "labels": "labels.npy",
                "uncertainty": "uncertainty.npy" if uncertainty is not None else None,
                "spacing": [float(v) for v in geometry["spacing"]], "origin": [float(v) for v in geometry["origin"]],
                "direction": [float(v) for v in geometry["direction"]], "organs": list(organs), "model": str(model),
                "device": device, "samples": None if samples is None else int(samples), "seed": int(seed),
                "locked": list(locked), "interactions": list(interactions), "suggestions": int(suggestions),
                "encode_ahead": bool(encodeAhead), "watch_pid": int(watchPid if watchPid is not None else os.getpid()),
            }
            requestPath = self.folder / REQUEST_FILE
            requestPath.write_text(json.dumps(request, indent=2), encoding="utf-8")
            self.shape = tuple(int(v) for v in image.shape)
            self.runner.start(self.command(str(requestPath)), env=workerEnvironment(self.pythonPath),
                              cwd=str(self.folder))
        except BaseException:
            self.cleanup()
            raise
        self.state = "starting"
        self._pingId = self.send("ping")

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready")

    @property
    def busy(self) -> bool:
        """A correction (or undo/redo) was sent and not answered yet."""
        return any(cmd in ("refine", "undo", "redo") for cmd in self.pending.values())

    # -- commands ---------------------------------------------------------------------------------------------
    def send(self, cmd: str, **fields: Any) -> int:
        """Send a command; returns its id (its reply carries it). Raises when the worker is not running."""
        if not self.alive:
            raise RuntimeError(f"the refine worker is not running ({self.state}): {self.errorMessage}")
        cid = self._nextId
        self._nextId += 1
        if not self.runner.writeLine(json.dumps({"id": cid, "cmd": cmd, **fields})):
            raise RuntimeError("the refine worker no longer reads its commands (it has ended)")
        self.pending[cid] = cmd
        return cid

    def refine(self, organ: str, positive: Sequence[Sequence[float]] = (), negative: Sequence[Sequence[float]] = (),
               box: Sequence[float] | None = None) -> int:
        """Correct ``organ`` with clicks and/or a box (world coordinates in mm, LPS)."""
        return self.send("refine", organ=organ, positive=[[float(v) for v in p] for p in positive],
                         negative=[[float(v) for v in p] for p in negative],
                         box=None if box is None else [float(v) for v in box])

    def suggest(self, organ: str, k: int = 3) -> int:
        return self.send("suggest", organ=organ, k=int(k))

    def undo(self) -> int:
        return self.send("undo")

    def redo(self) -> int:
        return self.send("redo")

    def lock(self, organ: str, locked: bool = True) -> int:
        return self.send("lock", organ=organ, locked=bool(locked))

    def cancel(self, cid: int | None = None) -> None:
        """Cancel command ``cid`` (default: every correction waiting or running); it is answered as cancelled."""
        ids = [cid] if cid is not None else [i for i, cmd in self.pending.items() if cmd == "refine"]
        for i in ids:
            if self.alive:
                self.runner.writeLine(json.dumps({"cmd": "cancel", "id": i}))

    # -- events -----------------------------------------------------------------------------------------------
    def poll(self) -> list[dict[str, Any]]:
        """The events received since the last call; notices the process ending (see the module docstring)."""
        if self.state == "created" or self.exitCode is not None:
            return []
        events = self._readEvents()
        code = self.runner.poll()
        if code is None:
            if (self._pingId in self.pending and self._readyAt is not None
                    and time.monotonic() - self._readyAt > self.PING_TIMEOUT_S):
                self.state = "failed"
                self.errorMessage = (f"the refine worker does not receive its commands (no answer within "
                                     f"{self.PING_TIMEOUT_S:.0f} s of being ready: its standard input is not "
                                     "passed on)")
                self.runner.terminate(0.5)
                return events + self.poll()
            return events
        events += self._readEvents()
        self.exitCode = code
        if self.state != "failed":
            if self._stopping:  # asked to stop (and ended, if it had not stopped in time)
                self.state = "stopped"
            else:
                self.state = "failed"
                if not self.errorMessage:
                    self.errorMessage = f"the refine worker ended unexpectedly (exit status {code})"
        stderr = self.runner.errorText().strip()
        if self.state == "failed" and stderr:
            self.errorDetails = (self.errorDetails + "\n" if self.errorDetails else "") + stderr[-8000:]
        for cid, cmd in sorted(self.pending.items()):  # nobody will answer them now
            events.append({"type": "reply", "id": cid, "cmd": cmd, "ok": False, "kind": "WorkerEnded",
                           "message": self.errorMessage or "the refine worker has stopped"})
        self.pending.clear()
        self.cleanup()
        return events

    def _readEvents(self) -> list[dict[str, Any]]:
        events = protocolEvents(self.runner, parseRefineLine, self.logLines)
        for event in events:
            kind = event["type"]
            if kind == "ready":
                self.state = "ready"
                self._readyAt = time.monotonic()
            elif kind == "device":
                self.device = str(event.get("device", ""))
            elif kind == "progress":
                self.progress = event
            elif kind == "reply":
                self.pending.pop(event.get("id"), None)
                self.canUndo = bool(event.get("can_undo", self.canUndo))
                self.canRedo = bool(event.get("can_redo", self.canRedo))
            elif kind == "error":
                self.state = "failed"
                if not self.errorMessage:  # the first reason is the one to tell
                    self.errorKind = str(event.get("kind", ""))
                    self.errorMessage = event["message"]
                    self.errorDetails = str(event.get("details", ""))
        return events

    def readUpdate(self, update: dict[str, Any]) -> tuple[str, int, int, int, np.ndarray, np.ndarray]:
        """``(organ, axis, start, stop, mask, uncertainty)`` of a reply's ``update``; the files are removed.

        The arrays are checked: ``mask`` uint8 of 0/1 and ``uncertainty`` float32, both of the volume's shape
        with ``stop - start`` slices along ``axis``."""
        if self.folder is None or self.shape is None:
            raise RuntimeError("the refine worker has no session folder")
        try:
            axis, start, stop = int(update["axis"]), int(update["start"]), int(update["stop"])
            names = [str(update["mask"]), str(update["uncertainty"])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a malformed update from the refine worker: {update!r}") from exc
        paths = []
        for name in names:
            if Path(name).name != name or not name.endswith(".npy"):
                raise ValueError(f"the refine worker named a file outside its folder: {name!r}")
            paths.append(self.folder / name)
        try:
            if not (0 <= axis < 3 and 0 <= start < stop <= self.shape[axis]):
                raise ValueError(f"slices {start}..{stop - 1} along axis {axis} do not fit a volume of shape {self.shape}")
            expected = list(self.shape)
            expected[axis] = stop - start
            mask = np.load(paths[0], allow_pickle=False)
            uncertainty = np.load(paths[1], allow_pickle=False)
            for array, dtype, what in ((mask, np.uint8, "mask"), (uncertainty, np.float32, "uncertainty")):
                if array.dtype != dtype or list(array.shape) != expected:
                    raise ValueError(f"the {what} from the refine worker is {array.dtype} {array.shape}, expected "
                                     f"{np.dtype(dtype)} {tuple(expected)}")
            if mask.size and int(mask.max()) > 1:
                raise ValueError("the mask from the refine worker is not binary")
        finally:
            for path in paths:
                path.unlink(missing_ok=True)
        return str(update.get("organ", "")), axis, start, stop, mask, uncertainty

    # -- stopping -------------------------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, timeout: float = 5.0) -> None:
        """Ask the worker to stop (``shutdown``, stdin closed); with ``wait``, end it if it has not stopped
        within ``timeout`` seconds. The temporary folder is removed."""
        if self.state == "created" or self.exitCode is not None:
            self.cleanup()
            return
        if self.state == "failed":  # said why and is ending by itself
            self.terminate()
            return
        self._stopping = True
        self.runner.writeLine(json.dumps({"cmd": "shutdown"}))
        self.runner.closeInput()
        if not wait:
            return
        if self.runner.wait(timeout) is None:
            self.runner.terminate(0.5)
        self.poll()
        if self.state not in ("stopped", "failed"):
            self.state = "stopped"
        self.cleanup()

    def terminate(self) -> None:
        """End the worker's process tree now."""
        self._stopping = True
        if self.state != "created" and self.exitCode is None:
            self.runner.terminate(0.5)
            self.poll()
        self.state = "stopped" if self.state != "failed" else self.state
        self.cleanup()

    def waitUntil(self, predicate: Callable[[], bool], timeout: float, interval: float = 0.02,
                  onEvent: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Poll until ``predicate()`` (scripts and tests; the Widget polls from a timer)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.poll():
                if onEvent is not None:
                    onEvent(event)
            if predicate():
                return True
            if time.monotonic() > deadline or self.exitCode is not None:
                return bool(predicate())
            time.sleep(interval)

    def cleanup(self) -> None:
        if self.folder is not None and (self.exitCode is not None or self.state in ("created", "stopped")):
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
