"""``evaluate()`` and ``meddiffseg evaluate``: label mapping, geometry rules, uncertainty, JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import InputError, MedDiffSegError
from MedDiffSegLib.evaluation import (
    LabelSpec,
    calibration,
    evaluate,
    near_band,
    on_reference_grid,
    parse_label_specs,
    same_physical_grid,
    to_json_ready,
)

SPACING = (0.8, 0.8, 2.5)  # x, y, z


def _image(arr, spacing=SPACING, origin=(10.0, -20.0, 5.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


@pytest.fixture()
def case(tmp_path):
    """Prediction (liver=1, spleen=2) and a ground truth in another code table (liver=5, spleen=1, kidney=3)."""
    gt = np.zeros((8, 32, 32), np.uint8)
    gt[2:6, 4:16, 4:16] = 5
    gt[2:6, 20:28, 20:28] = 1
    gt[3:5, 4:8, 24:28] = 3
    pred = np.zeros_like(gt)
    pred[2:6, 4:16, 5:17] = 1  # liver shifted by one column
    pred[2:6, 20:28, 20:28] = 2  # spleen exact
    pred[6, 0:3, 0:3] = 4  # a stray label value that the ground truth does not have
    unc = np.zeros(gt.shape, np.float32)
    unc[2:6, 4:16, 15:17] = 0.2  # uncertain exactly at the liver's wrong columns and its true edge ...
    unc[2:6, 4:16, 4:5] = 0.2
    prob = np.where(pred == 1, 0.9, 0.05).astype(np.float32)
    paths = {}
    for name, arr in (("pred", pred), ("gt", gt), ("unc", unc), ("prob", prob)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(_image(arr), str(paths[name]))
    return paths


def test_parse_label_specs():
    assert parse_label_specs(["liver=1", "spleen=2:7"]) == [LabelSpec("liver", 1, 1), LabelSpec("spleen", 2, 7)]
    for bad in (["liver"], ["liver=x"], ["liver=0"], ["a=1", "a=2"], ["a=1", "b=1"], ["a=1:2:3"]):
        with pytest.raises(MedDiffSegError):
            parse_label_specs(bad)


def test_evaluate_with_two_code_tables(case):
    labels = parse_label_specs(["liver=1:5", "spleen=2:1", "kidney=3:3"])
    r = evaluate(case["pred"], case["gt"], labels, uncertainty=case["unc"], probabilities={"liver": case["prob"]})
    organs = {o["name"]: o for o in r["organs"]}
    assert organs["liver"]["dice"] == pytest.approx(2 * 4 * 12 * 11 / (2 * 4 * 12 * 12))
    assert organs["liver"]["hd95_mm"] > 0 and organs["liver"]["status"] == "ok"
    assert organs["spleen"]["dice"] == pytest.approx(1.0) and organs["spleen"]["hd95_mm"] == pytest.approx(0.0)
    assert organs["kidney"]["status"] == "missed" and organs["kidney"]["failure"]
    assert math.isinf(organs["kidney"]["hd95_mm"])
    assert r["summary"]["failures"] == 1 and math.isinf(r["summary"]["mean_hd95_mm"])
    u = r["uncertainty"]
    # errors: the liver's wrong column (pred 1 / gt 0), its missed column (0 / 5) and the kidney;
    # the stray label 4 is not evaluated, so it is not an error
    assert u["error_voxels"] == 4 * 12 * 2 + 2 * 4 * 4
    assert 0.5 < u["auroc"] < 1.0
    cal = r["calibration"]["organs"]["liver"]
    assert 0 <= cal["ece"] <= 1 and 0 <= cal["ece_near_organ"] <= 1
    # "near the organ" is the 10 mm band around the liver's predicted and true voxels, not the whole volume
    pred_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case["pred"])))
    gt_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case["gt"])))
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(case["prob"])))
    band = near_band(pred_arr == 1, gt_arr == 5, SPACING[::-1], 10.0)
    assert 0 < cal["near_organ_voxels"] == band.sum() < band.size
    assert cal["ece_near_organ"] == pytest.approx(calibration(prob[band], gt_arr[band] == 5)["ece"])
    assert r["calibration"]["band_mm"] == 10.0 and u["band_mm"] == 10.0 and u["flag_threshold"] is None
    liver = u["organs"]["liver"]
    assert liver["ece_near"] == pytest.approx(cal["ece_near_organ"]) and liver["ece"] == pytest.approx(cal["ece"])
    assert u["organs"]["spleen"]["ece"] is None and u["organs"]["spleen"]["auroc"] is None  # exact: no errors
    assert liver["error_voxels"] == 4 * 12 * 2 and liver["near_voxels"] == band.sum()
    text = json.dumps(to_json_ready(r), allow_nan=False)  # strictly valid JSON
    assert '"inf"' in text


def test_default_labels_are_the_values_present(case):
    r = evaluate(case["pred"], case["gt"])
    assert [o["name"] for o in r["organs"]] == ["1", "2", "3", "4", "5"]
    statuses = {o["name"]: o["status"] for o in r["organs"]}
    assert statuses["4"] == "false_positive" and statuses["5"] == "missed"


def test_same_physical_grid_other_axis_conventions_is_mapped_exactly():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 3, (6, 10, 12)).astype(np.uint8)
    ref = _image(arr)
    # The same voxels stored with the row axis reversed (like a NIfTI label map of a DICOM series).
    flipped = _image(arr[:, ::-1, :].copy(), origin=(10.0, -20.0 + 9 * 0.8, 5.0), direction=(1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert same_physical_grid(flipped, ref)
    out, resampled = on_reference_grid(flipped, ref, "gt")
    assert resampled and np.array_equal(sitk.GetArrayFromImage(out), arr)
    # Permuted axes (x and y swapped in storage).
    perm = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(0, 2, 1)))
    perm.SetSpacing((0.8, 0.8, 2.5))
    perm.SetOrigin(ref.GetOrigin())
    perm.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    assert same_physical_grid(perm, ref)
    assert np.array_equal(sitk.GetArrayFromImage(on_reference_grid(perm, ref, "gt")[0]), arr)


@pytest.mark.parametrize("change, words", [
    ({"origin": (10.4, -20.0, 5.0)}, "origin"),
    ({"spacing": (0.8, 0.8, 3.0)}, "spacing"),
    ({"direction": (0, 1, 0, 1, 0, 0, 0, 0, 1)}, "direction"),
])
def test_different_grids_are_refused_naming_the_difference(change, words):
    arr = np.zeros((6, 10, 12), np.uint8)
    ref = _image(arr)
    other = _image(arr, **change)
    assert not same_physical_grid(other, ref)
    with pytest.raises(InputError, match=words):
        on_reference_grid(other, ref, "the ground truth")


def test_cli_evaluate_json_and_table(case, tmp_path, capsys):
    out = tmp_path / "scores" / "report.json"
    # plain probability files must come one per --labels organ
    rc = main(["evaluate", "--pred", str(case["pred"]), "--gt", str(case["gt"]), "--labels", "liver=1:5",
               "spleen=2:1", "kidney=3", "--probabilities", str(case["prob"]), "--json", str(out)])
    assert rc == 1 and "one organ per file" in capsys.readouterr().err
    assert not out.exists()
    rc = main(["evaluate", "--pred", str(case["pred"]), "--gt", str(case["gt"]), "--labels", "liver=1:5",
               "spleen=2:1", "kidney=3", "--uncertainty", str(case["unc"]),
               "--probabilities", f"liver={case['prob']}", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "liver" in text and "missed (FAILURE)" in text and "1 failure(s) of 3" in text and "AUROC" in text
    report = json.loads(out.read_text())
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # as any new file, not mkstemp's 0600
    kidney = next(o for o in report["organs"] if o["name"] == "kidney")
    assert kidney["hd95_mm"] == "inf" and kidney["dice"] == 0.0
    assert report["summary"]["mean_hd95_mm"] == "inf"


def test_cli_evaluate_geometry_mismatch_exit_code(tmp_path, capsys):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    sitk.WriteImage(_image(np.ones((4, 8, 8), np.uint8)), str(a))
    sitk.WriteImage(_image(np.ones((4, 8, 9), np.uint8)), str(b))
    assert main(["evaluate", "--pred", str(a), "--gt", str(b)]) == 2
    assert "size 9×8×4 vs 8×8×4" in capsys.readouterr().err


def test_real_dicom_labels_against_a_dicom_oriented_prediction(data_dir):
    """The NIfTI label map of the DICOM CT (LAS) scored against a prediction on the DICOM grid (LPS)."""
    from MedDiffSegLib.io import read_volume

    gt_path = data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz"
    image = read_volume(data_dir / "totalsegmentator" / "example_ct_dicom")
    gt = sitk.ReadImage(str(gt_path))
    pred = sitk.Resample(gt, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, gt.GetPixelID())
    assert sitk.GetArrayViewFromImage(pred).shape == sitk.GetArrayViewFromImage(gt).shape
    r = evaluate(pred, gt_path, parse_label_specs(["liver=5", "spleen=1", "aorta=52"]))
    assert r["ground_truth_resampled"]
    for o in r["organs"]:
        assert o["dice"] == pytest.approx(1.0) and o["hd95_mm"] == 0.0 and o["status"] == "ok"


# -- several probability maps: each map's voxels stay valid while the next is read (issue #25) ------


def _blurred_masks(labels: sitk.Image, values: dict[str, int], sigma_mm: float = 4.0) -> dict[str, sitk.Image]:
    """Smooth probabilities in [0, 1] from a label map's organ masks (a stand-in for a model's maps)."""
    maps = {}
    for name, value in values.items():
        mask = sitk.Cast(labels == value, sitk.sitkFloat32)
        smooth = sitk.SmoothingRecursiveGaussian(mask, sigma_mm)
        maps[name] = sitk.Clamp(smooth, sitk.sitkFloat32, 0.0, 1.0)
    return maps


def test_several_probability_maps_are_each_scored_on_their_own_voxels(case, tmp_path):
    """Three maps of different values: each organ's ECE is that of its own file (a view of a freed image
    made the second and later maps read freed memory, or crash)."""
    pred = sitk.ReadImage(str(case["pred"]))
    gt_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case["gt"])))
    paths, arrays = {}, {}
    for name, value, level in (("liver", 1, 0.9), ("spleen", 2, 0.7), ("stray", 4, 0.6)):
        arr = np.where(sitk.GetArrayFromImage(pred) == value, level, 0.02).astype(np.float32)
        paths[name] = tmp_path / f"prob_{name}.nii.gz"
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(pred)
        sitk.WriteImage(img, str(paths[name]))
        arrays[name] = arr
    labels = parse_label_specs(["liver=1:5", "spleen=2:1", "stray=4:3"])
    r = evaluate(case["pred"], case["gt"], labels, uncertainty=case["unc"], probabilities=paths)
    for spec in labels:
        expected = calibration(arrays[spec.name], gt_arr == spec.gt_value)
        got = r["calibration"]["organs"][spec.name]
        assert got["ece"] == pytest.approx(expected["ece"], abs=1e-12), spec.name
        assert got["bins"] == expected["bins"]
        assert r["uncertainty"]["organs"][spec.name]["ece"] == pytest.approx(expected["ece"], abs=1e-12)


def test_cli_evaluate_three_probability_maps_and_the_uncertainty_on_real_data(data_dir, tmp_path):
    """TotalSegmentator's fast labels scored against its full-resolution labels of the same real CT, with
    three probability maps and an uncertainty map made from the prediction; in a child process, so that a
    memory fault shows as its exit status."""
    import subprocess
    import sys

    ts = data_dir / "totalsegmentator"
    pred_path, gt_path = ts / "example_seg_fast.nii.gz", ts / "example_seg.nii.gz"
    codes = {"liver": 5, "spleen": 1, "kidney_right": 2}  # the same code table in both
    maps = _blurred_masks(sitk.ReadImage(str(pred_path)), codes)
    prob_args = []
    for name, img in maps.items():
        path = tmp_path / f"probability_{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        prob_args.append(f"{name}={path}")
    arrays = {n: sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"probability_{n}.nii.gz"))) for n in maps}
    variance = np.max([p * (1 - p) for p in arrays.values()], axis=0).astype(np.float32)
    unc = sitk.GetImageFromArray(variance)
    unc.CopyInformation(maps["liver"])
    sitk.WriteImage(unc, str(tmp_path / "uncertainty.nii.gz"))
    out = tmp_path / "scores.json"
    run = subprocess.run(
        [sys.executable, "-m", "MedDiffSegLib", "evaluate", "--pred", str(pred_path), "--gt", str(gt_path),
         "--labels", *(f"{n}={v}" for n, v in codes.items()), "--uncertainty", str(tmp_path / "uncertainty.nii.gz"),
         "--probabilities", *prob_args, "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    report = json.loads(out.read_text(encoding="utf-8"))
    gt_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_path)))
    assert set(report["calibration"]["organs"]) == set(codes)
    for name, code in codes.items():
        expected = calibration(arrays[name], gt_arr == code)["ece"]
        assert report["calibration"]["organs"][name]["ece"] == pytest.approx(expected, abs=1e-12), name
        assert 0 < report["calibration"]["organs"][name]["ece_near_organ"] < 1
    u = report["uncertainty"]
    assert u["error_voxels"] > 0 and 0.5 < u["auroc"] <= 1.0 and set(u["organs"]) == set(codes)


def test_the_readme_evaluate_example_writes_into_an_ignored_folder():
    """Issue #25: the README's example wrote scores.json into the repository root, which git did not ignore."""
    import re
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"meddiffseg evaluate (?:[^\n]*\\\n)*[^\n]*", text)
    assert commands, "the README shows no 'meddiffseg evaluate' command"
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    for command in commands:
        target = re.search(r"--json\s+(\S+)", command).group(1)
        assert "/" in target, f"{target} would land in the repository root"
        ignored = subprocess.run(["git", "check-ignore", "-q", target], cwd=repo, capture_output=True)
        assert ignored.returncode == 0, f"{target} (the README's evaluate example) is not ignored by git"
