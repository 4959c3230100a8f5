"""``meddiffseg segment`` and the pipeline behind it: validation, atomic outputs, end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedDiffSegLib.cli.main import DEFAULT_SCHEDULERS, main
from MedDiffSegLib.errors import Cancelled, DeviceError, InputError, MedDiffSegError, ModelError, OutputError
from MedDiffSegLib.inference import engine as engine_module
from MedDiffSegLib.inference.pipeline import run_segment
from MedDiffSegLib.io import volume as volume_module
from MedDiffSegLib.registry import DEFAULT_MODELS, export_zip, install_zip, sha256_file
from MedDiffSegLib.registry import store
from tinymodels import make_tiny_package, write_ellipsoid_ct

OUTPUTS = {"segmentation.nii.gz", "uncertainty.nii.gz", "summary.json"}


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_cli_pkgs")


@pytest.fixture(scope="session")
def tiny_guided(tiny_root) -> Path:
    return make_tiny_package(tiny_root / "tiny-guided", "guided").path


@pytest.fixture(scope="session")
def tiny_sdseg(tiny_root) -> Path:
    return make_tiny_package(tiny_root / "tiny-sdseg", "sdseg").path


@pytest.fixture(scope="session")
def small_volume(tmp_path_factory) -> Path:
    """A small synthetic CT-like volume (a bright ellipsoid in air) with a non-trivial geometry."""
    return write_ellipsoid_ct(tmp_path_factory.mktemp("small_volume") / "small.nii.gz", (6, 40, 48))


@pytest.fixture
def empty_builtin(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "builtin_models"
    d.mkdir()
    monkeypatch.setattr(store, "BUILTIN_MODELS_DIR", d)
    return d


def _segment_argv(inp, out, model, *extra, organs=("liver",)) -> list[str]:
    argv = ["segment", str(inp), "--out", str(out), "--model", str(model), "--quiet"]
    for o in organs:
        argv += ["--organ", o]
    return argv + list(extra)


def _assert_no_outputs(out: Path, existed_before: bool = False, previous: set[str] | None = None) -> None:
    if existed_before:
        assert out.is_dir()
        assert {p.name for p in out.iterdir()} == (previous or set())
    else:
        assert not out.exists(), sorted(p.name for p in out.rglob("*"))


def _assert_one_error_line(err: str, *fragments: str) -> None:
    assert err.startswith("meddiffseg: error: "), err
    assert err.count("\n") == 1, err
    for f in fragments:
        assert f in err, (f, err)


# -- bad inputs: message, exit code, no files ------------------------------------------------------


def _text_file_named_nifti(tmp: Path) -> Path:
    p = tmp / "notes.nii.gz"
    p.write_text("this is not an image\n", encoding="utf-8")
    return p


def _image_2d(tmp: Path) -> Path:
    p = tmp / "slice2d.nii.gz"
    sitk.WriteImage(sitk.Image([32, 32], sitk.sitkInt16), str(p))
    return p


def _image_4d(tmp: Path) -> Path:
    p = tmp / "series4d.nii.gz"
    sitk.WriteImage(sitk.Image([7, 6, 5, 2], sitk.sitkInt16), str(p))
    return p


def _empty_folder(tmp: Path) -> Path:
    p = tmp / "empty_dicom"
    p.mkdir()
    return p


def _mixed_dicom_folder(tmp: Path, data: Path) -> Path:
    p = tmp / "mixed_dicom"
    p.mkdir()
    for src_dir, prefix in ((data / "totalsegmentator" / "example_ct_dicom", "a"), (data / "dcmqi" / "ct-3slice", "b")):
        for f in sorted(src_dir.iterdir()):
            (p / f"{prefix}_{f.name}").symlink_to(f)
    return p


BAD_INPUTS = {
    "missing": (lambda tmp, data: tmp / "no_such_scan.nii.gz", "does not exist"),
    "not-an-image": (lambda tmp, data: _text_file_named_nifti(tmp), "notes.nii.gz"),
    "2d": (lambda tmp, data: _image_2d(tmp), "is 2D"),
    "4d": (lambda tmp, data: _image_4d(tmp), "is 4D"),
    "empty-dicom-folder": (lambda tmp, data: _empty_folder(tmp), "empty folder"),
    "mixed-dicom-folder": (lambda tmp, data: _mixed_dicom_folder(tmp, data), "2 DICOM series"),
}


@pytest.mark.parametrize("existed_before", [False, True], ids=["new-dir", "existing-dir"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case, existed_before, tmp_path, tiny_guided, data_dir, capsys):
    make, fragment = BAD_INPUTS[case]
    inp = make(tmp_path, data_dir)
    out = tmp_path / "out"
    if existed_before:
        out.mkdir()
    assert main(_segment_argv(inp, out, tiny_guided)) == InputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, fragment)
    _assert_no_outputs(out, existed_before)


def test_unknown_organ_lists_known_ones(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, organs=("liver", "pancreas"))) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "'pancreas'", "liver, spleen")
    _assert_no_outputs(out)


def test_organ_given_twice(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, organs=("liver", "Liver"))) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "twice")
    _assert_no_outputs(out)


def test_organ_all_segments_every_organ_of_the_model_in_its_order(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, organs=("all",))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(o["label"], o["name"]) for o in summary["organs"]] == [(1, "liver"), (2, "spleen")]
    bad = tmp_path / "bad"
    assert main(_segment_argv(small_volume, bad, tiny_guided, organs=("all", "liver"))) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "'all' means every organ")
    _assert_no_outputs(bad)


def test_corrupt_weights(tmp_path, tiny_guided, small_volume, capsys):
    bad = shutil.copytree(tiny_guided, tmp_path / "corrupt-model")
    with open(bad / "weights.safetensors", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        tail = f.read(3)
        f.seek(-3, os.SEEK_END)
        f.write(bytes(b ^ 0x5A for b in tail))
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, bad)) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "does not match its sha256")
    _assert_no_outputs(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, "--device", "cuda")) == DeviceError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "'cuda'", "CUDA is not available")
    _assert_no_outputs(out)


def test_fp16_on_cpu_is_refused(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, "--device", "cpu", "--precision", "fp16")) == DeviceError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "'fp16' needs a CUDA GPU")
    _assert_no_outputs(out)


def test_adaptive_sampling_and_precision_are_reported(tmp_path, tiny_guided, small_volume, capsys):
    runs = {}
    for name, extra in (("adaptive", ()), ("all", ("--no-adaptive", "--precision", "bf16"))):
        out = tmp_path / name
        argv = ["segment", str(small_volume), "--out", str(out), "--model", str(tiny_guided), "--organ", "liver",
                "--organ", "spleen", "--samples", "3", "--device", "cpu", *extra]
        assert main(argv) == 0
        runs[name] = (json.loads((out / "summary.json").read_text(encoding="utf-8")), capsys.readouterr().out)
    (adaptive, text_a), (full, text_f) = runs["adaptive"], runs["all"]
    assert adaptive["settings"]["precision"] == "fp32" and full["settings"]["precision"] == "bf16"
    assert adaptive["sampling"]["adaptive"] and not full["sampling"]["adaptive"]
    windows = full["sampling"]["windows"] - full["sampling"]["windows_outside_body"]
    for name in ("liver", "spleen"):
        assert full["sampling"]["organs"][name]["samples_drawn"] == 3 * windows
        assert windows <= adaptive["sampling"]["organs"][name]["samples_drawn"] <= 3 * windows
    assert "drawn per window" in text_a and "bf16" in text_f and "drawn per window" not in text_f


def test_default_samples_are_the_slicer_standard_preset(tmp_path, tiny_guided, small_volume, capsys):
    """Issue #25: a plain run had 1 sample and so an all-zero uncertainty map; it now draws Slicer's Standard 5."""
    import sys as _sys

    from MedDiffSegLib.cli.main import DEFAULT_SAMPLES

    _sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedDiffSeg"))
    try:
        from MedDiffSegLogicLib.presets import DEFAULT_PRESET, QUALITY_PRESETS
    finally:
        _sys.path.pop(0)
    assert DEFAULT_SAMPLES == QUALITY_PRESETS[DEFAULT_PRESET].samples == 5
    out = tmp_path / "out"
    argv = ["segment", str(small_volume), "--out", str(out), "--model", str(tiny_guided), "--organ", "liver",
            "--device", "cpu", "--no-adaptive"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["settings"]["samples"] == 5  # the package's own default (2) is not used by the CLI
    windows = summary["sampling"]["windows"] - summary["sampling"]["windows_outside_body"]
    assert summary["sampling"]["organs"]["liver"]["samples_drawn"] == 5 * windows
    assert "; 5 sample(s)" in printed and "no uncertainty map" not in printed
    assert main(argv[:-1] + ["--samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "no uncertainty map: 1 sample cannot disagree with itself" in printed


def test_unknown_device(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, "--device", "tpu")) == DeviceError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "unknown device 'tpu'")
    _assert_no_outputs(out)


def test_output_under_a_regular_file(tmp_path, tiny_guided, small_volume, capsys):
    blocker = tmp_path / "report.txt"
    blocker.write_text("keep me\n", encoding="utf-8")
    out = blocker / "results"
    assert main(_segment_argv(small_volume, out, tiny_guided)) == OutputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "report.txt is not a folder")
    assert blocker.read_text(encoding="utf-8") == "keep me\n"


