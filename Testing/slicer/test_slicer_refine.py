"""Refine mode: the persistent worker (``MedDiffSegLib.interactive.worker``) through its client, and the Widget.

The model is the rule-based interactive method of ``Testing/rulemodels.py`` (a positive click makes the
ball of half the click radius the organ, a negative one takes it away, a box keeps the organ inside it),
registered in the worker process by a wrapper command, so every expected voxel is known. The Widget
tests drive the real code paths: Start refining, the place tools (a control point added to the active
place node, as a click in a slice view does), the worker's replies applied to the segment and the
uncertainty volume, Ctrl+Z / Ctrl+Y, the lock list, suggestions, Stop; the reference for every array is
an :class:`InteractiveSession` run in this process on the same inputs with the same clicks.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import SimpleITK as sitk

import rulemodels
from MedDiffSegLogicLib import refineworker
from MedDiffSegLogicLib.refineworker import RefineWorker, parseRefineLine, refineAvailability
from slicer_harness import GuiSession

WORKER_MODULE = "MedDiffSegLib.interactive.worker"
TIMEOUT = 120
ORGANS = ["liver", "spleen"]
SAMPLES = 3

# The case of Testing/lib/test_session.py: a 40×36×20 CT (2×2×3 mm), a liver block and a spleen block.
SHAPE = (20, 36, 40)  # [K, J, I] = [z, y, x]
SPACING = (2.0, 2.0, 3.0)
ORIGIN_LPS = (-40.0, -30.0, 100.0)


def case_arrays():
    image = np.full(SHAPE, -500, np.int16)
    image[2:18, 4:32, 4:36] = 60
    labels = np.zeros(SHAPE, np.uint8)
    labels[6:14, 8:18, 8:20] = 1
    labels[6:14, 8:18, 24:32] = 2
    uncertainty = np.zeros(SHAPE, np.float32)
    uncertainty[8:13, 18:22, 10:16] = 0.24  # just below the liver: a likely miss (a positive suggestion)
    return image, labels, uncertainty


def case_image(array) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN_LPS)
    return img


GEOMETRY = {"spacing": SPACING, "origin": ORIGIN_LPS, "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}


def lps(ijk) -> tuple[float, float, float]:
    return case_image(np.zeros(SHAPE, np.int16)).TransformIndexToPhysicalPoint(tuple(int(v) for v in ijk))


def ras(ijk) -> tuple[float, float, float]:
    x, y, z = lps(ijk)
    return (-x, -y, z)


def rule_command(requestPath: str, python=None) -> list[str]:
    return rulemodels.worker_command(WORKER_MODULE) + ["--session", requestPath]


@pytest.fixture(scope="module")
def rule_pkg(tmp_path_factory):
    return rulemodels.save_rule_package(tmp_path_factory.mktemp("rule") / "rule-interactive", roi=64)


@pytest.fixture(scope="module")
def slow_pkg(tmp_path_factory):
    return rulemodels.save_rule_package(tmp_path_factory.mktemp("rule-slow") / "rule-slow", roi=64, delay_s=1.0,
                                        name="rule-slow")


def reference_session(rule_pkg, labels=None, uncertainty=None):
    """The library's session in this process on the same inputs (the reference for every array)."""
    from MedDiffSegLib.interactive.session import InteractiveSession
    from MedDiffSegLib.registry import ModelPackage

    image, labels0, unc0 = case_arrays()
    pkg = ModelPackage.from_folder(rule_pkg.path)
    return InteractiveSession(case_image(image), pkg, ORGANS, case_image(labels0 if labels is None else labels),
                              case_image(unc0 if uncertainty is None else uncertainty), samples=SAMPLES, seed=0,
                              device="cpu", method=rulemodels.PromptRuleMethod(pkg.config))


def start_worker(package, tmp_path, **kw) -> RefineWorker:
    image, labels, uncertainty = case_arrays()
    worker = RefineWorker(command=rule_command, tempRoot=str(tmp_path))
    worker.start(image, labels, uncertainty, GEOMETRY, ORGANS, str(package.path), device="cpu", samples=SAMPLES, **kw)
    return worker


def answer(worker: RefineWorker, cid: int, events: list) -> dict:
    assert worker.waitUntil(lambda: cid not in worker.pending, TIMEOUT, onEvent=events.append), \
        (worker.state, worker.errorMessage, worker.errorDetails[-3000:])
    return next(e for e in reversed(events) if e["type"] == "reply" and e.get("id") == cid)


