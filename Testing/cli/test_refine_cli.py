"""``meddiffseg refine``: a segment result corrected with clicks, from files to files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import InputError, ModelError, OutputError
from MedDiffSegLib.interactive.refine import run_refine
from MedDiffSegLib.registry import export_zip, install_zip
from tinymodels import make_tiny_package, write_ellipsoid_ct


@pytest.fixture(scope="module")
def interactive_pkg(tmp_path_factory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("pkg") / "tiny-interactive", "guided", prompt_channels=4,
                             name="tiny-interactive", samples=1).path


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    return write_ellipsoid_ct(tmp_path_factory.mktemp("vol") / "ct.nii.gz", (10, 40, 48))


@pytest.fixture(scope="module")
def result(tmp_path_factory, volume, interactive_pkg) -> Path:
    out = tmp_path_factory.mktemp("res") / "seg"
    assert main(["segment", str(volume), "--out", str(out), "--model", str(interactive_pkg), "--organ", "liver",
                 "--organ", "spleen", "--quiet", "--samples", "1"]) == 0
    return out


def _centre(volume: Path) -> tuple[float, float, float]:
    img = sitk.ReadImage(str(volume))
    return img.TransformIndexToPhysicalPoint((24, 20, 5))


def _arg(p) -> str:
    return ",".join(f"{v:.3f}" for v in p)


def test_refine_writes_a_result_on_the_input_grid_and_records_the_clicks(tmp_path, volume, result, interactive_pkg,
                                                                         capsys):
    src_listing = sorted((f.name, f.stat().st_mtime_ns) for f in result.iterdir())
    click = _centre(volume)
    out = tmp_path / "r1"
    assert main(["refine", str(result), "--organ", "liver", "--click", _arg(click), "--model", str(interactive_pkg),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Liver:" in printed and "voxels changed" in printed
    ref = sitk.ReadImage(str(volume))
    for name in ("segmentation.nii.gz", "uncertainty.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize()
        assert np.allclose(img.GetSpacing(), ref.GetSpacing()) and np.allclose(img.GetOrigin(), ref.GetOrigin())
        assert np.allclose(img.GetDirection(), ref.GetDirection())
    summary = json.loads((out / "summary.json").read_text())
    (inter,) = summary["interactions"]
    assert inter["organ"] == "liver" and inter["clicks"] == [{"point_mm": list(click), "positive": True}]
    assert inter["slices"] and all(0 <= k < 10 for k in inter["slices"])
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(result / "segmentation.nii.gz")))
    assert inter["changed_voxels"] == int((lab != before).sum())
    assert np.array_equal(lab == 2, before == 2)  # a liver correction never changes the spleen
    assert [o["voxel_count"] for o in summary["organs"]] == [int((lab == 1).sum()), int((lab == 2).sum())]
    # the earlier result is untouched
    assert sorted((f.name, f.stat().st_mtime_ns) for f in result.iterdir()) == src_listing

    # refining the refined result keeps the earlier click
    out2 = tmp_path / "r2"
    assert main(["refine", str(out), "--organ", "liver", "--negative-click", _arg(click), "--model",
                 str(interactive_pkg), "--out", str(out2), "--quiet"]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert [len(i["clicks"]) for i in s2["interactions"]] == [1, 1]
    assert s2["interactions"][0] == inter and s2["interactions"][1]["clicks"][0]["positive"] is False


def test_the_recorded_model_is_found_and_checked(tmp_path, volume, result, interactive_pkg):
    click = _centre(volume)
    with pytest.raises(ModelError, match="tiny-interactive"):  # not installed: named in the error
        run_refine(result, tmp_path / "a", "liver", positive=[click])
    install_zip(export_zip(interactive_pkg, tmp_path / "pkg.zip"))
    run_refine(result, tmp_path / "b", "liver", positive=[click])
    assert (tmp_path / "b" / "summary.json").is_file()
    other = make_tiny_package(tmp_path / "other", "guided", prompt_channels=4, name="tiny-interactive", seed=3)
    shutil.rmtree(tmp_path / "home-models", ignore_errors=True)
    install_zip(export_zip(other, tmp_path / "other.zip"), force=True)
    with pytest.raises(ModelError, match="not the model that made this result"):
        run_refine(result, tmp_path / "c", "liver", positive=[click])
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("case", ["outside", "organ", "all_organs", "no_summary", "same_out", "no_click", "bad_point"])
def test_bad_refine_writes_nothing(tmp_path, volume, result, interactive_pkg, case):
    out = tmp_path / "out"
    argv = ["refine", str(result), "--organ", "liver", "--click", _arg(_centre(volume)), "--model",
            str(interactive_pkg), "--out", str(out), "--quiet"]
    expected = InputError.exit_code
    if case == "outside":
        argv[5] = "900,900,900"
    elif case == "organ":
        argv[3] = "kidney_left"
        expected = ModelError.exit_code
    elif case == "all_organs":  # 'all' is for segment; a correction is for one organ
        argv[3] = "all"
    elif case == "no_summary":
        empty = tmp_path / "empty"
        empty.mkdir()
        argv[1] = str(empty)
    elif case == "same_out":
        argv[-2] = str(result)
        expected = OutputError.exit_code
    elif case == "no_click":
        del argv[4:6]
    elif case == "bad_point":
        argv[5] = "1,2"
    listing = sorted(f.name for f in result.iterdir())
    assert main(argv) == expected
    assert not out.exists()
    assert sorted(f.name for f in result.iterdir()) == listing


def test_a_model_without_prompts_cannot_refine(tmp_path, volume):
    plain = make_tiny_package(tmp_path / "plain", "guided", name="tiny-plain")
    res = tmp_path / "res"
    assert main(["segment", str(volume), "--out", str(res), "--model", str(plain.path), "--organ", "liver",
                 "--quiet"]) == 0
    assert main(["refine", str(res), "--organ", "liver", "--click", _arg(_centre(volume)), "--model",
                 str(plain.path), "--out", str(tmp_path / "r")]) == ModelError.exit_code
    assert not (tmp_path / "r").exists()


def test_suggest_reads_a_result_without_the_model(tmp_path, volume, interactive_pkg, capsys):
    res = tmp_path / "res"
    assert main(["segment", str(volume), "--out", str(res), "--model", str(interactive_pkg), "--organ", "liver",
                 "--samples", "4", "--quiet", "--no-adaptive"]) == 0
    capsys.readouterr()
    assert main(["suggest", str(res), "--organ", "liver", "-k", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(res / "uncertainty.nii.gz")))
    ref = sitk.ReadImage(str(volume))
    assert 1 <= len(found) <= 2
    for x in found:
        z, y, xx = np.array(ref.TransformPhysicalPointToIndex(x["point_mm"]))[::-1]
        assert unc[z, y, xx] >= 0.02 and 0 < x["confidence"] <= 0.5
    assert main(["suggest", str(res), "--organ", "liver", "--model-free"]) == 0
    assert "look at " in capsys.readouterr().out
    # a refined result's suggestions keep away from the organ's recorded clicks
    clicked = tuple(found[0]["point_mm"])
    assert main(["refine", str(res), "--organ", "liver", "--click", ",".join(map(str, clicked)), "--model",
                 str(interactive_pkg), "--out", str(tmp_path / "r1"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["suggest", str(tmp_path / "r1"), "--organ", "liver", "-k", "5", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert all(np.linalg.norm(np.subtract(x["point_mm"], clicked)) > 10.0 for x in again)
    assert main(["suggest", str(res), "--organ", "pancreas"]) == InputError.exit_code
    assert main(["suggest", str(tmp_path), "--organ", "liver"]) == InputError.exit_code


def test_probability_maps_are_carried_through_refine(tmp_path, volume, interactive_pkg):
    res = tmp_path / "res"
    assert main(["segment", str(volume), "--out", str(res), "--model", str(interactive_pkg), "--organ", "liver",
                 "--organ", "spleen", "--samples", "1", "--quiet", "--save-probabilities"]) == 0
    click = _centre(volume)
    out = tmp_path / "r1"
    assert main(["refine", str(res), "--organ", "liver", "--click", _arg(click), "--model", str(interactive_pkg),
                 "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"]["probabilities"] == {"liver": "probability_liver.nii.gz",
                                                   "spleen": "probability_spleen.nii.gz"}
    ref = sitk.ReadImage(str(volume))

    def prob(folder, organ):
        img = sitk.ReadImage(str(folder / f"probability_{organ}.nii.gz"))
        assert img.GetSize() == ref.GetSize() and np.allclose(img.GetOrigin(), ref.GetOrigin())
        return sitk.GetArrayFromImage(img)

    # the spleen's map is carried over as it was; the liver's changed, on the re-sampled slices only (axis z here)
    assert np.array_equal(prob(out, "spleen"), prob(res, "spleen"))
    changed = np.flatnonzero((prob(out, "liver") != prob(res, "liver")).any(axis=(1, 2)))
    assert changed.size and set(changed) <= set(summary["interactions"][0]["slices"])
    # the re-sampled liver probability agrees with the corrected labels where the liver took background
    before = sitk.GetArrayFromImage(sitk.ReadImage(str(res / "segmentation.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    gained = (lab == 1) & (before == 0)
    assert not gained.any() or float(prob(out, "liver")[gained].min()) >= 0.5
    # a listed probability map that is gone: the folder is incomplete, and refine writes nothing
    (out / "probability_spleen.nii.gz").unlink()
    assert main(["refine", str(out), "--organ", "liver", "--click", _arg(click), "--model", str(interactive_pkg),
                 "--out", str(tmp_path / "r2"), "--quiet"]) == InputError.exit_code
    assert not (tmp_path / "r2").exists()
