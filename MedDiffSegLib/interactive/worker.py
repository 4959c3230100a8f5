"""The persistent interactive worker: one :class:`~.session.InteractiveSession` kept alive between clicks.

Starting Python, torch and MONAI costs more than one click's correction, so a front end (the 3D
Slicer module) starts this process once per result and sends it every correction::

    python -m MedDiffSegLib.interactive.worker --session REQUEST.json

**The request** (a JSON object written by the front end into a private folder, e.g. ``mkdtemp``)::

    {"folder": "/tmp/MedDiffSeg-refine-x", "image": "image.npy", "labels": "labels.npy",
     "uncertainty": "uncertainty.npy", "spacing": [0.8, 0.8, 2.5], "origin": [x, y, z],
     "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "organs": ["liver", "spleen"], "model": "/path/to/package",
     "device": "auto", "samples": 5, "seed": 0, "locked": [], "interactions": [], "suggestions": 3,
     "encode_ahead": true, "watch_pid": 1234}

The arrays are ``.npy`` files in ``folder`` (read with ``allow_pickle=False``: only plain numbers):
the image ``[z, y, x]`` (a numeric dtype), the label map (uint8, label ``i`` = ``organs[i-1]``) and the
uncertainty map (float32, optional) of the same shape. ``spacing``, ``origin`` and ``direction`` are
the image's geometry in LPS, as SimpleITK has it. ``encode_ahead`` encodes every slice while the
worker is idle (a click interrupts it), so that no click pays for it.

**Commands**, one JSON object per line on stdin::

    {"id": 1, "cmd": "refine", "organ": "liver", "positive": [[x, y, z]], "negative": [], "box": null}
    {"id": 2, "cmd": "suggest", "organ": "liver", "k": 3}
    {"id": 3, "cmd": "undo"}        {"id": 4, "cmd": "redo"}
    {"id": 5, "cmd": "lock", "organ": "liver", "locked": true}
    {"id": 6, "cmd": "ping"}        (answered at once: the front end knows its commands arrive)
    {"cmd": "cancel", "id": 1}      (request 1 stops, running or waiting; the result is unchanged)
    {"cmd": "shutdown"}             (closing stdin does the same)

Points and boxes are world coordinates in mm, LPS. Commands run one at a time, in order.

**Events**, one JSON object per line on stdout (nothing else is written there, as for the segmentation
worker, :mod:`MedDiffSegLib.inference.worker`): ``start``; ``device``; ``progress`` (stage ``load``,
``encode``, ``refine``); ``ready`` (``organs``, ``shape``, ``slice_axis``) once the session is
built; for every command a ``reply`` with its ``id`` and ``cmd`` and either ``"ok": true`` or
``"ok": false`` with ``kind`` and ``message`` (a bad click, a locked organ, ``Cancelled``...; the
worker goes on); ``suggestions`` (``organ``, ``suggestions``) after each correction, unless another
command is already waiting; last ``stopped`` (exit status 0), or ``error`` (exit status non-zero) when
the session cannot be built or the worker must stop.

A ``refine``, ``undo`` or ``redo`` reply carries ``update``: ``{"organ", "label", "axis", "start",
"stop", "mask", "uncertainty"}``: the organ's mask (uint8, 0/1) and the uncertainty map on the input
slices ``start`` .. ``stop - 1`` along numpy axis ``axis``, as ``.npy`` files in ``folder`` that the
front end reads and removes. Only that organ changed (see the session's write-back rules).

SIGTERM or SIGINT, or the death of ``watch_pid``, ends the worker (status 130).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..inference.worker import CancelFlag, ProtocolWriter, RequestError, protocol_stream, read_request

PROTOCOL_VERSION = 1
COMMANDS = ("refine", "suggest", "undo", "redo", "lock", "ping", "cancel", "shutdown")
#: Slices encoded per idle step of ``encode_ahead`` (a click waits at most for one such batch).
ENCODE_BATCH = 8
#: How often the idle worker checks the cancel flag (seconds).
IDLE_POLL_S = 0.2

_REQUIRED = ("folder", "image", "labels", "spacing", "origin", "direction", "organs", "model")
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "uncertainty": (str,), "device": (str,), "samples": (int,), "seed": (int,), "locked": (list,),
    "interactions": (list,), "suggestions": (int,), "encode_ahead": (bool,), "watch_pid": (int,),
    "precision": (str,),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def load_session_request(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a session request (see the module docstring); raises :class:`RequestError`."""
    request = read_request(path, _REQUIRED, _OPTIONAL)
    for key, n in (("spacing", 3), ("origin", 3), ("direction", 9)):
        value = request[key]
        if not isinstance(value, list) or len(value) != n or not all(_number(v) for v in value):
            raise RequestError(f"request key {key!r} must be {n} finite numbers, got {value!r}")
    if not all(float(v) > 0 for v in request["spacing"]):
        raise RequestError(f"the spacing must be positive, got {request['spacing']}")
    if not isinstance(request["organs"], list) or not request["organs"] or not all(isinstance(o, str) for o in request["organs"]):
        raise RequestError("request key 'organs' must be a non-empty list of organ names")
    folder = Path(request["folder"])
    if not folder.is_dir():
        raise RequestError(f"the session folder {folder} does not exist")
    for key in ("image", "labels", "uncertainty"):
        name = request.get(key)
        if name is None:
            continue
        if not isinstance(name, str) or Path(name).name != name:
            raise RequestError(f"request key {key!r} must name a file in the session folder, got {name!r}")
    return request


