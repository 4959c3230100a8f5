"""The shipped default model segments real CT: organs where they are, in the input's geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.registry import ModelPackage
from MedDiffSegLib.registry.store import DEFAULT_MODEL, builtin_models_dir

TS_CODES = {"liver": 5, "spleen": 1}


def _package() -> ModelPackage:
    return ModelPackage.from_folder(builtin_models_dir() / DEFAULT_MODEL)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _segment(inp, out, *organs, samples=1):
    # no --model: the default CT model (--modality CT: a NIfTI file has no modality tag; a DICOM series agrees)
    argv = ["segment", str(inp), "--out", str(out), "--modality", "CT", "--samples", str(samples), "--seed", "0",
            "--device", "cpu", "--quiet"]
    for o in organs:
        argv += ["--organ", o]
    assert main(argv) == 0
    return sitk.ReadImage(str(out / "segmentation.nii.gz"))


def test_default_package_is_complete_and_verified():
    pkg = _package()
    pkg.verify()  # sha256 of the shipped weights
    assert pkg.method_name == "guided"
    assert {"liver", "spleen", "kidney_left", "kidney_right", "pancreas", "stomach", "gallbladder", "aorta"} <= set(pkg.organ_names)
    assert (pkg.path / "MODEL_CARD.md").is_file()
    unseen = pkg.metrics["evaluation"]["dcmqi-ct-3slice"]
    assert unseen["organs"]["liver"]["dice"] >= 0.9
    assert (pkg.path / "weights.safetensors").stat().st_size < 50 * 2**20


def test_training_ct_liver_and_spleen_where_the_labels_are(data_dir, tmp_path):
    ts = data_dir / "totalsegmentator"
    image = sitk.ReadImage(str(ts / "example_ct.nii.gz"))
    seg = _segment(ts / "example_ct.nii.gz", tmp_path / "out", "liver", "spleen")
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(seg, get)(), getattr(image, get)(), atol=1e-4), get
    pred = sitk.GetArrayFromImage(seg)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg_fast_force_split.nii.gz")))
    liver = _dice(pred == 1, gt == TS_CODES["liver"])
    spleen = _dice(pred == 2, gt == TS_CODES["spleen"])
    assert liver >= 0.9, liver
    assert spleen >= 0.85, spleen
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["organs"][0]["name"] == "liver" and summary["organs"][0]["volume_ml"] > 800


def test_unseen_patient_liver(data_dir, tmp_path):
    """dcmqi's 3-slice CT: another patient, another source, never seen in training."""
    seg = _segment(data_dir / "dcmqi" / "ct-3slice", tmp_path / "out", "liver", samples=2)
    gt_img = sitk.ReadImage(str(data_dir / "dcmqi" / "liver_spine_seg.nrrd"))
    assert seg.GetSize() == gt_img.GetSize()
    assert np.allclose(seg.GetOrigin(), gt_img.GetOrigin(), atol=1e-3)
    dice = _dice(sitk.GetArrayFromImage(seg) == 1, sitk.GetArrayFromImage(gt_img) == 1)
    assert dice >= 0.85, dice


def test_dicom_series_end_to_end_keeps_the_series_geometry(data_dir, tmp_path):
    folder = data_dir / "totalsegmentator" / "example_ct_dicom"
    seg = _segment(folder, tmp_path / "out", "liver")
    from MedDiffSegLib.io import read_volume

    image = read_volume(folder)
    assert seg.GetSize() == image.GetSize()
    assert np.allclose(seg.GetSpacing(), image.GetSpacing(), atol=1e-5)
    assert np.allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-3)
    assert np.allclose(seg.GetDirection(), image.GetDirection(), atol=1e-6)
    # Liver where the (flipped-axis) TotalSegmentator label map has it, compared physically.
    gt = sitk.Resample(sitk.ReadImage(str(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz")), image,
                       sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    dice = _dice(sitk.GetArrayFromImage(seg) == 1, sitk.GetArrayFromImage(gt) == TS_CODES["liver"])
    assert dice >= 0.9, dice
