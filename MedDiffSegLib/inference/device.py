"""Choosing the compute device from a user-facing name (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""

from __future__ import annotations

import os
import platform

import torch

from ..errors import DeviceError

VALID_DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def _cuda_unavailable_reason() -> str:
    if not torch.backends.cuda.is_built():
        return f"this PyTorch build ({torch.__version__}) has no CUDA support; install a CUDA build of PyTorch or use --device cpu"
    return (f"this PyTorch build supports CUDA {torch.version.cuda} but no usable GPU was found "
            "(check the NVIDIA driver and CUDA_VISIBLE_DEVICES), or use --device cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """Map ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` to a device.

    Anything else, or a CUDA device that is not available, raises :class:`DeviceError`.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name is None:
        name = "auto"
    if not isinstance(name, str):
        raise DeviceError(f"device must be a string, one of {', '.join(VALID_DEVICES)}; got {name!r}")
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "cuda" or key.startswith("cuda:"):
        index: int | None = None
        if key != "cuda":
            suffix = key[len("cuda:"):]
            if not suffix.isdigit():
                raise DeviceError(f"invalid device {name!r}; valid values: {', '.join(VALID_DEVICES)}")
            index = int(suffix)
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available: {_cuda_unavailable_reason()}")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise DeviceError(f"device {name!r} requested but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    raise DeviceError(f"unknown device {name!r}; valid values: {', '.join(VALID_DEVICES)}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def device_description(device: str | torch.device) -> str:
    """Human-readable description: the GPU's name and memory, or the CPU model and thread count."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    threads = torch.get_num_threads()
    model = _cpu_model()
    if model:
        return f"cpu: {model} ({threads} thread{'' if threads == 1 else 's'} of {os.cpu_count() or '?'} cores)"
    return f"cpu ({threads} threads)"


#: Names ``precision`` accepts (``segment_volume``, ``meddiffseg segment --precision``).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN reports it): there
    bf16 convolutions run about twice as fast as float32; elsewhere they are emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str | None, device: torch.device, cpu_auto: str = "fp32") -> torch.dtype | None:
    """The autocast dtype for the network on ``device`` (None: float32, no autocast).

    ``auto``: on a GPU bfloat16 where it is supported, else float16; on a CPU ``cpu_auto`` (a
    model package's ``inference.cpu_precision``, float32 unless the package says its accuracy
    holds in bf16), and bf16 only where the CPU has native bf16. ``fp16`` needs a GPU.
    """
    key = "auto" if name is None else str(name).strip().lower()
    if key not in PRECISIONS:
        raise DeviceError(f"unknown precision {name!r}; valid values: {', '.join(PRECISIONS)}")
    if key == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        key = "bf16" if (cpu_auto == "bf16" and cpu_has_native_bf16()) else "fp32"
    if key == "fp32":
        return None
    if key == "fp16":
        if device.type != "cuda":
            raise DeviceError("precision 'fp16' needs a CUDA GPU (CPUs compute float16 slowly); use 'bf16' or 'fp32' on a CPU")
        return torch.float16
    return torch.bfloat16
