"""The shipped per-modality defaults on real patients: organs where they are, the input's geometry kept,
and the protocol scores their packages record reproduced on a test patient. The same record and
reproduction checks hold for every other shipped package scored under the protocol (the seed
methods retrained for issue #24)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.modality import DEFAULT_MODELS
from MedDiffSegLib.registry import ModelPackage
from MedDiffSegLib.registry.store import builtin_models_dir, default_model_for, read_package_info

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = json.loads((REPO / "bench" / "protocol.json").read_text(encoding="utf-8"))
#: The protocol dataset each default is trained and scored on.
DATASET = {"CT": "btcv", "MR": "chaos_mr"}
BENCHMARK_ORGANS = {"spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "aorta", "pancreas"}


#: Every shipped package that records protocol scores: the defaults, and the seed methods retrained under
#: the protocol (the older seed packages record the dcmqi evaluation instead: test_shipped_models.py).
PROTOCOL_SCORED = sorted(
    d.name for d in builtin_models_dir().iterdir()
    if (d / "model.json").is_file() and "protocol" in read_package_info(d).metrics)


def _package(modality: str) -> ModelPackage:
    return ModelPackage.from_folder(builtin_models_dir() / DEFAULT_MODELS[modality])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _segment(inp, out, organs, *extra):
    # 1 sample, as the protocol recorded the packages' scores (the CLI's default is 5)
    argv = ["segment", str(inp), "--out", str(out), "--seed", "0", "--samples", "1", "--device", "cpu", "--quiet",
            *extra]
    for o in organs:
        argv += ["--organ", o]
    assert main(argv) == 0
    return sitk.ReadImage(str(out / "segmentation.nii.gz"))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_default_package_is_the_real_data_model_and_is_verified(modality):
    pkg = _package(modality)
    pkg.verify()
    assert default_model_for(modality).name == pkg.name
    assert pkg.modality == modality and pkg.preprocessing.context_slices == 3
    if modality == "CT":
        assert BENCHMARK_ORGANS <= set(pkg.organ_names)
        assert pkg.preprocessing.ct_window == (-125.0, 275.0)  # BTCV's clipping: no saturation learned
    else:
        assert set(pkg.organ_names) == {"liver", "kidney_right", "kidney_left", "spleen"}


def test_the_defaults_are_among_the_protocol_scored_packages():
    assert set(DEFAULT_MODELS.values()) <= set(PROTOCOL_SCORED)


@pytest.mark.parametrize("name", PROTOCOL_SCORED)
def test_protocol_scored_package_records_its_test_patients_and_its_card_shows_them(name):
    pkg = ModelPackage.from_folder(builtin_models_dir() / name)
    pkg.verify()
    modality = pkg.modality
    # fp16 storage, within budget
    from safetensors import safe_open

    with safe_open(str(pkg.weights_path), framework="pt") as fh:
        dtypes = {str(fh.get_slice(k).get_dtype()) for k in fh.keys()}
    assert {d for d in dtypes if d.startswith(("F", "BF"))} == {"F16"}, dtypes  # integer buffers (indices) stay
    # trained on the protocol's training patients only; scored on its test patients
    d = PROTOCOL["datasets"][DATASET[modality]]
    trained = [c for e in pkg.provenance["data"]["train"] for c in e.get("cases", [])]
    # (the protocol's training list may have grown since: a package uses some of it, never a test patient)
    assert trained and set(trained) <= set(d["train"]) and not set(trained) & set(d["test"])
    result = pkg.metrics["protocol"]["results"][DATASET[modality]]
    assert result["role"] == "test" and result["cases"] == d["test"]
    card = (pkg.path / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Limitations" in card and f"`{pkg.name}`" in card and "test patients" in card
    for organ, v in result["per_seed"]["0"]["organs"].items():  # the card shows the recorded Dice of each organ
        assert _card_dice(card, pkg.name, organ) == f"{v['dice_mean']:.3f} ± {v['dice_sd']:.3f}", organ


def _card_dice(card: str, name: str, organ: str) -> str | None:
    """An organ's "mean ± sd" Dice as a model card shows it: a row per organ (``| organ | n | mean ± sd |``, the
    defaults' cards) or a column per organ in the package's row (bench/model_card.py's comparison table)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in card.splitlines() if line.startswith("|")]
    for row in rows:
        if row[0] == organ and len(row) > 2:
            return row[2]
    for i, header in enumerate(rows):
        if header[0] == "package" and organ in header:
            for row in rows[i + 2:]:
                if row[0] == f"`{name}`":
                    return row[header.index(organ)].split(" (")[0]
    return None


@pytest.mark.parametrize("name", PROTOCOL_SCORED)
def test_a_test_patient_reproduces_the_recorded_scores_in_the_input_geometry(name, data_dir, tmp_path):
    """The first test patient of the protocol, every organ prompted, seed 0, as bench/evaluate_protocol.py."""
    pkg = ModelPackage.from_folder(builtin_models_dir() / name)
    modality = pkg.modality
    d = PROTOCOL["datasets"][DATASET[modality]]
    case = d["test"][0]
    table = json.loads((data_dir / d["dataset"]).read_text(encoding="utf-8"))["labels"]
    image_path = data_dir / Path(d["dataset"]).parent / "imagesTr" / f"{case}.nii.gz"
    label_path = data_dir / Path(d["dataset"]).parent / "labelsTr" / f"{case}.nii.gz"
    if not image_path.is_file():
        pytest.skip(f"{image_path} not found")
    organs = [o for o in pkg.organ_names if o in table]
    # a default with no --model (the default for the declared modality); float32 arithmetic, as the scores
    # were recorded (a package's cpu_precision may pick bf16 on a CPU with bf16 units: within ~0.002)
    which = ["--modality", modality] if name == DEFAULT_MODELS[modality] else ["--model", name]
    seg = _segment(image_path, tmp_path / "out", organs, *which, "--precision", "fp32")
    image = sitk.ReadImage(str(image_path))
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(seg, get)(), getattr(image, get)(), atol=1e-6), get
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"]["name"] == pkg.name
    pred = sitk.GetArrayFromImage(seg)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
    recorded = pkg.metrics["protocol"]["results"][DATASET[modality]]["dice_per_case_first_seed"][case]
    for i, organ in enumerate(organs, 1):
        dice = _dice(pred == i, gt == table[organ])
        assert dice == pytest.approx(recorded[organ], abs=0.01), (organ, dice, recorded[organ])
    if which[0] == "--modality":  # a default: the liver well found (the weakest test patient: 0.78)
        assert _dice(pred == organs.index("liver") + 1, gt == table["liver"]) >= 0.7


