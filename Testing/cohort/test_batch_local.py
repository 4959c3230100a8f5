"""``meddiffseg batch`` without Ray: the studies one after another in the command's process (real model, real data)."""

from __future__ import annotations

import csv
import json
import hashlib
import os
import sys
from pathlib import Path

import pytest

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.cohort import BatchSettings, run_batch

from .conftest import MAX_VOXELS

pytestmark = pytest.mark.slow


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "batch.csv", newline="", encoding="utf-8") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def _fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_without_ray_runs_in_process_and_resumes(tmp_path, volume_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    inputs_before = _fingerprint(volume_folder)
    out = tmp_path / "out"
    argv = ["batch", str(volume_folder), "--out", str(out), "--organ", "liver", "--model", "abdomen-ct",
            "--modality", "CT", "--samples", "1", "--max-voxels", str(MAX_VOXELS)]
    assert main(argv) == 1  # the corrupt file failed; the others are done
    err = capsys.readouterr().err
    assert "Ray is not installed (pip install 'meddiffseg[cluster]'): running the 3 studies one after another" in err
    rows = _rows(out)
    assert list(rows) == ["btcv_0005", "corrupt", "dcmqi_3slice"]  # a folder's entries in name order
    assert rows["corrupt"]["status"] == "error" and "truncated" in rows["corrupt"]["error"]
    for sid in ("btcv_0005", "dcmqi_3slice"):
        r = rows[sid]
        assert r["status"] == "ok" and r["error"] == "" and r["attempts"] == "1", r
        assert r["worker"].startswith("local@") and r["worker"].endswith(f":{os.getpid()}")
        summary = json.loads((out / sid / "summary.json").read_text())
        assert r["liver_volume_ml"] == f"{summary['organs'][0]['volume_ml']:.3f}"
        assert float(r["liver_volume_ml"]) > 0
        assert sorted(p.name for p in (out / sid).iterdir()) == ["segmentation.nii.gz", "summary.json",
                                                                  "uncertainty.nii.gz"]
    assert rows["dcmqi_3slice"]["modality"] == "CT (dicom)"  # the series' own tag, which --modality agrees with
    assert sorted(p.name for p in out.iterdir()) == [".batch.lock", "batch.csv", "btcv_0005", "dcmqi_3slice"]

    done_before = _fingerprint(out / "btcv_0005") | _fingerprint(out / "dcmqi_3slice")
    assert main(argv) == 1  # rerun: the two done studies are skipped, the corrupt one is tried again
    err = capsys.readouterr().err
    assert "3 studies: 2 already done, 1 to segment in this process" in err
    again = _rows(out)
    for sid in ("btcv_0005", "dcmqi_3slice"):
        assert again[sid]["status"] == "skipped"
        for key in ("liver_volume_ml", "liver_mean_uncertainty", "seconds", "worker", "attempts", "model"):
            assert again[sid][key] == rows[sid][key], key
    assert again["corrupt"]["status"] == "error"
    assert _fingerprint(out / "btcv_0005") | _fingerprint(out / "dcmqi_3slice") == done_before  # not rewritten
    assert _fingerprint(volume_folder) == inputs_before  # the inputs are only read


def test_cancel_in_process_keeps_finished_studies_and_nothing_half_written(tmp_path, cohort):
    out = tmp_path / "out"
    ids = ["btcv_0005", "btcv_0006", "btcv_0007"]
    table = cohort.write_csv(tmp_path / "s.csv", ids)
    latch = {"on": False}

    def should_cancel() -> bool:  # Ctrl-C while the second study's network runs
        latch["on"] = latch["on"] or any(out.glob(".partial.*.btcv_0006"))
        return latch["on"]

    report = run_batch(table, out, BatchSettings(organs=("liver",), model="abdomen-ct", samples=1),
                       use_ray=False, should_cancel=should_cancel)
    assert report.cancelled and report.engine == "in-process"
    rows = _rows(out)
    assert [rows[i]["status"] for i in ids] == ["ok", "cancelled", "pending"]
    assert sorted(p.name for p in out.iterdir()) == [".batch.lock", "batch.csv", "btcv_0005"]
    assert report.workers and list(report.workers.values())[0] == {"studies": 1, "model_loads": 1}


def test_an_error_that_fails_every_study_stops_the_batch_with_its_exit_code(tmp_path, cohort, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "out"
    table = cohort.write_csv(tmp_path / "s.csv", ["btcv_0005", "btcv_0006"])
    assert main(["batch", str(table), "--out", str(out), "--organ", "liver", "--model", "abdomen-ct",
                 "--device", "cuda", "--no-ray", "--quiet"]) == 4
    err = capsys.readouterr().err
    assert err.count("CUDA is not available") == 1  # said once, as the command's error
    rows = _rows(out)
    assert rows["btcv_0005"]["status"] == "error" and "CUDA is not available" in rows["btcv_0005"]["error"]
    assert rows["btcv_0006"]["status"] == "pending"
    assert sorted(p.name for p in out.iterdir()) == [".batch.lock", "batch.csv"]
