"""Bad input, tried systematically (issue #25): headers and files a user can really meet, fed to
``meddiffseg segment`` and ``meddiffseg evaluate`` (in-process ``main``, a few real subprocesses) and to the
API (``run_segment``, ``evaluate``, ``segment_volume`` on images in memory).

Every case must end with one clear message (one line, naming what is wrong), a non-zero exit code,
nothing written in the output folder (nor the --json file), and the input untouched (every input file's
sha256 is the same after the run). The table is fixed, not generated: each row is a file or header a
scanner, a converter, a download or a script really produces. The README says how many cases it covers
(:data:`CASES`, checked below).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from MedDiffSegLib.cli.main import main
from MedDiffSegLib.errors import InputError, MedDiffSegError
from MedDiffSegLib.evaluation import evaluate, parse_label_specs
from MedDiffSegLib.inference import engine as engine_module
from MedDiffSegLib.inference.pipeline import run_segment
from tinymodels import make_tiny_package

REPO = Path(__file__).resolve().parents[2]
SIZE_ZYX = (6, 20, 24)
SPACING = (1.5, 1.5, 3.0)


# -- a small CT-like volume and ways to spoil its files ------------------------------------------------


def _ct_array(dtype=np.int16) -> np.ndarray:
    z, y, x = np.mgrid[0:SIZE_ZYX[0], 0:SIZE_ZYX[1], 0:SIZE_ZYX[2]]
    body = ((x - 12) / 9.0) ** 2 + ((y - 10) / 7.0) ** 2 < 1
    return np.where(body, 40, -1000).astype(dtype)


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin((-20.0, 10.0, 100.0))
    return img


def _nifti(tmp: Path, name: str, patch: Callable[[bytearray], None] | None = None, arr: np.ndarray | None = None,
           gz: bool = True, cut: int = 0) -> Path:
    """A NIfTI-1 file of the volume, its header bytes patched, optionally cut short by ``cut`` bytes."""
    plain = tmp / f".{name}.nii"
    sitk.WriteImage(_image(_ct_array() if arr is None else arr), str(plain))
    data = bytearray(plain.read_bytes())
    plain.unlink()
    if patch is not None:
        patch(data)
    path = tmp / (f"{name}.nii.gz" if gz else f"{name}.nii")
    if gz:
        packed = gzip.compress(bytes(data))
        path.write_bytes(packed[:len(packed) - cut] if cut else packed)
    else:
        path.write_bytes(bytes(data[:len(data) - cut] if cut else data))
    return path


def _pixdim(axis: int, value: float):
    return lambda b: struct.pack_into("<f", b, 76 + 4 * axis, value)


def _scaling(slope: float, inter: float = 0.0):
    return lambda b: struct.pack_into("<2f", b, 112, slope, inter)


def _sform(rows: tuple[float, ...]):
    def patch(b: bytearray) -> None:
        struct.pack_into("<2h", b, 252, 0, 1)  # no qform, sform code 1: the sform is the geometry
        struct.pack_into("<12f", b, 280, *rows)
    return patch


def _voxel(value: float, index: int = 0):
    def patch(b: bytearray) -> None:
        offset = int(struct.unpack_from("<f", b, 108)[0])
        struct.pack_into("<f", b, offset + 4 * index, value)
    return patch


def _metaimage(tmp: Path, name: str, spacing: str = "1.5 1.5 3", matrix: str = "1 0 0 0 1 0 0 0 1",
               arr: np.ndarray | None = None) -> Path:
    """A MetaImage (.mha) written by hand, as a script or another toolkit would."""
    arr = _ct_array() if arr is None else arr
    element = {np.dtype(np.int16): "MET_SHORT", np.dtype(np.float32): "MET_FLOAT"}[arr.dtype]
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = False\nTransformMatrix = {matrix}\nOffset = -20 10 100\n"
              f"ElementSpacing = {spacing}\nDimSize = {SIZE_ZYX[2]} {SIZE_ZYX[1]} {SIZE_ZYX[0]}\n"
              f"ElementType = {element}\nElementDataFile = LOCAL\n")
    path = tmp / f"{name}.mha"
    path.write_bytes(header.encode("ascii") + np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
    return path


def _with_values(**where: float) -> np.ndarray:
    arr = _ct_array(np.float32)
    for i, (_, value) in enumerate(where.items()):
        arr.flat[7 + 13 * i] = value
    return arr


def _sitk_file(tmp: Path, name: str, arr: np.ndarray, size: tuple[int, ...] | None = None) -> Path:
    path = tmp / name
    img = sitk.GetImageFromArray(arr) if size is None else sitk.Image(list(size), sitk.sitkInt16)
    sitk.WriteImage(img, str(path))
    return path


def _dicom(tmp: Path, data: Path, name: str, change: Callable) -> Path:
    """dcmqi's real 3-slice CT series, each file's header changed by ``change(index, dataset)``."""
    import pydicom

    folder = tmp / name
    folder.mkdir()
    for i, src in enumerate(sorted((data / "dcmqi" / "ct-3slice").iterdir())):
        ds = pydicom.dcmread(src)
        change(i, ds)
        ds.save_as(folder / src.name)
    return folder


def _drop(keyword: str, which: set[int] | None = None):
    def change(i, ds):
        if (which is None or i in which) and keyword in ds:
            del ds[keyword]
    return change


def _set(keyword: str, value, which: set[int] | None = None):
    def change(i, ds):
        if which is None or i in which:
            setattr(ds, keyword, value)
    return change


def _half_size(i, ds):
    if i == 2:
        half = ds.pixel_array[:256, :256].copy()
        ds.Rows, ds.Columns = 256, 256
        ds.PixelData = half.tobytes()


# -- the table ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    make: Callable[[Path, Path], Path]  # (tmp folder, data folder) -> the input
    fragment: str                        # what the message must say
    real_data: bool = False              # built from the real data folder


SHEAR = (1.5, 0.9, 0, 0, 0, 1.5, 0, 0, 0, 0, 3, 0)
PARALLEL = (1.5, 0, 0, 0, 1.5, 0, 0, 0, 0, 0, 3, 0)

SEGMENT_CASES: dict[str, Case] = {
    # spacing in the header: zero, negative, NaN, infinite (ITK would use 1 mm or flip an axis)
    "nifti-zero-spacing": Case(lambda t, d: _nifti(t, "a", _pixdim(1, 0.0)), "pixdim[1] = 0"),
    "nifti-negative-spacing": Case(lambda t, d: _nifti(t, "a", _pixdim(2, -1.5)), "pixdim[2] = -1.5"),
    "nifti-nan-spacing": Case(lambda t, d: _nifti(t, "a", _pixdim(3, float("nan"))), "pixdim[3] = nan"),
    "nifti-inf-spacing": Case(lambda t, d: _nifti(t, "a", _pixdim(1, float("inf"))), "pixdim[1] = inf"),
    "mha-zero-spacing": Case(lambda t, d: _metaimage(t, "a", spacing="0 1.5 3"), "ElementSpacing = 0 1.5 3"),
    "mha-negative-spacing": Case(lambda t, d: _metaimage(t, "a", spacing="1.5 -1.5 3"), "ElementSpacing = 1.5 -1.5 3"),
    "mha-nan-spacing": Case(lambda t, d: _metaimage(t, "a", spacing="1.5 1.5 nan"), "ElementSpacing = 1.5 1.5 nan"),
    # direction: sheared (non-orthogonal) or degenerate (two axes the same way)
    "nifti-sheared-sform": Case(lambda t, d: _nifti(t, "a", _sform(SHEAR)), "is not orthonormal"),
    "nifti-degenerate-sform": Case(lambda t, d: _nifti(t, "a", _sform(PARALLEL)), "is not orthonormal"),
    "mha-sheared-direction": Case(lambda t, d: _metaimage(t, "a", matrix="1 0 0 0.5 1 0 0 0 1"),
                                  "is not orthonormal"),
    "mha-degenerate-direction": Case(lambda t, d: _metaimage(t, "a", matrix="1 0 0 1 0 0 0 0 1"), "is degenerate"),
    # size: one voxel, 2D stored as 3D (either way round)
    "one-voxel": Case(lambda t, d: _sitk_file(t, "one.nii.gz", None, (1, 1, 1)), "holds a single voxel"),
    "2d-in-3d": Case(lambda t, d: _sitk_file(t, "flat.nii.gz", None, (24, 20, 1)), "is 2D (size 24×20×1)"),
    "2d-in-3d-sideways": Case(lambda t, d: _sitk_file(t, "side.nrrd", None, (1, 20, 6)), "is 2D (size 1×20×6)"),
    # voxel values: NaN, infinity (ITK's NIfTI reader would make them 0), an overflowing scaling
    "nifti-nan-voxels": Case(lambda t, d: _nifti(t, "a", _voxel(float("nan")), arr=_ct_array(np.float32)),
                             "1 of its voxel values are NaN or infinite"),
    "nifti-inf-voxels": Case(lambda t, d: _nifti(t, "a", _voxel(float("-inf"), 5), arr=_ct_array(np.float32),
                                                 gz=False), "1 of its voxel values are NaN or infinite"),
    "mha-nan-and-inf-voxels": Case(lambda t, d: _metaimage(t, "a", arr=_with_values(a=np.nan, b=np.inf)),
                                   "2 of its 2880 voxels are NaN or infinite"),
    "nifti-slope-overflow": Case(lambda t, d: _nifti(t, "a", _scaling(1e38)), "scaling slope or intercept"),
    "nifti-slope-nan": Case(lambda t, d: _nifti(t, "a", _scaling(float("nan"))), "scl_slope = nan"),
    "nifti-intercept-inf": Case(lambda t, d: _nifti(t, "a", _scaling(1.0, float("inf"))), "scl_inter = inf"),
    # a download cut short
    "truncated-nii-gz": Case(lambda t, d: _nifti(t, "a", cut=200), "is truncated"),
    "truncated-nii": Case(lambda t, d: _nifti(t, "a", gz=False, cut=100), "is truncated"),
    # DICOM series with missing or contradictory geometry, mixed sizes, an overflowing rescale slope
    "dicom-no-position": Case(lambda t, d: _dicom(t, d, "s", _drop("ImagePositionPatient", {1})),
                              "has no ImagePositionPatient (0020,0032)", True),
    "dicom-no-orientation": Case(lambda t, d: _dicom(t, d, "s", _drop("ImageOrientationPatient")),
                                 "has no ImageOrientationPatient (0020,0037)", True),
    "dicom-no-pixel-spacing": Case(lambda t, d: _dicom(t, d, "s", _drop("PixelSpacing", {2})),
                                   "has no PixelSpacing (0028,0030)", True),
    "dicom-pixel-spacings-differ": Case(lambda t, d: _dicom(t, d, "s", _set("PixelSpacing", [0.5, 0.5], {1})),
                                        "different pixel spacings", True),
    "dicom-zero-pixel-spacing": Case(lambda t, d: _dicom(t, d, "s", _set("PixelSpacing", [0, 0])),
                                     "every spacing must be positive", True),
    "dicom-sheared-orientation": Case(lambda t, d: _dicom(t, d, "s", _set("ImageOrientationPatient", [1, 0, 0, 0.5, 1, 0])),
                                      "not perpendicular unit vectors", True),
    "dicom-all-at-one-position": Case(lambda t, d: _dicom(t, d, "s", _set("ImagePositionPatient", [0, 0, 0])),
                                      "several slices at the same position", True),
    "dicom-orientations-differ": Case(lambda t, d: _dicom(t, d, "s", _set("ImageOrientationPatient", [0, 1, 0, 0, 0, -1], {0})),
                                      "different orientations", True),
    "dicom-mixed-sizes": Case(lambda t, d: _dicom(t, d, "s", _half_size), "different sizes", True),
    "dicom-rescale-slope-overflow": Case(lambda t, d: _dicom(t, d, "s", _set("RescaleSlope", "1e38")),
                                         "beyond what a float32 holds", True),
}


def _labels(tmp: Path, name: str, arr: np.ndarray | None = None, **geometry) -> Path:
    arr = np.zeros(SIZE_ZYX, np.uint8) if arr is None else arr
    if arr.max() == 0:
        arr[2:4, 5:12, 6:14] = 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(geometry.get("spacing", SPACING))
    img.SetOrigin(geometry.get("origin", (-20.0, 10.0, 100.0)))
    path = tmp / f"{name}.nii.gz"
    sitk.WriteImage(img, str(path))
    return path


def _map(tmp: Path, name: str, arr: np.ndarray, suffix: str = ".nii.gz", **geometry) -> Path:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(geometry.get("spacing", SPACING))
    img.SetOrigin(geometry.get("origin", (-20.0, 10.0, 100.0)))
    path = tmp / f"{name}{suffix}"
    sitk.WriteImage(img, str(path))
    return path


def _prob(value: float, suffix: str = ".nii.gz"):
    def make(tmp: Path) -> dict:
        arr = np.full(SIZE_ZYX, 0.2, np.float32)
        arr[3, 10, 10] = value
        return {"probabilities": {"liver": _map(tmp, "p", arr, suffix)}}
    return make


#: evaluate: prediction and ground truth are fine unless the case replaces one; each adds what it spoils.
EVALUATE_CASES: dict[str, tuple[Callable[[Path], dict], str]] = {
    "eval-gt-other-spacing": (lambda t: {"gt": _labels(t, "gt", spacing=(1.5, 1.5, 2.5))}, "do not share a voxel grid"),
    "eval-gt-other-size": (lambda t: {"gt": _labels(t, "gt", np.zeros((6, 20, 23), np.uint8))}, "size 23×20×6 vs 24×20×6"),
    "eval-gt-shifted-origin": (lambda t: {"gt": _labels(t, "gt", origin=(-19.0, 10.0, 100.0))}, "origin"),
    "eval-uncertainty-other-grid": (lambda t: {"uncertainty": _map(t, "u", np.zeros((6, 20, 23)))},
                                    "do not share a voxel grid"),
    "eval-probability-above-one": (_prob(1.5), "probabilities must lie in [0, 1], found [0.2, 1.5]"),
    "eval-probability-negative": (_prob(-0.25), "probabilities must lie in [0, 1], found [-0.25, 0.2]"),
    "eval-probability-nan": (_prob(float("nan"), ".mha"), "1 of its 2880 voxels are NaN or infinite"),
    "eval-probability-nan-nifti": (_prob(float("nan")), "1 of its voxel values are NaN or infinite"),
    "eval-pred-truncated": (lambda t: {"pred": _truncated_copy(_labels(t, "pred0"), t)}, "is truncated"),
}


def _truncated_copy(path: Path, tmp: Path) -> Path:
    out = tmp / "pred.nii.gz"
    data = path.read_bytes()
    out.write_bytes(data[:-20])  # a copy cut short: the header is there, the end of the voxels is not
    return out


#: Images in memory given to the API (``segment_volume``), which reads no file.
API_CASES: dict[str, tuple[Callable[[], sitk.Image], str]] = {
    "api-nan-voxels": (lambda: _image(_with_values(a=np.nan)), "1 of its 2880 voxels are NaN or infinite"),
    "api-inf-voxels": (lambda: _image(_with_values(a=np.inf, b=-np.inf)), "2 of its 2880 voxels are NaN or infinite"),
    "api-float64-overflow": (lambda: _image(_ct_array(np.float64) * 1e300), "beyond what a float32 holds"),
    "api-sheared-direction": (lambda: _sheared_in_memory(), "is not orthonormal"),
}


def _sheared_in_memory() -> sitk.Image:
    img = _image(_ct_array())
    img.SetDirection((1, 0.4, 0, 0, 1, 0, 0, 0, 1))
    return img


CASES = len(SEGMENT_CASES) + len(EVALUATE_CASES) + len(API_CASES)


# -- checks ------------------------------------------------------------------------------------------------


def _digests(path: Path) -> dict[str, str]:
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def _one_line(err: str, fragment: str) -> None:
    assert err.startswith("meddiffseg: error: ") and err.count("\n") == 1, err
    assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_package(tmp_path_factory.mktemp("bad_input_pkg") / "tiny-guided", "guided").path


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network ran on a bad input")

    monkeypatch.setattr(engine_module, "segment_volume", refuse)


@pytest.mark.parametrize("name", sorted(SEGMENT_CASES))
def test_segment_refuses_bad_input(name, tmp_path, tiny, no_network, capsys, request):
    case = SEGMENT_CASES[name]
    data = request.getfixturevalue("data_dir") if case.real_data else REPO
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = case.make(inputs, data)
    before = _digests(source)
    out = tmp_path / "out"
    # the API ...
    with pytest.raises(MedDiffSegError) as info:
        run_segment(source, out, ["liver"], model=tiny, device="cpu")
    message = str(info.value)
    assert case.fragment in message and "\n" not in message, message
    assert isinstance(info.value, InputError) and info.value.exit_code != 0
    assert not out.exists()
    # ... and the command line, into an output folder that already holds a file of the user's
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    rc = main(["segment", str(source), "--organ", "liver", "--out", str(out), "--model", str(tiny), "--quiet"])
    assert rc == InputError.exit_code
    _one_line(capsys.readouterr().err, case.fragment)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _digests(source) == before


@pytest.mark.parametrize("name", sorted(EVALUATE_CASES))
def test_evaluate_refuses_bad_input(name, tmp_path, capsys):
    make, fragment = EVALUATE_CASES[name]
    files = {"pred": _labels(tmp_path, "pred0"), "gt": _labels(tmp_path, "gt0")}
    extra = make(tmp_path)
    files.update({k: v for k, v in extra.items() if k != "probabilities"})
    probs = extra.get("probabilities")
    before = _digests(tmp_path)
    labels = parse_label_specs(["liver=1"])
    with pytest.raises(MedDiffSegError) as info:
        evaluate(files["pred"], files["gt"], labels, uncertainty=files.get("uncertainty"), probabilities=probs)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert info.value.exit_code != 0
    out = tmp_path / "scores" / "report.json"
    argv = ["evaluate", "--pred", str(files["pred"]), "--gt", str(files["gt"]), "--labels", "liver=1",
            "--json", str(out)]
    if "uncertainty" in files:
        argv += ["--uncertainty", str(files["uncertainty"])]
    if probs:
        argv += ["--probabilities", *(f"{k}={v}" for k, v in probs.items())]
    assert main(argv) == info.value.exit_code
    _one_line(capsys.readouterr().err, fragment)
    assert not out.exists() and not out.parent.exists()
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("name", sorted(API_CASES))
def test_segment_volume_refuses_bad_images_in_memory(name, tiny):
    from MedDiffSegLib.registry import ModelPackage

    make, fragment = API_CASES[name]
    image = make()
    values = sitk.GetArrayFromImage(image)
    package = ModelPackage.from_folder(tiny)
    with pytest.raises(InputError, match=None) as info:
        engine_module.segment_volume(image, package, ["liver"], device="cpu")
    assert fragment in str(info.value) and str(info.value).startswith("the input: "), str(info.value)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), values)  # the caller's image is untouched


def test_a_few_bad_inputs_through_the_installed_command(tmp_path, tiny):
    """Real processes: the exit code, one line on stderr, no output folder, the input untouched."""
    chosen = ("nifti-nan-spacing", "mha-sheared-direction", "nifti-nan-voxels")
    for name in chosen:
        source = SEGMENT_CASES[name].make(tmp_path, REPO)
        before = _digests(source)
        out = tmp_path / f"out-{name}"
        run = subprocess.run([sys.executable, "-m", "MedDiffSegLib", "segment", str(source), "--organ", "liver",
                              "--out", str(out), "--model", str(tiny), "--quiet"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == InputError.exit_code, (name, run.returncode, run.stderr)
        _one_line(run.stderr, SEGMENT_CASES[name].fragment)
        assert run.stdout == "" and not out.exists() and _digests(source) == before
        shutil.rmtree(tmp_path / f"out-{name}", ignore_errors=True)


def test_the_readme_states_how_many_cases_this_module_covers():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"{CASES} cases" in readme and "Testing/cli/test_bad_input.py" in readme, CASES