@pytest.mark.skipif(not Path("/proc/self").is_dir() or not Path("/sys/kernel").is_dir(), reason="no /proc or /sys")
@pytest.mark.parametrize("out", ["/proc/meddiffseg-out", "/sys/kernel/meddiffseg/out"], ids=["proc", "sys"])
def test_output_on_a_kernel_file_system_is_refused_before_the_run(out, tiny_guided, small_volume, monkeypatch, capsys):
    """Issue #25: an --out under /proc or /sys passed the up-front check (writable for root) and failed
    only after inference (exit 5 after ~20 s)."""
    def no_run(*args, **kwargs):
        raise AssertionError("nothing may run before the output folder is known to be usable")

    monkeypatch.setattr(engine_module, "segment_volume", no_run)
    monkeypatch.setattr(volume_module, "read_volume", no_run)
    assert main(_segment_argv(small_volume, out, tiny_guided)) == OutputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, f"output folder {out} is on ", "a kernel file system",
                           "choose a folder on a disk")
    assert not Path(out).exists()


def test_kernel_file_systems_are_told_apart_from_ordinary_folders(tmp_path):
    from MedDiffSegLib.io.volume import pseudo_filesystem

    assert pseudo_filesystem(tmp_path / "a" / "b") is None and pseudo_filesystem(tmp_path) is None
    if Path("/proc/self").is_dir():
        assert pseudo_filesystem("/proc/no/such/folder") == "proc" and pseudo_filesystem("/sys/x") == "sysfs"


