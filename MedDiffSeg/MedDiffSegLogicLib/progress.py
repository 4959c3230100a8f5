"""The worker's JSON-lines protocol on the module's side: parsing, progress text, remaining time.

The worker (``MedDiffSegLib.inference.worker``) prints one JSON object per line: ``start``,
``device``, ``progress`` (stage, fraction of the whole run, message), and last ``done`` or
``error``. Lines that are not such objects are passed on as log text, never as progress.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

EVENT_TYPES = ("start", "device", "progress", "done", "error")

STAGE_TEXT = {
    "read": "Reading the volume",
    "load": "Loading the model",
    "preprocess": "Preparing slices",
    "network": "Sampling (diffusion)",
    "postprocess": "Fusing samples",
    "write": "Writing results",
}


def parseJsonEvent(line: str | bytes, types: tuple[str, ...]) -> dict[str, Any] | None:
    """The JSON object of one line whose ``type`` is one of ``types``; None for any other line."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("type") not in types:
        return None
    return event


def parseWorkerLine(line: str | bytes) -> dict[str, Any] | None:
    """The event of one protocol line, or None when the line is not a protocol message."""
    event = parseJsonEvent(line, EVENT_TYPES)
    if event is None:
        return None
    if event["type"] == "progress":
        try:
            fraction = float(event.get("fraction", 0.0))
        except (TypeError, ValueError):
            return None
        event["fraction"] = min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0
        event["stage"] = str(event.get("stage", ""))
        event["message"] = str(event.get("message", ""))
    if event["type"] == "error":
        event["message"] = str(event.get("message") or "the segmentation failed")
    return event


def formatDuration(seconds: float | None) -> str:
    """``"45 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``; ``"?"`` for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class ProgressTracker:
    """Keeps the latest stage/fraction and estimates the remaining time.

    The estimate extrapolates the rate observed since the sampling stage began (reading and
    model loading are not representative), once a little progress has been made.
    """

    MIN_FRACTION_FOR_ESTIMATE = 0.01
    MIN_SECONDS_FOR_ESTIMATE = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        self.fraction = 0.0
        self.stage = ""
        self.message = ""
        self.device = ""
        self._rateStart: tuple[float, float] | None = None

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "device":
            self.device = str(event.get("device", ""))
        elif kind == "progress":
            now = self._clock()
            self.fraction = max(self.fraction, float(event["fraction"]))
            self.stage = event.get("stage", self.stage)
            self.message = event.get("message", "")
            if self.stage == "network" and self._rateStart is None:
                self._rateStart = (now, self.fraction)
        elif kind == "done":
            self.fraction = 1.0

    def elapsed(self) -> float:
        return self._clock() - self.started

    def remainingSeconds(self) -> float | None:
        if self._rateStart is None:
            return None
        t0, f0 = self._rateStart
        dt, df = self._clock() - t0, self.fraction - f0
        if df < self.MIN_FRACTION_FOR_ESTIMATE or dt < self.MIN_SECONDS_FOR_ESTIMATE:
            return None
        return max(0.0, (1.0 - self.fraction) * dt / df)

    def stageText(self) -> str:
        return STAGE_TEXT.get(self.stage, self.stage.capitalize() if self.stage else "Starting")

    def text(self) -> str:
        """One line for the progress bar: stage, detail, remaining time."""
        parts = [self.stageText()]
        if self.message:
            parts[0] += f": {self.message}"
        remaining = self.remainingSeconds()
        if remaining is not None:
            parts.append(f"about {formatDuration(remaining)} left")
        return " - ".join(parts)
