"""``meddiffseg batch`` on a local Ray cluster of 2 CPUs with 2 workers (real model, real data).

One batch over the cohort (5 good studies, a corrupt file, an MR for the CT model, one above
``--max-voxels``) is run once for the module and checked against single ``segment`` runs; then a
rerun, a worker killed mid-study, and Ctrl-C of the command in its own process (its own Ray).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.cohort import BatchSettings, run_batch

from .conftest import BAD, GOOD, MAX_VOXELS

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'meddiffseg[cluster]'; CI installs it)")

pytestmark = pytest.mark.slow

SETTINGS = BatchSettings(organs=("liver",), model="abdomen-ct", samples=1, seed=0, max_voxels=MAX_VOXELS)
OUTPUTS = ["segmentation.nii.gz", "summary.json", "uncertainty.nii.gz"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for this module's batches (they reuse it); shut down at the end."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


class Events:
    def __init__(self):
        self.items: list[tuple[str, dict]] = []
        self.notes: list[str] = []

    def __call__(self, kind, data):
        self.items.append((kind, data))

    def ids(self, kind: str) -> list[str]:
        return [d["id"] if kind == "started" else d["row"]["id"] for k, d in self.items if k == kind]


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "batch.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["id"] for r in rows}) == len(rows)
    return {r["id"]: r for r in rows}


def _labels(folder: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "segmentation.nii.gz")))


def _assert_clean(out: Path, ok_ids) -> None:
    """Exactly one complete folder per done study, nothing partial or set aside."""
    assert sorted(p.name for p in out.iterdir()) == sorted([".batch.lock", "batch.csv", *ok_ids])
    for sid in ok_ids:
        assert sorted(p.name for p in (out / sid).iterdir()) == OUTPUTS


@pytest.fixture(scope="module")
def first_batch(local_ray, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    events = Events()
    report = run_batch(cohort.csv, out, SETTINGS, workers=2, on_event=events, notify=events.notes.append)
    return out, report, events


@pytest.fixture(scope="module")
def single_runs(cohort, tmp_path_factory):
    """Each good study through 'meddiffseg segment' on its own (one torch thread, as a Ray worker of 1 CPU)."""
    import torch

    refs = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for sid in GOOD:
            argv = ["segment", str(cohort.paths[sid]), "--out", str(refs / sid), "--organ", "liver",
                    "--model", "abdomen-ct", "--samples", "1", "--seed", "0", "--quiet"]
            if cohort.modality[sid]:
                argv += ["--modality", cohort.modality[sid]]
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return refs


def test_two_workers_segment_the_cohort_and_record_the_bad_studies(first_batch, cohort):
    out, report, events = first_batch
    assert report.engine == "ray" and not report.cancelled
    rows = _rows(out)
    assert list(rows) == list(GOOD) + list(BAD)  # the CSV's order
    for sid in GOOD:
        assert rows[sid]["status"] == "ok" and rows[sid]["attempts"] == "1", rows[sid]
    for sid, fragment in BAD.items():
        assert rows[sid]["status"] == "error" and fragment in rows[sid]["error"], rows[sid]
        assert rows[sid]["liver_volume_ml"] == ""
    assert rows["dcmqi_3slice"]["modality"] == "CT (dicom)"
    _assert_clean(out, GOOD)
    workers = {rows[sid]["worker"] for sid in GOOD + tuple(BAD)}
    assert len(workers) == 2  # both workers took studies
    # each worker loaded (and hashed) the model once, however many studies it segmented
    assert {w: s["model_loads"] for w, s in report.workers.items()} == {w: 1 for w in workers}
    assert sum(s["studies"] for s in report.workers.values()) == len(GOOD)
    assert sorted(events.ids("started")) == sorted(GOOD + tuple(BAD))
    assert sorted(events.ids("finished")) == sorted(GOOD + tuple(BAD))
    assert report.counts == {"ok": len(GOOD), "error": len(BAD)}


def test_figures_match_single_segment_runs(first_batch, single_runs):
    out, _, _ = first_batch
    rows = _rows(out)
    for sid in GOOD:
        ref = json.loads((single_runs / sid / "summary.json").read_text())
        got = json.loads((out / sid / "summary.json").read_text())
        assert np.array_equal(_labels(out / sid), _labels(single_runs / sid)), sid  # voxel for voxel
        o = ref["organs"][0]
        assert rows[sid]["liver_volume_ml"] == f"{o['volume_ml']:.3f}"
        assert rows[sid]["liver_mean_uncertainty"] == ("" if o["mean_uncertainty"] is None
                                                       else f"{o['mean_uncertainty']:.6g}")
        assert got["model"] == ref["model"] and got["organs"] == ref["organs"] and got["input"] == ref["input"]
        assert {k: v for k, v in got["settings"].items() if k != "device"} == \
               {k: v for k, v in ref["settings"].items() if k != "device"}
        assert got["timings_s"]["load_model"] < 0.01  # the worker's model, loaded before the study


def test_rerun_skips_everything_done(first_batch, cohort):
    out, _, _ = first_batch
    before = _rows(out)
    stamps = {sid: [(out / sid / f).stat().st_mtime_ns for f in OUTPUTS] for sid in GOOD}
    events = Events()
    report = run_batch(cohort.csv, out, SETTINGS, workers=2, on_event=events)
    plan = next(d for k, d in events.items if k == "plan")
    assert (plan["skipped"], plan["to_run"]) == (len(GOOD), len(BAD))
    assert sorted(events.ids("started")) == sorted(BAD)  # only the failed ones run again
    rows = _rows(out)
    for sid in GOOD:
        assert rows[sid]["status"] == "skipped"
        assert {k: v for k, v in rows[sid].items() if k != "status"} == \
               {k: v for k, v in before[sid].items() if k != "status"}
        assert [(out / sid / f).stat().st_mtime_ns for f in OUTPUTS] == stamps[sid]
    for sid in BAD:
        assert rows[sid]["status"] == "error"
    assert report.counts == {"skipped": len(GOOD), "error": len(BAD)}
    _assert_clean(out, GOOD)


def test_worker_killed_mid_study_is_replaced_and_the_study_done_once(local_ray, first_batch, cohort, tmp_path):
    """SIGKILL the worker while it segments the first study (its partial folder exists); the batch goes on."""
    reference, _, _ = first_batch
    ids = list(GOOD) + ["corrupt"]
    table = cohort.write_csv(tmp_path / "s.csv", ids)
    out = tmp_path / "out"
    victim = GOOD[0]
    killed: dict[str, object] = {}

    def kill_when_running(pid: int) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(out.glob(f".partial.*.{victim}")):  # run_segment is running for it in that worker
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
                return
            time.sleep(0.005)

    events = Events()

    def on_event(kind, data):
        events(kind, data)
        if kind == "started" and data["id"] == victim and "thread" not in killed:
            killed["thread"] = threading.Thread(target=kill_when_running, args=(data["pid"],), daemon=True)
            killed["thread"].start()

    report = run_batch(table, out, SETTINGS, workers=2, on_event=on_event, notify=events.notes.append)
    assert "pid" in killed, "the victim study finished before its partial folder was seen"
    rows = _rows(out)
    assert rows[victim]["status"] == "ok" and rows[victim]["attempts"] == "2"
    assert not rows[victim]["worker"].endswith(f":{killed['pid']}")
    assert any(f"died while segmenting {victim} (attempt 1 of 3)" in n for n in events.notes)
    assert events.ids("started").count(victim) == 2 and events.ids("finished").count(victim) == 1
    for sid in GOOD:  # every good study done exactly once, and the same as in the first batch
        assert rows[sid]["status"] == "ok"
        assert events.ids("finished").count(sid) == 1
        assert np.array_equal(_labels(out / sid), _labels(reference / sid)), sid
    assert rows["corrupt"]["status"] == "error"
    _assert_clean(out, GOOD)  # the killed worker's partial folder is gone
    assert any(w.endswith(f":{killed['pid']}") for w in report.workers)  # the killed worker had started
    assert all(s["model_loads"] == 1 for s in report.workers.values() if s["studies"])  # each loaded it once


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find Ray's processes")
def test_ctrl_c_keeps_finished_studies_and_stops_ray(cohort, tmp_path):
    out = tmp_path / "out"
    studies = [f"{sid}_{k}" for k in range(4) for sid in GOOD]  # enough work left when the first is done
    table = tmp_path / "s.csv"
    table.write_text("".join(f"{sid},{cohort.paths[sid.rsplit('_', 1)[0]]},{cohort.modality[sid.rsplit('_', 1)[0]]}\n"
                             for sid in studies), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "MedDiffSegLib", "batch", str(table), "--out", str(out), "--organ", "liver",
         "--model", "abdomen-ct", "--samples", "1", "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:  # until one study is done
            rows = _rows(out) if (out / "batch.csv").exists() else {}
            if any(r["status"] == "ok" for r in rows.values()):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        ray_processes = _descendants(proc.pid)
        assert ray_processes  # the command's own local Ray (GCS, raylet, workers)
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "cancelled; the finished studies are kept" in stderr
    rows = _rows(out)
    assert list(rows) == studies
    assert {r["status"] for r in rows.values()} <= {"ok", "cancelled", "pending"}
    assert any(r["status"] != "ok" for r in rows.values())
    done = [sid for sid, r in rows.items() if r["status"] == "ok"]
    assert done
    _assert_clean(out, done)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in ray_processes):
        time.sleep(0.5)
    assert not [p for p in ray_processes if _alive(p)], "Ray processes outlived the cancelled batch"
