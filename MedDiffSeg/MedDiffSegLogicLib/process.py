"""Running the worker as a separate process, behind a small protocol (no Qt).

The Widget polls a :class:`ProcessRunner` from a timer; tests drive the same object in a loop.
:class:`SubprocessRunner` is the real one: ``subprocess.Popen`` in its own process group (POSIX
session / Windows process group), stdout lines collected by a reader thread into a queue (never
blocking the caller), stderr kept (the tail) for error details. With ``keepInput=True`` its stdin
is a pipe that :meth:`~SubprocessRunner.writeLine` writes commands to (the persistent refine worker). :meth:`terminate` ends the whole
process tree: SIGTERM to the group (the worker cancels cleanly), then SIGKILL to the group after
a grace period; on Windows ``taskkill /T /F``.

:func:`probeDevice` asks a short-lived worker (``--device-info``) which compute device a run would
use, so that Slicer's own process never imports torch or initialises CUDA.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol, Sequence

log = logging.getLogger(__name__)

WORKER_MODULE = "MedDiffSegLib.inference.worker"


class ProcessRunner(Protocol):
    """What the background segmentation needs from a process."""

    pid: int | None

    def start(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None: ...

    def readLines(self) -> list[str]:
        """Complete stdout lines received since the last call (never blocks)."""

    def errorText(self) -> str:
        """The tail of what the process wrote to stderr so far."""

    def poll(self) -> int | None:
        """Exit status, or None while running."""

    def wait(self, timeout: float | None = None) -> int | None: ...

    def terminate(self, grace: float = 1.0) -> None:
        """End the process and all its children (the whole group)."""


class SubprocessRunner:
    """:class:`ProcessRunner` on ``subprocess.Popen``."""

    STDERR_TAIL = 64 * 1024

    def __init__(self, keepInput: bool = False):
        self.pid: int | None = None
        self.keepInput = bool(keepInput)
        self._inputLock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._stderr: list[str] = []
        self._stderrSize = 0
        self._stderrLock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- starting ------------------------------------------------------------------------------
    def start(self, args: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("a process is already running")
        kwargs: dict = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # own process group: cancel reaches every child
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self._proc = subprocess.Popen(
            list(args), stdin=subprocess.PIPE if self.keepInput else subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env, cwd=cwd, **kwargs,
        )
        self.pid = self._proc.pid
        self._threads = [
            threading.Thread(target=self._readStdout, args=(self._proc.stdout,), daemon=True),
            threading.Thread(target=self._readStderr, args=(self._proc.stderr,), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _readStdout(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            self._lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        stream.close()

    def _readStderr(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", errors="replace")
            with self._stderrLock:
                self._stderr.append(text)
                self._stderrSize += len(text)
                while self._stderrSize > self.STDERR_TAIL and len(self._stderr) > 1:
                    self._stderrSize -= len(self._stderr.pop(0))
        stream.close()

    # -- writing (keepInput=True) ---------------------------------------------------------------
    def writeLine(self, text: str) -> bool:
        """Send one line to the process's stdin; False when it can no longer be written (the process ended)."""
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise RuntimeError("this runner has no input pipe (SubprocessRunner(keepInput=True))")
        data = (text.rstrip("\n") + "\n").encode("utf-8")
        with self._inputLock:
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                return False
        return True

    def closeInput(self) -> None:
        """Close the process's stdin (it reads end-of-file)."""
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            with self._inputLock:
                try:
                    proc.stdin.close()
                except (BrokenPipeError, OSError):
                    pass

    # -- reading --------------------------------------------------------------------------------
    def readLines(self) -> list[str]:
        lines = []
        while True:
            try:
                lines.append(self._lines.get_nowait())
            except queue.Empty:
                return lines

    def errorText(self) -> str:
        with self._stderrLock:
            return "".join(self._stderr)

    def poll(self) -> int | None:
        if self._proc is None:
            return None
        code = self._proc.poll()
        if code is not None:
            self._joinReaders(0.5)  # everything the process wrote is in the queues once it has exited
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        if self._proc is None:
            return None
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._joinReaders(1.0)
        return code

    def _joinReaders(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    # -- stopping -------------------------------------------------------------------------------
    def terminate(self, grace: float = 1.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if os.name == "posix":
            pgid = proc.pid  # start_new_session: the worker leads its own group
            if proc.poll() is None:
                _killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            _killpg(pgid, signal.SIGKILL)  # children that outlived the leader, or a leader that did not stop
        else:  # pragma: no cover - Windows
            if proc.poll() is None:
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            log.error("worker process %s did not exit after SIGKILL", proc.pid)
        self.closeInput()
        self._joinReaders(1.0)


def protocolEvents(runner: ProcessRunner, parse, logLines: list[str]) -> list[dict]:
    """The protocol events among the lines ``runner``'s process wrote since the last call (``parse`` turns a
    line into an event or None); the other non-empty lines are appended to ``logLines``."""
    events = []
    for line in runner.readLines():
        event = parse(line)
        if event is None:
            if line.strip():
                logLines.append(line)
            continue
        events.append(event)
    return events


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pythonExecutable() -> str:
    """The Python to run the worker with: Slicer's ``PythonSlicer`` launcher inside Slicer, else ours.

    Inside Slicer ``sys.executable`` is the application itself; ``PythonSlicer`` (next to it, or
    in ``bin/``) starts Slicer's Python with the same environment.
    """
    exe = Path(sys.executable)
    if exe.stem.lower().startswith("python"):
        return str(exe)
    for candidate in (exe.with_name("PythonSlicer"), exe.with_name("PythonSlicer.exe"),
                      exe.parent.parent / "bin" / "PythonSlicer", exe.parent.parent / "bin" / "PythonSlicer.exe"):
        if candidate.is_file():
            return str(candidate)
    import shutil

    found = shutil.which("PythonSlicer")
    return found or str(exe)


class DeviceProbeError(RuntimeError):
    """The worker could not tell the device (the message is for the user)."""


def probeDevice(device: str = "auto", python: str | None = None, pythonPath: Sequence[str] = (),
                timeout: float = 180.0) -> dict:
    """``{"device": description, "gpu": bool}`` for ``device`` (auto/cpu/cuda/cuda:N), from a worker process
    started with ``--device-info``; raises :class:`DeviceProbeError` with the worker's message."""
    args = [python or pythonExecutable(), "-u", "-m", WORKER_MODULE, "--device-info", "--device", str(device)]
    kwargs: dict = {"start_new_session": True} if os.name == "posix" else {}
    try:
        done = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              env=workerEnvironment(pythonPath), **kwargs)
    except subprocess.TimeoutExpired:
        raise DeviceProbeError(f"the worker did not say which device it would use within {timeout:.0f} s") from None
    except OSError as exc:
        raise DeviceProbeError(f"cannot start the worker ({args[0]}): {exc}") from None
    from .progress import parseWorkerLine

    for raw in done.stdout.decode("utf-8", errors="replace").splitlines():
        event = parseWorkerLine(raw)
        if event is None:
            continue
        if event["type"] == "device":
            return {"device": str(event.get("device", "")), "gpu": bool(event.get("gpu", False))}
        if event["type"] == "error":
            raise DeviceProbeError(event["message"])
    tail = done.stderr.decode("utf-8", errors="replace").strip().splitlines()[-5:]
    raise DeviceProbeError(f"the worker ended without saying which device it would use (exit status "
                           f"{done.returncode}): {' '.join(tail)}")


def workerCommand(requestPath: str, python: str | None = None) -> list[str]:
    return [python or pythonExecutable(), "-u", "-m", WORKER_MODULE, "--request", str(requestPath)]


REFINE_WORKER_MODULE = "MedDiffSegLib.interactive.worker"


def refineWorkerCommand(requestPath: str, python: str | None = None) -> list[str]:
    """The persistent refine worker (``MedDiffSegLib.interactive.worker``) for a session request."""
    return [python or pythonExecutable(), "-u", "-m", REFINE_WORKER_MODULE, "--session", str(requestPath)]


def workerEnvironment(extraPythonPath: Sequence[str] = ()) -> dict[str, str]:
    """The current environment with ``extraPythonPath`` prepended (so a source checkout of the library is found)."""
    env = dict(os.environ)
    paths = [str(p) for p in extraPythonPath if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def waitUntil(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
