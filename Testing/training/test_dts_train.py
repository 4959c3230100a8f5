"""``dts`` training: the SSL pretext losses, ``meddiffseg pretrain`` → ``train`` → ``segment`` on real data.

Tiny models (32×32 windows at 6 mm) and at most 20 steps keep everything to seconds on a shared CPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import MedDiffSegError
from MedDiffSegLib.methods.dts import DTS, ENCODER_FILE, ENCODER_FORMAT, build_conditional_encoder, encoder_config
from MedDiffSegLib.registry import ModelPackage
from MedDiffSegLib.registry.package import sha256_file
from MedDiffSegLib.training import TrainConfig, TrainingInterrupted, train
from MedDiffSegLib.training.ssl import (
    PretrainConfig,
    SSLHeads,
    nt_xent,
    pretrain,
    random_cell_mask,
    region_mask,
    ssl_losses,
)

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "tiny_config.json"
CONFIGS = HERE.parents[1] / "MedDiffSegLib" / "training" / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def _quiet(_msg: str) -> None:
    pass


def _tiny_pretrain_config(**overrides) -> dict:
    """Unlabelled CT slab + MR (their label maps are named but never read), tiny encoder, 32×32 windows at 6 mm."""
    cfg = {
        "name": "tiny-ssl", "method": "dts", "method_config": "tiny",
        "preprocessing": {"modality": "CT", "orientation": "LPS", "spacing": [6.0, 6.0], "ct_window": [-200.0, 300.0]},
        "images": [{"name": "ct-slab", "image": "totalsegmentator/example_ct.nii.gz", "slices": [40, 56]},
                   {"name": "mr", "image": "totalsegmentator/example_mr_sm.nii.gz", "modality": "MR",
                    "label": "totalsegmentator/example_seg_mr.nii.gz"}],
        "roi": 32, "steps": 20, "lr": 0.003, "batch": 4, "log_every": 5, "mask_patch": 4, "location_grid": 4,
    }
    cfg.update(overrides)
    return cfg


def _write(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj))
    return path


# -- the pretext tasks ---------------------------------------------------------------------------


def test_masks_and_nt_xent():
    g = torch.Generator().manual_seed(0)
    cells = random_cell_mask(3, (32, 32), 4, 0.4, g, "cpu")
    assert cells.shape == (3, 1, 32, 32) and cells.dtype == torch.bool
    # exactly round(0.4 · 64) = 26 of the 64 cells, whole cells only
    assert all(int(c.sum()) == 26 * 16 for c in cells)
    assert torch.equal(cells[:, :, ::4, ::4].repeat_interleave(4, 2).repeat_interleave(4, 3), cells)
    regions = region_mask(torch.tensor([0, 5, 15]), (32, 32), 4)
    assert [int(r.sum()) for r in regions] == [64, 64, 64]
    assert bool(regions[0, 0, :8, :8].all()) and bool(regions[1, 0, 8:16, 8:16].all()) and bool(regions[2, 0, 24:, 24:].all())
    # NT-Xent: identical views of orthogonal embeddings score low, shuffled pairs high
    z = torch.eye(4) * 3
    assert float(nt_xent(z, z, 0.1)) < 0.01
    assert float(nt_xent(z, z[[1, 2, 3, 0]], 0.1)) > 5


def _overfit(key: str, steps: int) -> list[dict[str, float]]:
    """Optimise ``key`` of the pretext losses on four fixed windows with the same masks every step."""
    torch.manual_seed(0)
    cfg = DTS.tiny_config(1)
    encoder = build_conditional_encoder(cfg)
    heads = SSLHeads(encoder, location_grid=4, norm_groups=cfg["norm_groups"])
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy - k) for k in range(4)])[:, None]
    opt = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=3e-3)
    history = []
    for _ in range(steps):
        terms = ssl_losses(encoder, heads, images, torch.Generator().manual_seed(7), mask_ratio=0.4, mask_patch=4,
                           location_grid=4, temperature=0.5)
        opt.zero_grad()
        terms[key].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in terms.items()})
    return history


@pytest.mark.parametrize("key", ["rec", "loc", "cl"])
def test_each_ssl_loss_decreases_on_a_tiny_overfit(key):
    history = _overfit(key, 40)
    assert history[-1][key] < 0.5 * history[0][key], (history[0][key], history[-1][key])


def test_the_weighted_total_lowers_every_term():
    """L_rec + 0.1 L_loc + 0.01 L_cl: optimising the total still lowers each term."""
    history = _overfit("loss", 60)
    first, last = history[0], history[-1]
    for k, ratio in (("rec", 0.5), ("loc", 0.7), ("cl", 0.9), ("loss", 0.5)):
        assert last[k] < ratio * first[k], (k, first[k], last[k])
    assert first["loss"] == pytest.approx(first["rec"] + 0.1 * first["loc"] + 0.01 * first["cl"], rel=1e-5)


# -- pretrain → train → segment, all from the CLI ------------------------------------------------


def test_pretrain_train_segment_from_the_cli(data_dir, tmp_path, capsys, monkeypatch):
    cfg_path = _write(tmp_path / "ssl.json", _tiny_pretrain_config(steps=50))
    ssl = tmp_path / "ssl"
    rc = main(["pretrain", "--config", str(cfg_path), "--out", str(ssl), "--max-steps", "20",
               "--data-root", str(data_dir), "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "init_from" in out.out and "rec" in out.out
    enc = ssl / ENCODER_FILE
    assert {p.name for p in ssl.iterdir()} == {ENCODER_FILE, "pretrain.json", "pretrain_log.csv"}
    with safe_open(str(enc), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == ENCODER_FORMAT and meta["steps"] == "20"
    assert json.loads(meta["encoder_config"]) == encoder_config(DTS.tiny_config(1))
    summary = json.loads((ssl / "pretrain.json").read_text())
    assert summary["steps"] == 20 and summary["encoder_sha256"] == sha256_file(enc)
    assert [d["modality"] for d in summary["data"]] == ["CT", "MR"]
    rows = list(csv.reader((ssl / "pretrain_log.csv").open()))
    assert rows[0] == ["step", "loss", "rec", "loc", "cl", "lr", "seconds"] and [r[0] for r in rows[1:]] == ["5", "10", "15", "20"]

    # train the tiny config as dts, starting from the pretrained encoder (a relative init_from: the current folder)
    train_cfg = json.loads(TINY_CONFIG.read_text())
    train_cfg["init_from"] = "ssl"
    monkeypatch.chdir(tmp_path)
    train_path = _write(tmp_path / "train.json", train_cfg)
    run = tmp_path / "run"
    rc = main(["train", "--config", str(train_path), "--out", str(run), "--method", "dts", "--max-steps", "20",
               "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    pkg = ModelPackage.from_folder(run / "tiny-smoke")
    assert pkg.method_name == "dts" and pkg.provenance["steps"] == {"denoiser": 20}
    assert pkg.provenance["init_from"]["sha256"] == sha256_file(enc) and pkg.provenance["init_from"]["steps"] == 20
    assert set(pkg.metrics["validation"]["dice"]) == {"liver", "spleen"}
    method = pkg.load_method()
    assert isinstance(method, DTS) and method.config == DTS.tiny_config(2)

    # segment a real CT slab with the trained package
    seg = tmp_path / "seg"
    ct = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    rc = main(["segment", str(ct), "--organ", "liver", "--organ", "spleen", "--out", str(seg),
               "--model", str(run / "tiny-smoke"), "--device", "cpu", "--steps", "2", "--samples", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    ref = sitk.ReadImage(str(ct))
    for name in ("segmentation.nii.gz", "uncertainty.nii.gz"):
        img = sitk.ReadImage(str(seg / name))
        assert img.GetSize() == ref.GetSize() and img.GetSpacing() == pytest.approx(ref.GetSpacing())
        assert img.GetOrigin() == pytest.approx(ref.GetOrigin()) and img.GetDirection() == pytest.approx(ref.GetDirection())
    summary = json.loads((seg / "summary.json").read_text())
    assert summary["model"]["name"] == "tiny-smoke" and summary["settings"]["steps"] == 2
    assert [o["name"] for o in summary["organs"]] == ["liver", "spleen"]


def test_init_from_loads_the_encoder_and_resume_does_not_reload(data_dir, tmp_path):
    """lr 0: the trained package's τθ is exactly the pretrained one; a resumed run takes it from its checkpoint."""
    res = pretrain(PretrainConfig(**_tiny_pretrain_config()), tmp_path / "ssl", data_root=data_dir, device="cpu",
                   max_steps=3, log=_quiet)
    pretrained = load_file(str(res.encoder_path))
    d = json.loads(TINY_CONFIG.read_text())
    d.update(method="dts", init_from=str(res.out_dir), val_every=100, validation=[],
             stages={"denoiser": {"steps": 4, "lr": 0.0, "batch": 2}})
    cfg = TrainConfig(**d)
    out = tmp_path / "run"
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    with pytest.raises(TrainingInterrupted):
        train(cfg, out, data_root=data_dir, device="cpu", log=_quiet, should_stop=stop_after_two)
    res.encoder_path.unlink()  # a resumed run must not need it
    pkg = train(cfg, out, data_root=data_dir, device="cpu", log=_quiet, resume=True)
    weights = load_file(str(pkg.weights_path))
    for k, v in pretrained.items():
        assert torch.equal(weights[f"cond_encoder.{k}"], v), k
    assert pkg.provenance["init_from"]["path"] == str(res.encoder_path.resolve())


