"""Interactive prompts on the Method seam: maps, the oracle click, the prompt encoder, simulated training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from MedDiffSegLib.interactive.prompts import (
    BOX,
    NEGATIVE,
    POSITIVE,
    PREVIOUS,
    Click,
    box_map,
    click_map,
    error_click,
    prompt_maps,
)
from MedDiffSegLib.methods.base import _METHODS, available_methods, build_method
from MedDiffSegLib.training.interactive import interactive_settings, jittered_box, simulate_prompts

H = W = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name="guided", prompts=4, seed=0):
    assert name in available_methods()  # imports the built-in methods
    torch.manual_seed(seed)
    cfg = _METHODS[name].tiny_config(3)
    cfg["prompt_channels"] = prompts
    m = build_method(name, cfg).eval()
    if m.prompt_encoder is not None:  # a trained encoder is not zero: give it weights that act
        torch.nn.init.normal_(m.prompt_encoder.head.weight, std=0.5)
    return m


# -- maps ------------------------------------------------------------------------------------
def test_click_map_is_a_truncated_3d_distance_map():
    m = click_map((H, W), (2.0, 2.0), [Click(10, 12, True)], 20.0, True)
    assert m[10, 12] == 1.0
    assert m[10, 17] == pytest.approx(1 - 10 / 20)  # 5 columns × 2 mm = 10 mm
    assert m[10, 22] == 0.0 and m[0, 0] == 0.0  # 20 mm away and beyond: nothing
    # the same click seen from a slice 12 mm away is weaker everywhere, and reaches less far
    far = click_map((H, W), (2.0, 2.0), [Click(10, 12, True, dz_mm=12.0)], 20.0, True)
    assert far[10, 12] == pytest.approx(1 - 12 / 20)
    assert bool((far <= m + 1e-6).all()) and far[10, 20] == 0.0 < m[10, 20]
    # clicks of the other sign and clicks beyond the radius draw nothing
    assert not click_map((H, W), (2.0, 2.0), [Click(10, 12, False)], 20.0, True).any()
    assert not click_map((H, W), (2.0, 2.0), [Click(10, 12, True, dz_mm=25.0)], 20.0, True).any()
    with pytest.raises(ValueError, match="radius"):
        click_map((H, W), (2.0, 2.0), [], 0.0, True)


def test_box_and_previous_channels_say_nothing_without_input():
    assert not box_map((H, W), None).any()
    b = box_map((H, W), (4, 5, 10, 20))
    assert b[4, 5] == 1 and b[9, 19] == 1 and b[10, 19] == -1 and b[0, 0] == -1
    p = prompt_maps((H, W), (2.0, 2.0))
    assert p.shape == (4, H, W) and not p.any()
    prev = torch.zeros(H, W)
    prev[3:6, 3:6] = 1
    p = prompt_maps((H, W), (2.0, 2.0), [Click(1, 1, False)], previous=prev)
    assert p[PREVIOUS, 4, 4] == 1 and p[PREVIOUS, 0, 20] == -1
    assert p[NEGATIVE, 1, 1] == 1 and not p[POSITIVE].any() and not p[BOX].any()


def test_error_click_is_deepest_inside_the_largest_error():
    gt = np.zeros((H, W), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[5:25, 15:25] = False  # a 20×10 miss
    pred[28:30, 0:3] = True  # a small false positive
    r, c, positive = error_click(pred, gt)
    assert positive and 5 <= r < 25 and c == 19  # middle of the 10-column strip (ties: first in row order)
    assert gt[r, c] and not pred[r, c]
    # over-segmentation larger than any miss gives a negative click
    pred2 = gt.copy()
    pred2[0:4, :] = True
    r, c, positive = error_click(pred2, gt)
    assert not positive and pred2[r, c] and not gt[r, c]
    assert error_click(gt, gt) is None


def test_jittered_box_surrounds_the_organ():
    gt = np.zeros((H, W), bool)
    gt[8:14, 10:20] = True
    rng = np.random.default_rng(0)
    for _ in range(20):
        r0, c0, r1, c1 = jittered_box(gt, rng)
        assert 5 <= r0 <= 9 and 6 <= c0 <= 11 and 13 <= r1 <= 17 and 19 <= c1 <= 23
    assert jittered_box(np.zeros((H, W), bool), rng) is None


# -- the Method seam -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["guided", "sdseg"])
def test_no_prompt_is_exactly_the_automatic_segmentation(name):
    m = _model(name)
    x = torch.rand(2, 1, H, W, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = m.condition(x)
    ids = torch.tensor([0, 2])
    auto = m.sample(cond, ids, 2, 1, torch.Generator().manual_seed(3))
    zero = m.sample(cond, ids, 2, 1, torch.Generator().manual_seed(3), prompts=torch.zeros(2, 4, H, W))
    assert torch.equal(auto, zero)
    clicked = torch.zeros(2, 4, H, W)
    clicked[:, POSITIVE] = click_map((H, W), (2.0, 2.0), [Click(16, 16, True)], 20.0, True)
    changed = m.sample(cond, ids, 2, 1, torch.Generator().manual_seed(3), prompts=clicked)
    assert not torch.equal(auto, changed)


def test_a_fresh_prompt_encoder_starts_as_the_automatic_model():
    assert "guided" in available_methods()
    torch.manual_seed(0)
    cfg = _METHODS["guided"].tiny_config(3)
    cfg["prompt_channels"] = 4
    m = build_method("guided", cfg).eval()  # zero-initialised head, as when fine-tuning starts
    x = torch.rand(1, 1, H, W) * 2 - 1
    cond = m.condition(x)
    p = torch.rand(1, 4, H, W)
    a = m.sample(cond, torch.tensor([1]), 1, 1, torch.Generator().manual_seed(0))
    b = m.sample(cond, torch.tensor([1]), 1, 1, torch.Generator().manual_seed(0), prompts=p)
    assert torch.equal(a, b)


def test_prompt_shape_and_support_are_checked():
    m = _model()
    cond = m.condition(torch.zeros(2, 1, H, W))
    with pytest.raises(ValueError, match=r"prompts must have shape \[2,4,32,32\]"):
        m.sample(cond, torch.tensor([0, 1]), 1, 1, None, prompts=torch.zeros(2, 3, H, W))
    plain = _model(prompts=0)
    assert plain.prompt_channels == 0 and plain.prompt_encoder is None
    with pytest.raises(ValueError, match="takes no interactive prompts"):
        plain.sample(plain.condition(torch.zeros(1, 1, H, W)), torch.tensor([0]), 1, 1, None,
                     prompts=torch.zeros(1, 4, H, W))


def test_training_loss_reaches_the_prompt_encoder():
    m = _model().train()
    x = torch.rand(4, 1, H, W) * 2 - 1
    y = (torch.rand(4, 1, H, W) > 0.5).float()
    p = torch.rand(4, 4, H, W)
    loss = m.training_loss(x, y, torch.tensor([0, 1, 2, 0]), torch.Generator().manual_seed(0), prompts=p)["loss"]
    loss.backward()
    assert m.prompt_encoder.head.weight.grad is not None and m.prompt_encoder.head.weight.grad.abs().sum() > 0
    assert any(p is m.prompt_encoder.head.weight for p in m.stage_parameters("denoiser"))


def test_load_pretrained_from_a_model_without_prompts(tmp_path):
    from MedDiffSegLib.preprocessing import PreprocessSpec
    from MedDiffSegLib.registry import save_package
    from MedDiffSegLib.training.organs import organ_from_config

    plain = _model(prompts=0)
    pkg = tmp_path / "plain"
    save_package(pkg, plain, name="plain", version="0.1.0",
                 organs=[organ_from_config(o) for o in ("liver", "spleen", "pancreas")],
                 preprocessing=PreprocessSpec.from_dict({"modality": "CT"}))
    torch.manual_seed(1)
    cfg = _METHODS["guided"].tiny_config(3)
    cfg["prompt_channels"] = 4
    m = build_method("guided", cfg)
    m.load_pretrained(pkg, organs=["liver", "spleen", "pancreas"])
    x = torch.rand(1, 1, H, W) * 2 - 1
    a = plain.sample(plain.condition(x), torch.tensor([2]), 1, 1, torch.Generator().manual_seed(0))
    b = m.eval().sample(m.condition(x), torch.tensor([2]), 1, 1, torch.Generator().manual_seed(0),
                        prompts=torch.rand(1, 4, H, W))
    assert torch.equal(a, b)  # every tensor taken over, the prompt encoder still silent


# -- simulated clicks in training ------------------------------------------------------------
def test_interactive_settings_are_checked():
    assert interactive_settings({}) is None and interactive_settings(None) is None
    s = interactive_settings({"max_clicks": 2})
    assert s["max_clicks"] == 2 and s["no_click_fraction"] == 0.5
    for bad in ({"max_click": 2}, {"no_click_fraction": 1.5}, {"max_clicks": 0}, {"click_radius_mm": -1}):
        with pytest.raises(ValueError):
            interactive_settings(bad)


def test_simulated_clicks_follow_the_models_errors():
    m = _model().train()
    b = 16
    x = torch.rand(b, 1, H, W, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = torch.zeros(b, 1, H, W)
    y[:, :, 8:24, 8:24] = 1
    ids = torch.zeros(b, dtype=torch.long)
    s = interactive_settings({"no_click_fraction": 0.5, "box_fraction": 0.3, "max_clicks": 2, "neighbour_fraction": 0})
    p = simulate_prompts(m, x, y, ids, np.random.default_rng(0), torch.Generator().manual_seed(0), s, (2.0, 2.0))
    assert p.shape == (b, 4, H, W) and m.training  # the model is left in training mode
    auto = ~p.flatten(1).any(1)
    assert 0 < int(auto.sum()) < b  # some rows automatic, some interactive
    for i in range(b):
        if auto[i]:
            continue
        has_box = bool(p[i, BOX].any())
        if has_box:
            assert p[i, BOX, 16, 16] == 1 and p[i, BOX, 0, 0] == -1
        # every click sits where its sign says: positive inside the organ, negative outside
        for ch, inside in ((POSITIVE, True), (NEGATIVE, False)):
            peaks = torch.nonzero(p[i, ch] == 1)
            for r, c in peaks.tolist():
                assert bool(y[i, 0, r, c] == 1) == inside
        if not has_box:  # a refine row starts from the model's own prediction: previous mask is set
            assert p[i, PREVIOUS].abs().sum() > 0
    again = simulate_prompts(m, x, y, ids, np.random.default_rng(0), torch.Generator().manual_seed(0), s, (2.0, 2.0))
    assert torch.equal(p, again)  # reproducible from the generators


def test_interactive_training_config_writes_the_click_radius(tmp_path, data_dir):
    import json

    from MedDiffSegLib.training.trainer import TrainConfig, train

    cfg = TrainConfig.from_file(Path(__file__).resolve().parents[1] / "training" / "tiny_config.json")
    cfg.method_config = dict(_METHODS[cfg.method].tiny_config(len(cfg.organs)), prompt_channels=4)
    cfg.interactive = {"click_radius_mm": 15.0, "max_clicks": 2}
    cfg.soft_targets = True
    for s in cfg.stages.values():
        s["steps"] = min(int(s.get("steps", 2)), 2)
    train(cfg, tmp_path / "run", data_root=data_dir, progress=False, log=lambda m: None)
    meta = json.loads((tmp_path / "run" / cfg.name / "model.json").read_text())
    assert meta["inference"]["click_radius_mm"] == 15.0
    assert meta["config"]["prompt_channels"] == 4


