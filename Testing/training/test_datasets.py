"""dataset.json reading (Decathlon and nnU-Net v2 layouts), label tables, and the folder converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import OutputError
from MedDiffSegLib.training.data import SliceWindowSampler, load_labelled_volume
from MedDiffSegLib.training.datasets import (
    DatasetError,
    make_dataset,
    modality_of,
    read_dataset,
    read_label_table,
    volume_stem,
)
from MedDiffSegLib.preprocessing import PreprocessSpec


def _write(path: Path, arr, spacing=(1.0, 1.0, 2.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _pair(root: Path, case: str, image_name: str | None = None) -> None:
    img = np.full((4, 16, 16), -1000, np.int16)
    lab = np.zeros((4, 16, 16), np.uint8)
    img[:, 4:12, 4:12] = 60
    lab[:, 4:12, 4:12] = 1
    lab[1:3, 6:9, 6:9] = 2
    _write(root / "images" / (image_name or f"{case}.nii.gz"), img)
    _write(root / "labels" / f"{case}.nii.gz", lab)


# -- label tables ----------------------------------------------------------------------------------


def test_label_tables_csv_and_json(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("name,value\n# a comment\nliver,1\nspleen, 2\n")
    assert read_label_table(csv) == {"liver": 1, "spleen": 2}
    csv.write_text("1,liver\n2,spleen\n")  # value,name order
    assert read_label_table(csv) == {"liver": 1, "spleen": 2}
    js = tmp_path / "t.json"
    js.write_text(json.dumps({"background": 0, "liver": 1}))
    assert read_label_table(js) == {"liver": 1}
    js.write_text(json.dumps({"0": "background", "5": "liver"}))  # Decathlon value -> name
    assert read_label_table(js) == {"liver": 5}
    for bad in ({"liver": 1, "spleen": 1}, {"liver": 0}, {"liver": 1.5}, {"liver": [1, 2]}):
        js.write_text(json.dumps(bad))
        with pytest.raises(DatasetError):
            read_label_table(js)


def test_modality_and_stems():
    assert modality_of("CT") == "CT" and modality_of("MRI") == "MR" and modality_of("T2") == "MR"
    with pytest.raises(DatasetError):
        modality_of("PET")
    assert volume_stem("a.b.nii.gz") == "a.b" and volume_stem("x.nrrd") == "x" and volume_stem("notes.txt") is None


# -- reading dataset.json --------------------------------------------------------------------------


def test_read_decathlon_dataset(tmp_path):
    _pair(tmp_path, "c1")
    _pair(tmp_path, "c2")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "name": "Task99", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "numTraining": 2,
        "training": [{"image": "./images/c1.nii.gz", "label": "./labels/c1.nii.gz"},
                     {"image": "./images/c2.nii.gz", "label": "./labels/c2.nii.gz"}],
        "test": ["./images/c1.nii.gz"],
    }))
    ds = read_dataset(tmp_path)  # the folder works as well as the file
    assert ds.name == "Task99" and ds.modality == "CT" and ds.labels == {"liver": 1, "tumour": 2}
    assert [c.name for c in ds.cases()] == ["c1", "c2"] and ds.cases("validation") == []
    assert ds.cases()[0].image == tmp_path / "images" / "c1.nii.gz"


def test_read_nnunet_v2_dataset(tmp_path):
    _pair(tmp_path / "tmp", "case_001")
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "tmp" / "images" / "case_001.nii.gz").rename(tmp_path / "imagesTr" / "case_001_0000.nii.gz")
    (tmp_path / "tmp" / "labels").rename(tmp_path / "labelsTr")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 1, "file_ending": ".nii.gz"}))
    ds = read_dataset(tmp_path / "dataset.json")
    assert ds.modality == "MR" and ds.labels == {"liver": 1, "tumour": 2}
    (case,) = ds.cases()
    assert case.name == "case_001" and case.image.name == "case_001_0000.nii.gz"


@pytest.mark.parametrize("meta, words", [
    ({"modality": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "a"}, "training": []}, "2 input channels"),
    ({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "a"},
      "training": [{"image": "./nope.nii.gz", "label": "./nope_l.nii.gz"}]}, "missing files"),
    ({"labels": {"0": "background", "1": "a"}, "training": []}, "modality"),
    ({"modality": {"0": "CT"}, "labels": {"background": 0, "a": [1, 2]}, "training": []}, "region-based"),
])
def test_bad_dataset_json(tmp_path, meta, words):
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=words):
        read_dataset(tmp_path / "dataset.json")


# -- the converter ---------------------------------------------------------------------------------


def test_make_dataset_pairs_by_stem_and_holds_out_validation(tmp_path):
    for c in ("a", "b", "c"):
        _pair(tmp_path, c)
    _pair(tmp_path, "d", image_name="d_0000.nii.gz")  # nnU-Net image naming pairs too
    (tmp_path / "images" / "README.txt").write_text("not a volume")
    table = tmp_path / "labels.csv"
    table.write_text("liver,1\ntumour,2\n")
    ds = make_dataset(tmp_path / "images", tmp_path / "labels", table, tmp_path / "out" / "dataset.json",
                      modality="CT", validation_cases=["b"])
    assert [c.name for c in ds.cases("training")] == ["a", "c", "d"]
    assert [c.name for c in ds.cases("validation")] == ["b"]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert meta["modality"] == {"0": "CT"} and meta["numTraining"] == 3
    assert meta["training"][0]["image"] == "../images/a.nii.gz"  # relative to the dataset.json
    with pytest.raises(OutputError):  # no silent overwrite
        make_dataset(tmp_path / "images", tmp_path / "labels", table, tmp_path / "out" / "dataset.json", modality="CT")
    ds2 = make_dataset(tmp_path / "images", tmp_path / "labels", {"liver": 1}, tmp_path / "out2.json",
                       modality="CT", validation_fraction=0.5, seed=1)
    assert len(ds2.cases("validation")) == 2 and len(ds2.cases("training")) == 2


def test_make_dataset_reports_every_unpaired_file(tmp_path):
    _pair(tmp_path, "a")
    _write(tmp_path / "images" / "lonely_image.nii.gz", np.zeros((4, 8, 8), np.int16))
    _write(tmp_path / "labels" / "lonely_label.nrrd", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(DatasetError) as e:
        make_dataset(tmp_path / "images", tmp_path / "labels", {"liver": 1}, tmp_path / "d.json", modality="CT")
    assert "lonely_image.nii.gz" in str(e.value) and "lonely_label.nrrd" in str(e.value)
    assert not (tmp_path / "d.json").exists()


def test_make_dataset_checks_label_grid(tmp_path):
    _pair(tmp_path, "a")
    _write(tmp_path / "labels" / "a.nii.gz", np.zeros((4, 8, 8), np.uint8))  # wrong size
    with pytest.raises(DatasetError, match="does not match image"):
        make_dataset(tmp_path / "images", tmp_path / "labels", {"liver": 1}, tmp_path / "d.json", modality="CT")


def test_cli_make_dataset_then_load_per_organ_targets(tmp_path, capsys):
    for c in ("a", "b"):
        _pair(tmp_path, c)
    (tmp_path / "table.json").write_text(json.dumps({"liver": 1, "tumour": 2}))
    out = tmp_path / "ds" / "dataset.json"
    rc = main(["train", "make-dataset", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
               "--table", str(tmp_path / "table.json"), "--modality", "CT", "--out", str(out),
               "--validation-cases", "b"])
    assert rc == 0, capsys.readouterr().err
    assert "1 training and 1 validation" in capsys.readouterr().out
    ds = read_dataset(out)
    case = ds.cases()[0]
    # Per-organ binary targets go through the dataset's name table: model organ order (tumour, liver).
    vol = load_labelled_volume(case.image, case.label, ds.labels, ["tumour", "liver", "spleen"],
                               PreprocessSpec(spacing=(1.0, 1.0)))
    assert vol.labelled.tolist() == [True, True, False]
    assert int((vol.labels == 1).sum()) == 2 * 9  # tumour voxels → organ index 0 (+1)
    assert int((vol.labels == 2).sum()) == 4 * 64 - 2 * 9
    rc = main(["train", "make-dataset", "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "nope"),
               "--table", str(tmp_path / "table.json"), "--modality", "CT", "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_sampler_picks_datasets_uniformly():
    """One dataset of one volume beside one of three: each dataset gets half of the windows."""
    from MedDiffSegLib.training.data import LabelledVolume
    import torch

    def vol(name):
        lab = torch.zeros((2, 16, 16), dtype=torch.int16)
        lab[:, 4:8, 4:8] = 1
        return LabelledVolume(name, torch.zeros((2, 16, 16)), lab, np.array([[True], [True]]), np.array([True]))

    vols = [vol("solo"), vol("x1"), vol("x2"), vol("x3")]
    s = SliceWindowSampler(vols, 1, 16, seed=0, groups=[[0], [1, 2, 3]])
    picks = []
    orig = s._window
    s._window = lambda v, *a: (picks.append(v.name), orig(v, *a))[1]
    for _ in range(2000):
        s.draw()
    share = picks.count("solo") / len(picks)
    assert abs(share - 0.5) < 0.04
    assert {"x1", "x2", "x3"} <= set(picks)
