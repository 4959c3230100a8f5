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
from MedDiffSegLib.training.interactive import error_weights, interactive_settings, jittered_box, simulate_prompts

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
    # a preferred kind is taken whenever there is one, however small; otherwise the other kind
    r, c, positive = error_click(pred, gt, prefer=False)
    assert not positive and pred[r, c] and not gt[r, c] and r >= 28
    assert error_click(pred2, gt, prefer=True)[2] is False  # no miss at all: the over-segmentation
    assert error_click(pred, gt, prefer=True)[:2] == error_click(pred, gt)[:2]


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
    assert s["negative_fraction"] == 0.0 and s["error_weight"] == 0.0  # both off unless asked for
    for bad in ({"max_click": 2}, {"no_click_fraction": 1.5}, {"max_clicks": 0}, {"click_radius_mm": -1},
                {"negative_fraction": 2}, {"error_weight": -1}):
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
    # negative_fraction 0 draws nothing more (a run started before the option resumes bit for bit) ...
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    off = simulate_prompts(m, x, y, ids, rng_b, torch.Generator().manual_seed(0), {**s, "negative_fraction": 0.0},
                           (2.0, 2.0))
    simulate_prompts(m, x, y, ids, rng_a, torch.Generator().manual_seed(0), s, (2.0, 2.0))
    assert torch.equal(off, p) and rng_a.random() == rng_b.random()
    # ... and at 1 every round that has an over-segmentation clicks it: with an organ filling most of the
    # window the oracle clicks the (larger) misses, the preference the false positives
    big = torch.zeros_like(y)
    big[:, :, 1:31, 1:31] = 1

    def n_negative(fraction):
        q = simulate_prompts(m, x, big, ids, np.random.default_rng(0), torch.Generator().manual_seed(0),
                             {**s, "negative_fraction": fraction, "box_fraction": 0.0}, (2.0, 2.0))
        return int((q[:, NEGATIVE] == 1).flatten(1).any(1).sum()), int((q[:, POSITIVE] == 1).flatten(1).any(1).sum())

    (neg0, pos0), (neg1, pos1) = n_negative(0.0), n_negative(1.0)
    assert neg1 > neg0 and pos1 < pos0


def test_error_weights_look_where_the_previous_mask_is_wrong():
    prompts = torch.zeros(3, 4, 16, 16)
    masks = torch.zeros(3, 1, 16, 16)
    masks[:, :, :8, :8] = 1.0
    prompts[0, PREVIOUS] = -1.0
    prompts[0, PREVIOUS, :8, :8] = 1.0  # row 0: the previous mask is right
    prompts[1, PREVIOUS] = -1.0  # row 1: it missed the organ (the top-left 8x8 block is wrong)
    # row 2: no previous mask (an automatic row)
    w = error_weights(prompts, masks, 3.0, 8)
    assert w.shape == (3, 1, 2, 2)
    assert torch.equal(w[0], torch.ones(1, 2, 2)) and torch.equal(w[2], torch.ones(1, 2, 2))
    assert w[1, 0, 0, 0] == 4.0 and w[1, 0, 1, 1] == 1.0
    assert error_weights(prompts, masks, 0.0, 8) is None


@pytest.mark.parametrize("name", ["guided", "sdseg"])
def test_weighted_denoiser_loss_is_the_weighted_mean_and_keeps_its_scale(name):
    m = _model(name)
    g = torch.Generator().manual_seed(3)
    z0, noise, pred = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    a = torch.full((2, 1, 1, 1), 0.6)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
    plain = m.denoiser_loss(z0, z_t, noise, pred, a)
    ones = m.denoiser_loss(z0, z_t, noise, pred, a, torch.ones(2, 1, 4, 4))
    assert all(torch.allclose(plain[k], ones[k]) for k in plain)  # uniform weights change nothing
    w = torch.ones(2, 1, 4, 4)
    w[0, 0, 0, 0] = 5.0
    key = "x0_mse" if name == "guided" else "noise_mae"
    target = z0 if name == "guided" else noise
    d = (pred - target).square() if name == "guided" else (pred - target).abs()
    expected = (w.expand_as(d) * d).sum() / w.expand_as(d).sum()
    assert torch.allclose(m.denoiser_loss(z0, z_t, noise, pred, a, w)[key], expected)


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




def test_a_run_with_negative_clicks_preferred_and_error_weights_trains(tmp_path, data_dir):
    """The two options of a correction-focused run reach the loss: the trainer weighs the latent pixels."""
    import csv
    import json

    from MedDiffSegLib.training.trainer import TrainConfig, train

    cfg = TrainConfig.from_file(Path(__file__).resolve().parents[1] / "training" / "tiny_config.json")
    assert cfg.method in available_methods()  # imports the built-in methods
    cfg.method_config = dict(_METHODS[cfg.method].tiny_config(len(cfg.organs)), prompt_channels=4)
    cfg.interactive = {"click_radius_mm": 15.0, "max_clicks": 2, "negative_fraction": 0.5, "error_weight": 2.0}
    cfg.stages = {"autoencoder": {"steps": 0}, "denoiser": {"steps": 3, "lr": 0.001, "batch": 4}}
    cfg.validation = []
    pkg = train(cfg, tmp_path / "run", data_root=data_dir, progress=False, log=lambda m: None)
    rows = list(csv.reader(open(tmp_path / "run" / "train_log.csv")))[1:]
    assert rows and all(np.isfinite(float(r[2])) for r in rows)
    assert json.loads((pkg.path / "model.json").read_text())["inference"]["click_radius_mm"] == 15.0
