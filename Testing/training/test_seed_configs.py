"""The seed methods' training configs (``training/configs/seeds/``, issue #24) follow abdomen-ct 2.0's recipe.

Same patients (training and validation, never a protocol test patient), same 13 organs, same
preprocessing but for the axial context (each seed method reads one slice, as in its paper), same
augmentation and area-fraction targets; the latent methods share abdomen-ct 2.0's mask
autoencoder; every method config builds; DTS's self-supervised pretraining reads only the training
patients' images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from MedDiffSegLib.methods.base import build_method
from MedDiffSegLib.training import TrainConfig
from MedDiffSegLib.training.ssl import PretrainConfig
from MedDiffSegLib.training.trainer import method_config_for

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "MedDiffSegLib" / "training" / "configs"
SEEDS = sorted(p for p in (CONFIGS / "seeds").glob("*.json") if p.stem != "dts-ssl-pretrain")
REFERENCE = TrainConfig.from_file(CONFIGS / "abdomen-ct-2.json")
PROTOCOL = json.loads((REPO / "bench" / "protocol.json").read_text(encoding="utf-8"))


def _cases(entries: list[dict]) -> set[str]:
    return {c for e in entries for c in e.get("cases", [])}


def test_every_seed_method_has_a_config():
    assert {TrainConfig.from_file(p).method for p in SEEDS} == {"sdseg", "meddelinea", "medsegdiff_v2", "dts", "guided"}
    assert len(SEEDS) == 6  # dts with and without its self-supervised pretraining; guided as the equal-budget control


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: p.stem)
def test_seed_config_follows_the_recipe(path):
    cfg = TrainConfig.from_file(path)
    for key in ("organs", "train", "validation", "augmentation", "soft_targets", "foreground_fraction",
                "weight_decay", "seed"):
        assert getattr(cfg, key) == getattr(REFERENCE, key), key
    context = ("context_slices", "context_spacing_mm")
    assert cfg.preprocessing == {k: v for k, v in REFERENCE.preprocessing.items() if k not in context}
    test_cases = set(PROTOCOL["datasets"]["btcv"]["test"])
    assert len(test_cases) == 6 and not (_cases(cfg.train) | _cases(cfg.validation)) & test_cases
    assert cfg.interactive in ({}, None) and cfg.version == "1.0.0"
    assert all(int(s.get("steps", 0)) >= 0 for s in cfg.stages.values())
    assert sum(int(s.get("steps", 0)) for s in cfg.stages.values()) > 0, "steps are set from the wall-time budget"
    if cfg.method in ("sdseg", "meddelinea", "guided"):
        assert cfg.mask_autoencoder_from == {"model": "abdomen-ct", "version": REFERENCE.version}
    else:
        assert cfg.mask_autoencoder_from is None
    method = build_method(cfg.method, method_config_for(cfg, len(cfg.organs)))
    assert int(cfg.inference["roi_size"][0]) % method.size_multiple == 0


def test_dts_ssl_pretraining_reads_only_the_training_patients():
    ssl = PretrainConfig.from_file(CONFIGS / "seeds" / "dts-ssl-pretrain.json")
    plain = TrainConfig.from_file(CONFIGS / "seeds" / "dts.json")
    with_ssl = TrainConfig.from_file(CONFIGS / "seeds" / "dts-ssl.json")
    assert _cases(ssl.images) == _cases(plain.train)
    assert ssl.preprocessing == plain.preprocessing and ssl.roi == plain.inference["roi_size"][0]
    assert with_ssl.init_from and plain.init_from is None
    keep = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("name", "description", "init_from", "stages",  # noqa: E731
                                                                          "val_every")}
    assert keep(with_ssl) == keep(plain)
