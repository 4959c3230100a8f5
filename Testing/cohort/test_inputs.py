"""``meddiffseg batch`` without running a model: the studies, the ids, the table, and what is refused up front."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

from MedDiffSegLib.cli import batch as cli_batch
from MedDiffSegLib.cli.main import main
from MedDiffSegLib.cohort import DEFAULT_MAX_VOXELS, discover
from MedDiffSegLib.cohort import table as table_mod
from MedDiffSegLib.cohort.inputs import safe_id
from MedDiffSegLib.cohort.segmenter import BatchSettings, expected_record, place, recover_leftovers, summary_mismatch
from MedDiffSegLib.errors import InputError, OutputError
from MedDiffSegLib.registry import resolve_model


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# -- studies and ids ------------------------------------------------------------------------------


def test_folder_of_volumes_and_series(tmp_path):
    _touch(tmp_path / "case 01.nii.gz")
    _touch(tmp_path / "case02.nrrd")
    _touch(tmp_path / "case03.mhd")
    _touch(tmp_path / "case03.raw")      # the .mhd's data file: not a study
    _touch(tmp_path / "notes.txt")       # not a volume: left out
    _touch(tmp_path / ".hidden.nii.gz")  # hidden: left out
    _touch(tmp_path / "series_a" / "1.dcm")
    studies = discover(tmp_path)
    assert [s.id for s in studies] == ["case_01", "case02", "case03", "series_a"]
    assert studies[0].path == tmp_path / "case 01.nii.gz" and studies[0].modality is None
    assert studies[3].path == tmp_path / "series_a"


def test_folder_holding_one_series_itself_is_refused(tmp_path):
    _touch(tmp_path / "IM0001", b"\0" * 128 + b"DICM" + b"\0" * 10)
    with pytest.raises(InputError, match="holds DICOM files itself"):
        discover(tmp_path)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(InputError, match="holds no studies"):
        discover(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "nope")


def test_one_volume_is_not_a_list_of_studies(tmp_path):
    with pytest.raises(InputError, match="one image, not a list of studies"):
        discover(_touch(tmp_path / "ct.nii.gz"))


def test_csv_with_header_comments_relative_paths_and_modality(tmp_path):
    table = tmp_path / "sub" / "studies.csv"
    _touch(table, "id,path,modality\n# a comment\n\nP1 a,../a.nii.gz,mri\nP2,/abs/b.nii.gz,\nP3,c.nrrd,ct\n".encode())
    studies = discover(table)
    assert [(s.id, s.modality) for s in studies] == [("P1_a", "MR"), ("P2", None), ("P3", "CT")]
    assert studies[0].path == table.parent / "../a.nii.gz"
    assert studies[1].path == Path("/abs/b.nii.gz")
    assert studies[2].source == "line 6"


def test_csv_without_header_and_with_bom(tmp_path):
    table = _touch(tmp_path / "s.csv", "\ufeffx,x.nii.gz\n".encode("utf-8"))
    assert [s.id for s in discover(table)] == ["x"]


@pytest.mark.parametrize("text, fragment", [
    ("a,a.nii.gz,PET\n", "line 1: the modality must be CT or MR"),
    ("a\n", "line 1: expected id,path[,modality], got 1 column"),
    ("a,b,CT,extra\n", "got 4 column"),
    ("id,path\n,a.nii.gz\n", "line 2: the id is empty"),
    ("a,a.nii.gz\na,b.nii.gz\n", "have the same id"),
    ("Case1,a.nii.gz\ncase1,b.nii.gz\n", "the same output folder 'case1'"),
    ("a b,a.nii.gz\na_b,b.nii.gz\n", "the same output folder 'a_b'"),
    ("batch.csv,a.nii.gz\n", "reserved"),
    ("%%,a.nii.gz\n", "no letter or digit"),
    ("id,path\n", "lists no studies"),
])
def test_bad_csv(tmp_path, text, fragment):
    table = _touch(tmp_path / "s.csv", text.encode())
    with pytest.raises(InputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        discover(table)


def test_colliding_files_in_a_folder_are_named(tmp_path):
    _touch(tmp_path / "case1.nii.gz")
    _touch(tmp_path / "case1.nrrd")
    with pytest.raises(InputError, match=r"'case1' \(file case1.nii.gz\) and 'case1' \(file case1.nrrd\)"):
        discover(tmp_path)


def test_safe_id():
    assert safe_id("Müller, Hans/2021") == "M_ller_Hans_2021"
    assert safe_id("..hidden") == "hidden"
    assert safe_id("a.b-c_d") == "a.b-c_d"
    assert len(safe_id("x" * 500)) == 120


def test_not_a_text_csv(tmp_path):
    with pytest.raises(InputError, match="not a UTF-8 text file"):
        discover(_touch(tmp_path / "s.csv", b"\xff\xfe\x00bad"))


# -- the table ------------------------------------------------------------------------------------


def _summary(volume=12.3456789, mu=0.0123456789, runs=None, overridden=False) -> dict:
    return {"model": {"name": "m", "version": "1.0"}, "input": {"modality": "CT", "modality_source": "declared"},
            "settings": {"samples": 5},
            "modality_check": {"overridden": overridden},
            "organs": [{"label": 1, "name": "liver", "volume_ml": volume, "mean_uncertainty": mu,
                        "max_uncertainty_slice": 7, "possible_continuation": runs or []}]}


def test_row_figures_and_review():
    from MedDiffSegLib.cohort.inputs import Study

    run = {"kind": "beyond_mask", "side": "superior", "slices": [3, 4, 5], "area_mm2": [100.0, 300.0, 150.0],
           "extent_mm": 9.0, "peak_slice": 4}
    study = Study("a", Path("/x/a.nii.gz"))
    r = table_mod.row(study, ["liver", "Portal vein"], status="ok", seconds=1.234, worker="w1@h:1", attempts=2,
                      summary=_summary(runs=[run]))
    assert list(r) == table_mod.columns(["liver", "Portal vein"])
    assert r["liver_volume_ml"] == "12.346" and r["liver_mean_uncertainty"] == "0.0123457"
    assert r["liver_review"] == ("the organ probably continues beyond its superior end, unsegmented, on slices 3-5 "
                                 "(9 mm, clearest on 4)")
    assert r["liver_review_slice"] == "4"  # the possible miss comes before the most uncertain slice
    assert r["portal_vein_volume_ml"] == ""  # no label 2 in the summary
    assert (r["seconds"], r["attempts"], r["model"], r["modality"]) == ("1.23", "2", "m 1.0", "CT (declared)")
    no_miss = table_mod.row(study, ["liver"], status="skipped", summary=_summary())
    assert no_miss["liver_review"] == "" and no_miss["liver_review_slice"] == "7"
    assert no_miss["modality_overridden"] == "no"


def test_table_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from MedDiffSegLib.cohort.inputs import Study

    rows = [table_mod.row(Study("a", Path("/a")), ["liver"], status="pending")]
    table_mod.write_table(tmp_path, rows, ["liver"])
    before = (tmp_path / "batch.csv").read_bytes()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(table_mod.os, "replace", fail)
    rows[0] = table_mod.row(Study("a", Path("/a")), ["liver"], status="error", error="x")
    with pytest.raises(OSError):
        table_mod.write_table(tmp_path, rows, ["liver"])
    assert (tmp_path / "batch.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.csv"]
    assert table_mod.read_table(tmp_path)["a"]["status"] == "pending"


# -- is it done? ----------------------------------------------------------------------------------


def _record_summary(package, settings: BatchSettings) -> dict:
    """The parts of a summary.json that a run of ``package`` with ``settings`` records (as run_segment writes)."""
    e = expected_record(package, settings)
    return {"format": 1, "model": {"weights_sha256": e["sha256"]}, "organs": [{"name": n} for n in e["organs"]],
            "settings": {k: e[k] for k in ("samples", "steps", "scheduler", "seed", "staple",
                                           "largest_component_organs")}
            | {"precision": "fp32"},
            "sampling": {"adaptive": e["adaptive"], "body_box": None},
            "outputs": {"segmentation": "segmentation.nii.gz", "uncertainty": "uncertainty.nii.gz", "probabilities": {}},
            "modality_check": {"overridden": False}}


@pytest.mark.parametrize("change, fragment", [
    ({"seed": 1}, "another seed"),
    ({"samples": 3}, "another samples"),
    ({"organs": ("liver", "spleen")}, "other organs"),
    ({"staple": True, "samples": 2}, "another samples"),
    ({"save_probabilities": True}, "probability maps missing"),
    ({"precision": "bf16"}, "another precision"),
    ({"dicom_seg": "binary"}, "DICOM-SEG"),
    ({"largest_component": True}, "another largest_component_organs"),
])
def test_other_settings_are_not_done(change, fragment):
    package = resolve_model("abdomen-ct")
    # an organ whose largest component the package does not keep by default, so that asking for it changes the run
    organ = next(o for o in package.organ_names if o not in (package.inference.get("largest_component") or ()))
    settings = BatchSettings(organs=(organ,), samples=1)
    summary = _record_summary(package, settings)
    assert summary_mismatch(summary, expected_record(package, settings)) is None
    other = BatchSettings(**{**settings.to_dict(), **change})
    assert fragment in summary_mismatch(summary, expected_record(package, other))
    summary["model"]["weights_sha256"] = "0" * 64
    assert "another model" in summary_mismatch(summary, expected_record(package, settings))


# -- the output folder ----------------------------------------------------------------------------


def test_place_swaps_a_study_folder_and_refuses_foreign_files(tmp_path):
    old = tmp_path / "a"
    _touch(old / "segmentation.nii.gz", b"old")
    new = _touch(tmp_path / ".partial.12345678.a" / "segmentation.nii.gz", b"new").parent
    place(new, old)
    assert (old / "segmentation.nii.gz").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    _touch(old / "my_notes.txt")
    new = _touch(tmp_path / ".partial.abcdef12.a" / "segmentation.nii.gz", b"newer").parent
    with pytest.raises(OutputError, match="my_notes.txt"):
        place(new, old)
    assert (old / "my_notes.txt").exists() and (old / "segmentation.nii.gz").read_bytes() == b"new"


def test_leftovers_of_an_interrupted_batch(tmp_path):
    _touch(tmp_path / ".partial.00000000.a" / "segmentation.nii.gz")   # a study that was running
    _touch(tmp_path / ".replaced.00000000.b.c" / "summary.json", b"b")  # swapped out, new one not in place
    _touch(tmp_path / ".replaced.11111111.d" / "summary.json", b"old")  # swapped out, new one in place
    _touch(tmp_path / "d" / "summary.json", b"new")
    recover_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.c", "d"]
    assert (tmp_path / "b.c" / "summary.json").read_bytes() == b"b"
    assert (tmp_path / "d" / "summary.json").read_bytes() == b"new"


# -- the command refuses before running anything --------------------------------------------------


def test_cli_default_max_voxels_matches_the_library():
    assert cli_batch.DEFAULT_MAX_VOXELS == DEFAULT_MAX_VOXELS


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "missing.csv"), "--out", str(out), "--organ", "liver"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_organ_exits_3_before_anything_runs(tmp_path, capsys):
    table = _touch(tmp_path / "s.csv", b"a,a.nii.gz,CT\n")
    out = tmp_path / "out"
    assert main(["batch", str(table), "--out", str(out), "--organ", "brain", "--model", "abdomen-ct"]) == 3
    assert "does not know organ" in capsys.readouterr().err
    assert not out.exists()


def test_output_inside_the_input_folder_is_refused(tmp_path, capsys):
    _touch(tmp_path / "a.nii.gz")
    assert main(["batch", str(tmp_path), "--out", str(tmp_path / "results"), "--organ", "liver",
                 "--modality", "CT"]) == 5
    assert "inside the input folder" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_second_batch_on_the_same_folder_is_refused(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    table = _touch(tmp_path / "s.csv", b"a,a.nii.gz,CT\n")
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".batch.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["batch", str(table), "--out", str(out), "--organ", "liver", "--no-ray"]) == 5
    assert "another 'meddiffseg batch' is writing to" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".batch.lock"]


@pytest.mark.parametrize("option, value, fragment", [
    ("--samples", "0", "--samples must be at least 1"),
    ("--workers", "0", "--workers must be at least 1"),
    ("--retries", "-1", "--retries must be at least 0"),
    ("--max-voxels", "0", "--max-voxels must be at least 1"),
])
def test_bad_numbers(tmp_path, capsys, option, value, fragment):
    table = _touch(tmp_path / "s.csv", b"a,a.nii.gz,CT\n")
    assert main(["batch", str(table), "--out", str(tmp_path / "out"), "--organ", "liver", option, value]) == 1
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_address_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as when it is not installed
    table = _touch(tmp_path / "s.csv", b"a,a.nii.gz,CT\n")
    assert main(["batch", str(table), "--out", str(tmp_path / "out"), "--organ", "liver",
                 "--address", "ray://head:10001"]) == 1
    err = capsys.readouterr().err
    assert "Ray is not installed, so --address cannot join a cluster" in err and "meddiffseg[cluster]" in err
    assert not (tmp_path / "out").exists()


def test_table_columns_follow_the_organs(tmp_path):
    from MedDiffSegLib.cohort.inputs import Study

    table_mod.write_table(tmp_path, [table_mod.row(Study("a", Path("/a")), ["liver", "spleen"], status="pending")],
                          ["liver", "spleen"])
    with open(tmp_path / "batch.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header[:9] == ["id", "path", "status", "error", "seconds", "worker", "attempts", "model", "modality"]
    assert header[9:] == ["liver_volume_ml", "liver_mean_uncertainty", "liver_review", "liver_review_slice",
                          "spleen_volume_ml", "spleen_mean_uncertainty", "spleen_review", "spleen_review_slice",
                          "modality_overridden"]
    assert os.stat(tmp_path / "batch.csv").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_unreachable_cluster_fails_fast_and_writes_nothing(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    table = _touch(tmp_path / "s.csv", b"a,a.nii.gz,CT\n")
    assert main(["batch", str(table), "--out", str(tmp_path / "out"), "--organ", "liver",
                 "--address", f"127.0.0.1:{port}"]) == 1
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
