"""``meddiffseg train --method medsegdiff_v2`` on the real data, then ``meddiffseg segment`` with the package.

The tiny config (32×32 windows at 6 mm, 20 steps) keeps the training to seconds on a shared 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.methods.base import _METHODS, available_methods, build_method
from MedDiffSegLib.registry import ModelPackage
from MedDiffSegLib.training import TrainConfig
from MedDiffSegLib.training.trainer import method_config_for, state_digest

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "tiny_config.json"
CONFIGS = HERE.parents[1] / "MedDiffSegLib" / "training" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_20_steps_from_the_cli_then_segment_a_real_ct(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(TINY_CONFIG), "--out", str(out), "--method", "medsegdiff_v2", "--max-steps",
               "20", "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    pkg_dir = out / "tiny-smoke"
    pkg = ModelPackage.from_folder(pkg_dir)
    assert pkg.method_name == "medsegdiff_v2" and pkg.organ_names == ["liver", "spleen"]
    available_methods()
    assert pkg.config == build_method("medsegdiff_v2", _METHODS["medsegdiff_v2"].tiny_config(2)).config
    method = pkg.load_method()  # sha256 verified, strict safetensors load
    prov = pkg.provenance
    assert prov["trained"] and prov["steps"] == {"denoiser": 20}
    assert prov["parameters_sha256"] == state_digest(method)
    assert prov["data"]["validation"][0]["name"] == "dcmqi-ct-3slice"
    assert set(pkg.metrics["validation"]["dice"]) == {"liver", "spleen"}
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0] == "stage,step,loss,terms,lr,seconds" and len(log) == 1 + 4  # every 5 steps, one stage
    terms = json.loads(log[-1].split(",", 3)[3].rsplit(",", 2)[0].strip('"').replace('""', '"'))
    assert {"noise_mse", "anchor_loss", "anchor_dice", "anchor_ce", "anchor_rows"} <= set(terms)

    # the package segments a real CT slab (an ensemble of 3 samples; STAPLE through the engine is tested with
    # a synthetic volume in Testing/lib/test_medsegdiff_v2.py: on this volume its EM takes minutes for an
    # untrained model's noisy samples)
    ct = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    seg = tmp_path / "seg"
    rc = main(["segment", str(ct), "--organ", "liver", "--organ", "spleen", "--out", str(seg), "--model", str(pkg_dir),
               "--device", "cpu", "--samples", "3", "--steps", "2", "--save-probabilities", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    image = sitk.ReadImage(str(ct))
    labels = sitk.ReadImage(str(seg / "segmentation.nii.gz"))
    uncertainty = sitk.ReadImage(str(seg / "uncertainty.nii.gz"))
    for out_img in (labels, uncertainty):
        assert out_img.GetSize() == image.GetSize()
        assert np.allclose(out_img.GetSpacing(), image.GetSpacing()) and np.allclose(out_img.GetOrigin(), image.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2}
    assert uncertainty.GetPixelID() == sitk.sitkFloat32
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(seg / "probability_liver.nii.gz")))
    assert 0.0 <= float(prob.min()) and float(prob.max()) <= 1.0
    summary = json.loads((seg / "summary.json").read_text())
    assert "medsegdiff_v2" in json.dumps(summary)

    # ... and installs from the zip the training wrote
    rc = main(["models", "install", str(out / "tiny-smoke.zip"), "--force"])
    assert rc == 0, capsys.readouterr().err


def test_the_abdomen_ct_config_matches_the_guided_one():
    """Same organs, preprocessing, data and validation split as abdomen-ct-guided.json; a valid method config."""
    mine = TrainConfig.from_file(CONFIGS / "medsegdiff-v2-abdomen-ct.json")
    guided = TrainConfig.from_file(CONFIGS / "abdomen-ct-guided.json")
    assert mine.method == "medsegdiff_v2"
    for key in ("organs", "preprocessing", "name_tables", "train", "validation", "foreground_fraction", "seed"):
        assert getattr(mine, key) == getattr(guided, key), key
    assert set(mine.stages) == {"denoiser"}
    assert mine.inference["roi_size"] == [224, 224] and mine.inference["samples"] >= 2  # an ensemble: STAPLE works
    available_methods()
    cls = _METHODS["medsegdiff_v2"]
    cfg = cls.normalise_config(method_config_for(mine, len(mine.organs)))
    # the default architecture; the one deliberate change: the anchor supervised on every row (paper: α = 5)
    assert cfg == {**cls.default_config(len(mine.organs)), "anchor_every": 1}
    torch.manual_seed(0)
    m = build_method("medsegdiff_v2", cfg)
    assert 224 % m.size_multiple == 0
