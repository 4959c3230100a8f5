"""``meddiffseg train --method meddelinea``: a smoke training on the real data, then segment and evaluate.

The tiny method config (``"method_config": "tiny"`` in ``tiny_config.json``, 32×32 windows at
6 mm) and 20 steps per stage keep this to seconds on a shared 2-core CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.inference.pipeline import run_segment
from MedDiffSegLib.methods.base import _METHODS
from MedDiffSegLib.registry import ModelPackage
from MedDiffSegLib.training import TrainConfig
from MedDiffSegLib.training.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "tiny_config.json"
STEPS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meddelinea") / "run"
    # checkpoints only at the end of each stage: the newest two are then "autoencoder done" and "denoiser done"
    rc = main(["train", "--config", str(TINY_CONFIG), "--out", str(out), "--method", "meddelinea", "--max-steps",
               str(STEPS), "--checkpoint-every", "1000", "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 0
    return out


def test_training_writes_a_loadable_package(trained):
    pkg = ModelPackage.from_folder(trained / "tiny-smoke")
    assert pkg.method_name == "meddelinea" and pkg.organ_names == ["liver", "spleen"]
    assert pkg.config == _METHODS["meddelinea"].tiny_config(2)
    method = pkg.load_method()  # sha256 verified, strict safetensors load
    assert method.name == "meddelinea"
    prov = pkg.provenance
    assert prov["trained"] and prov["steps"] == {"autoencoder": STEPS, "denoiser": STEPS}
    assert set(pkg.metrics["validation"]["dice"]) == {"liver", "spleen"}
    with open(trained / "train_log.csv", newline="") as fh:
        terms = {r["stage"]: set(json.loads(r["terms"])) for r in csv.DictReader(fh)}
    assert terms == {"autoencoder": {"mask_bce", "mask_dice", "image_l1"}, "denoiser": {"noise_mse", "bce", "dice"}}


def test_autoencoders_stay_frozen_except_the_decoders_last_layer(trained):
    after_ae, _ = load_checkpoint(trained / "checkpoints" / f"step-0-{STEPS:07d}")
    after_ae = {k[len("model."):]: v for k, v in after_ae.items() if k.startswith("model.")}
    final = load_file(str(trained / "tiny-smoke" / "weights.safetensors"))
    assert after_ae.keys() == final.keys()
    head = "mask_autoencoder.decoder.head."
    frozen = [k for k in final if k.startswith(("image_autoencoder.", "mask_autoencoder.")) and not k.startswith(head)]
    assert frozen and all(torch.equal(after_ae[k], final[k]) for k in frozen)
    assert not torch.equal(after_ae[head + "weight"], final[head + "weight"])
    # the Control DiT left its zero initialisation, and the DiT was trained too (freeze_dit is off)
    assert all(bool(final[k].any()) for k in final if k.startswith("denoiser.control.zero_proj."))
    assert all(not torch.equal(after_ae[k], final[k]) for k in final if k.startswith("denoiser.dit.final."))


def test_package_segments_and_evaluates_a_real_ct(trained, data_dir, tmp_path, capsys):
    pkg_dir = trained / "tiny-smoke"
    ct = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    ref = sitk.ReadImage(str(ct))
    seg = tmp_path / "seg"
    rc = main(["segment", str(ct), "--organ", "liver", "--organ", "spleen", "--out", str(seg), "--model",
               str(pkg_dir), "--device", "cpu", "--quiet", "--steps", "3", "--scheduler", "euler_ancestral",
               "--save-probabilities"])
    assert rc == 0, capsys.readouterr().err
    out = sitk.ReadImage(str(seg / "segmentation.nii.gz"))
    assert out.GetSize() == ref.GetSize() and out.GetSpacing() == pytest.approx(ref.GetSpacing())
    assert out.GetOrigin() == pytest.approx(ref.GetOrigin()) and out.GetDirection() == pytest.approx(ref.GetDirection())
    assert set(sitk.GetArrayViewFromImage(out).ravel().tolist()) <= {0, 1, 2}
    summary = json.loads((seg / "summary.json").read_text())
    assert summary["model"]["method"] == "meddelinea"
    assert summary["settings"]["steps"] == 3 and summary["settings"]["scheduler"] == "euler_ancestral"
    rc = main(["evaluate", "--pred", str(seg / "segmentation.nii.gz"),
               "--gt", str(data_dir / "totalsegmentator" / "example_seg.nii.gz"), "--labels", "liver=1:5",
               "spleen=2:1", "--json", str(tmp_path / "ev.json"), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert {o["name"] for o in json.loads((tmp_path / "ev.json").read_text())["organs"]} == {"liver", "spleen"}
    # the library route takes every scheduler, LMS and the one-step estimate included
    for steps, scheduler in ((2, "lms"), (1, None)):
        s = run_segment(ct, tmp_path / f"lib-{steps}", ["liver"], model=pkg_dir, steps=steps, scheduler=scheduler,
                        device="cpu")
        assert (tmp_path / f"lib-{steps}" / "segmentation.nii.gz").is_file()
        assert s["settings"]["steps"] == steps and s["settings"]["scheduler"] == (scheduler or "ddim")


@pytest.mark.skipif("init_from" not in TrainConfig.__dataclass_fields__, reason="trainer without 'init_from'")
def test_paper_recipe_frozen_pretrained_dit_with_a_fresh_control(trained, data_dir, tmp_path):
    """init_from a trained package, freeze_dit, no autoencoder steps: only the Control DiT (and decoder head) train."""
    donor = trained / "tiny-smoke"
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg.update(method="meddelinea", init_from=str(donor),
               method_config={**_METHODS["meddelinea"].tiny_config(2), "freeze_dit": True})
    cfg["stages"]["autoencoder"]["steps"] = 0
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg_path), "--out", str(out), "--max-steps", "5", "--data-root",
               str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 0
    before = load_file(str(donor / "weights.safetensors"))
    after = load_file(str(out / "tiny-smoke" / "weights.safetensors"))
    head = "mask_autoencoder.decoder.head."
    kept = [k for k in after if k.startswith(("image_autoencoder.", "mask_autoencoder.", "denoiser.dit."))
            and not k.startswith(head)]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    assert all(bool(after[k].any()) for k in after if k.startswith("denoiser.control.zero_proj."))
    pkg = ModelPackage.from_folder(out / "tiny-smoke")
    assert pkg.provenance["init_from"]["sha256"] == ModelPackage.from_folder(donor).weights_sha256
    assert pkg.provenance["steps"] == {"denoiser": 5}
