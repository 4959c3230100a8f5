"""Training checkpoints: tensors in ``state.safetensors``, everything else in ``state.json``.

A checkpoint is a folder ``<run>/checkpoints/step-<stage>-<step>/`` written under a temporary
name and renamed into place, then ``<run>/checkpoints/latest.json`` (written to a temporary
file and renamed) points at it, so an interruption at any moment leaves the previous
checkpoint usable. ``state.json`` records the sha256 of ``state.safetensors``; loading checks
it. Nothing is ever unpickled: tensors are read with safetensors, the rest is plain JSON
(numpy bit-generator states included: their integers round-trip exactly through JSON).

What a training checkpoint holds is decided by the trainer; this module only stores
``(tensors: dict[str, Tensor], meta: dict)`` pairs and keeps the newest ``keep`` of them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import MedDiffSegError
from ..registry.package import sha256_file

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
TENSORS = "state.safetensors"
META = "state.json"
FORMAT = 1


class CheckpointError(MedDiffSegError):
    """A checkpoint is missing, corrupt or does not belong to this run."""

    exit_code = 1


def _write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checkpoint_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / META).is_file())


def save_checkpoint(run_dir: str | os.PathLike, tag: str, tensors: dict[str, torch.Tensor], meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``tag`` (e.g. ``"1-000500"``) atomically, point ``latest.json`` at it, prune old ones."""
    from safetensors.torch import save_file

    if not re.fullmatch(r"[0-9A-Za-z_.-]+", tag):
        raise ValueError(f"bad checkpoint tag {tag!r}")
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # left by a write that was killed half-way
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{tag}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{tag}.", dir=root))
    try:
        flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(flat, str(tmp / TENSORS))
        full = dict(meta)
        full["format"] = FORMAT
        full["tensors_sha256"] = sha256_file(tmp / TENSORS)
        _write_json_atomic(tmp / META, full)
        if final.exists():  # the same step written again (e.g. interrupted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json_atomic(root / LATEST, {"checkpoint": final.name})
    for old in _checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest.json`` names, or None when the run has no checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable ({exc})") from None
    path = root / str(name)
    if not (path / META).is_file():
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read one checkpoint folder: its tensors (after the sha256 check) and its JSON metadata."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / META}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta.get('format')!r}")
    digest = sha256_file(path / TENSORS) if (path / TENSORS).is_file() else None
    if digest != meta.get("tensors_sha256"):
        raise CheckpointError(f"{path / TENSORS} is missing or does not match its sha256: the checkpoint is corrupt")
    return load_file(str(path / TENSORS), device="cpu"), meta


# -- helpers for states that are not tensors ------------------------------------------------------


def bytes_to_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).clone() if b else torch.zeros(0, dtype=torch.uint8)


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return bytes(t.to(torch.uint8).contiguous().numpy().tobytes())


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def unb64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"))