def test_output_is_an_existing_file(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "results"
    out.write_text("x", encoding="utf-8")
    assert main(_segment_argv(small_volume, out, tiny_guided)) == OutputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "is not a folder")


@pytest.mark.parametrize("option,value,fragment", [
    ("--samples", "0", "samples must be at least 1"),
    ("--steps", "0", "steps must be at least 1"),
    ("--seed", "-1", "seed must be at least 0"),
])
def test_bad_option_values(option, value, fragment, tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided, option, value)) == MedDiffSegError.exit_code
    _assert_one_error_line(capsys.readouterr().err, fragment)
    _assert_no_outputs(out)


def test_staple_needs_two_samples(tmp_path, tiny_guided, small_volume, capsys):
    out = tmp_path / "out"
    rc = main(_segment_argv(small_volume, out, tiny_guided, "--staple", "--samples", "1"))
    assert rc == MedDiffSegError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "STAPLE", "samples >= 2")
    _assert_no_outputs(out)


def test_samples_checked_before_everything(tmp_path, capsys):
    # Cheap checks come first: a bad --samples is reported even when the input and model are bad too.
    out = tmp_path / "out"
    rc = main(["segment", str(tmp_path / "missing.nii.gz"), "--organ", "liver", "--out", str(out),
               "--model", str(tmp_path / "no-model"), "--samples", "0"])
    assert rc == MedDiffSegError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "samples must be at least 1")


def test_usage_errors_keep_argparse_code(capsys):
    assert main(["segment", "x.nii.gz", "--out", "o"]) == 2  # --organ missing
    assert "--organ" in capsys.readouterr().err
    assert main(["segment", "x.nii.gz", "--organ", "liver", "--out", "o", "--scheduler", "magic"]) == 2
    assert main([]) == 2


def test_default_model_not_installed(tmp_path, empty_builtin, small_volume, capsys):
    out = tmp_path / "out"
    rc = main(["segment", str(small_volume), "--modality", "CT", "--organ", "liver", "--out", str(out), "--quiet"])
    assert rc == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "no CT model is installed", f"'{DEFAULT_MODELS['CT']}'",
                           "meddiffseg models install")
    _assert_no_outputs(out)


def test_installed_model_by_name(tmp_path, empty_builtin, tiny_guided, small_volume, capsys):
    install_zip(export_zip(tiny_guided, tmp_path / "tiny.zip"))
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, "tiny-guided")) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert json.loads((out / "summary.json").read_text())["model"]["origin"] == "user"


def test_schedulers_match_the_sampling_module():
    from MedDiffSegLib.sampling.schedulers import SCHEDULERS

    assert tuple(DEFAULT_SCHEDULERS) == tuple(SCHEDULERS)


# -- modality: default per modality, mismatch stops, override ----------------------------------


@pytest.fixture(scope="session")
def tiny_mr(tiny_root) -> Path:
    """A tiny package made for MR (preprocessing.modality = MR)."""
    return make_tiny_package(tiny_root / "tiny-mr", "guided", modality="MR", name="tiny-mr").path


