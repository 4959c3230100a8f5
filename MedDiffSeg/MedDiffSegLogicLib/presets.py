"""Quality presets, device choices and a rough run-time estimate (plain data, no Qt, no MRML)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QualityPreset:
    name: str
    samples: int
    staple: bool
    description: str


QUALITY_PRESETS: dict[str, QualityPreset] = {
    "Fast": QualityPreset("Fast", 1, False,
                          "1 diffusion sample: a segmentation quickly, but no uncertainty overlay (one sample cannot disagree "
                          "with itself); slices where an organ probably continues unsegmented are still flagged."),
    "Standard": QualityPreset("Standard", 5, False,
                              "5 samples: mean probability thresholded, variance as uncertainty. On the test patients 5 "
                              "one-step samples find errors near the organ about as well as 10, at half the time, and "
                              "as well as 4-step sampling in less than half the time (docs/uncertainty.md)."),
    "Thorough": QualityPreset("Thorough", 10, True,
                              "10 samples fused with STAPLE: the most robust masks and uncertainty, 10x the network time of Fast."),
}
#: Chosen from docs/uncertainty.md: the most uncertainty per second of the settings measured.
DEFAULT_PRESET = "Standard"

#: GUI device choice -> library device name.
DEVICES: dict[str, str] = {"Auto": "auto", "GPU": "cuda", "CPU": "cpu"}

#: Rough CPU seconds for one network evaluation (one reverse step of one sample) of a 256x256 window,
#: used only when the model card gives no ``inference.cpu_seconds_per_window`` of its own.
DEFAULT_CPU_SECONDS_PER_WINDOW = 0.25


def presetSettings(preset: str) -> QualityPreset:
    try:
        return QUALITY_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown quality preset {preset!r}; choose one of {', '.join(QUALITY_PRESETS)}") from None


def deviceName(choice: str) -> str:
    """``"Auto"``/``"GPU"``/``"CPU"`` (or a library name already) -> ``"auto"``/``"cuda"``/``"cpu"``."""
    if choice in DEVICES:
        return DEVICES[choice]
    if choice in DEVICES.values() or str(choice).startswith("cuda:"):
        return str(choice)
    raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICES)}")


def networkEvaluations(dimensionsIJK, spacing, package, organs: int, samples: int, steps: int | None = None,
                       sliceAxis: int | None = None) -> int:
    """Number of (window x organ x sample x step) network evaluations a run needs.

    ``sliceAxis``: the I/J/K axis closest to superior-inferior (the axis slices are taken across);
    when unknown, the axis with the largest spacing."""
    inference = package.inference
    roi = inference.get("roi_size", [256, 256])
    if isinstance(roi, int):
        roi = [roi, roi]
    overlap = float(inference.get("overlap", 0.25))
    steps = int(steps or inference.get("steps", 1))
    if sliceAxis is None:
        sliceAxis = max(range(3), key=lambda a: spacing[a])
    inplane = [a for a in range(3) if a != sliceAxis]
    target = getattr(package.preprocessing, "spacing", None) or (spacing[inplane[0]], spacing[inplane[1]])
    windows = 1
    for k, axis in enumerate(inplane):
        size = max(1, int(round(dimensionsIJK[axis] * spacing[axis] / float(target[k % len(target)]))))
        r = int(roi[k % len(roi)])
        if size <= r:
            continue
        stride = max(1, int(r * (1.0 - overlap)))
        windows *= 1 + math.ceil((size - r) / stride)
    return int(dimensionsIJK[sliceAxis]) * windows * max(1, organs) * max(1, samples) * max(1, steps)


def estimateCpuSeconds(dimensionsIJK, spacing, package, organs: int, samples: int, steps: int | None = None,
                       sliceAxis: int | None = None) -> float:
    """A rough CPU run time: evaluations x seconds per window (scaled by window area)."""
    inference = package.inference
    roi = inference.get("roi_size", [256, 256])
    if isinstance(roi, int):
        roi = [roi, roi]
    perWindow = inference.get("cpu_seconds_per_window")
    if not isinstance(perWindow, (int, float)) or perWindow <= 0:
        perWindow = DEFAULT_CPU_SECONDS_PER_WINDOW * (int(roi[0]) * int(roi[1])) / (256.0 * 256.0)
    return networkEvaluations(dimensionsIJK, spacing, package, organs, samples, steps, sliceAxis) * float(perWindow)


def scoreSummary(metrics) -> str:
    """A short text of the scores a package records, for its description in the model list: the library's
    :func:`MedDiffSegLib.registry.card.score_lines` (the real-data protocol's test patients first, then
    held-out numbers, else the trainer's last validation Dice), joined; "" when none."""
    from MedDiffSegLib.registry.card import score_lines

    return "; ".join(score_lines(metrics))
