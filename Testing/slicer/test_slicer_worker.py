"""The background-process path with the real worker process (``python -m MedDiffSegLib.inference.worker``).

- the worker's protocol: only JSON lines on stdout (start, device, progress..., done | error),
  stray prints moved to stderr, readable errors with the right exit status;
- ``BackgroundSegmentation`` driven by polling, as the Widget's QTimer does: progress lines
  arrive, the outputs are read back into nodes identical to the library's run, Cancel kills the
  whole process group within 2 s and leaves the scene and the temporary folder as they were, a
  failing worker reaches the user as a readable message with details.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tinymodels import write_ellipsoid_ct

from MedDiffSegLib.inference import worker
from MedDiffSegLogicLib import geometry, nodes
from MedDiffSegLogicLib.process import SubprocessRunner, waitUntil, workerCommand
from MedDiffSegLogicLib.segmentation import SegmentOptions
from slicer_harness import ORGANS, SAMPLES, SEED, assert_scene_unchanged, scene_state

WORKER_TIMEOUT = 300


def process_group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` still runs (zombies awaiting their reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - not Linux
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            return True
    return False


def run_worker(request: dict, tmp_path: Path, timeout=WORKER_TIMEOUT) -> tuple[int, list[dict], str]:
    request_path = tmp_path / "request.json"
    request_path.write_text(json.dumps(request))
    proc = subprocess.run(workerCommand(str(request_path), sys.executable), capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    events = [json.loads(ln) for ln in lines]  # every stdout line is one JSON object
    return proc.returncode, events, proc.stderr


@pytest.fixture(scope="module")
def small_nifti(tmp_path_factory) -> Path:
    return write_ellipsoid_ct(tmp_path_factory.mktemp("worker_input") / "small.nii.gz", (5, 36, 44))


# -- the worker process on its own ---------------------------------------------------------------------------


def test_worker_reports_json_progress_and_writes_outputs(tmp_path, small_nifti, tiny_package):
    out = tmp_path / "out"
    code, events, stderr = run_worker({"input": str(small_nifti), "out_dir": str(out), "organs": ORGANS,
                                       "model": str(tiny_package.path), "samples": 2, "seed": 3, "device": "cpu"}, tmp_path)
    assert code == 0, stderr
    types = [e["type"] for e in events]
    assert types[0] == "start" and events[0]["protocol"] == worker.PROTOCOL_VERSION
    assert types[1] == "device" and events[1]["gpu"] is False and events[1]["device"].startswith("cpu")
    assert types[-1] == "done" and types.count("done") == 1 and "error" not in types
    progress = [e for e in events if e["type"] == "progress"]
    assert len(progress) >= 5
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    stages = [e["stage"] for e in progress]
    assert stages[0] == "read" and stages[-1] == "write" and "network" in stages
    summary = events[-1]["summary"]
    assert [o["name"] for o in summary["organs"]] == ORGANS and summary["settings"]["seed"] == 3
    assert Path(events[-1]["out_dir"]) == out.absolute()
    assert {p.name for p in out.iterdir()} == {"segmentation.nii.gz", "uncertainty.nii.gz", "summary.json"}


@pytest.mark.parametrize("request_patch, kind, exit_code, text", [
    ({"organs": ["kidney"]}, "ModelError", 3, "does not know organ"),
    ({"samples": 0}, "MedDiffSegError", 1, "samples must be at least 1"),
    ({"input": "/nonexistent/ct.nii.gz"}, "InputError", 2, "/nonexistent/ct.nii.gz"),
    ({"bogus": 1}, "RequestError", 2, "unknown key"),
    ({"samples": "five"}, "RequestError", 2, "must be of type int"),
])
def test_worker_errors_are_one_readable_line_and_an_exit_status(tmp_path, small_nifti, tiny_package,
                                                                 request_patch, kind, exit_code, text):
    request = {"input": str(small_nifti), "out_dir": str(tmp_path / "out"), "organs": ORGANS,
               "model": str(tiny_package.path), "device": "cpu"}
    request.update(request_patch)
    code, events, stderr = run_worker(request, tmp_path)
    assert code == exit_code
    assert events[0]["type"] == "start" and events[-1]["type"] == "error"
    assert events[-1]["kind"] == kind and events[-1]["exit_code"] == exit_code
    assert text in events[-1]["message"]
    assert not (tmp_path / "out").exists(), "a failed run leaves no output"


def test_worker_without_request_file_fails_cleanly(tmp_path):
    proc = subprocess.run(workerCommand(str(tmp_path / "missing.json"), sys.executable), capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=WORKER_TIMEOUT)
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]
    assert proc.returncode == 2 and events[-1]["kind"] == "RequestError" and "cannot read request file" in events[-1]["message"]


def test_stray_output_goes_to_stderr_not_into_the_protocol(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from MedDiffSegLib.inference.worker import ProtocolWriter, protocol_stream
        emit = ProtocolWriter(protocol_stream())
        print("a stray print")
        os.write(1, b"C-level output on fd 1\\n")
        emit({"type": "start", "protocol": 1})
        sys.stdout.write("more noise\\n")
        emit({"type": "done", "summary": {}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(ln)["type"] for ln in proc.stdout.splitlines()] == ["start", "done"]
    for noise in ("a stray print", "C-level output on fd 1", "more noise"):
        assert noise in proc.stderr


def test_sigterm_cancels_the_worker_cleanly(tmp_path, data_dir, tiny_package):
    """SIGTERM = cancel: the run stops at the next window batch, no output is left, exit status 130."""
    out = tmp_path / "out"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"input": str(data_dir / "totalsegmentator" / "example_ct.nii.gz"),
                                   "out_dir": str(out), "organs": ORGANS, "model": str(tiny_package.path),
                                   "samples": 8, "device": "cpu"}))
    runner = SubprocessRunner()
    runner.start(workerCommand(str(request), sys.executable))
    events = []

    def in_network():
        events.extend(json.loads(ln) for ln in runner.readLines())
        return any(e.get("stage") == "network" for e in events) or runner.poll() is not None

    assert waitUntil(in_network, WORKER_TIMEOUT)
    os.kill(runner.pid, signal.SIGTERM)  # the worker alone, not its group: it must stop by itself
    assert runner.wait(30) == 130
    events.extend(json.loads(ln) for ln in runner.readLines())
    assert events[-1]["type"] == "error" and events[-1]["kind"] == "Cancelled"
    assert not out.exists()


# -- the process runner --------------------------------------------------------------------------------------------


def test_terminate_kills_the_whole_process_tree(tmp_path):
    """A child that ignores SIGTERM and a grandchild: both gone within 2 s of terminate()."""
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(120)
    """)
    runner = SubprocessRunner()
    runner.start([sys.executable, "-c", script])
    lines = []
    assert waitUntil(lambda: lines.extend(runner.readLines()) or "ready" in lines, 60)
    grandchild = int(pid_file.read_text())
    t0 = time.monotonic()
    runner.terminate(grace=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert runner.poll() is not None
    assert not process_group_alive(runner.pid), "a process of the tree survived"
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


class ScriptedRunner:
    """A ProcessRunner that replays lines: shows the Logic depends on the protocol only."""

    def __init__(self, lines, exit_code, stderr=""):
        self._lines, self._exit, self._stderr = list(lines), exit_code, stderr
        self.pid = 4242
        self.started_with = None
        self.terminated = False

    def start(self, args, env=None, cwd=None):
        self.started_with = list(args)

    def readLines(self):
        out, self._lines = self._lines, []
        return out

    def errorText(self):
        return self._stderr

    def poll(self):
        return None if self._lines else self._exit

    def wait(self, timeout=None):
        return self._exit

    def terminate(self, grace=1.0):
        self.terminated = True


def test_a_worker_dying_without_a_message_is_reported_with_its_stderr(mrml, slicer, module, tiny_package):
    volume = slicer.util.addVolumeFromArray(np.zeros((3, 8, 8), np.int16), name="v")
    before = mrml.node_count()
    runner = ScriptedRunner(['{"type":"start","protocol":1}', "not json: a log line",
                             '{"type":"progress","stage":"read","fraction":0.01,"message":"reading input"}'],
                            exit_code=-9, stderr="Killed (out of memory)\n")
    job = module.MedDiffSegLogic().startBackgroundSegmentation(volume, SegmentOptions(ORGANS, model=tiny_package),
                                                               runner=runner)
    assert runner.started_with[-3:-1] == ["MedDiffSegLib.inference.worker", "--request"]
    temp = job.tempDir
    assert (temp / "input.nrrd").is_file() and json.loads((temp / "request.json").read_text())["organs"] == ORGANS
    assert job.wait(timeout=5) == "failed"
    assert "exit status -9" in job.errorMessage and "out of memory" in job.errorDetails
    assert job.logLines == ["not json: a log line"]
    assert not temp.exists() and mrml.node_count() == before
    with pytest.raises(RuntimeError, match="no results"):
        job.loadResults()


# -- the background segmentation on the real CT ----------------------------------------------------------------------


def test_background_segmentation_reads_outputs_back_into_nodes(mrml, slicer, module, ct_node, tiny_package, library_ct):
    logic = module.MedDiffSegLogic()
    before = mrml.node_count()
    job = logic.startBackgroundSegmentation(ct_node, SegmentOptions(ORGANS, model=tiny_package, samples=SAMPLES,
                                                                    seed=SEED, device="cpu"))
    temp = job.tempDir
    assert mrml.node_count() == before, "starting writes the input through a storage node outside the scene"
    events = []
    assert job.wait(timeout=WORKER_TIMEOUT, onEvent=events.append) == "succeeded", (job.errorMessage, job.errorDetails)
    assert mrml.node_count() == before, "nothing enters the scene before loadResults"
    progress = [e for e in events if e["type"] == "progress"]
    assert len(progress) >= 5 and progress[-1]["fraction"] == 1.0
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"
    assert job.tracker.device.startswith("cpu") and job.tracker.fraction == 1.0

    result = job.loadResults()
    assert job.state == "loaded" and not temp.exists()
    labels = sitk.GetArrayViewFromImage(library_ct.labels)
    for label, organ in enumerate(ORGANS, start=1):
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(result.segmentationNode, organ, ct_node)
        assert np.array_equal(mask.astype(bool), labels == label)
    assert np.array_equal(geometry.ijkToRasArray(result.uncertaintyNode), geometry.ijkToRasArray(ct_node))
    from MedDiffSegLib.uncertainty.ensemble import variance_for_storage  # the map as written to disk

    assert np.array_equal(slicer.util.arrayFromVolume(result.uncertaintyNode),
                          variance_for_storage(sitk.GetArrayViewFromImage(library_ct.uncertainty)))
    assert [o["name"] for o in result.organs] == ORGANS
    assert result.organs[0]["volume_ml"] == pytest.approx(library_ct.stats[0].volume_ml)
    assert result.segmentationNode.GetSegmentation().GetSegment("liver").GetName() == "Liver"
    assert result.durationSeconds > 0
    # the package folder of the run is recorded: DICOM export reads the organ codes from it again
    from MedDiffSegLogicLib import dicomexport

    assert Path(dicomexport.resolveModel(result.segmentationNode)[0].path).resolve() == Path(tiny_package.path).resolve()


def test_cancel_kills_the_worker_within_2s_and_leaves_the_scene_unchanged(mrml, slicer, module, ct_node, tiny_package):
    before = scene_state(mrml, ct_node)
    job = module.MedDiffSegLogic().startBackgroundSegmentation(
        ct_node, SegmentOptions(ORGANS, model=tiny_package, samples=8, seed=SEED, device="cpu"))
    temp, pgid = job.tempDir, job.runner.pid

    def sampling():
        job.poll()
        return job.tracker.stage == "network" or job.finished

    assert waitUntil(sampling, WORKER_TIMEOUT)
    assert job.state == "running", "the run finished before it could be cancelled"
    assert process_group_alive(pgid)
    t0 = time.monotonic()
    job.cancel()
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"cancel took {elapsed:.2f} s"
    assert job.state == "cancelled" and job.finished
    assert not process_group_alive(pgid), "worker process group still alive after cancel"
    assert not temp.exists(), "temporary folder left behind"
    assert_scene_unchanged(before, mrml, ct_node)
    with pytest.raises(RuntimeError):
        job.loadResults()


def test_failing_worker_reaches_the_user_and_adds_no_nodes(mrml, slicer, module, tiny_package, tmp_path):
    """A package whose weights were modified: detected in the worker (sha256), reported, nothing added."""
    import shutil

    broken = tmp_path / "tiny-broken"
    shutil.copytree(tiny_package.path, broken)
    weights = broken / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    volume = slicer.util.addVolumeFromArray(np.full((4, 24, 24), -1000, np.int16), name="v")
    before = nodes.nodeIDs(mrml.scene)
    job = module.MedDiffSegLogic().startBackgroundSegmentation(volume, SegmentOptions(ORGANS, model=str(broken), device="cpu"))
    temp = job.tempDir
    assert job.wait(timeout=WORKER_TIMEOUT) == "failed"
    assert job.errorKind == "ModelError" and "does not match its sha256" in job.errorMessage
    assert nodes.nodeIDs(mrml.scene) == before and not temp.exists()


# -- device information from a worker, orphans, a cancel that returns at once (issue 14) ----------------------------


def test_device_info_mode_says_the_device_without_a_run(tmp_path):
    """The Slicer module asks a worker which device a run would use: torch and CUDA stay out of Slicer's process."""
    from MedDiffSegLogicLib.process import DeviceProbeError, probeDevice

    proc = subprocess.run([sys.executable, "-u", "-m", worker.__name__, "--device-info", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert [e["type"] for e in events] == ["start", "device"]
    assert events[1]["device"].startswith("cpu") and events[1]["gpu"] is False
    info = probeDevice("cpu", python=sys.executable)
    assert info == {"device": events[1]["device"], "gpu": False}
    import torch

    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-u", "-m", worker.__name__, "--device-info", "--device", "cuda"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 4
        assert json.loads(proc.stdout.splitlines()[-1])["kind"] == "DeviceError"
        with pytest.raises(DeviceProbeError, match="CUDA is not available"):
            probeDevice("cuda", python=sys.executable)
    with pytest.raises(DeviceProbeError, match="cannot start the worker"):
        probeDevice("cpu", python=str(tmp_path / "no-python"))


def test_cancel_flag_watches_the_given_process_not_the_launcher():
    """Inside Slicer the worker's parent is the PythonSlicer launcher, which outlives a crashed Slicer: the
    flag watches the process id it is given, and the watchdog ends the run (exit 130) after the grace period."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        exits = []
        flag = worker.CancelFlag(watch_pid=sleeper.pid)
        assert not flag() and not flag.owner_gone()
        flag.watch(interval=0.05, grace=0.3, exit=exits.append)
        time.sleep(0.2)
        assert not flag() and exits == []
        sleeper.kill()
        sleeper.wait(10)
        assert waitUntil(lambda: flag.orphaned, 5) and flag()
        assert waitUntil(lambda: exits == [130], 5), "the watchdog did not end the run"
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert worker.pid_alive(os.getpid()) and not worker.pid_alive(sleeper.pid)


def test_worker_started_through_a_launcher_stops_when_slicer_dies(tmp_path, data_dir, tiny_package):
    """Slicer -> launcher -> worker: killing "Slicer" (the watched process) ends the run even though the
    launcher, the worker's parent, is still alive; no output is left."""
    slicer_stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    out = tmp_path / "out"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"input": str(data_dir / "totalsegmentator" / "example_ct.nii.gz"),
                                   "out_dir": str(out), "organs": ORGANS, "model": str(tiny_package.path),
                                   "samples": 8, "device": "cpu", "watch_pid": slicer_stand_in.pid}))
    launcher = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]
    runner = SubprocessRunner()
    try:
        runner.start(launcher + workerCommand(str(request), sys.executable))
        events = []

        def in_network():
            events.extend(json.loads(ln) for ln in runner.readLines())
            return any(e.get("stage") == "network" for e in events) or runner.poll() is not None

        assert waitUntil(in_network, WORKER_TIMEOUT)
        assert runner.poll() is None, "the run ended before Slicer's stand-in was killed"
        slicer_stand_in.kill()
        slicer_stand_in.wait(10)
        t0 = time.monotonic()
        code = runner.wait(worker.ORPHAN_GRACE_S + 20)
        assert code == 130, f"exit status {code} after {time.monotonic() - t0:.1f} s"
        events.extend(json.loads(ln) for ln in runner.readLines())
        assert events[-1]["type"] == "error" and events[-1]["kind"] == "Cancelled"
        assert not out.exists()
    finally:
        runner.terminate(0.5)
        if slicer_stand_in.poll() is None:
            slicer_stand_in.kill()