def _install_as(src: Path, folder: Path, name: str) -> Path:
    """Copy the package at ``src`` into ``folder`` under the package name ``name``."""
    dest = shutil.copytree(src, folder / name)
    meta = json.loads((dest / "model.json").read_text())
    meta["name"] = name
    (dest / "model.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.parametrize("existed_before", [False, True], ids=["new-dir", "existing-dir"])
def test_plain_file_without_model_or_modality_asks_for_the_modality(existed_before, tmp_path, data_dir, capsys):
    out = tmp_path / "out"
    if existed_before:
        out.mkdir()
    ct = data_dir / "totalsegmentator" / "example_ct.nii.gz"
    assert main(["segment", str(ct), "--organ", "liver", "--out", str(out), "--quiet"]) == InputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "example_ct.nii.gz has no modality tag",
                           "pass --modality CT or --modality MR", "--model")
    _assert_no_outputs(out, existed_before)


def test_modality_mr_with_only_ct_models_says_how_to_install_one(tmp_path, empty_builtin, tiny_guided, data_dir, capsys):
    install_zip(export_zip(tiny_guided, tmp_path / "ct.zip"))
    out = tmp_path / "out"
    mr = data_dir / "totalsegmentator" / "example_mr_sm.nii.gz"
    rc = main(["segment", str(mr), "--modality", "MR", "--organ", "liver", "--out", str(out), "--quiet"])
    assert rc == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "no MR model is installed", f"'{DEFAULT_MODELS['MR']}'",
                           "tiny-guided (CT)", "meddiffseg models install PACKAGE.zip")
    _assert_no_outputs(out)


@pytest.mark.parametrize("rel,extra,fragment", [
    ("totalsegmentator/example_mr_sm.nii.gz", (), "implausible as Hounsfield units"),
    ("chaos_mr/imagesTr/chaos_t2_01.nii.gz", (), "implausible as Hounsfield units"),
    ("chaos_mr/imagesTr/chaos_t2_01.nii.gz", ("--modality", "MR"), "the input is MR (--modality)"),
], ids=["ts-mr", "chaos-mr", "chaos-mr-declared"])
def test_ct_model_on_a_real_mr_stops_naming_the_mr_models(rel, extra, fragment, tmp_path, empty_builtin, tiny_guided,
                                                          tiny_mr, data_dir, capsys):
    install_zip(export_zip(tiny_mr, tmp_path / "mr.zip"))
    out = tmp_path / "out"
    assert main(_segment_argv(data_dir / rel, out, tiny_guided, *extra)) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "model 'tiny-guided' is a CT model", fragment,
                           "installed MR models: tiny-mr", "--allow-modality-mismatch")
    _assert_no_outputs(out)


def test_allow_modality_mismatch_runs_and_records_it(tmp_path, tiny_guided, data_dir, capsys):
    out = tmp_path / "out"
    mr = data_dir / "totalsegmentator" / "example_mr_sm.nii.gz"
    rc = main(_segment_argv(mr, out, tiny_guided, "--allow-modality-mismatch", "--samples", "1", "--steps", "1",
                            "--device", "cpu"))
    assert rc == 0
    err = capsys.readouterr().err
    assert "meddiffseg: warning: modality mismatch overridden (--allow-modality-mismatch)" in err
    assert {p.name for p in out.iterdir()} == OUTPUTS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["modality"] is None and summary["input"]["modality_source"] is None
    check = summary["modality_check"]
    assert check["mismatch"] is True and check["overridden"] is True and check["hu_plausible"] is False
    assert check["model_modality"] == "CT" and "implausible as Hounsfield units" in check["reason"]


def test_dicom_ct_series_is_detected_as_ct_without_any_option(tmp_path, empty_builtin, tiny_guided, tiny_mr, data_dir):
    _install_as(tiny_guided, empty_builtin, DEFAULT_MODELS["CT"])
    _install_as(tiny_mr, empty_builtin, DEFAULT_MODELS["MR"])
    out = tmp_path / "out"
    folder = data_dir / "totalsegmentator" / "example_ct_dicom"
    rc = main(["segment", str(folder), "--organ", "liver", "--out", str(out), "--quiet", "--samples", "1",
               "--steps", "1", "--device", "cpu"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == DEFAULT_MODELS["CT"] and summary["model"]["modality"] == "CT"
    assert summary["input"]["modality"] == "CT" and summary["input"]["modality_source"] == "dicom"
    assert summary["modality_check"]["mismatch"] is False


def test_mr_model_on_ct_stops_and_modality_contradicting_the_tag_is_an_input_error(tmp_path, empty_builtin, tiny_guided,
                                                                                  tiny_mr, small_volume, data_dir, capsys):
    _install_as(tiny_guided, empty_builtin, "abdomen-ct-guided")
    series = data_dir / "dcmqi" / "ct-3slice"
    out = tmp_path / "out"
    assert main(_segment_argv(series, out, tiny_mr)) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "model 'tiny-mr' is an MR model but the input is CT (its DICOM "
                           "Modality tag)", "installed CT models: abdomen-ct-guided", "--allow-modality-mismatch")
    assert main(_segment_argv(small_volume, out, tiny_mr, "--modality", "CT")) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "the input is CT (--modality)")
    # no tag, nothing declared: HU intensities are not an MR
    assert main(_segment_argv(small_volume, out, tiny_mr)) == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "the input's intensities look like a CT in Hounsfield units",
                           "if it is a CT, pass --modality CT instead of --model")
    assert main(_segment_argv(series, out, tiny_guided, "--modality", "MR")) == InputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "--modality MR contradicts the DICOM Modality tag CT")
    _assert_no_outputs(out)


