"""Checkpoint folders: safetensors + JSON, latest pointer, pruning, corruption detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from MedDiffSegLib.training.checkpoint import (
    CheckpointError,
    bytes_to_tensor,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tensor_to_bytes,
)


def test_round_trip_pointer_and_pruning(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    g = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(3)
    rng.random(5)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, f"0-{step:07d}", {"w": torch.full((2, 2), float(step)), "g": g.get_state()},
                        {"step": step, "numpy": rng.bit_generator.state})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest.json", "step-0-0000002", "step-0-0000003"]  # the newest two are kept
    tensors, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert meta["step"] == 3 and torch.equal(tensors["w"], torch.full((2, 2), 3.0))
    g2 = torch.Generator()
    g2.set_state(tensors["g"])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = meta["numpy"]  # 128-bit integers survive JSON exactly
    assert rng2.random() == rng.random()
    assert tensor_to_bytes(bytes_to_tensor(b"\x00\x01\xff")) == b"\x00\x01\xff"


def test_corruption_and_dangling_pointer_are_detected(tmp_path):
    path = save_checkpoint(tmp_path, "1-0000010", {"w": torch.zeros(4)}, {"step": 10})
    data = bytearray((path / "state.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step-9-9999999"}))
    with pytest.raises(CheckpointError, match="missing"):
        latest_checkpoint(tmp_path)
