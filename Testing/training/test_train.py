"""``meddiffseg train``: smoke trainings of each method on the real data, bit-identical resume, DDP on gloo.

Tiny models (``"method_config": "tiny"``, 32×32 windows at 6 mm) and a few steps per stage keep
every training here to seconds on a shared 2-core CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import MedDiffSegError
from MedDiffSegLib.registry import ModelPackage
from MedDiffSegLib.training import TrainConfig, TrainingInterrupted, apply_overrides, train
from MedDiffSegLib.training.checkpoint import CheckpointError, latest_checkpoint
from MedDiffSegLib.training.trainer import state_digest

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "tiny_config.json"
REPO = HERE.parents[1]
TS_CT_TABLE = "spleen,1\nkidney_right,2\nkidney_left,3\ngallbladder,4\nliver,5\nstomach,6\npancreas,7\naorta,52\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _weights(pkg_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(pkg_dir / "weights.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _quiet(_msg: str) -> None:
    pass


# -- smoke trainings from the CLI ------------------------------------------------------------------


def _check_package(pkg_dir: Path, method: str, data_dir: Path, tmp_path: Path, capsys) -> None:
    pkg = ModelPackage.from_folder(pkg_dir)
    assert pkg.method_name == method and pkg.organ_names == ["liver", "spleen"]
    pkg.load_method()  # sha256 verified, strict safetensors load
    prov = pkg.provenance
    assert prov["trained"] and prov["steps"] == {"autoencoder": 10, "denoiser": 10}
    assert prov["wall_time_s"] > 0 and "cpu" in prov["hardware"]["device"] and prov["hardware"]["processes"] == 1
    assert prov["data"]["train"] and prov["data"]["validation"][0]["name"] == "dcmqi-ct-3slice"
    assert prov["parameters_sha256"] == state_digest(pkg.load_method())
    assert set(pkg.metrics["validation"]["dice"]) == {"liver", "spleen"}
    assert pkg.metrics["validation"]["dice"]["spleen"] is None  # the validation data does not label the spleen

    # the package segments a real CT with `meddiffseg segment` ...
    seg = tmp_path / "seg"
    rc = main(["segment", str(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"), "--organ", "liver",
               "--organ", "spleen", "--out", str(seg), "--model", str(pkg_dir), "--device", "cpu", "--quiet",
               "--save-probabilities"])
    assert rc == 0, capsys.readouterr().err
    # ... and `meddiffseg evaluate` scores the result against the TotalSegmentator labels (another code table)
    rc = main(["evaluate", "--pred", str(seg / "segmentation.nii.gz"),
               "--gt", str(data_dir / "totalsegmentator" / "example_seg.nii.gz"), "--labels", "liver=1:5",
               "spleen=2:1", "--uncertainty", str(seg / "uncertainty.nii.gz"),
               "--probabilities", f"liver={seg / 'probability_liver.nii.gz'}", "--json", str(tmp_path / "ev.json"),
               "--quiet"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ev.json").read_text())
    assert {o["name"] for o in report["organs"]} == {"liver", "spleen"}
    # ... and installs from the zip the training wrote
    rc = main(["models", "install", str(pkg_dir.parent / f"{pkg.name}.zip"), "--force"])
    assert rc == 0, capsys.readouterr().err


def test_smoke_sdseg_from_cli(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(TINY_CONFIG), "--out", str(out), "--method", "sdseg", "--max-steps", "10",
               "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} >= {"tiny-smoke", "tiny-smoke.zip", "train_log.csv", "validation.csv",
                                               "history.json", "checkpoints"}
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0] == "stage,step,loss,terms,lr,seconds" and len(lines) == 1 + 4  # every 5 steps, 2 stages
    val = (out / "validation.csv").read_text().splitlines()
    assert val[0] == "stage,step,liver,spleen,mean" and val[1].startswith("denoiser,10,")
    _check_package(out / "tiny-smoke", "sdseg", data_dir, tmp_path, capsys)


def test_smoke_guided_from_a_converted_dataset(data_dir, tmp_path, capsys):
    """Folders of real images and label maps → make-dataset → a config that trains from the dataset.json."""
    ts = data_dir / "totalsegmentator"
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "ts_sm.nii.gz").symlink_to(ts / "example_ct_sm.nii.gz")
    (tmp_path / "labels" / "ts_sm.nii.gz").symlink_to(ts / "example_seg.nii.gz")
    (tmp_path / "images" / "dicom_ct").symlink_to(ts / "example_ct_dicom", target_is_directory=True)
    (tmp_path / "labels" / "dicom_ct.nii.gz").symlink_to(ts / "example_seg_dicom.nii.gz")
    (tmp_path / "labels.csv").write_text("name,value\n" + TS_CT_TABLE)
    rc = main(["train", "make-dataset", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
               "--table", str(tmp_path / "labels.csv"), "--modality", "CT", "--out", str(tmp_path / "ds" / "dataset.json")])
    assert rc == 0, capsys.readouterr().err

    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["train"] = [{"dataset": str(tmp_path / "ds" / "dataset.json")},
                    {"name": "dcmqi", "image": "dcmqi/ct-3slice", "label": "dcmqi/liver_spine_seg.nrrd",
                     "table": {"liver": 1}}]
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg_path), "--out", str(out), "--method", "guided", "--max-steps", "10",
               "--data-root", str(data_dir), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    pkg = ModelPackage.from_folder(out / "tiny-smoke")
    train_prov = pkg.provenance["data"]["train"]
    assert train_prov[0]["cases"] == ["dicom_ct", "ts_sm"] and len(train_prov[0]["dataset_sha256"]) == 64
    assert train_prov[1]["name"] == "dcmqi"
    _check_package(out / "tiny-smoke", "guided", data_dir, tmp_path, capsys)


# -- resume ----------------------------------------------------------------------------------------


def _stop_after(n_calls: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == n_calls

    return should_stop


@pytest.fixture(scope="module")
def tiny_cfg() -> TrainConfig:
    return TrainConfig.from_file(TINY_CONFIG)


@pytest.fixture(scope="module")
def reference_run(tiny_cfg, data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run: guided, 8 steps per stage."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=8, checkpoint_every=3, log=_quiet)
    return out


def test_resume_after_interruptions_is_bit_identical(tiny_cfg, reference_run, data_dir, tmp_path):
    out = tmp_path / "run"
    # stop at step 5 of the autoencoder stage (between periodic checkpoints at 3 and 6) ...
    with pytest.raises(TrainingInterrupted, match="stage autoencoder, step 5/8"):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=8, checkpoint_every=3, log=_quiet,
              should_stop=_stop_after(5))
    assert latest_checkpoint(out).name == "step-0-0000005"
    # ... then, resumed, at step 2 of the denoiser stage (3 more autoencoder steps, then 2) ...
    log: list[str] = []
    with pytest.raises(TrainingInterrupted, match="stage denoiser, step 2/8"):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=8, checkpoint_every=3, resume=True,
              log=log.append, should_stop=_stop_after(5))
    assert any("resuming from step-0-0000005: stage autoencoder, step 5" in m for m in log)
    # ... and finish.
    pkg = train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=8, checkpoint_every=3, resume=True, log=_quiet)
    _assert_same_weights(reference_run / "tiny-smoke", out / "tiny-smoke")
    strip = lambda p: [r.rsplit(",", 1)[0] for r in p.read_text().splitlines()]  # noqa: E731 (drop the seconds)
    assert strip(out / "train_log.csv") == strip(reference_run / "train_log.csv")
    assert (out / "validation.csv").read_text() == (reference_run / "validation.csv").read_text()
    assert pkg.provenance["resumed_at"] == [{"stage": "autoencoder", "step": 5, "amp": "auto"},
                                            {"stage": "denoiser", "step": 2, "amp": "auto"}]
    ref = ModelPackage.from_folder(reference_run / "tiny-smoke")
    assert pkg.metrics["validation"] == ref.metrics["validation"]
    # resuming a finished run changes nothing
    again = train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=8, resume=True, log=_quiet)
    assert again.weights_sha256 == pkg.weights_sha256


def test_resume_refuses_other_options_and_reuse_without_resume(tiny_cfg, data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=4, log=_quiet, should_stop=_stop_after(2))
    with pytest.raises(MedDiffSegError, match="already holds a training run"):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=4, log=_quiet)
    with pytest.raises(CheckpointError, match="another configuration"):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=5, resume=True, log=_quiet)
    with pytest.raises(CheckpointError, match="another configuration"):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=4, method="sdseg", resume=True, log=_quiet)


def test_resume_may_change_mixed_precision_and_records_it(tiny_cfg, data_dir, tmp_path):
    """``amp`` is a run setting: a run started in fp32 resumes under bf16 autocast (a CPU with bf16 units
    trains about twice as fast), the package says from which step, and the weights stay finite."""
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=4, amp="off", log=_quiet,
              should_stop=_stop_after(6))
    log: list[str] = []
    pkg = train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=4, amp="bf16", resume=True, log=log.append)
    assert any("autocast bfloat16" in m for m in log)
    assert pkg.provenance["resumed_at"] == [{"stage": "denoiser", "step": 2, "amp": "bf16"}]
    assert all(torch.isfinite(v.float()).all() for v in _weights(out / "tiny-smoke").values())
    with pytest.raises(MedDiffSegError, match="amp must be one of"):
        train(tiny_cfg, tmp_path / "other", data_root=data_dir, device="cpu", max_steps=4, amp="fp8", log=_quiet)


def test_a_shared_mask_autoencoder_is_taken_and_kept_fixed(tiny_cfg, reference_run, data_dir, tmp_path):
    """``mask_autoencoder_from``: sdseg and meddelinea start from the guided package's mask autoencoder
    and leave it as it is (meddelinea's autoencoder stage trains only its image autoencoder; its denoiser
    stage, as in the paper, the decoder's last layer); the package records where it came from."""
    src = reference_run / "tiny-smoke"
    ae = {k: v for k, v in _weights(src).items() if k.startswith("mask_autoencoder.")}
    assert ae
    cfg = TrainConfig(**{**tiny_cfg.to_dict(), "method": "sdseg", "mask_autoencoder_from": str(src),
                         "stages": {"autoencoder": {"steps": 0}, "denoiser": {"steps": 3, "lr": 0.001, "batch": 4}}})
    pkg = train(cfg, tmp_path / "sdseg", data_root=data_dir, device="cpu", log=_quiet)
    got = _weights(tmp_path / "sdseg" / "tiny-smoke")
    assert all(torch.equal(got[k], v) for k, v in ae.items())
    info = pkg.provenance["mask_autoencoder_from"]
    assert info["package"] == "tiny-smoke" and info["method"] == "guided" and info["tensors"] == len(ae)

    cfg_m = TrainConfig(**{**cfg.to_dict(), "method": "meddelinea",
                           "mask_autoencoder_from": {"model": str(src), "version": "0.0.1"},
                           "stages": {"autoencoder": {"steps": 2, "lr": 0.003, "batch": 4},
                                      "denoiser": {"steps": 2, "lr": 0.001, "batch": 4}}})
    train(cfg_m, tmp_path / "meddelinea", data_root=data_dir, device="cpu", log=_quiet)
    got = _weights(tmp_path / "meddelinea" / "tiny-smoke")
    changed = sorted(k for k, v in ae.items() if not torch.equal(got[k], v))
    assert changed and all(k.startswith("mask_autoencoder.decoder.head.") for k in changed), changed
    assert any(l.startswith("autoencoder,") and "image_l1" in l and "mask_bce" not in l
               for l in (tmp_path / "meddelinea" / "train_log.csv").read_text().splitlines())

    with pytest.raises(MedDiffSegError, match=r"stage 'autoencoder' has nothing to train.*steps to 0"):
        train(TrainConfig(**{**cfg.to_dict(), "stages": tiny_cfg.stages}), tmp_path / "a", data_root=data_dir,
              device="cpu", log=_quiet)
    with pytest.raises(MedDiffSegError, match="version 9.9.9 was asked for, found version 0.0.1"):
        train(TrainConfig(**{**cfg.to_dict(), "mask_autoencoder_from": {"model": str(src), "version": "9.9.9"}}),
              tmp_path / "b", data_root=data_dir, device="cpu", log=_quiet)
    with pytest.raises(MedDiffSegError, match="has no mask autoencoder"):
        train(TrainConfig(**{**cfg.to_dict(), "method": "dts"}), tmp_path / "c", data_root=data_dir, device="cpu",
              log=_quiet)


def test_config_keys_added_later_keep_the_digest_of_older_runs(tiny_cfg):
    """A key added after runs had started does not change their digest while at its default (so they resume)."""
    from MedDiffSegLib.training.trainer import config_digest

    d = tiny_cfg.to_dict()
    assert config_digest(TrainConfig(**{**d, "mask_autoencoder_from": None})) == config_digest(tiny_cfg)
    assert config_digest(TrainConfig(**{**d, "mask_autoencoder_from": "abdomen-ct"})) != config_digest(tiny_cfg)


def test_ctrl_c_writes_a_checkpoint_and_resume_matches(tiny_cfg, data_dir, tmp_path, capsys):
    """A real SIGINT to `meddiffseg train`, exit 130, then `--resume`: same parameters as without the interruption."""
    ref = tmp_path / "ref"
    train(tiny_cfg, ref, data_root=data_dir, device="cpu", max_steps=40, log=_quiet)
    out = tmp_path / "run"
    argv = ["train", "--config", str(TINY_CONFIG), "--out", str(out), "--max-steps", "40", "--data-root",
            str(data_dir), "--device", "cpu", "--checkpoint-every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "MedDiffSegLib", *argv], env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "stopping after this step" in err and "--resume" in err
    step = json.loads((latest_checkpoint(out) / "state.json").read_text())["step"]
    assert not (out / "tiny-smoke").exists()
    rc = main([*argv, "--resume", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    _assert_same_weights(ref / "tiny-smoke", out / "tiny-smoke")
    assert step >= 1


# -- options ---------------------------------------------------------------------------------------


def test_method_override_and_step_cap(tiny_cfg):
    c = apply_overrides(tiny_cfg, method="sdseg", max_steps=3)
    assert c.method == "sdseg" and c.method_config == "tiny"
    assert c.stages["autoencoder"]["steps"] == 3 and c.stages["denoiser"]["steps"] == 3
    assert tiny_cfg.method == "guided" and tiny_cfg.stages["denoiser"]["steps"] == 20  # the original is untouched
    d = TrainConfig(**{**tiny_cfg.to_dict(), "method_config": {"num_organs": 2, "unet_channels": [16, 16]}})
    assert apply_overrides(d, method="sdseg").method_config is None  # another method's dict is not reused
    assert apply_overrides(d, method="guided").method_config == {"num_organs": 2, "unet_channels": [16, 16]}
    with pytest.raises(MedDiffSegError):
        apply_overrides(tiny_cfg, method="nope")
    with pytest.raises(MedDiffSegError):
        apply_overrides(tiny_cfg, max_steps=0)


def test_cli_train_errors(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x")]) == 1
    assert "needs --config" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_autocast_bf16_path_on_cpu(tiny_cfg, data_dir, tmp_path):
    """The mixed-precision code path (autocast around the loss) runs; on CUDA 'auto' picks it by itself."""
    cfg = TrainConfig(**{**tiny_cfg.to_dict(), "amp": "bf16"})
    pkg = train(cfg, tmp_path / "run", data_root=data_dir, device="cpu", max_steps=2, log=_quiet)
    assert pkg.provenance["amp"] == "bfloat16"
    assert all(torch.isfinite(v).all() for v in _weights(pkg.path).values())


# -- several processes -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_two_processes_on_gloo_end_in_sync(data_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "run"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "MedDiffSegLib", "train", "--config",
           str(TINY_CONFIG), "--out", str(out), "--max-steps", "4", "--data-root", str(data_dir), "--device", "cpu"]
    res = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "× 2 processes" in res.stderr
    pkg = ModelPackage.from_folder(out / "tiny-smoke")
    # Every rank hashed its final parameters; the trainer fails unless all hashes agree.
    assert pkg.provenance["ranks_in_sync"] is True and pkg.provenance["hardware"]["processes"] == 2
    assert pkg.provenance["parameters_sha256"] == state_digest(pkg.load_method())
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["sampler"] != state["rng"][1]["sampler"]  # each rank draws its own windows


def test_validation_samples_with_the_package_inference_defaults(tiny_cfg, data_dir, tmp_path, monkeypatch):
    """Validation Dice is measured the way the package will segment: its default steps and scheduler."""
    import copy

    from MedDiffSegLib.training import trainer as trainer_module

    calls = []
    real_sample = None

    def spy_validate(method, *args, **kwargs):
        nonlocal real_sample
        real_sample = method.sample

        def sample(cond, ids, n, steps, g, scheduler=None):
            calls.append((n, steps, scheduler))
            return real_sample(cond, ids, n, steps, g, scheduler)

        method.sample = sample
        try:
            return real_validate(method, *args, **kwargs)
        finally:
            del method.sample

    real_validate = trainer_module.validate
    monkeypatch.setattr(trainer_module, "validate", spy_validate)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.inference = {**cfg.inference, "steps": 3, "scheduler": "unipc"}
    pkg = train(cfg, tmp_path / "run", data_root=data_dir, device="cpu", max_steps=2, log=_quiet)
    assert calls and set(calls) == {(1, 3, "unipc")}
    assert "default steps and scheduler" in pkg.metrics["validation"]["protocol"]
    # the function itself: steps and scheduler reach the sampler, 1 step stays the default
    method = pkg.load_method()
    from MedDiffSegLib.training.data import load_labelled_volume

    vol = load_labelled_volume(data_dir / "dcmqi" / "ct-3slice", data_dir / "dcmqi" / "liver_spine_seg.nrrd",
                               {"liver": 1}, pkg.organ_names, pkg.preprocessing)
    calls.clear()
    spy_validate(method, [vol], len(pkg.organ_names), 32)
    assert set(calls) == {(1, 1, None)}


def test_a_checkpoint_becomes_a_package_that_segments_and_starts_another_run(tiny_cfg, data_dir, tmp_path):
    """bench/package_checkpoint.py: the newest checkpoint of an unfinished run as a package (its weights
    exactly, the config checked), which a second phase of training can start from (``init_from``)."""
    from benchtools import load_bench

    from MedDiffSegLib.training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(tiny_cfg, out, data_root=data_dir, device="cpu", max_steps=4, checkpoint_every=2, log=_quiet,
              should_stop=_stop_after(6))
    tool = load_bench("package_checkpoint")
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(apply_overrides(tiny_cfg, max_steps=4).to_dict()))
    pkg = tool.package_checkpoint(out, cfg_path, tmp_path / "pkg")
    tensors, meta = load_checkpoint(latest_checkpoint(out))
    weights = _weights(pkg.path)
    assert all(torch.equal(weights[k[len("model."):]], v) for k, v in tensors.items() if k.startswith("model."))
    assert pkg.version == "0.0.1+step2" and pkg.provenance["from_checkpoint"]["stage"] == "denoiser"
    pkg.verify()
    # the config must be the run's
    with pytest.raises(MedDiffSegError, match="another configuration"):
        tool.package_checkpoint(out, TINY_CONFIG, tmp_path / "other")
    # a second phase starts from it
    phase2 = TrainConfig(**{**tiny_cfg.to_dict(), "init_from": str(pkg.path),
                            "stages": {"autoencoder": {"steps": 0}, "denoiser": {"steps": 2, "lr": 0.001, "batch": 4}}})
    done = train(phase2, tmp_path / "phase2", data_root=data_dir, device="cpu", log=_quiet)
    assert done.provenance["init_from"]["version"] == "0.0.1+step2"