@pytest.mark.parametrize("rel,declared,fragments", [
    ("totalsegmentator/example_ct.nii.gz", "MR",
     ("model 'abdomen-mr' is an MR model and the input is MR (--modality), but its intensities look like a CT",
      "if it is a CT, pass --modality CT;", "installed CT models: abdomen-ct (the default)")),
    ("chaos_mr/imagesTr/chaos_t2_01.nii.gz", "CT",
     ("model 'abdomen-ct' is a CT model and the input is CT (--modality), but its intensities are implausible",
      "if it is an MR, pass --modality MR;", "installed MR models: abdomen-mr (the default)")),
], ids=["ct-declared-mr", "mr-declared-ct"])
def test_a_real_scan_declared_the_wrong_modality_stops_before_the_network(rel, declared, fragments, tmp_path, data_dir,
                                                                         monkeypatch, capsys):
    """Issue #25: a CT declared MR ran the MR model and reported a 7.9 L 'liver'; the refusal of an MR
    declared CT did not name abdomen-mr or --modality MR. Both stop after reading the input: no network,
    nothing written."""
    def no_network(*args, **kwargs):
        raise AssertionError("the network must not run")

    monkeypatch.setattr(engine_module, "segment_volume", no_network)
    out = tmp_path / "out"
    inp = data_dir / rel
    before = sha256_file(inp)
    rc = main(["segment", str(inp), "--modality", declared, "--organ", "liver", "--out", str(out), "--quiet"])
    assert rc == ModelError.exit_code
    _assert_one_error_line(capsys.readouterr().err, *fragments, "--allow-modality-mismatch")
    _assert_no_outputs(out)
    assert sha256_file(inp) == before


# -- atomicity: failures and cancellation leave nothing ------------------------------------------


@pytest.mark.parametrize("existed_before", [False, True], ids=["new-dir", "existing-dir"])
def test_failure_while_writing_leaves_nothing(existed_before, tmp_path, tiny_guided, small_volume, monkeypatch, capsys):
    out = tmp_path / "deep" / "out"
    previous: set[str] = set()
    if existed_before:
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine", encoding="utf-8")
        previous = {"notes.txt"}
    real_write = volume_module.write_image_atomic
    calls = []

    def failing_write(image, path, *a, **kw):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OutputError(f"cannot write {path}: disk full (simulated)")
        return real_write(image, path, *a, **kw)

    monkeypatch.setattr(volume_module, "write_image_atomic", failing_write)
    assert main(_segment_argv(small_volume, out, tiny_guided)) == OutputError.exit_code
    _assert_one_error_line(capsys.readouterr().err, "disk full")
    assert calls == ["segmentation.nii.gz", "uncertainty.nii.gz"]
    _assert_no_outputs(out, existed_before, previous)
    if not existed_before:
        assert not (tmp_path / "deep").exists()  # every folder the run created is gone


def test_cancel_during_network_leaves_nothing(tmp_path, tiny_guided, small_volume):
    out = tmp_path / "out"
    seen = []

    def progress(stage, fraction, message):
        seen.append(stage)

    with pytest.raises(Cancelled):
        run_segment(small_volume, out, ["liver"], model=tiny_guided, device="cpu", progress=progress,
                    should_cancel=lambda: "network" in seen)
    assert "network" in seen
    _assert_no_outputs(out)


def test_cancel_while_writing_leaves_nothing(tmp_path, tiny_guided, small_volume):
    out = tmp_path / "out"
    seen = []
    with pytest.raises(Cancelled):
        run_segment(small_volume, out, ["liver"], model=tiny_guided, device="cpu",
                    progress=lambda s, f, m: seen.append((s, m)),
                    should_cancel=lambda: any(m.startswith("wrote") for _, m in seen))
    _assert_no_outputs(out)