def test_cancel_without_waiting_returns_at_once_and_ends_the_tree(mrml, slicer, module, tiny_package, monkeypatch):
    """The Widget's cancel: the job is cancelled at once (well under 1 s) even when the worker ignores SIGTERM;
    the process tree is gone after the grace period and the temporary folder is removed."""
    import MedDiffSegLogicLib.segmentation as segmentation

    stubborn = textwrap.dedent("""
        import json, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"type": "start", "protocol": 1}), flush=True)
        time.sleep(120)
    """)
    monkeypatch.setattr(segmentation, "workerCommand", lambda request, python=None: [sys.executable, "-c", stubborn])
    volume = slicer.util.addVolumeFromArray(np.full((3, 16, 16), -1000, np.int16), name="v")
    before = scene_state(mrml, volume)
    job = module.MedDiffSegLogic().startBackgroundSegmentation(volume, SegmentOptions(ORGANS, model=tiny_package))
    temp, pgid = job.tempDir, job.runner.pid
    assert waitUntil(lambda: job.poll() is not None and bool(job.events), 30), "the stand-in worker did not start"
    t0 = time.monotonic()
    job.cancel(wait=False)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.2, f"cancel took {elapsed:.2f} s"
    assert job.state == "cancelled" and job.finished
    assert job.waitStopped(5)
    assert not process_group_alive(pgid) and not temp.exists()
    assert_scene_unchanged(before, mrml, volume)