def test_pretrain_and_init_from_errors(data_dir, tmp_path, capsys):
    cfg_path = _write(tmp_path / "ssl.json", _tiny_pretrain_config(method_config={"cond_channels": 4, **{
        k: v for k, v in DTS.tiny_config(1).items() if k != "cond_channels"}}))
    ssl = tmp_path / "ssl"
    argv = ["pretrain", "--config", str(cfg_path), "--out", str(ssl), "--max-steps", "2", "--data-root", str(data_dir),
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(argv) == 1 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    # an encoder made for another τθ is refused with the differing keys named (exit code 3: a model problem)
    train_cfg = json.loads(TINY_CONFIG.read_text())
    train_cfg["init_from"] = str(ssl / ENCODER_FILE)
    train_path = _write(tmp_path / "train.json", train_cfg)
    rc = main(["train", "--config", str(train_path), "--out", str(tmp_path / "run"), "--method", "dts",
               "--max-steps", "2", "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 3 and "cond_channels" in capsys.readouterr().err
    # a method that starts from trained packages (guided) refuses a dts encoder file: it does not fit
    rc = main(["train", "--config", str(train_path), "--out", str(tmp_path / "run2"), "--max-steps", "2",
               "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 3 and "do not fit this model" in capsys.readouterr().err
    # methods without a pretrained part say so
    rc = main(["train", "--config", str(train_path), "--out", str(tmp_path / "run3"), "--method", "medsegdiff_v2",
               "--max-steps", "2", "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 1 and "cannot start from pretrained weights" in capsys.readouterr().err
    # config errors, before any data is read
    for bad, msg in (({"batch": 1}, "negatives"), ({"roi": 30}, "multiple"), ({"colour": 1}, "unknown config keys"),
                     ({"mask_ratio": 1.0}, "mask_ratio"), ({"loss_weights": {"rec": 1}}, "loss_weights")):
        p = _write(tmp_path / "bad.json", _tiny_pretrain_config(**bad))
        assert main(["pretrain", "--config", str(p), "--out", str(tmp_path / "x")]) == 1
        assert msg in capsys.readouterr().err
        assert not (tmp_path / "x").exists()
    with pytest.raises(MedDiffSegError, match="multiple of 8"):
        pretrain(PretrainConfig(**_tiny_pretrain_config(roi=36, mask_patch=4, location_grid=4)), tmp_path / "y",
                 data_root=data_dir, device="cpu", log=_quiet)


# -- the shipped configs -------------------------------------------------------------------------


def test_shipped_dts_configs_are_consistent():
    guided = json.loads((CONFIGS / "abdomen-ct-guided.json").read_text())
    plain = TrainConfig.from_file(CONFIGS / "dts-abdomen-ct.json")
    ssl_train = TrainConfig.from_file(CONFIGS / "dts-ssl-abdomen-ct.json")
    ssl = PretrainConfig.from_file(CONFIGS / "dts-ssl-pretrain.json")
    for cfg in (plain, ssl_train):
        assert cfg.method == "dts"
        for key in ("organs", "preprocessing", "name_tables", "train", "validation"):
            assert getattr(cfg, key) == guided[key], key  # same organs, preprocessing, data and held-out split
    assert plain.init_from is None and ssl_train.init_from
    assert {k: v for k, v in ssl_train.to_dict().items() if k not in ("name", "description", "init_from")} == \
        {k: v for k, v in plain.to_dict().items() if k not in ("name", "description", "init_from")}
    assert ssl.preprocessing == guided["preprocessing"]
    assert ssl.roi == plain.inference["roi_size"][0] and ssl.method_config == plain.method_config
    # unlabelled pretraining never sees the validation images
    val_images = {e["image"] for e in guided["validation"]}
    assert not val_images & {e.get("image") for e in ssl.images}