def test_ctrl_c_exits_130_and_leaves_nothing(tmp_path, tiny_guided, small_volume, monkeypatch, capsys):
    """A real SIGINT during sampling: the CLI's handler asks the engine to stop; exit 130, no files."""
    real_segment = engine_module.segment_volume

    def segment_with_interrupt(*args, progress=None, **kw):
        sent = []

        def progress_and_interrupt(stage, fraction, message):
            if stage == "network" and not sent:
                sent.append(True)
                signal.raise_signal(signal.SIGINT)
            if progress is not None:
                progress(stage, fraction, message)

        return real_segment(*args, progress=progress_and_interrupt, **kw)

    monkeypatch.setattr(engine_module, "segment_volume", segment_with_interrupt)
    out = tmp_path / "out"
    # Python's default handler, or SIG_IGN when the test run was started in the background (nohup, &)
    before = signal.getsignal(signal.SIGINT)
    assert main(_segment_argv(small_volume, out, tiny_guided)) == Cancelled.exit_code
    err = capsys.readouterr().err
    assert "cancelling" in err and "meddiffseg: error: segmentation cancelled" in err
    _assert_no_outputs(out)
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_keyboard_interrupt_exits_130(tmp_path, tiny_guided, small_volume, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module, "segment_volume", interrupted)
    out = tmp_path / "out"
    assert main(_segment_argv(small_volume, out, tiny_guided)) == Cancelled.exit_code
    _assert_one_error_line(capsys.readouterr().err, "interrupted")
    _assert_no_outputs(out)


