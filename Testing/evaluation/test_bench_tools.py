"""bench/bench_segment.make_volume and bench/bench_peer.fit_cost_model: the benchmark's volumes and cost model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from benchtools import load_bench



def _load(name: str):
    return load_bench(name)


@pytest.fixture()
def clipped_ct(tmp_path) -> Path:
    """A small CT windowed like BTCV (floor -125 HU): 20×16×10 voxels at 2×2×3 mm, a bright block inside."""
    a = np.full((10, 16, 20), -125, dtype=np.int16)
    a[2:8, 4:12, 5:15] = 200
    img = sitk.GetImageFromArray(a)
    img.SetSpacing((2.0, 2.0, 3.0))
    img.SetOrigin((-10.0, 5.0, 30.0))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def test_make_volume_same_anatomy_for_every_slice_count(tmp_path, clipped_ct):
    make_volume = _load("bench_segment").make_volume
    for k in (5, 10, 40):
        info = make_volume(tmp_path / f"v{k}.nii.gz", (24, 20, k), (1.5, 1.5, 2.5), source=clipped_ct, cover_source_z=True)
        out = sitk.ReadImage(str(tmp_path / f"v{k}.nii.gz"))
        assert out.GetSize() == (24, 20, k)
        assert out.GetSpacing()[2] == pytest.approx(30.0 / k)  # the source's 10 slices × 3 mm over k
        assert info["spacing_mm"][2] == pytest.approx(30.0 / k, abs=1e-3)
        a = sitk.GetArrayFromImage(out)
        # Outside the source's in-plane extent the grid holds the source's floor (-125), not -1024.
        assert a.min() == -125 and a[:, 0, 0].tolist() == [-125] * k
        # Same centre: the bright block's centre of mass lands at the same physical point.
        zz, yy, xx = np.nonzero(a > 0)
        centre = out.TransformContinuousIndexToPhysicalPoint([float(xx.mean()), float(yy.mean()), float(zz.mean())])
        assert centre == pytest.approx((-10.0 + 9.5 * 2, 5.0 + 7.5 * 2, 30.0 + 4.5 * 3), abs=max(out.GetSpacing()))


def test_make_volume_fixed_spacing_pads_with_air(tmp_path, clipped_ct):
    make_volume = _load("bench_segment").make_volume
    src = sitk.ReadImage(str(clipped_ct))
    air = sitk.Cast(src, sitk.sitkInt16) * 0 - 1500  # a source colder than air: the pad is clamped to -1024
    sitk.WriteImage(air, str(tmp_path / "cold.nii.gz"))
    make_volume(tmp_path / "v.nii.gz", (8, 8, 30), (2.0, 2.0, 3.0), source=tmp_path / "cold.nii.gz")
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii.gz")))
    assert a[0].max() == -1024 and a[15].max() == -1500  # slice 0 is padding (30 slices of 3 mm > source's 10)


def test_cost_model_recovers_its_parts():
    fit = _load("bench_peer").fit_cost_model
    points = [{"slices": k, "network_passes": p, "seconds": 4.0 + 0.01 * k + 0.03 * p}
              for k, p in [(100, 80), (100, 500), (200, 150), (200, 900), (400, 320), (400, 2000)]]
    c = fit(points)
    assert c["fixed_s"] == pytest.approx(4.0) and c["per_slice_s"] == pytest.approx(0.01)
    assert c["per_pass_s"] == pytest.approx(0.03) and c["max_abs_residual_s"] < 1e-9
    with pytest.raises(SystemExit, match="network passes"):
        fit([{**points[0], "network_passes": None}])


def test_compare_models_reports_the_recorded_protocol_scores(capsys):
    """The comparison of docs/methods.md: the built-in CT default's recorded protocol scores, a package
    without them as dashes; its headline equals the mean Dice over the benchmark organs it recorded."""
    from MedDiffSegLib.registry import ModelPackage
    from MedDiffSegLib.registry.store import builtin_models_dir

    compare = _load("compare_models")
    ct = ModelPackage.from_folder(builtin_models_dir() / "abdomen-ct")
    res = ct.metrics["protocol"]["results"]["btcv"]
    first = res["per_seed"][sorted(res["per_seed"], key=int)[0]]
    unscored = ModelPackage.from_folder(builtin_models_dir() / "abdomen-mr")  # an MR model: no btcv scores
    text = compare.tables([ct, unscored], "btcv")
    row = next(line for line in text.splitlines() if line.startswith("| `abdomen-ct` "))
    assert f"{first['mean_dice']:.3f} ± " in row and f"({first['cases']})" in row
    assert next(line for line in text.splitlines() if line.startswith("| `abdomen-mr` ")).count("—") >= 6
    organ_row = [line for line in text.splitlines() if line.startswith("| `abdomen-ct` |")][0]
    assert f"{first['organs']['liver']['dice_mean']:.3f} ± " in organ_row
    assert compare.main(["--dataset", "btcv", str(builtin_models_dir() / "abdomen-ct")]) == 0
    assert "`abdomen-ct`" in capsys.readouterr().out


def test_compare_models_extras_read_the_uncertainty_and_speed_files(tmp_path):
    """--extras: a package's near-organ AUROC / ECE from evaluate_uncertainty's summary, its seconds and peak
    memory from bench_segment's --json-out files; a package without them is dashes; a failed run is not read."""
    import json

    from MedDiffSegLib.registry import ModelPackage
    from MedDiffSegLib.registry.store import builtin_models_dir

    compare = _load("compare_models")
    ct = ModelPackage.from_folder(builtin_models_dir() / "abdomen-ct")
    mr = ModelPackage.from_folder(builtin_models_dir() / "abdomen-mr")
    (tmp_path / "uncertainty" / ct.name).mkdir(parents=True)
    (tmp_path / "uncertainty" / ct.name / "summary.json").write_text(json.dumps({"settings": {"1x5": {
        "variance_auroc_near": [0.778, 0.106, 78], "entropy_auroc_near": [0.825, 0.098, 78], "ece_near": [0.058, 0.034, 78]}}}))
    (tmp_path / "speed").mkdir()
    run = {"device": "cpu (test)", "cpu_count": 2, "torch_threads": 2}
    (tmp_path / "speed" / f"{ct.name}.one.json").write_text(json.dumps({"runs": [dict(run, wall_seconds=11.5, peak_rss_mb=2100.0)]}))
    (tmp_path / "speed" / f"{ct.name}.all.json").write_text(json.dumps({"runs": [dict(run, wall_seconds=88.25, peak_rss_mb=3900.4)]}))
    (tmp_path / "speed" / f"{mr.name}.one.json").write_text(json.dumps({"runs": [{"samples": 1, "error": "boom"}]}))
    text = compare.extras_table([ct, mr], tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| `abdomen-ct` "))
    assert row.split(" | ")[1:] == ["0.778 ± 0.106", "0.825 ± 0.098", "0.058 ± 0.034", "78", "11.5", "88.2", "3900 |"]
    assert next(line for line in text.splitlines() if line.startswith("| `abdomen-mr` ")).count("—") == 7
    assert "Hardware: cpu (test), 2 cores, 2 torch threads" in text


def test_model_card_says_what_the_package_records(tmp_path):
    """bench/model_card.py: the card's numbers are the package's own (training patients, stages, the protocol's
    headline and per-organ Dice, the extras), its limitations the releaser's; written atomically."""
    import json

    from MedDiffSegLib.registry import ModelPackage
    from MedDiffSegLib.registry.store import builtin_models_dir

    cards = _load("model_card")
    ct = ModelPackage.from_folder(builtin_models_dir() / "abdomen-ct")
    limits = tmp_path / "limits.md"
    limits.write_text("It misses the gallbladder of one patient in six.\n")
    (tmp_path / "uncertainty" / ct.name).mkdir(parents=True)
    (tmp_path / "uncertainty" / ct.name / "summary.json").write_text(json.dumps({"settings": {"1x5": {
        "variance_auroc_near": [0.778, 0.106, 78], "entropy_auroc_near": [0.825, 0.098, 78], "ece_near": [0.058, 0.034, 78]}}}))
    out = tmp_path / "CARD.md"
    assert cards.main([str(ct.path), "--limitations", str(limits), "--extras", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith(f"# Model card: `abdomen-ct` {ct.version}\n")
    assert text.rstrip().endswith("## Limitations\n\nIt misses the gallbladder of one patient in six.")
    train = ct.provenance["data"]["train"][0]["cases"]
    assert f"Training patients: {len(train)} ({', '.join(train)})" in text
    res = ct.metrics["protocol"]["results"]["btcv"]
    first = res["per_seed"][sorted(res["per_seed"], key=int)[0]]
    assert f"{first['organs']['liver']['dice_mean']:.3f} ± " in text
    assert "| `abdomen-ct` | 0.778 ± 0.106 | 0.825 ± 0.098 | 0.058 ± 0.034 | 78 |" in text
    assert "HU window [" in text
    lc = ct.inference["largest_component"]  # the post-processing the engine applies, and where it was chosen
    assert (f"only the largest 3D connected component is kept for {', '.join(lc)}, chosen on the held-out patients "
            f"{', '.join(ct.inference['postprocessing_chosen_on'])}") in text
    assert not list(tmp_path.glob(".card-*"))  # the temporary file was renamed
    mr = cards.card(ModelPackage.from_folder(builtin_models_dir() / "abdomen-mr"), "none known")
    assert "HU window" not in mr and "Uncertainty and cost" not in mr
    from tinymodels import make_tiny_package

    bare = make_tiny_package(tmp_path / "tiny", "guided")  # no post-processing chosen
    assert "Post-processing: none" in cards.card(bare, "none known")


@pytest.mark.parametrize("method", ["sdseg", "medsegdiff_v2"])
def test_diagnose_latent_estimate_prints_the_estimate_per_timestep(method, data_dir, tmp_path, capsys, monkeypatch):
    """bench/diagnose_latent_estimate.py on a latent (SDSeg) and a pixel (MedSegDiff-V2) ε-model: one table row per
    t, ᾱ_t falling with t, Dice in [0, 1]; an x0-predicting method is refused."""
    from tinymodels import make_tiny_package

    monkeypatch.setenv("MEDDIFFSEG_DATA", str(data_dir))
    diag = _load("diagnose_latent_estimate")
    pkg = make_tiny_package(tmp_path / method, method)
    assert diag.main([str(pkg.path), "--windows", "2", "--t", "10", "999", "--slices", "60", "64"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 10 ") or line.startswith("| 999 ")]
    assert [r[0] for r in rows] == ["| 10", "| 999"]
    alpha = [float(r[1]) for r in rows]
    assert 1.0 > alpha[0] > alpha[1] >= 0.0
    assert all(0.0 <= float(r[4].rstrip(" |")) <= 1.0 for r in rows)
    with pytest.raises(SystemExit):
        diag.main([str(make_tiny_package(tmp_path / "guided", "guided").path), "--windows", "2"])


def test_evaluate_protocol_resumes_from_the_reports_made_with_the_same_weights_and_settings(data_dir, tmp_path, capsys,
                                                                                          monkeypatch):
    """--resume: a case report of the same weights and settings is reused (the case is not segmented again and the
    summary is the same); other settings are segmented again."""
    import json

    from tinymodels import make_tiny_package

    monkeypatch.setenv("MEDDIFFSEG_DATA", str(data_dir))
    ev = _load("evaluate_protocol")
    pkg = make_tiny_package(tmp_path / "pkg", "guided", spacing=(8.0, 8.0), samples=1, steps=1)
    out = tmp_path / "out"
    argv = [str(pkg.path), "--cases", "btcv_0007", "--out", str(out), "--resume"]
    assert ev.main(argv) == 0
    first = json.loads((out / "summary.json").read_text())
    report = out / "btcv" / "seed0" / "btcv_0007.json"
    assert json.loads(report.read_text())["made_with"]["weights_sha256"] == pkg.weights_sha256
    stamp = report.stat().st_mtime_ns
    capsys.readouterr()
    assert ev.main(argv) == 0
    assert "btcv_0007: " in (err := capsys.readouterr().err) and "(the earlier report)" in err
    assert report.stat().st_mtime_ns == stamp  # reused, not rewritten
    again = json.loads((out / "summary.json").read_text())
    assert again["results"] == first["results"]
    assert ev.main(argv + ["--steps", "2"]) == 0  # other settings: segmented again
    assert report.stat().st_mtime_ns != stamp and json.loads(report.read_text())["made_with"]["steps"] == 2
    # the package's own settings changed (post-processing recorded into model.json, weights untouched): again
    from MedDiffSegLib.registry.package import update_inference

    assert ev.main(argv) == 0
    stamp = report.stat().st_mtime_ns
    update_inference(pkg.path, {"largest_component": [pkg.organ_names[0]]})
    capsys.readouterr()
    assert ev.main(argv) == 0
    assert "(the earlier report)" not in capsys.readouterr().err and report.stat().st_mtime_ns != stamp
    assert json.loads(report.read_text())["made_with"]["inference"]["largest_component"] == [pkg.organ_names[0]]
