"""bench/evaluate_interactive.py: the challenge's oracle click, the Dice curve, and a whole case run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from benchtools import load_bench
from tinymodels import make_tiny_package


@pytest.fixture(scope="module")
def ev():
    return load_bench("evaluate_interactive")


def test_oracle_clicks_the_deepest_point_of_the_largest_error(ev):
    gt = np.zeros((10, 20, 20), bool)
    gt[2:8, 4:16, 4:16] = True
    pred = gt.copy()
    pred[2:8, 4:16, 10:16] = False  # a 6×12×6 miss
    pred[0, 0:2, 0:2] = True  # a 4-voxel false positive
    (z, y, x), positive = ev.oracle_click(pred, gt, (1.0, 1.0, 1.0))
    assert positive and gt[z, y, x] and not pred[z, y, x]
    assert 4 <= z <= 5 and 12 <= x <= 13 and 4 <= y < 16  # mid-slab in its two thin directions (ties: first)
    over = gt.copy()
    over[0:2] = True
    (z, y, x), positive = ev.oracle_click(over, gt, (1.0, 1.0, 1.0))
    assert not positive and over[z, y, x] and not gt[z, y, x]
    assert ev.oracle_click(gt, gt, (1.0, 1.0, 1.0)) is None
    # anisotropic spacing: the deepest point in mm, not in voxels
    slab = np.ones((9, 30, 30), bool)  # 45 × 30 × 30 mm: in mm the in-plane centre is deepest (15 mm) from
    (z, y, x), _ = ev.oracle_click(np.zeros_like(slab), slab, (5.0, 1.0, 1.0))  # slice 2 on (5 mm × 3)
    assert z == 2 and 14 <= y <= 15 and 14 <= x <= 15  # in voxels it would be slice 4 only


def test_auc_and_dice(ev):
    assert ev.auc([0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert ev.auc([0.0, 1.0]) == pytest.approx(0.5)
    a = np.zeros((4, 4), bool)
    assert ev.dice(a, a) == 1.0
    a[0, 0] = True
    assert ev.dice(a, np.zeros_like(a)) == 0.0


def test_a_case_runs_every_variant(ev, tmp_path):
    pkg = make_tiny_package(tmp_path / "pkg", "guided", prompt_channels=4, name="tiny-interactive", samples=1)
    arr = np.full((8, 40, 48), -500, np.int16)
    arr[1:7, 8:32, 8:40] = 60
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 5.0))
    lab = np.zeros(arr.shape, np.uint8)
    lab[2:6, 12:24, 10:22] = 5
    lab[2:6, 12:24, 26:36] = 1
    gt = sitk.GetImageFromArray(lab)
    gt.CopyInformation(img)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(gt, str(tmp_path / "gt.nii.gz"))
    case = {"name": "synthetic", "image": tmp_path / "ct.nii.gz", "label": tmp_path / "gt.nii.gz",
            "table": {"liver": 5, "spleen": 1}}
    method = pkg.load_method("cpu")
    out = ev.run_case(case, pkg, method, ["liver", "spleen"], list(ev.VARIANTS), 2, 2, "cpu", log=lambda m: None)
    for v in ev.VARIANTS:
        for organ in ("liver", "spleen"):
            r = out[v][organ]
            assert len(r["dice"]) == (4 if v == "box" else 3)
            assert all(0.0 <= d <= 1.0 for d in r["dice"]) and r["final"] == r["dice"][-1]
            assert len(r["seconds"]) == len(r["clicks"]) <= (3 if v == "box" else 2)
    assert out["box"]["liver"]["dice"][0] == 0.0  # the box variant starts from the organ removed
    summary = ev.summarise({"synthetic": out}, list(ev.VARIANTS), ["liver", "spleen"])
    assert summary["auto"]["liver"]["n"] == 1 and len(summary["box"]["spleen"]["dice_mean"]) == 4
    text = ev.markdown(summary, "cmd", "cpu", ["liver", "spleen", "pancreas"])
    assert "**auto**" in text and "| liver | 1 |" in text
    bm = ev.benchmark_mean(summary["auto"], ["liver", "spleen", "pancreas"])
    assert bm["organs"] == ["liver", "spleen"]  # the organs scored
    assert bm["dice_mean"][0] == pytest.approx((out["auto"]["liver"]["dice"][0] + out["auto"]["spleen"]["dice"][0]) / 2)
    assert f"**{bm['dice_mean'][-1]:.3f}**" in text and "mean over the 2 benchmark organs" in text
    doc = tmp_path / "doc.md"
    ev.write_doc_block(doc, "interactive:m:a", "first")
    ev.write_doc_block(doc, "interactive:m:b", "second")
    ev.write_doc_block(doc, "interactive:m:a", "third")
    body = doc.read_text()
    assert "third" in body and "second" in body and "first" not in body


def _synthetic_case(tmp_path):
    """A tiny interactive package and an 8×40×48 case whose liver (label 5) is a block: (package, image, labels, case)."""
    pkg = make_tiny_package(tmp_path / "pkg", "guided", prompt_channels=4, name="tiny-interactive", samples=1)
    arr = np.full((8, 40, 48), -500, np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 5.0))
    lab = np.zeros(arr.shape, np.uint8)
    lab[2:6, 12:24, 10:22] = 5
    gt = sitk.GetImageFromArray(lab)
    gt.CopyInformation(img)
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(gt, str(tmp_path / "gt.nii.gz"))
    case = {"name": "synthetic", "image": tmp_path / "ct.nii.gz", "label": tmp_path / "gt.nii.gz", "table": {"liver": 5}}
    return pkg, img, lab, case


def test_a_suggested_clicks_polarity_is_the_radiologists_or_the_models(ev, tmp_path, monkeypatch):
    """The suggestion says where; with polarity "user" what is there decides positive or negative."""
    from MedDiffSegLib.interactive.session import InteractiveSession, Suggestion

    pkg, img, lab, case = _synthetic_case(tmp_path)
    inside_organ = img.TransformIndexToPhysicalPoint((15, 18, 3))  # liver in the ground truth
    seen = []

    def suggest(self, organ, k=3, **options):  # the model guesses "over-segmented" at a point that is organ
        seen.append(options)
        return [Suggestion(organ, inside_organ, False, 0.5, 1.0, 1.0, 3)]

    monkeypatch.setattr(InteractiveSession, "suggest", suggest)
    method = pkg.load_method("cpu")
    user = ev.run_case(case, pkg, method, ["liver"], ["suggested-x"], 2, 2, "cpu", log=lambda m: None,
                       suggest_options={"suggested-x": {"reach_mm": 7.0}})
    assert user["suggested-x"]["liver"]["clicks"] == ["positive", "positive"] and seen[0] == {"reach_mm": 7.0}
    model = ev.run_case(case, pkg, method, ["liver"], ["suggested"], 2, 2, "cpu", log=lambda m: None, polarity="model")
    assert model["suggested"]["liver"]["clicks"] == ["negative", "negative"]


def test_a_probability_variant_gets_the_automatic_results_probabilities(ev, tmp_path, monkeypatch):
    """``{"use_probability": true}``: the session is given the automatic result's probability maps, and each
    variant starts from them again (as from its labels and variance)."""
    from MedDiffSegLib.interactive.session import InteractiveSession

    pkg, img, lab, case = _synthetic_case(tmp_path)
    seen = []
    real_suggest = InteractiveSession.suggest

    def suggest(self, organ, k=3, **options):
        seen.append((options.get("use_probability", False), sorted(self.prob_c), self.prob_c[1].copy()))
        return real_suggest(self, organ, k, **options)

    def automatic(image, package, organs, **kw):  # a result shifted off the truth, with its smoothed mask as probability
        assert kw["keep_probabilities"] is True
        shifted = np.roll(lab == 5, 3, axis=2)

        def on_grid(a):
            out = sitk.GetImageFromArray(a)
            out.CopyInformation(image)
            return out
        return SimpleNamespace(labels=on_grid(shifted.astype(np.uint8)), uncertainty=on_grid(np.zeros(lab.shape, np.float32)),
                               probabilities={"liver": sitk.SmoothingRecursiveGaussian(on_grid(shifted.astype(np.float32)), 4.0)})

    monkeypatch.setattr(InteractiveSession, "suggest", suggest)
    monkeypatch.setattr("MedDiffSegLib.inference.engine.segment_volume", automatic)
    method = pkg.load_method("cpu")
    out = ev.run_case(case, pkg, method, ["liver"], ["suggested-a", "suggested-b"], 2, 2, "cpu", log=lambda m: None,
                      suggest_options={"suggested-a": {"use_probability": True}, "suggested-b": {"use_probability": True}})
    assert set(out) >= {"suggested-a", "suggested-b"}
    firsts = [s for s in seen if s[0]]
    assert firsts and all(labels == [1] for _, labels, _ in firsts)
    # the second variant starts from the automatic result's probability, not from where the first left it
    n_a = len(out["suggested-a"]["liver"]["clicks"])
    assert n_a == 2 and len(firsts) == 4
    assert not np.array_equal(firsts[0][2], firsts[1][2])  # a's click re-sampled the liver's probability
    assert np.array_equal(firsts[0][2], firsts[n_a][2])