def test_progress_is_monotone_and_complete(tmp_path, tiny_guided, small_volume):
    events = []
    run_segment(small_volume, tmp_path / "out", ["spleen"], model=tiny_guided, device="cpu",
                progress=lambda s, f, m: events.append((s, f)))
    stages = [s for s, _ in events]
    for stage in ("read", "load", "preprocess", "network", "postprocess", "write"):
        assert stage in stages
    fractions = [f for _, f in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


# -- end to end on real data --------------------------------------------------------------------


def _check_outputs(out: Path, reference: sitk.Image, n_organs: int, *, exact: bool) -> dict:
    assert OUTPUTS <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    unc = sitk.ReadImage(str(out / "uncertainty.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert unc.GetPixelID() == sitk.sitkFloat32
    for img in (seg, unc):
        assert img.GetSize() == reference.GetSize()
        if exact:
            assert img.GetSpacing() == reference.GetSpacing()
            assert img.GetOrigin() == reference.GetOrigin()
            assert img.GetDirection() == reference.GetDirection()
        else:  # NIfTI stores geometry in float32: a DICOM's float64 geometry round-trips to ~1e-6
            np.testing.assert_allclose(img.GetSpacing(), reference.GetSpacing(), rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(img.GetOrigin(), reference.GetOrigin(), rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(img.GetDirection(), reference.GetDirection(), atol=1e-6)
        # the physical position of the far corner voxel agrees too (voxel-for-voxel alignment)
        corner = [s - 1 for s in reference.GetSize()]
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(corner),
                                   reference.TransformIndexToPhysicalPoint(corner), atol=1e-3)
    labels = sitk.GetArrayFromImage(seg)
    assert set(np.unique(labels).tolist()) <= set(range(n_organs + 1))
    u = sitk.GetArrayFromImage(unc)
    assert np.isfinite(u).all() and (u >= 0).all()
    from MedDiffSegLib.uncertainty.ensemble import STORAGE_VARIANCE_FLOOR
    assert ((u == 0) | (u >= np.float32(STORAGE_VARIANCE_FLOOR))).all()  # written without the variance dust

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    voxel_ml = float(np.prod(seg.GetSpacing())) / 1000.0
    assert [o["label"] for o in summary["organs"]] == list(range(1, n_organs + 1))
    for o in summary["organs"]:
        count = int((labels == o["label"]).sum())
        assert o["voxel_count"] == count
        assert o["volume_ml"] == pytest.approx(count * voxel_ml, rel=1e-6)
        for key in ("name", "display_name", "mean_uncertainty", "max_uncertainty_slice"):
            assert key in o
        if count:
            assert o["mean_uncertainty"] == pytest.approx(float(u[labels == o["label"]].mean()), rel=1e-4, abs=1e-7)
            assert 0 <= o["max_uncertainty_slice"] < reference.GetSize()[2 - o["slice_axis"]]
        if o["slice_axis"] is not None:  # the same axis as ITK and Slicer name it: numpy axis 0 is K
            assert o["slice_axis_ijk"] == "IJK"[2 - o["slice_axis"]]
    for key in ("read", "preprocess", "network", "postprocess", "write", "total"):
        assert summary["timings_s"][key] >= 0
    assert summary["timings_s"]["total"] >= summary["timings_s"]["network"]
    assert set(summary["model"]) >= {"name", "version", "weights_sha256"}
    assert set(summary["settings"]) >= {"samples", "steps", "scheduler", "seed", "device"}
    assert summary["software"]["torch"] == torch.__version__
    assert summary["input"]["size"] == list(reference.GetSize())
    assert summary["input"]["spacing_mm"] == pytest.approx(list(reference.GetSpacing()))
    return summary


def test_end_to_end_nifti(tmp_path, tiny_guided, data_dir, capsys):
    ct = data_dir / "totalsegmentator" / "example_ct.nii.gz"
    before = sha256_file(ct)
    out = tmp_path / "out"
    argv = ["segment", str(ct), "--organ", "spleen", "--organ", "liver", "--out", str(out), "--model", str(tiny_guided),
            "--samples", "2", "--steps", "1", "--seed", "7", "--device", "cpu", "--save-probabilities"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Spleen" in stdout and "Liver" in stdout and "volume (mL)" in stdout
    assert "(CT model; input CT from its intensities)" in stdout
    assert "most uncertain slice (IJK)" in stdout
    ref = sitk.ReadImage(str(ct))
    summary = _check_outputs(out, ref, 2, exact=True)
    assert [o["name"] for o in summary["organs"]] == ["spleen", "liver"]
    assert {o["slice_axis_ijk"] for o in summary["organs"]} == {"K"}  # an axial CT: its slices run along K
    for o in summary["organs"]:
        if o["max_uncertainty_slice"] is not None:
            assert f"{o['display_name']}" in stdout and f"K {o['max_uncertainty_slice']}" in stdout
    assert summary["settings"]["samples"] == 2 and summary["settings"]["steps"] == 1
    assert summary["settings"]["seed"] == 7
    assert summary["model"]["weights_sha256"] == sha256_file(tiny_guided / "weights.safetensors")
    for organ in ("spleen", "liver"):
        prob = sitk.ReadImage(str(out / f"probability_{organ}.nii.gz"))
        assert prob.GetPixelID() == sitk.sitkFloat32 and prob.GetSize() == ref.GetSize()
        p = sitk.GetArrayFromImage(prob)
        assert p.min() >= 0 and p.max() <= 1
    # the input's path is recorded once (for `meddiffseg refine`), as an absolute path
    assert summary["input"]["path"] == str(Path(ct).absolute())
    assert (out / "summary.json").read_text().count(str(ct)) == 1
    assert sha256_file(ct) == before
    # no tag, no --modality: the intensities (plausible HU) say CT, and the CT model fits
    assert summary["input"]["modality"] == "CT" and summary["input"]["modality_source"] == "intensities"
    assert summary["model"]["modality"] == "CT"
    assert summary["modality_check"] == {"model_modality": "CT", "hu_plausible": True, "mismatch": False,
                                         "overridden": False, "reason": None}


def test_end_to_end_dicom_folder(tmp_path, tiny_sdseg, data_dir):
    folder = data_dir / "totalsegmentator" / "example_ct_dicom"
    listing = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir())
    out = tmp_path / "out"
    assert main(_segment_argv(folder, out, tiny_sdseg, "--samples", "2", "--largest-component")) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    summary = _check_outputs(out, ref, 1, exact=False)
    assert summary["input"]["kind"] == "dicom-series"
    assert sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()) == listing
    # No patient data in the summary: none of the identifying header values appear in it.
    text = (out / "summary.json").read_text(encoding="utf-8")
    header = sitk.ImageFileReader()
    header.SetFileName(str(sorted(folder.iterdir())[0]))
    header.LoadPrivateTagsOn()
    header.ReadImageInformation()
    for tag in ("0010|0010", "0010|0020", "0010|0030", "0008|0020", "0020|000d", "0020|000e", "0008|0018"):
        if header.HasMetaDataKey(tag):
            value = header.GetMetaData(tag).strip()
            if len(value) >= 4:
                assert value not in text, tag
    # The input's path is recorded once, where `meddiffseg refine` finds the image again.
    assert summary["input"]["path"] == str(folder.absolute()) and text.count(str(folder)) == 1


def test_rerun_replaces_outputs_and_keeps_other_files(tmp_path, tiny_guided, small_volume):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    s1 = run_segment(small_volume, out, ["liver"], model=tiny_guided, device="cpu", seed=1)
    s2 = run_segment(small_volume, out, ["liver"], model=tiny_guided, device="cpu", seed=1)
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"notes.txt"}
    assert s1["organs"] == s2["organs"]  # same seed, same result


def test_a_preloaded_method_gives_the_same_outputs_without_hashing_the_weights_again(tmp_path, tiny_guided,
                                                                                      small_volume, monkeypatch):
    from MedDiffSegLib.registry import ModelPackage

    package = ModelPackage.from_folder(tiny_guided)
    plain = run_segment(small_volume, tmp_path / "plain", ["liver"], model=package, device="cpu", seed=3, samples=2)
    method = package.load_method("cpu")
    verified = []
    monkeypatch.setattr(ModelPackage, "verify", lambda self: verified.append(self.name))
    reused = [run_segment(small_volume, tmp_path / f"reused{i}", ["liver"], model=package, method=method,
                          device="cpu", seed=3, samples=2) for i in range(2)]
    assert verified == []  # checked once, when the method was loaded
    for i, summary in enumerate(reused):
        assert summary["organs"] == plain["organs"] and summary["settings"] == plain["settings"]
        for name in ("segmentation.nii.gz", "uncertainty.nii.gz"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "plain" / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"reused{i}" / name)))
            assert np.array_equal(a, b), name
    with pytest.raises(TypeError, match="needs the ModelPackage it was loaded from"):
        run_segment(small_volume, tmp_path / "x", ["liver"], model=str(tiny_guided), method=method, device="cpu")
    assert not (tmp_path / "x").exists()


