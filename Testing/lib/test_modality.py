"""Modality of models and inputs (``MedDiffSegLib.modality``): the HU plausibility check on every real
volume, the default-model rule, combining a DICOM tag with a declared modality, and the mismatch rules."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib import modality as mod
from MedDiffSegLib.errors import InputError, MedDiffSegError, ModalityMismatchError, ModelError
from MedDiffSegLib.io import read_volume
from MedDiffSegLib.modality import (
    DEFAULT_MODELS,
    FALLBACK_MODELS,
    InputModality,
    check_model_fits,
    dicom_modality,
    hu_plausibility,
    input_modality,
    pick_default,
    read_package_modality,
)

REPO = Path(__file__).resolve().parents[2]

# -- every real volume beside the project --------------------------------------------------------------


def _real_volumes() -> tuple[list[str], list[str]]:
    """Paths relative to the data root (listed at collection time; the data_dir fixture skips without data)."""
    root = Path(os.environ.get("MEDDIFFSEG_DATA", REPO.parent / "shared" / "data"))  # as Testing/conftest.py
    cts = [f"btcv/imagesTr/{p.name}" for p in sorted((root / "btcv" / "imagesTr").glob("*.nii.gz"))]
    cts += [f"totalsegmentator/{p.name}" for p in sorted((root / "totalsegmentator").glob("example_ct*.nii.gz"))]
    cts += ["totalsegmentator/example_ct_dicom", "dcmqi/ct-3slice"]
    mrs = [f"chaos_mr/imagesTr/{p.name}" for p in sorted((root / "chaos_mr" / "imagesTr").glob("*.nii.gz"))]
    mrs += ["totalsegmentator/example_mr_sm.nii.gz"]
    return cts, mrs


REAL_CTS, REAL_MRS = _real_volumes()


def test_the_real_data_has_every_expected_volume(data_dir):
    """Every image of the data folder is in the lists below: each BTCV and CHAOS case its dataset.json lists,
    the TotalSegmentator CT files, and the two DICOM CT series; the TotalSegmentator MR."""
    count = {name: json.loads((data_dir / name / "dataset.json").read_text())["numTraining"] for name in ("btcv", "chaos_mr")}
    assert len([r for r in REAL_CTS if r.startswith("btcv/")]) == count["btcv"] > 0
    assert len([r for r in REAL_MRS if r.startswith("chaos_mr/")]) == count["chaos_mr"] > 0
    assert len(REAL_CTS) == count["btcv"] + 4, REAL_CTS  # + example_ct, example_ct_sm, 2 DICOM series
    assert len(REAL_MRS) == count["chaos_mr"] + 1, REAL_MRS
    images = {f"totalsegmentator/{p.name}" for p in (data_dir / "totalsegmentator").glob("example_*.nii.gz")
              if "_seg" not in p.name}
    assert images <= set(REAL_CTS) | set(REAL_MRS)


def _models(modality: str) -> list[str]:
    """The installed models of a modality, as the CLI lists them in a refusal (the shipped ones here)."""
    from MedDiffSegLib.registry import list_package_infos, models_for_modality

    return [p.name for p in models_for_modality(modality, list_package_infos())]


def _check_declared_both_ways(path: Path, truth: str, hu) -> None:
    """The modality declared right passes with the default model of that modality; declared wrong, the
    default model of the wrong modality refuses it, naming the right models and the flag (a DICOM series'
    tag is its declaration: contradicting it is refused before any model is chosen)."""
    wrong = "MR" if truth == "CT" else "CT"
    tag = dicom_modality(path)
    source = "dicom" if tag else "declared"
    assert tag in ("", truth), (path, tag)
    right = input_modality(dicom_tag=tag, declared=truth)
    check = check_model_fits(truth, DEFAULT_MODELS[truth], right, hu=hu, fitting_models=_models)
    assert not check.mismatch and check.input_modality == truth and check.input_source == source
    if tag:
        with pytest.raises(InputError, match=f"--modality {wrong} contradicts the DICOM Modality tag {truth}"):
            input_modality(dicom_tag=tag, declared=wrong, shown=str(path))
        lied = InputModality(wrong, "dicom", wrong)  # as if the series were tagged wrong
        flag = f"pass --modality {truth} with --allow-modality-mismatch"
    else:
        lied = input_modality(declared=wrong)
        flag = f"pass --modality {truth};"
    with pytest.raises(ModalityMismatchError) as exc:
        check_model_fits(wrong, DEFAULT_MODELS[wrong], lied, hu=hu, fitting_models=_models)
    msg = str(exc.value)
    assert f"if it is a{'n' if truth == 'MR' else ''} {truth}, {flag}" in msg, msg
    assert f"installed {truth} models: {DEFAULT_MODELS[truth]} (the default)" in msg, msg
    assert "--allow-modality-mismatch" in msg and "\n" not in msg


@pytest.mark.parametrize("rel", REAL_CTS)
def test_every_real_ct_is_plausible_as_hu_and_declared_mr_is_refused(rel, data_dir):
    """Including BTCV, clipped to [-125, 275] HU: air and fat saturate at -125, still 'dark'."""
    image = read_volume(data_dir / rel)  # kept alive: the array view does not own the voxels
    check = hu_plausibility(sitk.GetArrayViewFromImage(image))
    assert check.plausible is True, (rel, check)
    assert check.dark_fraction > 0.5 and 0 <= check.tissue_median <= 100, (rel, check)
    _check_declared_both_ways(data_dir / rel, "CT", check)


@pytest.mark.parametrize("rel", REAL_MRS)
def test_every_real_mr_is_flagged_as_not_hu_and_declared_ct_is_refused(rel, data_dir):
    image = read_volume(data_dir / rel)
    check = hu_plausibility(sitk.GetArrayViewFromImage(image))
    assert check.plausible is False, (rel, check)
    assert check.dark_fraction < 0.001 and "at or below -50" in check.reason
    _check_declared_both_ways(data_dir / rel, "MR", check)


def test_hu_check_on_synthetic_cases():
    rng = np.random.default_rng(0)
    body = rng.normal(40, 30, (8, 64, 64)).astype(np.float32)
    ct = body.copy()
    ct[:, :, :16] = -1000  # air beside the body
    assert hu_plausibility(ct).plausible
    # scanner padding (-3024 / -32768 outside the reconstructed circle) is ignored, not counted as air
    padded = ct.copy()
    padded[:, :8, :] = -32768
    assert hu_plausibility(padded).plausible
    only_padding_and_tissue = body.copy()
    only_padding_and_tissue[:, :, :32] = -3024
    assert hu_plausibility(only_padding_and_tissue).plausible is False
    # a CT stored without its rescale intercept (air at 0, tissue about 1064) is not HU
    assert not hu_plausibility((ct + 1024).astype(np.int16)).plausible
    # air and values that are all far too bright: the soft-tissue median gives it away
    bright = ct.copy()
    bright[:, :, 16:] += 3000
    check = hu_plausibility(bright)
    assert not check.plausible and "median" in check.reason
    # a z-scored MR (negative values, but none near -50) is not HU
    z = (body - body.mean()) / body.std()
    assert not hu_plausibility(z).plausible
    # one value (blank) or nothing but padding: inconclusive, refuses no model
    for blank in (np.zeros((0,), np.float32), np.zeros((3, 8, 8), np.int16), np.full((3, 8, 8), -1000, np.int16),
                  np.full((3, 8, 8), -3024, np.int16)):
        assert hu_plausibility(blank).plausible is None
    air_and_fat = np.where(np.arange(192).reshape(3, 8, 8) % 2, -1000, -100).astype(np.int16)
    assert hu_plausibility(air_and_fat).plausible is True  # no soft tissue, but no MR looks like this
    nan = ct.copy()
    nan[0] = np.nan
    assert hu_plausibility(nan).plausible


def test_hu_check_samples_large_volumes_the_same_way_every_time(monkeypatch):
    monkeypatch.setattr(mod, "MAX_SAMPLE", 10_000)
    arr = np.full((20, 100, 100), 40, np.int16)
    arr[:, :, :30] = -1000
    first, second = hu_plausibility(arr), hu_plausibility(arr)
    assert first == second and first.plausible
    assert first.dark_fraction == pytest.approx(0.3, abs=0.02)


# -- DICOM tag ----------------------------------------------------------------------------------------------


def test_dicom_modality_of_series_folders_files_and_plain_files(data_dir):
    assert dicom_modality(data_dir / "totalsegmentator" / "example_ct_dicom") == "CT"
    assert dicom_modality(data_dir / "dcmqi" / "ct-3slice") == "CT"
    assert dicom_modality(data_dir / "dcmqi" / "ct-3slice" / "01.dcm") == "CT"
    assert dicom_modality(data_dir / "dcmqi" / "liver.dcm") == "SEG"
    assert dicom_modality(data_dir / "totalsegmentator" / "example_mr_sm.nii.gz") == ""
    assert dicom_modality(data_dir / "no-such-folder") == ""


def test_input_modality_combines_tag_and_declaration(caplog):
    assert input_modality() == InputModality(None, None, "")
    assert input_modality(declared="mr") == InputModality("MR", "declared", "")
    assert input_modality(dicom_tag="CT") == InputModality("CT", "dicom", "CT")
    assert input_modality(dicom_tag="CT", declared="CT") == InputModality("CT", "dicom", "CT")
    with pytest.raises(InputError, match="--modality MR contradicts the DICOM Modality tag CT"):
        input_modality(dicom_tag="CT", declared="MR", shown="series/")
    with caplog.at_level(logging.WARNING, logger="MedDiffSegLib.modality"):
        assert input_modality(dicom_tag="CT", declared="MR", allow_mismatch=True).modality == "MR"
    assert "treated as MR" in caplog.text
    with pytest.raises(InputError, match="is a DICOM PT series"):
        input_modality(dicom_tag="PT", shown="pet/")
    with pytest.raises(InputError, match="is a DICOM PT series"):
        input_modality(dicom_tag="PT", declared="CT")  # declaring needs the override too
    assert input_modality(dicom_tag="PT", declared="CT", allow_mismatch=True) == InputModality("CT", "declared", "PT")
    with pytest.raises(MedDiffSegError, match="must be CT or MR"):
        input_modality(declared="PET")
    assert mod.normalise_modality("MRI") == "MR"


# -- default model --------------------------------------------------------------------------------------------


def test_default_rule_named_default_then_fallback_then_the_only_one():
    assert DEFAULT_MODELS == {"CT": "abdomen-ct", "MR": "abdomen-mr"}
    assert FALLBACK_MODELS["CT"] == ("abdomen-ct-guided",) and FALLBACK_MODELS["MR"] == ()
    shipped_today = {"abdomen-ct-guided": "CT", "abdomen-ct-dts": "CT", "abdomen-ct-meddelinea": "CT"}
    assert pick_default("CT", shipped_today) == "abdomen-ct-guided"  # the fallback until abdomen-ct lands
    assert pick_default("CT", {**shipped_today, "abdomen-ct": "CT"}) == "abdomen-ct"
    assert pick_default("MR", shipped_today) is None
    assert pick_default("MR", {**shipped_today, "abdomen-mr": "MR", "site-mr": "MR"}) == "abdomen-mr"
    assert pick_default("MR", {**shipped_today, "site-mr": "MR"}) == "site-mr"  # the only MR model
    assert pick_default("MR", {"site-mr": "MR", "other-mr": "MR"}) is None  # several: no guess
    assert pick_default("MR", {"abdomen-mr": "CT"}) is None  # a package must declare the modality
    assert pick_default("ct", {"x": "CT"}) == "x"
    msg = mod.missing_default_message("MR", shipped_today)
    assert msg.startswith("no MR model is installed") and "'abdomen-mr'" in msg and "abdomen-ct-guided (CT)" in msg
    msg = mod.missing_default_message("MR", {"site-mr": "MR", "other-mr": "MR"})
    assert "other-mr, site-mr" in msg and "--model" in msg


def test_read_package_modality_reads_model_json(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"preprocessing": {"modality": "MR"}}))
    assert read_package_modality(tmp_path) == "MR"
    (tmp_path / "model.json").write_text(json.dumps({"preprocessing": {}}))
    assert read_package_modality(tmp_path) == "CT"  # PreprocessSpec's default
    (tmp_path / "model.json").write_text(json.dumps({"preprocessing": {"modality": "PET"}}))
    with pytest.raises(ModelError, match="PET"):
        read_package_modality(tmp_path)
    with pytest.raises(ModelError, match="cannot read"):
        read_package_modality(tmp_path / "missing")


def test_modalities_match_the_preprocessing_spec():
    from MedDiffSegLib.preprocessing.spec import MODALITIES

    assert tuple(MODALITIES) == mod.MODALITIES


def test_modality_module_imports_neither_torch_nor_numpy():
    code = ("import sys, MedDiffSegLib.modality, MedDiffSegLib.cli.main; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, "
            "sorted(m for m in sys.modules if m in ('torch', 'numpy'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr


# -- model vs input ---------------------------------------------------------------------------------------------

CT_LIKE = np.where(np.arange(4000).reshape(10, 20, 20) % 3 == 0, -1000, 40).astype(np.int16)
MR_LIKE = (np.arange(4000).reshape(10, 20, 20) % 500).astype(np.float32)
UNKNOWN = InputModality(None, None, "")


def _fitting(m):
    return {"CT": ["abdomen-ct-guided", "site-ct"], "MR": []}[m]


def test_an_inconclusive_input_refuses_no_model():
    blank = np.zeros((3, 8, 8), np.int16)
    for model in ("CT", "MR"):
        check = check_model_fits(model, "m", UNKNOWN, blank)
        assert not check.mismatch and check.input_modality is None and check.to_dict()["hu_plausible"] is None
    with pytest.raises(ModalityMismatchError):  # a tag or a declaration still counts
        check_model_fits("CT", "m", InputModality("MR", "declared"), blank)


def test_matching_inputs_pass():
    for info in (UNKNOWN, InputModality("CT", "dicom", "CT"), InputModality("CT", "declared")):
        check = check_model_fits("CT", "ct-model", info, CT_LIKE)
        assert not check.mismatch and check.input_modality == "CT"
    assert check_model_fits("CT", "ct-model", UNKNOWN, CT_LIKE).input_source == "intensities"
    for info in (UNKNOWN, InputModality("MR", "dicom", "MR"), InputModality("MR", "declared")):
        assert not check_model_fits("MR", "mr-model", info, MR_LIKE).mismatch
    # a matching model whose intensities cannot tell (one value) passes on the tag or declaration alone
    blank = np.zeros((3, 8, 8), np.int16)
    assert not check_model_fits("MR", "mr-model", InputModality("MR", "declared"), blank).mismatch
    assert not check_model_fits("CT", "ct-model", InputModality("CT", "dicom", "CT"), blank).mismatch
    unknown = check_model_fits("MR", "mr-model", UNKNOWN, MR_LIKE)
    assert unknown.input_modality is None and unknown.to_dict()["hu_plausible"] is False


CT_MODELS = "installed CT models: abdomen-ct-guided (the default), site-ct"
NO_MR = "no MR model is installed"
HU_LIKE = "its intensities look like a CT in Hounsfield units"
NOT_HU = "its intensities are implausible as Hounsfield units"


@pytest.mark.parametrize("model,info,array,fragment,named", [
    ("CT", InputModality("MR", "dicom", "MR"), MR_LIKE, "the input is MR (its DICOM Modality tag)", NO_MR),
    ("CT", InputModality("MR", "declared"), MR_LIKE, "the input is MR (--modality)", NO_MR),
    ("CT", UNKNOWN, MR_LIKE, "the input's intensities are implausible as Hounsfield units",
     "if it is an MR, pass --modality MR instead of --model"),
    ("CT", InputModality("CT", "dicom", "CT"), MR_LIKE, f"and the input is CT (its DICOM Modality tag), but {NOT_HU}",
     "if it is an MR, pass --modality MR with --allow-modality-mismatch (overriding its DICOM Modality tag CT)"),
    ("CT", InputModality("CT", "declared"), MR_LIKE, f"and the input is CT (--modality), but {NOT_HU}",
     "if it is an MR, pass --modality MR; no MR model is installed"),
    ("MR", InputModality("CT", "dicom", "CT"), CT_LIKE, "the input is CT (its DICOM Modality tag)", CT_MODELS),
    ("MR", InputModality("CT", "declared"), CT_LIKE, "the input is CT (--modality)", CT_MODELS),
    ("MR", InputModality("CT", "declared"), MR_LIKE, f"the input is CT (--modality), but {NOT_HU}",
     "if it is an MR, pass --modality MR"),
    ("MR", UNKNOWN, CT_LIKE, "the input's intensities look like a CT in Hounsfield units",
     f"if it is a CT, pass --modality CT instead of --model (the default CT model is used) or choose one with "
     f"--model; {CT_MODELS}"),
    # HU intensities contradict a declared or tagged MR, as implausible ones contradict CT (issue #25)
    ("MR", InputModality("MR", "declared"), CT_LIKE, f"and the input is MR (--modality), but {HU_LIKE}",
     f"if it is a CT, pass --modality CT; {CT_MODELS}"),
    ("MR", InputModality("MR", "dicom", "MR"), CT_LIKE, f"and the input is MR (its DICOM Modality tag), but {HU_LIKE}",
     f"if it is a CT, pass --modality CT with --allow-modality-mismatch (overriding its DICOM Modality tag MR); "
     f"{CT_MODELS}"),
    ("CT", InputModality("MR", "declared"), CT_LIKE, f", the input is MR (--modality), but {HU_LIKE}",
     f"if it is a CT, pass --modality CT; {CT_MODELS}"),
], ids=["ct-model-mr-tag", "ct-model-mr-declared", "ct-model-not-hu", "ct-tag-not-hu", "ct-declared-not-hu",
        "mr-model-ct-tag", "mr-model-ct-declared", "mr-model-ct-declared-not-hu", "mr-model-hu-intensities",
        "mr-declared-hu", "mr-tag-hu", "ct-model-mr-declared-hu"])
def test_mismatches_stop_with_the_fitting_models_and_can_be_overridden(model, info, array, fragment, named, caplog):
    with pytest.raises(ModalityMismatchError) as exc:
        check_model_fits(model, "the-model", info, array, fitting_models=_fitting)
    msg = str(exc.value)
    assert f"'the-model' is a{'n' if model == 'MR' else ''} {model} model" in msg and fragment in msg, msg
    assert "--allow-modality-mismatch" in msg
    if named:
        assert named in msg
    assert isinstance(exc.value, ModelError) and exc.value.exit_code == ModelError.exit_code
    with caplog.at_level(logging.WARNING, logger="MedDiffSegLib.modality"):
        check = check_model_fits(model, "the-model", info, array, allow_mismatch=True, fitting_models=_fitting)
    assert check.mismatch and check.overridden and fragment in check.reason
    assert "modality mismatch overridden" in caplog.text
    assert check.to_dict()["overridden"] is True