def test_ct_default_finds_organs_on_a_non_contrast_ct_from_another_hospital(data_dir, tmp_path):
    """TotalSegmentator's example CT: non-contrast, another hospital; its labels are model-made."""
    ts = data_dir / "totalsegmentator"
    seg = _segment(ts / "example_ct.nii.gz", tmp_path / "out", ["liver", "spleen", "kidney_right", "kidney_left"],
                   "--modality", "CT")
    pred = sitk.GetArrayFromImage(seg)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg_fast_force_split.nii.gz")))
    for i, code in enumerate((5, 1, 2, 3), 1):  # TotalSegmentator's CT code table
        assert _dice(pred == i, gt == code) >= 0.6, (i, _dice(pred == i, gt == code))


def test_dicom_series_end_to_end_keeps_the_series_geometry(data_dir, tmp_path):
    """A DICOM CT series needs no --modality (its tag says CT) and the default CT model is used."""
    folder = data_dir / "totalsegmentator" / "example_ct_dicom"
    seg = _segment(folder, tmp_path / "out", ["liver"])
    from MedDiffSegLib.io import read_volume

    image = read_volume(folder)
    assert seg.GetSize() == image.GetSize()
    assert np.allclose(seg.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"]["name"] == DEFAULT_MODELS["CT"]
    gt = sitk.Resample(sitk.ReadImage(str(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz")), image,
                       sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    dice = _dice(sitk.GetArrayFromImage(seg) == 1, sitk.GetArrayFromImage(gt) == 5)
    assert dice >= 0.8, dice
