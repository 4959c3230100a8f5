"""bench/record_evaluation.py: evaluate_model.sh output → model-card tables and package metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main as cli
from MedDiffSegLib.registry import ModelPackage

from benchtools import load_bench



def _load_script():
    return load_bench("record_evaluation")


def _label_map(path: Path, boxes: dict[int, tuple[slice, slice, slice]]) -> Path:
    a = np.zeros((6, 20, 20), dtype=np.uint8)
    for value, box in boxes.items():
        a[box] = value
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((1.5, 1.5, 3.0))
    sitk.WriteImage(img, str(path))
    return path


def _case(eval_dir: Path, case: str, pred_boxes, gt_boxes, labels, wall_s: float, rss_kb: int) -> None:
    d = eval_dir / case
    d.mkdir(parents=True)
    pred = _label_map(d / "segmentation.nii.gz", pred_boxes)
    gt = _label_map(eval_dir / f"{case}-gt.nii.gz", gt_boxes)
    u = sitk.GetImageFromArray(np.random.default_rng(0).random((6, 20, 20)).astype(np.float32))
    u.CopyInformation(sitk.ReadImage(str(pred)))
    sitk.WriteImage(u, str(d / "uncertainty.nii.gz"))
    assert cli(["evaluate", "--pred", str(pred), "--gt", str(gt), "--labels", *labels, "--uncertainty",
                str(d / "uncertainty.nii.gz"), "--json", str(d / "scores.json"), "--quiet"]) == 0
    (eval_dir / f"{case}.time.json").write_text(json.dumps({"wall_s": wall_s, "peak_rss_kb": rss_kb}))


@pytest.fixture
def eval_dir(tmp_path):
    out = tmp_path / "eval"
    liver = (slice(1, 5), slice(2, 12), slice(2, 12))
    _case(out, "dcmqi-ct-3slice", {1: liver}, {1: (slice(1, 5), slice(2, 12), slice(4, 12))}, ["liver=1:1"], 12.5, 2048)
    _case(out, "ts-ct", {1: liver}, {5: liver, 1: (slice(0, 2), slice(14, 18), slice(14, 18))},
          ["liver=1:5", "spleen=2:1"], 300.0, 4096)
    return out


def test_tables_and_metrics_are_written_into_the_package(eval_dir, tmp_path, capsys):
    from tinymodels import make_tiny_package

    record = _load_script()
    pkg = make_tiny_package(tmp_path / "pkg", samples=3)
    weights_before = pkg.weights_path.read_bytes()
    assert record.main([str(eval_dir), "--package", str(pkg.path), "--command", "bash bench/evaluate_model.sh X Y 3"]) == 0
    text = capsys.readouterr().out
    # unseen first; Dice of the shifted box: 2*32/(40+32) per slice
    assert text.index("dcmqi-ct-3slice") < text.index("ts-ct")
    assert f"| liver | {2 * 32 / 72:.3f} |" in text
    assert "| liver | 1.000 | 0.00 | 0.00 | ok |" in text
    assert "| spleen | 0.000 | inf | inf | missed |" in text
    assert "12.5 s wall, peak RSS 2 MB" in text
    again = ModelPackage.from_folder(pkg.path)
    again.verify()  # the weights and their hash are untouched
    assert again.weights_path.read_bytes() == weights_before
    ev = again.metrics["evaluation"]
    assert list(ev) == ["dcmqi-ct-3slice", "ts-ct"] and ev["dcmqi-ct-3slice"]["role"].startswith("UNSEEN")
    assert ev["dcmqi-ct-3slice"]["organs"]["liver"]["dice"] == pytest.approx(2 * 32 / 72, abs=1e-4)
    assert ev["ts-ct"]["organs"]["spleen"]["status"] == "missed" and ev["ts-ct"]["segment_wall_s"] == 300.0
    assert 0.0 <= ev["ts-ct"]["uncertainty_auroc"] <= 1.0
    assert again.metrics["settings"]["samples"] == 3 and again.metrics["command"].endswith(" 3")
    assert not [p.name for p in pkg.path.iterdir() if p.name.startswith(".model.json")]  # no temporary left


def test_one_sample_has_no_uncertainty_score_and_an_empty_folder_is_an_error(eval_dir, tmp_path, capsys):
    record = _load_script()
    assert record.main([str(eval_dir), "--samples", "1"]) == 0
    assert "No uncertainty score: one sample" in capsys.readouterr().out
    assert record.main([str(tmp_path), "--samples", "1"]) == 2
    assert "no <case>/scores.json" in capsys.readouterr().err
