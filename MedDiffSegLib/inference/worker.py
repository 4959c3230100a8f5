"""Background-process entry point: one segmentation run driven by a JSON request, reporting on stdout.

Used by the 3D Slicer module (which must not block its GUI) and usable by any other front end::

    python -m MedDiffSegLib.inference.worker --request REQUEST.json

``REQUEST.json`` holds the arguments of :func:`~MedDiffSegLib.inference.pipeline.run_segment`::

    {"input": "/tmp/x/input.nrrd", "out_dir": "/tmp/x/out", "organs": ["liver", "spleen"],
     "model": null, "samples": 5, "steps": null, "seed": 0, "device": "auto",
     "scheduler": null, "staple": false, "largest_component": false,
     "modality": "CT", "allow_modality_mismatch": false}

Only ``input``, ``out_dir`` and ``organs`` are required. ``modality`` declares what the input is
(``"CT"``/``"MR"``; e.g. the DICOM Modality of the volume a front end wrote to a file), and
``allow_modality_mismatch`` runs a model made for another modality (see :mod:`MedDiffSegLib.modality`). The worker writes exactly one JSON
object per line to stdout (the *protocol stream*) and nothing else:

- ``{"type": "start", "protocol": 1, "pid": ..., "version": ...}`` once, first;
- ``{"type": "device", "device": "cpu: ...", "gpu": false}`` once the compute device is known;
- ``{"type": "progress", "stage": ..., "fraction": 0..1, "message": ...}`` for every progress
  update of the run (``fraction`` is the share of the whole run, never decreasing);
- last, either ``{"type": "done", "out_dir": ..., "summary": {...}}`` (exit status 0) or
  ``{"type": "error", "kind": ..., "message": ..., "exit_code": N}`` (exit status N, non-zero;
  ``kind`` is the error class, ``"Cancelled"`` with exit status 130 for a cancelled run).

Anything else the process prints - library warnings, tracebacks of bugs, even output of C code
writing to file descriptor 1 - goes to stderr: the worker moves its original stdout aside for the
protocol and points descriptor 1 at stderr before importing the heavy libraries.

**Cancel**: SIGTERM (or SIGINT) asks the run to stop; the engine notices before its next window
batch, the pipeline removes any partial output, and the worker exits with status 130. A second
signal ends the process at once.

**Orphans**: the run is also cancelled when the process it works for dies. That is the request's
``watch_pid`` (the 3D Slicer module sends its own process id: inside Slicer the worker is started
through the ``PythonSlicer`` launcher, which is the worker's parent and outlives a crashed Slicer),
else the parent process (POSIX). A watchdog thread checks every :data:`WATCH_INTERVAL_S` seconds, so
this also works while a long network batch runs; if the run has not stopped
:data:`ORPHAN_GRACE_S` seconds later, the process exits at once (status 130).

**Device information without a run**: ``python -m MedDiffSegLib.inference.worker --device-info
[--device auto|cpu|cuda]`` prints the ``start`` and ``device`` lines and exits (status 0; a device
that is not available is an ``error`` line, status 4). A front end that must not import torch or
initialise CUDA in its own process (the Slicer module) asks this way which device a run would use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

PROTOCOL_VERSION = 1

#: Request keys and the type each value must have (``None`` is always allowed for optional ones).
_REQUIRED = ("input", "out_dir", "organs")
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "samples": (int,),
    "steps": (int,),
    "seed": (int,),
    "device": (str,),
    "scheduler": (str,),
    "staple": (bool,),
    "largest_component": (bool,),
    "save_probabilities": (bool,),
    "modality": (str,),
    "allow_modality_mismatch": (bool,),
    "watch_pid": (int,),
}

#: How often the watchdog checks that the watched process is alive, and how long a run may go on
#: after it died before the worker exits at once (seconds).
WATCH_INTERVAL_S = 0.5
ORPHAN_GRACE_S = 10.0


class RequestError(Exception):
    """The request file is missing, not JSON, or has wrong keys/values (exit status 2)."""

    exit_code = 2


def read_request(path: str | os.PathLike, required: tuple[str, ...],
                 optional: dict[str, tuple[type, ...]]) -> dict[str, Any]:
    """A JSON object read from ``path`` with every ``required`` key, no other key than those and the
    ``optional`` ones, and each optional value of its type or None; raises :class:`RequestError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RequestError(f"cannot read request file {path}: {exc.strerror or exc}") from None
    try:
        request = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request file {path} is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError(f"request file {path} must hold a JSON object")
    missing = [k for k in required if k not in request]
    if missing:
        raise RequestError(f"request file {path} lacks required key(s): {', '.join(missing)}")
    unknown = sorted(set(request) - set(required) - set(optional))
    if unknown:
        raise RequestError(f"request file {path} has unknown key(s): {', '.join(unknown)}")
    for key, types in optional.items():
        value = request.get(key)
        if value is None:
            continue
        if types == (int,) and isinstance(value, bool):
            raise RequestError(f"request key {key!r} must be an integer, got {value!r}")
        if not isinstance(value, types):
            raise RequestError(f"request key {key!r} must be of type {types[0].__name__}, got {value!r}")
    return request


def load_request(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a request file; raises :class:`RequestError` with a readable message."""
    request = read_request(path, _REQUIRED, _OPTIONAL)
    for key in ("input", "out_dir"):
        if not isinstance(request[key], str) or not request[key]:
            raise RequestError(f"request key {key!r} must be a non-empty path string")
    organs = request["organs"]
    if isinstance(organs, str):
        organs = [organs]
    if not isinstance(organs, list) or not all(isinstance(o, str) for o in organs):
        raise RequestError("request key 'organs' must be a list of organ names")
    request["organs"] = organs
    return request


class ProtocolWriter:
    """Writes one JSON object per line to the protocol stream, thread-safe, flushed at once."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, allow_nan=False, default=_json_default, separators=(",", ":"))
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (BrokenPipeError, ValueError):  # the reader went away; nothing left to tell
                pass


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _clean_fraction(fraction: float) -> float:
    f = float(fraction)
    return min(1.0, max(0.0, f)) if math.isfinite(f) else 0.0


def protocol_stream() -> TextIO:
    """Move the real stdout aside for the protocol and send file descriptor 1 (and sys.stdout) to stderr."""
    sys.stdout.flush()
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (POSIX: signal 0; Windows: its handle is not signalled)."""
    if pid <= 0:
        return False
    if os.name == "posix":
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True
    import ctypes  # pragma: no cover - Windows

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x00100000, False, pid)  # SYNCHRONIZE
    if not handle:
        return False
    try:
        return kernel32.WaitForSingleObject(handle, 0) == 0x00000102  # WAIT_TIMEOUT: still running
    finally:
        kernel32.CloseHandle(handle)


class CancelFlag:
    """Set by SIGTERM/SIGINT (a second signal ends the process) or when the watched process is gone.

    ``watch_pid``: the process the worker works for (None: the parent, checked by re-parenting on POSIX).
    :meth:`watch` starts the watchdog thread (see the module docstring).
    """

    def __init__(self, watch_parent: bool = True, watch_pid: int | None = None):
        self._event = threading.Event()
        self._parent = os.getppid() if (watch_parent and os.name == "posix") else None
        self._watch_pid = watch_pid
        self._previous: dict[int, Any] = {}
        self._watchdog: threading.Thread | None = None
        self._stop_watching = threading.Event()
        self.orphaned = False

    def install(self) -> "CancelFlag":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # pragma: no cover - platform without the signal
                pass
        return self

    def _handler(self, signum, frame) -> None:
        if self._event.is_set():
            os._exit(130)  # second request: stop now, the parent cleans the temporary folder
        self._event.set()

    def set(self) -> None:
        self._event.set()

    def watch_process(self, pid: int | None) -> None:
        """Watch ``pid`` instead of the parent (the request's ``watch_pid``)."""
        self._watch_pid = pid if pid else None

    def owner_gone(self) -> bool:
        if self._watch_pid is not None:
            return not pid_alive(self._watch_pid)
        return self._parent is not None and os.getppid() != self._parent  # re-parented: our starter is gone

    def watch(self, interval: float = WATCH_INTERVAL_S, grace: float = ORPHAN_GRACE_S,
              exit: Callable[[int], None] = os._exit) -> "CancelFlag":
        """Start the watchdog thread: on the owner's death set the flag, then ``exit(130)`` after ``grace``."""
        def run() -> None:
            while not self.owner_gone():
                if self._stop_watching.wait(interval):
                    return
            self.orphaned = True
            self._event.set()  # the run cancels itself at its next check...
            if not self._stop_watching.wait(grace):
                exit(130)  # ...or is ended here

        self._watchdog = threading.Thread(target=run, name="meddiffseg-orphan-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def stop_watching(self) -> None:
        self._stop_watching.set()

    def __call__(self) -> bool:
        if not self._event.is_set() and self.owner_gone():
            self.orphaned = True
            self._event.set()
        return self._event.is_set()


def run_request(request: dict[str, Any], emit: Callable[[dict[str, Any]], None],
                should_cancel: Callable[[], bool]) -> dict[str, Any]:
    """Run one validated request, reporting device and progress through ``emit``; returns the summary."""
    from .device import device_description, resolve_device
    from .pipeline import run_segment

    device = request.get("device") or "auto"
    torch_device = resolve_device(device)
    emit({"type": "device", "device": device_description(torch_device), "gpu": torch_device.type == "cuda"})

    last = {"fraction": 0.0}

    def progress(stage: str, fraction: float, message: str) -> None:
        f = max(last["fraction"], _clean_fraction(fraction))  # never decreasing
        last["fraction"] = f
        emit({"type": "progress", "stage": str(stage), "fraction": round(f, 6), "message": str(message)})

    return run_segment(
        request["input"], request["out_dir"], request["organs"],
        model=request.get("model"), samples=request.get("samples"), steps=request.get("steps"),
        seed=request.get("seed") or 0, device=str(torch_device), scheduler=request.get("scheduler"),
        staple=bool(request.get("staple", False)), largest_component=request.get("largest_component"),
        save_probabilities=bool(request.get("save_probabilities", False)),
        modality=request.get("modality"), allow_modality_mismatch=bool(request.get("allow_modality_mismatch", False)),
        progress=progress, should_cancel=should_cancel,
    )


def device_info(device: str, emit: Callable[[dict[str, Any]], None]) -> int:
    """The ``--device-info`` mode: one ``device`` line for ``device`` (or an ``error`` line)."""
    from ..errors import MedDiffSegError
    from .device import device_description, resolve_device

    try:
        torch_device = resolve_device(device)
        emit({"type": "device", "device": device_description(torch_device), "gpu": torch_device.type == "cuda",
              "requested": device})
    except MedDiffSegError as exc:
        code = int(getattr(exc, "exit_code", 1)) or 1
        emit({"type": "error", "kind": type(exc).__name__, "message": str(exc), "exit_code": code})
        return code
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m MedDiffSegLib.inference.worker",
        description="Run one segmentation described by a JSON request; JSON progress lines on stdout.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--request", help="path of the JSON request file")
    what.add_argument("--device-info", action="store_true",
                      help="only say which device a run would use (a 'device' line) and exit")
    parser.add_argument("--device", default="auto", help="with --device-info: auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)

    emit = ProtocolWriter(protocol_stream())
    cancel = CancelFlag().install()
    from .. import __version__

    emit({"type": "start", "protocol": PROTOCOL_VERSION, "pid": os.getpid(), "version": __version__})
    if args.device_info:
        return device_info(args.device, emit)
    try:
        request = load_request(args.request)
        cancel.watch_process(request.get("watch_pid"))
        cancel.watch()
        summary = run_request(request, emit, cancel)
    except RequestError as exc:
        emit({"type": "error", "kind": "RequestError", "message": str(exc), "exit_code": exc.exit_code})
        return exc.exit_code
    except KeyboardInterrupt:
        emit({"type": "error", "kind": "Cancelled", "message": "segmentation cancelled; no output was written",
              "exit_code": 130})
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure must reach the parent as a message
        from ..errors import MedDiffSegError

        if isinstance(exc, MedDiffSegError):
            code = int(getattr(exc, "exit_code", 1)) or 1
            emit({"type": "error", "kind": type(exc).__name__, "message": str(exc), "exit_code": code})
            return code
        details = traceback.format_exc()
        print(details, file=sys.stderr, flush=True)
        emit({"type": "error", "kind": "InternalError", "message": f"{type(exc).__name__}: {exc}",
              "details": details, "exit_code": 1})
        return 1
    emit({"type": "done", "out_dir": str(Path(request["out_dir"]).expanduser().absolute()), "summary": summary})
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    sys.exit(main())