def slab_of(array: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    return array[tuple(index)]


# -- can a model refine -----------------------------------------------------------------------------------


def test_refine_availability_is_read_from_model_json(rule_pkg, tiny_package, tmp_path):
    from MedDiffSegLib.interactive.prompts import PROMPT_CHANNELS

    assert refineworker.PROMPT_CHANNELS == PROMPT_CHANNELS
    assert refineAvailability(rule_pkg.path) == (True, "")
    ok, why = refineAvailability(tiny_package.path, "tiny-guided")
    assert not ok and "was not trained with clicks" in why and "tiny-guided 0.0.1" in why
    ok, why = refineAvailability(tmp_path / "gone", "abdomen-ct")
    assert not ok and "not installed" in why and "abdomen-ct" in why
    assert parseRefineLine("not json") is None and parseRefineLine('{"type": "other"}') is None
    assert parseRefineLine('{"type": "reply", "id": 1, "ok": false}')["message"] == "the command failed"


# -- the worker's protocol, through the client --------------------------------------------------------------


def test_worker_starts_refines_undoes_locks_suggests_and_shuts_down(rule_pkg, tmp_path):
    worker = start_worker(rule_pkg, tmp_path)
    folder = worker.folder
    assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700", "the arrays go to a private folder"
    events: list = []
    try:
        assert worker.waitUntil(lambda: worker.state == "ready", TIMEOUT, onEvent=events.append), \
            (worker.errorMessage, worker.errorDetails[-3000:])
        kinds = [e["type"] for e in events]
        assert kinds[:2] == ["start", "device"] and "ready" in kinds and worker.device.startswith("cpu")
        assert next(e for e in events if e["type"] == "ready")["organs"] == ORGANS
        ref = reference_session(rule_pkg)

        # a positive click below the liver: the update is the organ's mask and the uncertainty on the slab it reached
        click = lps((12, 27, 10))
        reply = answer(worker, worker.refine("liver", positive=[click]), events)
        assert reply["ok"] and reply["can_undo"] and not reply["can_redo"], reply
        inter = ref.refine("liver", positive=[click])
        assert reply["interaction"]["slices"] == inter.slices and reply["interaction"]["changed_voxels"] == inter.changed_voxels > 0
        organ, axis, start, stop, mask, unc = worker.readUpdate(reply["update"])
        assert (organ, axis, start, stop) == ("liver", 0, min(inter.slices), max(inter.slices) + 1)
        assert not (folder / reply["update"]["mask"]).exists(), "the client removes what it has read"
        expected = sitk.GetArrayFromImage(ref.labels)
        assert np.array_equal(mask, slab_of(expected, axis, start, stop) == 1)
        assert np.array_equal(unc, slab_of(sitk.GetArrayFromImage(ref.uncertainty), axis, start, stop))
        assert worker.waitUntil(lambda: any(e["type"] == "suggestions" for e in events), TIMEOUT, onEvent=events.append)

        # a bad click is one readable reply; the worker goes on
        reply = answer(worker, worker.refine("liver", positive=[(500.0, 0.0, 0.0)]), events)
        assert not reply["ok"] and reply["kind"] == "InputError" and "outside the image" in reply["message"]
        assert worker.runner.writeLine('{"id": 99, "cmd": "explode"}')
        assert worker.waitUntil(lambda: any(e.get("id") == 99 for e in events), TIMEOUT, onEvent=events.append)
        assert next(e for e in events if e.get("id") == 99)["kind"] == "RequestError"
        reply = answer(worker, worker.send("refine", organ="liver", positive=[["a", 1, 2]]), events)
        assert reply["kind"] == "RequestError" and "[x, y, z]" in reply["message"]

        # a locked organ is refused; unlocked, it can be corrected again
        assert answer(worker, worker.lock("spleen", True), events)["locked"] == ["spleen"]
        reply = answer(worker, worker.refine("spleen", negative=[lps((28, 12, 9))]), events)
        assert not reply["ok"] and "spleen is locked" in reply["message"]
        assert answer(worker, worker.lock("spleen", False), events)["locked"] == []

        # undo and redo: the slab as it was, then as the correction left it
        reply = answer(worker, worker.undo(), events)
        assert reply["ok"] and reply["can_redo"] and not reply["can_undo"]
        organ, axis, start, stop, mask, unc = worker.readUpdate(reply["update"])
        assert np.array_equal(mask, slab_of(case_arrays()[1], axis, start, stop) == 1)
        assert np.array_equal(unc, slab_of(case_arrays()[2], axis, start, stop))
        assert answer(worker, worker.undo(), events)["update"] is None  # nothing left to undo
        reply = answer(worker, worker.redo(), events)
        organ, axis, start, stop, mask, unc = worker.readUpdate(reply["update"])
        assert np.array_equal(mask, slab_of(expected, axis, start, stop) == 1)

        # where to click next, on request
        reply = answer(worker, worker.suggest("liver", 2), events)
        assert reply["ok"] and reply["organ"] == "liver"
        assert [s["point_mm"] for s in reply["suggestions"]] == [list(np.round(s.point_mm, 2)) for s in ref.suggest("liver", 2)]
    finally:
        worker.shutdown(timeout=30)
    assert worker.state == "stopped" and worker.exitCode == 0, (worker.errorMessage, worker.errorDetails[-2000:])
    assert events[-1]["type"] != "error" and not folder.exists()
    with pytest.raises(RuntimeError, match="not running"):
        worker.refine("liver", positive=[click])


def test_a_running_correction_can_be_cancelled(slow_pkg, tmp_path):
    worker = start_worker(slow_pkg, tmp_path, encodeAhead=False)
    events: list = []
    try:
        assert worker.waitUntil(lambda: worker.state == "ready", TIMEOUT, onEvent=events.append), worker.errorMessage
        cid = worker.refine("liver", positive=[lps((12, 27, 10))])
        assert worker.busy
        assert worker.waitUntil(lambda: worker.progress.get("stage") == "refine", TIMEOUT, onEvent=events.append)
        t0 = time.monotonic()
        worker.cancel()
        reply = answer(worker, cid, events)
        assert time.monotonic() - t0 < 5.0, "the correction did not stop at its next batch"
        assert not reply["ok"] and reply["kind"] == "Cancelled" and not reply["can_undo"]
        assert not worker.busy and worker.state == "ready"
        # the session is unchanged: undo has nothing to take back
        assert answer(worker, worker.undo(), events)["update"] is None
    finally:
        worker.shutdown(timeout=30)
    assert worker.state == "stopped"


def test_a_worker_crash_is_reported_not_waited_for(slow_pkg, tmp_path):
    worker = start_worker(slow_pkg, tmp_path, encodeAhead=False)
    events: list = []
    assert worker.waitUntil(lambda: worker.state == "ready", TIMEOUT, onEvent=events.append), worker.errorMessage
    cid = worker.refine("liver", positive=[lps((12, 27, 10))])
    assert worker.waitUntil(lambda: worker.progress.get("stage") == "refine", TIMEOUT, onEvent=events.append)
    folder = worker.folder
    os.kill(worker.runner.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    t0 = time.monotonic()
    assert worker.waitUntil(lambda: worker.state == "failed", 10, onEvent=events.append)
    assert time.monotonic() - t0 < 10
    assert "ended unexpectedly (exit status -9)" in worker.errorMessage
    reply = next(e for e in events if e["type"] == "reply" and e["id"] == cid)
    assert not reply["ok"] and reply["kind"] == "WorkerEnded" and not worker.pending and not worker.busy
    assert not folder.exists()
    with pytest.raises(RuntimeError, match="not running"):
        worker.undo()


def test_a_worker_that_does_not_receive_its_commands_is_ended_with_the_reason(rule_pkg, tmp_path):
    """A launcher that does not pass stdin on: the worker gets ready but never reads a command. The first
    command (a ping) goes unanswered, and the client ends the worker with a message instead of waiting."""
    deaf = ("import os, sys; read_end, _write_end = os.pipe(); sys.stdin = os.fdopen(read_end); "
            "sys.argv[1:] = {args!r}; exec(compile({code!r}, '<worker>', 'exec'))")

    def command(requestPath, python=None):
        base = rule_command(requestPath)
        return base[:3] + [deaf.format(args=base[4:], code=base[3])]

    image, labels, uncertainty = case_arrays()
    worker = RefineWorker(command=command, tempRoot=str(tmp_path))
    worker.PING_TIMEOUT_S = 2.0
    worker.start(image, labels, uncertainty, GEOMETRY, ORGANS, str(rule_pkg.path), device="cpu", samples=SAMPLES)
    events: list = []
    assert worker.waitUntil(lambda: worker.exitCode is not None, TIMEOUT, onEvent=events.append)
    assert "ready" in [e["type"] for e in events], (worker.errorMessage, worker.errorDetails[-2000:])
    assert worker.state == "failed" and "does not receive its commands" in worker.errorMessage
    assert not worker.pending and worker.folder is None


def test_a_model_without_prompts_stops_the_worker_with_its_reason(tiny_package, tmp_path):
    worker = start_worker(tiny_package, tmp_path)
    assert worker.waitUntil(lambda: worker.exitCode is not None, TIMEOUT) and worker.state == "failed"
    assert worker.errorKind == "ModelError" and "not trained for interactive correction" in worker.errorMessage
    assert worker.exitCode == 3 and worker.folder is None


def test_a_malformed_session_request_is_one_error_line(rule_pkg, tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "broken"
    folder.mkdir()
    image, labels, _ = case_arrays()
    np.save(folder / "image.npy", image)
    np.save(folder / "labels.npy", labels[:5])  # a label map of another shape
    request = {"folder": str(folder), "image": "image.npy", "labels": "labels.npy", "spacing": list(SPACING),
               "origin": list(ORIGIN_LPS), "direction": list(GEOMETRY["direction"]), "organs": ORGANS,
               "model": str(rule_pkg.path), "device": "cpu"}

    def run(req):
        (folder / "session.json").write_text(json.dumps(req))
        done = subprocess.run(rule_command(str(folder / "session.json"), sys.executable), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=TIMEOUT)
        return done.returncode, [json.loads(line) for line in done.stdout.splitlines()]  # only JSON lines

    code, events = run(request)
    assert code == 2 and events[-1]["type"] == "error" and events[-1]["kind"] == "InputError"
    assert "the label map has shape (5, 36, 40), the image (20, 36, 40)" in events[-1]["message"]
    code, events = run({**request, "labels": "../labels.npy"})
    assert code == 2 and "must name a file in the session folder" in events[-1]["message"]
    code, events = run({**request, "spacing": [2.0, 0.0, 3.0]})
    assert code == 2 and "spacing must be positive" in events[-1]["message"]


# -- the Widget -----------------------------------------------------------------------------------------------


@pytest.fixture
def gui(slicer, monkeypatch):
    import qtfake

    session = GuiSession(slicer, monkeypatch)
    monkeypatch.setattr(slicer.util, "mainWindow", lambda *a: qtfake.QWidget())  # the shortcuts' parent
    monkeypatch.setattr(refineworker, "refineWorkerCommand", rule_command)
    yield session
    session.close()


def result_in_scene(slicer, mrml, package, samples=SAMPLES):
    """A segmentation result made by ``package`` on the case's volume, as Segment leaves it in the scene."""
    from MedDiffSegLogicLib.segmentation import buildResultNodes

    from tinymodels import TINY_ORGANS

    image, labels, uncertainty = case_arrays()
    volume = slicer.util.addVolumeFromArray(image, name="patient")
    volume.SetSpacing(*SPACING)
    volume.SetOrigin(-ORIGIN_LPS[0], -ORIGIN_LPS[1], ORIGIN_LPS[2])
    volume.SetIJKToRASDirections([[-1, 0, 0], [0, -1, 0], [0, 0, 1]])
    organs = [o.to_dict() for o in TINY_ORGANS]
    summary = {"organs": [{**o, "label": i + 1, "volume_ml": 0.0, "mean_uncertainty": 0.0} for i, o in enumerate(organs)],
               "model": {"name": package.name, "version": package.version, "weights_sha256": package.weights_sha256},
               "settings": {"samples": samples, "seed": 0}}
    return buildResultNodes(volume, labels, uncertainty, organs, summary, modelPath=str(package.path))


def pump(gui, widget, until, timeout=TIMEOUT):
    """The event loop: deferred calls and the Refine timer, until ``until()``."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, (widget.ui.refineStatusLabel.text, widget.ui.refineInfoLabel.text)
        gui.process_events()
        if widget._refineTimer.isActive():
            widget._refineTimer.fire()
        time.sleep(0.02)


def place(slicer, gui, ras_point):
    """A click in a slice view in place mode: a control point on the active place node."""
    from MedDiffSegLogicLib.refine import interactionNodes

    selection, interaction = interactionNodes(slicer.mrmlScene)
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    node = slicer.mrmlScene.GetNodeByID(selection.GetActivePlaceNodeID())
    node.AddControlPointWorld(*ras_point)
    gui.process_events()
    return node


def segment_arrays(slicer, result):
    seg, volume = result.segmentationNode, result.volumeNode
    masks = {o: slicer.util.arrayFromSegmentBinaryLabelmap(seg, o, volume).astype(bool) for o in ORGANS}
    return masks, np.array(slicer.util.arrayFromVolume(result.uncertaintyNode))


def same_as(slicer, result, ref) -> bool:
    masks, unc = segment_arrays(slicer, result)
    labels = sitk.GetArrayFromImage(ref.labels)
    return (all(np.array_equal(masks[o], labels == i) for i, o in enumerate(ORGANS, start=1))
            and np.array_equal(unc, sitk.GetArrayFromImage(ref.uncertainty)))


def test_refine_mode_in_the_panel(gui, slicer, mrml, module, rule_pkg):
    import vtk

    import qtfake

    mrml.add_slice_views()
    result = result_in_scene(slicer, mrml, rule_pkg)
    widget = gui.open(module)
    ui = widget.ui
    assert not ui.refineStartButton.enabled and "Segment a volume first" in ui.refineInfoLabel.text
    widget.showResult(result)  # what the end of a Segment run does
    assert ui.refineStartButton.enabled and ui.refineStartButton.text == "Start refining", ui.refineInfoLabel.text
    assert not ui.refinePositiveButton.enabled

    ui.refineStartButton.click()
    refine = widget._refine
    assert refine is not None and ui.refineStartButton.text == "Stop refining" and not gui.errors
    assert [d for _, d in ui.refineOrganComboBox.items()] == ORGANS
    assert [ui.refineLockListWidget.item(i).text() for i in range(2)] == ["Liver", "Spleen"]
    pump(gui, widget, lambda: refine.state == "ready" and refine.suggestions)
    ref = reference_session(rule_pkg)
    # the suggestions: one locked point list, labelled with the organ, the click's sign and the confidence
    expected = ref.suggest("liver", 3)
    node = refine.suggestionsNode()
    labels = [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
    assert labels == [f"Liver {'+' if s.positive else '-'} {s.confidence:.0%}" for s in expected] and labels[0].startswith("Liver + ")
    assert node.GetLocked() and ui.refineJumpSuggestionButton.enabled
    ui.refineJumpSuggestionButton.click()
    assert ui.refineStatusLabel.text == f"Suggestion 1/{len(expected)}: {labels[0]}"

    # only the corrected organ's segment is written
    modified: list = []

    @vtk.calldata_type(vtk.VTK_STRING)
    def on_modified(caller, event, segment_id):
        modified.append((event, segment_id))

    segmentation = result.segmentationNode.GetSegmentation()
    tags = [segmentation.AddObserver(e, on_modified) for e in (slicer.vtkSegmentation.SegmentModified,
                                                                slicer.vtkSegmentation.SourceRepresentationModified,
                                                                slicer.vtkSegmentation.RepresentationModified)]

    # + point on the liver, placed in a slice view
    ui.refinePositiveButton.click()
    assert ui.refinePositiveButton.checked and refine.placingTool() == ("liver", "positive")
    p1 = (12, 27, 10)
    points = place(slicer, gui, ras(p1))
    assert points.GetAttribute("MedDiffSeg.RefineTool") == "positive" and refine.busy
    pump(gui, widget, lambda: not refine.busy)
    ref.refine("liver", positive=[lps(p1)])
    assert same_as(slicer, result, ref), ui.refineStatusLabel.text
    assert {sid for _event, sid in modified} == {"liver"}
    assert ui.refineStatusLabel.text.startswith("Liver: ") and "voxels changed" in ui.refineStatusLabel.text
    assert points.GetNthControlPointLocked(0) and ui.refineUndoButton.enabled and not ui.refineRedoButton.enabled
    rows = {r[1]: r for r in ui.resultsTableWidget.rows()}
    volume_ml = float((sitk.GetArrayFromImage(ref.labels) == 1).sum()) * 12 / 1000
    assert rows["Liver"][2] == f"{volume_ml:.1f}", "the results table shows the corrected volume"
    assert [i["organ"] for i in result.summary["interactions"]] == ["liver"]
    # the suggestions are refreshed after the correction (the click took away the likely miss)
    refreshed = [s.to_dict() for s in ref.suggest("liver", 3)]
    assert refreshed != [s.to_dict() for s in expected]
    pump(gui, widget, lambda: refine.suggestions == refreshed)
    assert node.GetNumberOfControlPoints() == len(refreshed)

    # - point on the spleen (the tool follows the organ chosen)
    ui.refineOrganComboBox.currentIndex = 1
    ui.refineNegativeButton.click()
    assert refine.placingTool() == ("spleen", "negative")
    modified.clear()
    p2 = (28, 12, 9)
    place(slicer, gui, ras(p2))
    pump(gui, widget, lambda: not refine.busy)
    ref.refine("spleen", negative=[lps(p2)])
    assert same_as(slicer, result, ref) and {sid for _event, sid in modified} == {"spleen"}

    # a box on the liver
    ui.refineOrganComboBox.currentIndex = 0
    ui.refineBoxButton.click()
    assert refine.placingTool() == ("liver", "box")
    before_box = ref.labels, ref.uncertainty
    box_node = slicer.mrmlScene.GetNodeByID(slicer.mrmlScene.GetNodeByID("vtkMRMLSelectionNodeSingleton").GetActivePlaceNodeID())
    box_node.SetCenterWorld(15.0, 5.0, 128.5)  # voxels i 10..15, j 10..15, k 8..11
    box_node.SetSizeWorld(10.0, 10.0, 9.0)
    gui.process_events()
    pump(gui, widget, lambda: not refine.busy)
    ref.refine("liver", box=[*lps((10, 10, 8)), *lps((15, 15, 11))])
    assert same_as(slicer, result, ref)
    after_box = sitk.GetArrayFromImage(ref.labels), sitk.GetArrayFromImage(ref.uncertainty)
    assert box_node.GetLocked()

    # undo (Ctrl+Z) and redo (Ctrl+Y, Ctrl+Shift+Z) restore exact arrays and take the box off the views and back
    assert gui.press("Ctrl+Z") == 1
    pump(gui, widget, lambda: not refine.busy and refine.canRedo)
    ref.undo()
    assert same_as(slicer, result, ref) and box_node.GetScene() is None
    assert np.array_equal(sitk.GetArrayFromImage(ref.labels), sitk.GetArrayFromImage(before_box[0]))
    assert gui.press("Ctrl+Y") == 1
    pump(gui, widget, lambda: not refine.busy and not refine.canRedo)
    ref.redo()
    assert same_as(slicer, result, ref)
    masks, unc = segment_arrays(slicer, result)
    assert np.array_equal(masks["liver"], after_box[0] == 1) and np.array_equal(unc, after_box[1])
    boxes = [n for n in refine.toolNodes() if n.GetAttribute("MedDiffSeg.RefineTool") == "box"]
    assert len(boxes) == 1 and boxes[0].GetLocked()
    gui.press("Ctrl+Z")
    pump(gui, widget, lambda: not refine.busy and refine.canRedo)
    gui.press("Ctrl+Shift+Z")
    pump(gui, widget, lambda: not refine.busy and not refine.canRedo)
    assert same_as(slicer, result, ref)

    # a locked organ: a point placed for it is refused with a message, nothing is sent
    ui.refinePositiveButton.click()
    assert refine.placingTool() == ("liver", "positive")
    ui.refineLockListWidget.item(0).setCheckState(qtfake.Qt.Checked)
    assert refine.locked == {"liver"} and "Liver is locked" in ui.refineStatusLabel.text
    sent = refine.worker._nextId
    points = place(slicer, gui, ras((20, 25, 10)))
    assert "Liver is locked: unlock it to correct it." == ui.refineStatusLabel.text
    assert points.GetNumberOfControlPoints() == 1 and refine.worker._nextId == sent and not refine.busy
    assert same_as(slicer, result, ref)
    ui.refineLockListWidget.item(0).setCheckState(qtfake.Qt.Unchecked)
    assert refine.locked == set()

    # a point outside the volume (e.g. placed in the 3D view) is ignored with a message
    sent = refine.worker._nextId
    place(slicer, gui, (500.0, 500.0, 500.0))
    assert "is outside the volume patient: ignored" in ui.refineStatusLabel.text
    assert points.GetNumberOfControlPoints() == 1 and refine.worker._nextId == sent and same_as(slicer, result, ref)
    pump(gui, widget, lambda: not refine.busy)

    # leaving Refine mode: the worker stops, the tools leave the scene, the corrections stay
    for tag in tags:
        segmentation.RemoveObserver(tag)
    worker = refine.worker
    ui.refineStartButton.click()
    assert widget._refine is None and ui.refineStartButton.text == "Start refining"
    assert not ui.refinePositiveButton.enabled and gui.press("Ctrl+Z") == 0
    assert refine.waitStopped(30) and worker.state == "stopped" and worker.exitCode == 0
    assert refine.toolNodes() == [] and same_as(slicer, result, ref)
    assert not gui.errors, gui.errors


def test_a_model_without_prompt_channels_disables_refine_with_the_reason(gui, slicer, mrml, module, tiny_package):
    result = result_in_scene(slicer, mrml, tiny_package)
    widget = gui.open(module)
    widget.showResult(result)
    ui = widget.ui
    assert not ui.refineStartButton.enabled
    assert "tiny-guided 0.0.1 was not trained with clicks, so it cannot refine" in ui.refineInfoLabel.text
    widget.startRefine()  # even called directly: refused with the reason, no worker
    assert widget._refine is None and gui.warnings and "was not trained with clicks" in gui.warnings[-1]


def test_a_worker_crash_ends_refine_mode_with_a_message(gui, slicer, mrml, module, rule_pkg):
    result = result_in_scene(slicer, mrml, rule_pkg)
    widget = gui.open(module)
    widget.showResult(result)
    widget.ui.refineStartButton.click()
    refine = widget._refine
    pump(gui, widget, lambda: refine.state == "ready")
    os.kill(refine.worker.runner.pid, signal.SIGKILL)
    pump(gui, widget, lambda: widget._refine is None, timeout=15)
    (error, _details), = gui.errors
    assert "Refine mode ended: the refine worker ended unexpectedly (exit status -9)" in error
    assert widget.ui.refineStartButton.text == "Start refining" and widget.ui.refineStartButton.enabled
    assert refine.toolNodes() == []


def test_points_and_boxes_are_sent_in_the_volume_s_own_lps_under_a_parent_transform(slicer, mrml, rule_pkg):
    """A volume under a transform: a world point maps to the volume's own coordinates (the library's image is
    there), a box is clipped to the volume and one that misses it is refused, and nothing needs a worker."""
    from MedDiffSegLogicLib import geometry
    from MedDiffSegLogicLib.refine import RefineController

    import vtk

    result = result_in_scene(slicer, mrml, rule_pkg)
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)  # 25 mm to the right
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(shift)
    for node in (result.volumeNode, result.segmentationNode, result.uncertaintyNode):
        node.SetAndObserveTransformNodeID(transform.GetID())
    local = ras((12, 27, 10))
    world = (local[0] + 25.0, local[1], local[2])
    assert geometry.worldToVolumeRas(result.volumeNode, world) == pytest.approx(local)
    assert geometry.volumeRasToWorld(result.volumeNode, local) == pytest.approx(world)
    assert geometry.insideVolume(result.volumeNode, local) and not geometry.insideVolume(result.volumeNode, (500, 0, 0))
    assert geometry.rasToLps(geometry.worldToVolumeRas(result.volumeNode, world)) == pytest.approx(lps((12, 27, 10)))

    controller = RefineController(result)
    roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(15.0 + 25.0, 5.0, 128.5)  # voxels i 10..15, j 10..15, k 8..11, seen through the transform
    roi.SetSizeWorld(10.0, 10.0, 9.0)
    assert controller.boxOnVolume(roi) == pytest.approx([*lps((10, 10, 8)), *lps((15, 15, 11))])
    roi.SetCenterWorld(15.0 + 25.0, 5.0, 100.0)  # half below the first slice: clipped to it
    assert controller.boxOnVolume(roi)[2] == pytest.approx(ORIGIN_LPS[2])
    roi.SetCenterWorld(1000.0, 5.0, 128.5)
    assert controller.boxOnVolume(roi) is None