def read_array(path: Path, what: str, dtypes: str | None = None, shape: tuple[int, ...] | None = None):
    """A ``.npy`` array (no pickles) of a numeric dtype, checked against ``dtypes`` (numpy kind letters) and ``shape``."""
    import numpy as np

    from ..errors import InputError

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the {what} ({path.name}): {exc}") from None
    if array.dtype.kind not in (dtypes or "biuf"):
        raise InputError(f"the {what} has dtype {array.dtype}, expected one of kind {dtypes or 'biuf'}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise InputError(f"the {what} has shape {array.shape}, the image {tuple(shape)}")
    if array.ndim != 3:
        raise InputError(f"the {what} must be a 3D array [z, y, x], got shape {array.shape}")
    return array


def build_session(request: dict[str, Any], emit: Callable[[dict[str, Any]], None]):
    """The :class:`InteractiveSession` a request describes (model loaded and verified)."""
    import numpy as np
    import SimpleITK as sitk

    from ..inference.device import device_description, resolve_device
    from ..registry.store import resolve_model
    from .session import Interaction, InteractiveSession

    device = resolve_device(request.get("device") or "auto")
    emit({"type": "device", "device": device_description(device), "gpu": device.type == "cuda"})
    folder = Path(request["folder"])
    emit({"type": "progress", "stage": "load", "fraction": 0.0, "message": "reading the volume"})
    image_array = read_array(folder / request["image"], "image")
    image = sitk.GetImageFromArray(image_array)
    image.SetSpacing(tuple(float(v) for v in request["spacing"]))
    image.SetOrigin(tuple(float(v) for v in request["origin"]))
    try:
        image.SetDirection(tuple(float(v) for v in request["direction"]))
    except RuntimeError as exc:  # not a rotation matrix
        raise RequestError(f"request key 'direction' is not a valid direction matrix: {exc}") from None

    def on_grid(array) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.CopyInformation(image)
        return img

    labels = on_grid(read_array(folder / request["labels"], "label map", "u", image_array.shape).astype(np.uint8))
    uncertainty = None
    if request.get("uncertainty"):
        uncertainty = on_grid(read_array(folder / request["uncertainty"], "uncertainty map", "f",
                                         image_array.shape).astype(np.float32))
    del image_array
    emit({"type": "progress", "stage": "load", "fraction": 0.3, "message": "loading the model"})
    package = resolve_model(request["model"])
    package.verify()
    interactions = [Interaction.from_dict(d) for d in request.get("interactions") or []]
    session = InteractiveSession(
        image, package, request["organs"], labels, uncertainty, device=str(device),
        samples=int(request.get("samples") or package.inference.get("samples", 1)), seed=int(request.get("seed") or 0),
        precision=request.get("precision") or "auto", locked=request.get("locked") or [], interactions=interactions)
    emit({"type": "progress", "stage": "load", "fraction": 1.0, "message": "model loaded"})
    return session


class Commands:
    """stdin read by a thread: commands queued in order; ``cancel`` and ``shutdown`` act at once."""

    SHUTDOWN = {"cmd": "shutdown"}

    def __init__(self, stream, emit: Callable[[dict[str, Any]], None]):
        self.queue: "queue.Queue[dict[str, Any]]" = queue.Queue()
        self.cancelled: set[Any] = set()
        self.shutdown = threading.Event()
        self._emit = emit
        self._thread = threading.Thread(target=self._read, args=(stream,), name="meddiffseg-commands", daemon=True)

    def start(self) -> "Commands":
        self._thread.start()
        return self

    def _read(self, stream) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.strip()
            if not line:
                continue
            try:
                command = json.loads(line)
            except json.JSONDecodeError as exc:
                self._emit({"type": "reply", "id": None, "cmd": None, "ok": False, "kind": "RequestError",
                            "message": f"a command is not valid JSON: {exc}"})
                continue
            if not isinstance(command, dict) or command.get("cmd") not in COMMANDS:
                self._emit({"type": "reply", "id": command.get("id") if isinstance(command, dict) else None,
                            "cmd": command.get("cmd") if isinstance(command, dict) else None, "ok": False,
                            "kind": "RequestError",
                            "message": f"unknown command; the commands are: {', '.join(COMMANDS)}"})
                continue
            if command["cmd"] == "cancel":
                self.cancelled.add(command.get("id"))
            elif command["cmd"] == "shutdown":
                self.shutdown.set()
                self.queue.put(self.SHUTDOWN)
                return
            else:
                self.queue.put(command)
        self.shutdown.set()  # stdin closed: the front end is gone or done
        self.queue.put(self.SHUTDOWN)


def _points(value: Any, what: str) -> list[tuple[float, float, float]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 3 and all(_number(v) for v in p)
                                              for p in value):
        raise RequestError(f"{what} must be a list of [x, y, z] points (finite numbers, mm), got {value!r}")
    return [tuple(float(v) for v in p) for p in value]  # type: ignore[misc]


class Worker:
    """Runs the commands on one session (see the module docstring)."""

    def __init__(self, session, folder: Path, emit: Callable[[dict[str, Any]], None], commands: Commands,
                 stop: Callable[[], bool], suggestions: int = 3, encode_ahead: bool = True):
        self.session = session
        self.folder = folder
        self.emit = emit
        self.commands = commands
        self.stop = stop  # the process must end (signal, owner gone)
        self.suggestions = int(suggestions)
        # only slices that fit one window have an encoding to cache (see InteractiveSession.encode)
        self._to_encode = list(range(session.canon.shape[0])) if encode_ahead and session._one_window else []
        self._encode_total = len(self._to_encode)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop():
            try:
                command = self.commands.queue.get(timeout=0 if self._to_encode else IDLE_POLL_S)
            except queue.Empty:
                if self._to_encode:
                    self._encode_some()
                continue
            if command is Commands.SHUTDOWN:
                return
            self.handle(command)

    def _encode_some(self) -> None:
        batch, self._to_encode = self._to_encode[:ENCODE_BATCH], self._to_encode[ENCODE_BATCH:]
        self.session.encode(batch)
        done = self._encode_total - len(self._to_encode)
        self.emit({"type": "progress", "stage": "encode", "fraction": round(done / max(1, self._encode_total), 4),
                   "message": f"{done}/{self._encode_total} slices encoded"})

    def handle(self, command: dict[str, Any]) -> None:
        from ..errors import Cancelled, MedDiffSegError

        cid, cmd = command.get("id"), command["cmd"]
        reply: dict[str, Any] = {"type": "reply", "id": cid, "cmd": cmd}
        try:
            if cid in self.commands.cancelled:
                raise Cancelled("correction cancelled before it started; the result is unchanged")
            reply.update(getattr(self, "do_" + cmd)(command))
            reply["ok"] = True
        except (MedDiffSegError, RequestError) as exc:
            reply.update(ok=False, kind=type(exc).__name__, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the session silently
            details = traceback.format_exc()
            print(details, file=sys.stderr, flush=True)
            reply.update(ok=False, kind="InternalError", message=f"{type(exc).__name__}: {exc}", details=details)
        self.commands.cancelled.discard(cid)
        reply.update(can_undo=self.session.can_undo, can_redo=self.session.can_redo)
        self.emit(reply)
        organ = (reply.get("update") or {}).get("organ")
        if organ and self.suggestions > 0 and self.commands.queue.empty():
            self.emit({"type": "suggestions", "id": cid, "organ": organ, "suggestions": self._suggest(organ, self.suggestions)})

    # -- commands ------------------------------------------------------------------------------
    def do_refine(self, command: dict[str, Any]) -> dict[str, Any]:
        organ = command.get("organ")
        if not isinstance(organ, str):
            raise RequestError(f"'organ' must be an organ name, got {organ!r}")
        positive = _points(command.get("positive"), "'positive'")
        negative = _points(command.get("negative"), "'negative'")
        box = command.get("box")
        if box is not None and (not isinstance(box, list) or len(box) != 6 or not all(_number(v) for v in box)):
            raise RequestError(f"'box' must be 6 finite numbers [x0, y0, z0, x1, y1, z1] (mm), got {box!r}")
        self.emit({"type": "progress", "stage": "refine", "fraction": 0.0, "message": f"correcting {organ}"})
        cid = command.get("id")
        inter = self.session.refine(organ, positive, negative, box,
                                    should_cancel=lambda: self.stop() or self.commands.shutdown.is_set()
                                    or cid in self.commands.cancelled)
        return {"interaction": inter.to_dict(), "update": self._update(cid, inter)}

    def do_undo(self, command: dict[str, Any]) -> dict[str, Any]:
        inter = self.session.undo()
        return {"interaction": None, "update": None} if inter is None else {
            "interaction": inter.to_dict(), "update": self._update(command.get("id"), inter)}

    def do_redo(self, command: dict[str, Any]) -> dict[str, Any]:
        inter = self.session.redo()
        return {"interaction": None, "update": None} if inter is None else {
            "interaction": inter.to_dict(), "update": self._update(command.get("id"), inter)}

    def do_lock(self, command: dict[str, Any]) -> dict[str, Any]:
        organ = command.get("organ")
        if not isinstance(organ, str) or not isinstance(command.get("locked"), bool):
            raise RequestError("'lock' needs 'organ' (a name) and 'locked' (true or false)")
        (self.session.lock if command["locked"] else self.session.unlock)(organ)
        return {"locked": sorted(self.session.locked)}

    def do_ping(self, command: dict[str, Any]) -> dict[str, Any]:
        return {}

    def do_suggest(self, command: dict[str, Any]) -> dict[str, Any]:
        organ = command.get("organ")
        k = command.get("k", self.suggestions)
        if not isinstance(organ, str) or not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise RequestError("'suggest' needs 'organ' (a name) and 'k' (a count >= 0)")
        name = self.session.canonical_name(organ)
        return {"organ": name, "suggestions": self._suggest(name, k)}

    def _suggest(self, organ: str, k: int) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.session.suggest(organ, k)]

    def _update(self, cid: Any, inter) -> dict[str, Any]:
        """The organ's mask and the uncertainty on the slices ``inter`` touched, written as .npy files."""
        import numpy as np

        session = self.session
        label = session.organs.index(inter.organ) + 1
        start, stop = min(inter.slices), max(inter.slices) + 1
        axis = int(inter.slice_axis)
        index = np.arange(start, stop)
        labels = np.take(session.view.from_canonical(session.labels_c), index, axis=axis)
        uncertainty = np.take(session.view.from_canonical(session.unc_c), index, axis=axis)
        tag = f"{int(cid)}" if isinstance(cid, int) and not isinstance(cid, bool) else f"{time.monotonic_ns()}"
        names = {"mask": f"update-{tag}-mask.npy", "uncertainty": f"update-{tag}-uncertainty.npy"}
        np.save(self.folder / names["mask"], (labels == label).astype(np.uint8), allow_pickle=False)
        np.save(self.folder / names["uncertainty"], uncertainty.astype(np.float32), allow_pickle=False)
        return {"organ": inter.organ, "label": label, "axis": axis, "start": int(start), "stop": int(stop), **names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedDiffSegLib.interactive.worker",
                                     description="Keep an interactive session alive; JSON commands on stdin, "
                                                 "JSON events on stdout.")
    parser.add_argument("--session", required=True, help="path of the JSON session request")
    args = parser.parse_args(argv)

    emit = ProtocolWriter(protocol_stream())
    commands_in = sys.stdin
    cancel = CancelFlag().install()
    from .. import __version__
    from ..errors import MedDiffSegError

    emit({"type": "start", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "version": __version__})
    try:
        request = load_session_request(args.session)
        cancel.watch_process(request.get("watch_pid"))
        cancel.watch()
        commands = Commands(commands_in, emit).start()
        t0 = time.perf_counter()
        session = build_session(request, emit)
        axis, _ = session.view.input_index_of_canonical_slice(0)
        emit({"type": "ready", "organs": session.organs, "shape": list(session.image.GetSize())[::-1],
              "slice_axis": int(axis), "locked": sorted(session.locked), "seconds": round(time.perf_counter() - t0, 3)})
        suggestions = request.get("suggestions")
        Worker(session, Path(request["folder"]), emit, commands, cancel,
               suggestions=3 if suggestions is None else suggestions,
               encode_ahead=bool(request.get("encode_ahead", True))).run()
    except RequestError as exc:
        emit({"type": "error", "kind": "RequestError", "message": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        emit({"type": "error", "kind": "Cancelled", "message": "the interactive session was stopped", "exit_code": 130})
        return 130
    except MedDiffSegError as exc:
        code = int(getattr(exc, "exit_code", 1)) or 1
        emit({"type": "error", "kind": type(exc).__name__, "message": str(exc), "exit_code": code})
        return code
    except Exception as exc:  # noqa: BLE001 - every failure must reach the front end as a message
        details = traceback.format_exc()
        print(details, file=sys.stderr, flush=True)
        emit({"type": "error", "kind": "InternalError", "message": f"{type(exc).__name__}: {exc}",
              "details": details, "exit_code": 1})
        return 1
    if cancel():
        emit({"type": "error", "kind": "Cancelled", "message": "the interactive session was stopped", "exit_code": 130})
        return 130
    emit({"type": "stopped"})
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    sys.exit(main())
