"""Interactive correction in 3D: InteractiveSession with a rule-based method whose answer is known.

The test method (:class:`rulemodels.PromptRuleMethod`) answers "organ" where the previous mask says so
or a positive click's map is at least 0.5 (within half the click radius, in 3D), and "not organ" where a
negative click's map is at least 0.5. So every expected voxel can be computed from the geometry alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.errors import InputError, ModelError
from MedDiffSegLib.interactive.prompts import NEGATIVE, POSITIVE
from MedDiffSegLib.interactive.session import InteractiveSession, Interaction

from rulemodels import RADIUS
from rulemodels import rule_package as _package


def _case(direction=None):
    """A 40×36×20 CT (2×2×3 mm) with a liver block (label 1) and a spleen block (label 2)."""
    arr = np.full((20, 36, 40), -500, np.int16)  # [z, y, x]
    arr[2:18, 4:32, 4:36] = 60
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetOrigin((-40.0, -30.0, 100.0))
    if direction is not None:
        img.SetDirection(direction)
    lab = np.zeros(arr.shape, np.uint8)
    lab[6:14, 8:18, 8:20] = 1
    lab[6:14, 8:18, 24:32] = 2
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    return img, labels


def _ball(img: sitk.Image, centre_mm, radius_mm) -> np.ndarray:
    """Voxels (numpy [z, y, x]) whose centres lie within ``radius_mm`` of ``centre_mm``."""
    size = img.GetSize()
    pts = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    world = np.array([img.TransformIndexToPhysicalPoint(tuple(int(v) for v in p)) for p in pts])
    inside = np.linalg.norm(world - np.asarray(centre_mm), axis=1) <= radius_mm
    return inside.reshape(size).transpose(2, 1, 0)


def _session(tmp_path, img, labels, **kw):
    pkg, method = _package(tmp_path, **{k: v for k, v in kw.items() if k in ("noise", "roi")})
    rest = {k: v for k, v in kw.items() if k not in ("noise", "roi")}
    return InteractiveSession(img, pkg, ["liver", "spleen"], labels, method=method, **rest), method


@pytest.mark.parametrize("roi", [16, 64])  # sliding windows over a slice; one window per slice (batched slices)
@pytest.mark.parametrize("direction", [None, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)])
def test_a_positive_click_adds_the_organ_where_clicked_and_nowhere_else(tmp_path, direction, roi):
    img, labels = _case(direction)
    sess, _ = _session(tmp_path, img, labels, roi=roi)
    before = sitk.GetArrayFromImage(labels)
    click = img.TransformIndexToPhysicalPoint((12, 27, 10))  # background below the liver, slice z=10
    inter = sess.refine("liver", positive=[click])
    after = sitk.GetArrayFromImage(sess.labels)
    ball = _ball(img, click, RADIUS / 2 - 0.01)
    # every background voxel of the ball became liver (the model grid is the input grid here)
    assert np.all(after[ball & (before == 0)] == 1)
    # the spleen never changes, and nothing outside the ball does (voxels exactly on its sphere may go either way)
    assert np.array_equal(after == 2, before == 2)
    outside = ~_ball(img, click, RADIUS / 2 + 0.01)
    assert np.array_equal(after[outside], before[outside])
    # the slices re-sampled are those the click reaches (3 mm slices, radius 30 mm) and no further
    assert inter.slices and all(abs(k - 10) * 3.0 < RADIUS for k in inter.slices)
    assert inter.changed_voxels == int((after != before).sum()) > 0
    assert sess.labels.GetSize() == img.GetSize() and sess.labels.GetDirection() == img.GetDirection()
    assert sess.labels.GetOrigin() == img.GetOrigin()


def test_a_negative_click_removes_only_that_organ(tmp_path):
    img, labels = _case()
    sess, _ = _session(tmp_path, img, labels)
    before = sitk.GetArrayFromImage(labels)
    click = img.TransformIndexToPhysicalPoint((14, 12, 10))  # inside the liver
    sess.refine("liver", negative=[click])
    after = sitk.GetArrayFromImage(sess.labels)
    ball = _ball(img, click, RADIUS / 2 - 0.01)
    assert np.all(after[ball & (before == 1)] == 0)
    assert np.array_equal(after == 2, before == 2)
    assert (after == 1).sum() > 0  # the rest of the liver stays


def test_a_box_limits_the_organ_in_3d(tmp_path):
    img, labels = _case()
    sess, _ = _session(tmp_path, img, labels)
    before = sitk.GetArrayFromImage(labels)
    a = img.TransformIndexToPhysicalPoint((10, 10, 8))
    b = img.TransformIndexToPhysicalPoint((15, 15, 11))
    sess.refine("liver", box=[*a, *b])
    after = sitk.GetArrayFromImage(sess.labels)
    inside = np.zeros(before.shape, bool)
    inside[8:12, 10:16, 10:16] = True
    # on the box's slices the liver is cut to the box; the other slices are not re-sampled
    assert np.array_equal((after == 1)[8:12], ((before == 1) & inside)[8:12])
    assert np.array_equal(after[:8], before[:8]) and np.array_equal(after[12:], before[12:])
    assert np.array_equal(after == 2, before == 2)


def test_clicks_accumulate_and_are_recorded(tmp_path):
    img, labels = _case()
    sess, method = _session(tmp_path, img, labels)
    p1 = img.TransformIndexToPhysicalPoint((12, 27, 10))
    p2 = img.TransformIndexToPhysicalPoint((30, 26, 10))
    sess.refine("liver", positive=[p1])
    method.seen_prompts.clear()
    sess.refine("liver", negative=[p2])
    # the second correction's prompts carry both clicks: p1's positive map and p2's negative one
    seen = torch.cat(method.seen_prompts)
    assert float(seen[:, POSITIVE].max()) == 1.0 and float(seen[:, NEGATIVE].max()) == 1.0
    recorded = [i.to_dict() for i in sess.interactions]
    assert [r["organ"] for r in recorded] == ["liver", "liver"]
    assert recorded[0]["clicks"] == [{"point_mm": list(p1), "positive": True}]
    assert recorded[1]["clicks"] == [{"point_mm": list(p2), "positive": False}]
    assert Interaction.from_dict(recorded[1]).negative == [tuple(p2)]
    # a session resumed with the record starts from the same clicks
    again = InteractiveSession(img, sess.package, ["liver", "spleen"], sess.labels, method=method,
                               interactions=[Interaction.from_dict(r) for r in recorded])
    assert len(again.interactions) == 2


@pytest.mark.parametrize("roi", [16, 64])
def test_the_encoding_of_a_slice_is_computed_once(tmp_path, roi):
    img, labels = _case()
    sess, method = _session(tmp_path, img, labels, roi=roi)
    click = img.TransformIndexToPhysicalPoint((12, 27, 10))
    sess.refine("liver", positive=[click])
    first = method.condition_calls
    sess.refine("liver", positive=[click])
    assert method.condition_calls == first  # the same slab: every encoding came from the cache


def test_bad_corrections_change_nothing(tmp_path):
    img, labels = _case()
    sess, _ = _session(tmp_path, img, labels, locked=["spleen"])
    before = sitk.GetArrayFromImage(sess.labels)
    inside = img.TransformIndexToPhysicalPoint((12, 27, 10))
    with pytest.raises(InputError, match="outside the image"):
        sess.refine("liver", positive=[(500.0, 0.0, 0.0)])
    with pytest.raises(InputError, match="locked"):
        sess.refine("spleen", positive=[inside])
    with pytest.raises(Exception, match="kidney|does not know"):
        sess.refine("kidney_left", positive=[inside])
    with pytest.raises(InputError, match="at least one click or a box"):
        sess.refine("liver")
    with pytest.raises(InputError, match="three finite numbers"):
        sess.refine("liver", positive=[(1.0, math.nan, 2.0)])
    assert np.array_equal(sitk.GetArrayFromImage(sess.labels), before) and not sess.interactions
    sess.unlock("spleen")
    sess.refine("spleen", positive=[inside])
    assert sess.interactions[-1].organ == "spleen"


def test_a_model_without_prompts_is_refused(tmp_path):
    img, labels = _case()
    for kw in ({"prompt_channels": 0}, {"radius": None}):
        pkg, method = _package(tmp_path, **kw)
        with pytest.raises(ModelError, match="not trained for interactive correction"):
            InteractiveSession(img, pkg, ["liver", "spleen"], labels, method=method)


def test_a_label_map_of_another_grid_is_refused(tmp_path):
    img, labels = _case()
    other = sitk.Image(10, 10, 10, sitk.sitkUInt8)
    pkg, method = _package(tmp_path)
    with pytest.raises(InputError, match="not on the image's voxel grid"):
        InteractiveSession(img, pkg, ["liver", "spleen"], other, method=method)


def test_variance_of_the_corrected_organ_goes_to_the_uncertainty_map(tmp_path):
    img, labels = _case()
    sess, _ = _session(tmp_path, img, labels, noise=True, samples=4)
    click = img.TransformIndexToPhysicalPoint((12, 27, 10))
    sess.refine("liver", positive=[click])
    unc = sitk.GetArrayFromImage(sess.uncertainty)
    lab = sitk.GetArrayFromImage(sess.labels)
    ball = _ball(img, click, RADIUS / 2 - 3)
    assert float(unc[ball & (lab == 1)].min()) > 0  # 4 noisy samples: a variance where the organ was corrected
    assert float(unc[lab == 2].max()) == 0  # the spleen was not re-sampled


def test_encode_all_leaves_nothing_for_the_clicks_to_encode(tmp_path):
    img, labels = _case()
    sess, method = _session(tmp_path, img, labels, roi=64)
    sess.encode_all(batch=7)
    assert method.condition_calls == 3  # 20 slices in batches of 7
    sess.refine("liver", positive=[img.TransformIndexToPhysicalPoint((12, 27, 10))])
    assert method.condition_calls == 3


def test_suggestions_rank_uncertain_regions_near_the_organ(tmp_path):
    img, labels = _case()
    before = sitk.GetArrayFromImage(labels)
    unc = np.zeros(before.shape, np.float32)
    unc[8:13, 18:22, 10:16] = 0.24  # just below the liver (outside it): a likely miss, 120 voxels
    unc[9:11, 10:12, 12:14] = 0.09  # inside the liver: a smaller doubt, 8 voxels
    unc[9:11, 10:12, 26:28] = 0.25  # on the spleen: never a liver suggestion
    unc[0:2, 0:3, 0:3] = 0.25  # far from the liver: outside the band
    u = sitk.GetImageFromArray(unc)
    u.CopyInformation(img)
    pkg, method = _package(tmp_path)
    sess = InteractiveSession(img, pkg, ["liver", "spleen"], labels, u, method=method)
    first, second = sess.suggest("liver", k=5, reach_mm=10.0)  # the two doubts are over 10 mm apart
    zyx = np.array(img.TransformPhysicalPointToIndex(first.point_mm))[::-1]
    assert 8 <= zyx[0] < 13 and 18 <= zyx[1] < 22 and 10 <= zyx[2] < 16 and first.positive
    e = (1 - math.sqrt(1 - 4 * 0.24)) / 2
    assert first.confidence == pytest.approx(e, rel=1e-4)
    assert first.expected_wrong_ml == pytest.approx(120 * e * 0.012, rel=1e-3)  # 2×2×3 mm voxels
    zyx2 = np.array(img.TransformPhysicalPointToIndex(second.point_mm))[::-1]
    assert before[tuple(zyx2)] == 1 and not second.positive
    # the model-free reference needs no variance: the boundary band, the largest first
    free = sess.suggest("liver", k=2, model_free=True)
    assert free and all(f.confidence == 1.0 for f in free)
    # nothing stands out without variance
    flat = InteractiveSession(img, pkg, ["liver", "spleen"], labels, method=method)
    assert flat.suggest("liver") == []


def test_suggestions_take_the_most_expected_error_within_reach_and_avoid_earlier_clicks(tmp_path):
    img, labels = _case()
    before = sitk.GetArrayFromImage(labels)
    unc = np.zeros(before.shape, np.float32)
    # two small doubts side by side below the liver (10 mm apart), and one larger doubt above it
    blocks = {"a": np.s_[9:11, 18:20, 10:12], "b": np.s_[9:11, 18:20, 15:17], "c": np.s_[9:11, 5:7, 11:17]}
    for b in blocks.values():
        unc[b] = 0.2  # a: 8 voxels, b: 8 voxels, c: 24 voxels, all background within the 10 mm band
    u = sitk.GetImageFromArray(unc)
    u.CopyInformation(img)
    pkg, method = _package(tmp_path)
    sess = InteractiveSession(img, pkg, ["liver", "spleen"], labels, u, method=method)
    e = (1 - math.sqrt(1 - 4 * 0.2)) / 2

    def block_of(s):
        z, y, x = np.array(img.TransformPhysicalPointToIndex(s.point_mm))[::-1]
        return next(n for n, b in blocks.items() if b[0].start <= z < b[0].stop and b[1].start <= y < b[1].stop
                    and b[2].start <= x < b[2].stop)

    # a short reach: the densest doubt first, and the two small ones are two places
    near = sess.suggest("liver", k=10, reach_mm=4.5)
    hits = [block_of(s) for s in near]
    assert hits[0] == "c" and hits.count("a") == 1 and hits.count("b") == 1
    # reach 12 mm: the two small doubts are one place to click (16 voxels within reach), the other stays apart
    wide = sess.suggest("liver", k=5, reach_mm=12.0)
    assert len(wide) == 2
    assert block_of(wide[0]) == "c" and block_of(wide[1]) in "ab"
    zyx = [np.array(img.TransformPhysicalPointToIndex(s.point_mm))[::-1] for s in wide]
    assert all(before[tuple(z)] == 0 and s.positive for z, s in zip(zyx, wide))
    assert all(s.confidence == pytest.approx(e, rel=1e-4) for s in wide)
    assert [round(s.expected_wrong_ml / (e * 0.012)) for s in wide] == [24, 16]
    # a place already clicked is not suggested again: a click at the first suggestion moves it on
    first = wide[0]
    sess.interactions.append(Interaction(organ="liver", positive=[first.point_mm]))
    after = sess.suggest("liver", k=5, reach_mm=12.0)
    assert len(after) == 1 and np.linalg.norm(np.subtract(after[0].point_mm, first.point_mm)) > 10.0
    assert sess.suggest("liver", k=5, reach_mm=12.0, avoid=()) == wide  # the session's clicks are the default


def test_undo_and_redo_restore_the_maps_exactly(tmp_path):
    img, labels = _case()
    sess, method = _session(tmp_path, img, labels, noise=True, samples=3)
    states = [(sitk.GetArrayFromImage(sess.labels), sitk.GetArrayFromImage(sess.uncertainty))]
    p1 = img.TransformIndexToPhysicalPoint((12, 27, 10))
    p2 = img.TransformIndexToPhysicalPoint((28, 12, 9))
    sess.refine("liver", positive=[p1])
    states.append((sitk.GetArrayFromImage(sess.labels), sitk.GetArrayFromImage(sess.uncertainty)))
    sess.refine("spleen", negative=[p2])
    states.append((sitk.GetArrayFromImage(sess.labels), sitk.GetArrayFromImage(sess.uncertainty)))
    assert not np.array_equal(states[1][0], states[2][0]) and not np.array_equal(states[0][0], states[1][0])

    def now():
        return sitk.GetArrayFromImage(sess.labels), sitk.GetArrayFromImage(sess.uncertainty)

    def same(a, b):
        return np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    assert sess.can_undo and not sess.can_redo
    assert sess.undo().organ == "spleen" and same(now(), states[1])
    assert [i.organ for i in sess.interactions] == ["liver"]
    assert sess.undo().organ == "liver" and same(now(), states[0]) and sess.interactions == []
    assert sess.undo() is None and not sess.can_undo
    assert sess.redo().organ == "liver" and same(now(), states[1])
    assert sess.redo().organ == "spleen" and same(now(), states[2])
    assert sess.redo() is None
    assert [i.organ for i in sess.interactions] == ["liver", "spleen"]
    # a new correction after an undo forgets what could have been redone
    sess.undo()
    sess.refine("liver", negative=[p1])
    assert not sess.can_redo and [i.organ for i in sess.interactions] == ["liver", "liver"]
    sess.undo()
    sess.undo()
    assert same(now(), states[0])
    # the clicks of an undone correction no longer count: its positive click is absent from the prompts
    method.seen_prompts.clear()
    sess.refine("liver", negative=[p1])
    seen = torch.cat(method.seen_prompts)
    assert float(seen[:, POSITIVE].max()) == 0.0 and float(seen[:, NEGATIVE].max()) == 1.0


def test_a_locked_organ_is_not_changed_by_undo_or_redo(tmp_path):
    img, labels = _case()
    sess, _ = _session(tmp_path, img, labels)
    sess.refine("liver", positive=[img.TransformIndexToPhysicalPoint((12, 27, 10))])
    after = sitk.GetArrayFromImage(sess.labels)
    sess.lock("liver")
    with pytest.raises(InputError, match="liver is locked"):
        sess.undo()
    assert np.array_equal(sitk.GetArrayFromImage(sess.labels), after) and sess.can_undo
    sess.unlock("liver")
    sess.undo()
    sess.lock("liver")
    with pytest.raises(InputError, match="liver is locked"):
        sess.redo()
    assert sess.can_redo


def _probability(img: sitk.Image, p: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(p.astype(np.float32))
    out.CopyInformation(img)
    return out


def test_suggestions_can_read_the_organs_probability(tmp_path):
    img, labels = _case()
    before = sitk.GetArrayFromImage(labels)
    p = (before == 1).astype(np.float32)
    p[8:13, 18:22, 10:16] = 0.4  # below the liver (outside it): the probability says 40 % organ, 120 voxels
    p[9:11, 10:12, 12:14] = 0.7  # inside the liver: 30 % not organ, 8 voxels
    pkg, method = _package(tmp_path)
    # no variance at all: only the probability can point there
    sess = InteractiveSession(img, pkg, ["liver", "spleen"], labels, method=method,
                              probabilities={"liver": _probability(img, p)})
    first, second = sess.suggest("liver", k=5, reach_mm=10.0, use_probability=True)
    zyx = np.array(img.TransformPhysicalPointToIndex(first.point_mm))[::-1]
    assert 8 <= zyx[0] < 13 and 18 <= zyx[1] < 22 and 10 <= zyx[2] < 16 and first.positive
    assert first.confidence == pytest.approx(0.4, abs=1 / 255)  # 8-bit storage
    assert first.expected_wrong_ml == pytest.approx(120 * 0.4 * 0.012, rel=1e-2)
    zyx2 = np.array(img.TransformPhysicalPointToIndex(second.point_mm))[::-1]
    assert before[tuple(zyx2)] == 1 and not second.positive
    assert second.confidence == pytest.approx(0.3, abs=1 / 255)
    assert sess.suggest("liver") == []  # by default from the variance: all zero here
    assert sess.suggest("spleen", use_probability=True) == []  # no probability for the spleen, no variance
    # suggest_clicks reads float probabilities and the session's 8-bit codes alike
    from MedDiffSegLib.interactive.session import suggest_clicks
    zero = np.zeros(before.shape, np.float32)
    as_float = suggest_clicks(img, before, zero, 1, "liver", 5, reach_mm=10.0, probability=p)
    as_codes = suggest_clicks(img, before, zero, 1, "liver", 5, reach_mm=10.0,
                              probability=np.rint(p * 255).astype(np.uint8))
    assert [s.point_mm for s in as_float] == [s.point_mm for s in as_codes] == [first.point_mm, second.point_mm]


def test_a_correction_updates_only_its_organs_probability_and_undo_restores_it(tmp_path):
    img, labels = _case()
    before = sitk.GetArrayFromImage(labels)
    p0 = (before == 1).astype(np.float32)
    sess, _ = _session(tmp_path, img, labels, probabilities={"Liver": _probability(img, p0)})
    assert sess.probability_organs == ["liver"]
    with pytest.raises(InputError, match="no probability map of spleen"):
        sess.probability("spleen")
    click = img.TransformIndexToPhysicalPoint((12, 27, 10))
    sess.refine("liver", positive=[click])
    p1 = sitk.GetArrayFromImage(sess.probability("liver"))
    ball = _ball(img, click, RADIUS / 2 - 0.01)
    assert np.all(p1[ball] == 1.0) and np.all(p1[~_ball(img, click, RADIUS) & (before == 0)] == 0.0)
    assert sess.probability("liver").GetOrigin() == img.GetOrigin()
    sess.refine("spleen", negative=[img.TransformIndexToPhysicalPoint((28, 12, 9))])  # the spleen has no map
    assert np.array_equal(sitk.GetArrayFromImage(sess.probability("liver")), p1)
    sess.undo()
    sess.undo()
    assert np.array_equal(sitk.GetArrayFromImage(sess.probability("liver")), p0)
    sess.redo()
    assert np.array_equal(sitk.GetArrayFromImage(sess.probability("liver")), p1)


def test_a_probability_map_of_another_grid_or_organ_is_refused(tmp_path):
    img, labels = _case()
    small = sitk.Image(10, 10, 10, sitk.sitkFloat32)
    with pytest.raises(InputError, match="probability map of liver is not on the image's voxel grid"):
        _session(tmp_path, img, labels, probabilities={"liver": small})
    good = _probability(img, np.zeros(sitk.GetArrayFromImage(labels).shape))
    with pytest.raises(ModelError, match="does not know organ.*pancreas"):
        _session(tmp_path, img, labels, probabilities={"pancreas": good})