def test_refuses_to_write_into_the_input_dicom_folder(tmp_path, tiny_guided, data_dir):
    src = data_dir / "totalsegmentator" / "example_ct_dicom"
    folder = tmp_path / "series"
    folder.mkdir()
    for f in src.iterdir():
        (folder / f.name).symlink_to(f)
    with pytest.raises(OutputError, match="is the input DICOM folder"):
        run_segment(folder, folder, ["liver"], model=tiny_guided, device="cpu")
    assert all(p.is_symlink() for p in folder.iterdir())


# -- the installed console script (one real subprocess) ------------------------------------------


def test_console_script(tmp_path, tiny_guided, small_volume):
    exe = Path(sys.executable).with_name("meddiffseg")
    if not exe.exists():
        found = shutil.which("meddiffseg")
        if not found:
            pytest.skip("the meddiffseg console script is not installed (pip install -e .)")
        exe = Path(found)
    env = dict(os.environ)
    help_run = subprocess.run([str(exe), "segment", "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=120)
    assert help_run.returncode == 0
    for text in ("--organ", "--samples", "uncertainty.nii.gz", "exit codes", "--device", "--modality",
                 "--allow-modality-mismatch"):
        assert text in help_run.stdout
    out = tmp_path / "out"
    run = subprocess.run([str(exe), *_segment_argv(small_volume, out, tiny_guided, "--samples", "2", "--steps", "1")],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and run.stderr == ""  # --quiet, and no bar when stderr is not a terminal
    assert {p.name for p in out.iterdir()} == OUTPUTS
    bad = subprocess.run([str(exe), *_segment_argv(small_volume, tmp_path / "o2", tiny_guided, "--samples", "0")],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("meddiffseg: error: samples must be at least 1")
    assert not (tmp_path / "o2").exists()


def test_segment_output_names_slices_to_review(capsys):
    """The missed-structure runs of summary.json are printed as a line a reader can act on."""
    from MedDiffSegLib.cli.main import _print_segment_result

    organ = {"label": 1, "name": "liver", "display_name": "Liver", "volume_ml": 1500.0, "mean_uncertainty": None,
             "max_uncertainty_slice": None, "slice_axis": 0, "slice_axis_ijk": "K",
             "possible_continuation": [{"kind": "beyond_mask", "side": "superior", "slices": [88, 89, 90],
                                        "extent_mm": 7.5, "area_mm2": [300.0, 200.0, 120.0], "peak_slice": 88,
                                        "peak_position_mm": [0.0, 0.0, 10.0]}]}
    summary = {"outputs": {"segmentation": "segmentation.nii.gz", "uncertainty": "uncertainty.nii.gz", "probabilities": {}},
               "organs": [organ, {**organ, "label": 2, "name": "spleen", "display_name": "Spleen",
                                  "possible_continuation": []}],
               "settings": {"samples": 1, "steps": 1, "seed": 0, "device": "cpu"}, "model": {"name": "m", "version": "1"},
               "timings_s": {"total": 1.0}, "input": {}, "modality_check": {}}
    _print_segment_result(summary, "out")
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("review")]
    assert lines == ["review Liver: the organ probably continues beyond its superior end, unsegmented, on slices "
                     "K 88-90 (8 mm, clearest on K 88)"]
    # a 1-sample run says plainly that there is no uncertainty map, and how to get one
    assert "no uncertainty map: 1 sample cannot disagree with itself" in out and "--samples 5 (the default)" in out
    for kind, text in (("gap", "the organ probably continues through a gap in the segmentation on slice K 40"),
                       ("not_segmented", "nothing was segmented, but the organ is probably there on slice K 40")):
        run = {"kind": kind, "side": None, "slices": [40], "extent_mm": 2.5, "area_mm2": [80.0], "peak_slice": 40,
               "peak_position_mm": [0.0, 0.0, 0.0]}
        _print_segment_result({**summary, "organs": [{**organ, "possible_continuation": [run]}]}, "out")
        assert f"review Liver: {text} (2 mm, clearest on K 40)" in capsys.readouterr().out
