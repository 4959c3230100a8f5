"""One correction from files to files: what ``meddiffseg refine`` does.

:func:`load_session` opens an earlier result (a ``segment`` or ``refine`` output folder) as an
:class:`~MedDiffSegLib.interactive.session.InteractiveSession`: the image named in its
``summary.json`` (or given), the model that made it (checked against the recorded sha256), its
label and uncertainty maps, its probability maps where it has them (``segment
--save-probabilities``: the corrected organ's map is re-sampled with it, the others are carried
over) and its earlier corrections. :func:`run_refine` applies one correction
and writes the same outputs as ``segment`` into another folder, atomically; its ``summary.json``
keeps the earlier summary's record and adds the correction to ``interactions``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, ModelError, OutputError
from ..jsonfile import read_json_object
from ..inference.pipeline import (SEGMENTATION, SUMMARY, UNCERTAINTY, _check_output_dir, place_outputs,
                                  probability_filename)
from .session import Interaction, InteractiveSession, Point


def read_result_summary(result_dir: str | os.PathLike) -> dict:
    """The ``summary.json`` of a result folder, or an :class:`InputError` saying why it is not one."""
    folder = Path(result_dir).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: give the output folder of 'meddiffseg segment' or 'refine'")
    path = folder / SUMMARY
    if not path.is_file():
        raise InputError(f"{folder} holds no {SUMMARY}: it is not a MedDiffSeg result folder")
    summary = read_json_object(path, InputError)
    if not isinstance(summary.get("organs"), list) or "model" not in summary:
        raise InputError(f"{path} is not a MedDiffSeg summary (no organs or model recorded)")
    for name in (SEGMENTATION,):
        if not (folder / name).is_file():
            raise InputError(f"{folder} lacks {name}: the result is incomplete")
    return summary


def load_session(result_dir: str | os.PathLike, *, image: str | os.PathLike | None = None, model=None,
                 device: str = "auto", samples: int | None = None, seed: int | None = None,
                 precision: str = "auto", locked: Sequence[str] = ()) -> tuple[InteractiveSession, dict, Path]:
    """``(session, summary, image path)`` for a result folder; see the module docstring."""
    import SimpleITK as sitk

    from ..io.volume import read_dicom_series, read_volume
    from ..registry.package import ModelPackage
    from ..registry.store import resolve_model

    folder = Path(result_dir).expanduser()
    summary = read_result_summary(folder)
    recorded = (summary.get("input") or {}).get("path")
    if image is None and not recorded:
        raise InputError(f"{folder / SUMMARY} does not record the image it was made from; give it with --image")
    image_path = Path(image if image is not None else recorded).expanduser()
    if not image_path.exists():
        raise InputError(f"the image {image_path} does not exist" +
                         ("" if image is not None else f" (recorded in {folder / SUMMARY}); give it with --image"))
    img = read_dicom_series(image_path)[0] if image_path.is_dir() else read_volume(image_path)
    size = (summary.get("input") or {}).get("size")
    if size is not None and [int(s) for s in img.GetSize()] != [int(s) for s in size]:
        raise InputError(f"the image {image_path} has size {list(img.GetSize())} but the result was made from an "
                         f"image of size {size}: it is not the same image")
    recorded_model = summary["model"]
    if model is None:
        package = resolve_model(recorded_model.get("name"))
        if recorded_model.get("weights_sha256") and package.weights_sha256 != recorded_model["weights_sha256"]:
            raise ModelError(f"the installed {package.name!r} ({package.version}) is not the model that made this "
                             f"result ({recorded_model.get('version')}, sha256 {recorded_model['weights_sha256'][:12]}…); "
                             "give that model with --model")
    else:
        package = model if isinstance(model, ModelPackage) else resolve_model(model)
    package.verify()
    organs = [o["name"] for o in sorted(summary["organs"], key=lambda o: int(o["label"]))]
    labels = _read_on_grid(folder / SEGMENTATION, img, sitk.sitkUInt8)
    unc_path = folder / UNCERTAINTY
    uncertainty = _read_on_grid(unc_path, img) if unc_path.is_file() else None
    probabilities = _MapsOnGrid({organ: folder / name for organ, name in result_probabilities(summary, folder).items()}, img)
    settings = summary.get("settings") or {}
    interactions = [Interaction.from_dict(d) for d in summary.get("interactions") or []]
    locked = list(dict.fromkeys([*(summary.get("locked") or []), *locked]))
    session = InteractiveSession(
        img, package, organs, labels, uncertainty, device=device,
        samples=int(samples if samples is not None else settings.get("samples", 1)),
        seed=int(seed if seed is not None else settings.get("seed", 0)), precision=precision, locked=locked,
        interactions=interactions, probabilities=probabilities)
    return session, summary, image_path


def result_probabilities(summary: dict, folder: Path) -> dict[str, str]:
    """organ -> file name of the probability maps a result folder holds (``segment --save-probabilities``)."""
    listed = ((summary.get("outputs") or {}).get("probabilities") or {})
    if not isinstance(listed, dict):
        raise InputError(f"{folder / SUMMARY}: outputs.probabilities is not a mapping of organ to file")
    missing = [str(f) for f in listed.values() if not (folder / str(f)).is_file()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)} (listed in its {SUMMARY}): the result is incomplete")
    return {str(o): str(f) for o, f in listed.items()}


class _MapsOnGrid(Mapping):
    """organ -> its map read from file on access (one organ's float32 volume in memory at a time)."""

    def __init__(self, paths: dict[str, Path], image):
        self._paths, self._image = paths, image

    def __getitem__(self, organ: str):
        return _read_on_grid(self._paths[organ], self._image)

    def __iter__(self):
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def _read_on_grid(path: Path, image, pixel_type=None):
    """A map written on ``image``'s grid (float32 unless ``pixel_type``), with the image's exact geometry (NIfTI
    rounds it)."""
    import SimpleITK as sitk

    m = sitk.ReadImage(str(path), sitk.sitkFloat32 if pixel_type is None else pixel_type)
    if m.GetSize() == image.GetSize() and np.allclose(m.GetSpacing(), image.GetSpacing(), atol=1e-3):
        m.CopyInformation(image)
    return m


def run_refine(result_dir: str | os.PathLike, out_dir: str | os.PathLike, organ: str, *,
               positive: Sequence[Point] = (), negative: Sequence[Point] = (), box: Sequence[float] | None = None,
               image: str | os.PathLike | None = None, model=None, device: str = "auto", samples: int | None = None,
               seed: int | None = None, precision: str = "auto", locked: Sequence[str] = (),
               should_cancel: Callable[[], bool] | None = None) -> dict:
    """Correct ``organ`` of the result in ``result_dir`` and write the corrected result to ``out_dir``.

    Everything is checked before ``out_dir`` is touched (a bad click, organ or folder writes
    nothing); the outputs are renamed into place at the end. Returns the new summary.
    """
    import SimpleITK as sitk

    from ..inference.pipeline import _check_int
    from ..io.volume import write_image_atomic
    from ..uncertainty.ensemble import variance_for_storage

    t_start = time.perf_counter()
    _check_int("samples", samples, 1)
    if not positive and not negative and box is None:
        raise InputError("give at least one --click, --negative-click or --box")
    src = Path(result_dir).expanduser().absolute()
    out = Path(out_dir).expanduser().absolute()
    if out == src:
        raise OutputError(f"--out {out} is the result being refined: write the corrected result to another folder "
                          "(the earlier one is kept)")
    session, summary, image_path = load_session(src, image=image, model=model, device=device, samples=samples,
                                                seed=seed, precision=precision, locked=locked)
    session.locate(positive, negative, box)  # a point outside the image fails here, before any output
    session.canonical_name(organ)
    to_create = _check_output_dir(out, image_path)
    t_load = time.perf_counter() - t_start
    inter = session.refine(organ, positive, negative, box, should_cancel=should_cancel)
    labels, uncertainty = session.labels, session.uncertainty
    stored = sitk.GetImageFromArray(variance_for_storage(sitk.GetArrayViewFromImage(uncertainty)))
    stored.CopyInformation(uncertainty)
    probability_files = {organ: probability_filename(organ) for organ in session.probability_organs}

    def write(staging: Path) -> None:
        write_image_atomic(labels, staging / SEGMENTATION)
        write_image_atomic(stored, staging / UNCERTAINTY)
        for organ, name in probability_files.items():  # the corrected organ's map changed; the others carried over
            write_image_atomic(session.probability(organ), staging / name)  # one organ's float32 volume at a time

    suggestions = [x.to_dict() for x in session.suggest(inter.organ, 3)]

    def make_summary() -> dict:
        out = refined_summary(summary, session, labels, uncertainty, image_path,
                              timings={"load": t_load, "refine": inter.seconds, "total": time.perf_counter() - t_start})
        out["suggestions"] = {inter.organ: suggestions}
        return out

    return place_outputs(out, to_create, write, [SEGMENTATION, UNCERTAINTY, *probability_files.values()], make_summary,
                         should_cancel_check(should_cancel))


def should_cancel_check(should_cancel: Callable[[], bool] | None) -> Callable[[], None]:
    from ..errors import Cancelled

    def check() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled("correction cancelled; no output was written")
    return check


def refined_summary(before: dict, session: InteractiveSession, labels, uncertainty, image_path: Path,
                    timings: dict) -> dict:
    """The earlier summary with the organs' volumes and uncertainty recounted and the corrections recorded.

    Fields that only the automatic run could know (the most uncertain slice, where an organ probably
    continues) are kept from it for the organs no correction touched and cleared for the others.
    """
    import SimpleITK as sitk

    summary = json.loads(json.dumps(before))  # a deep copy
    lab = sitk.GetArrayViewFromImage(labels)
    unc = sitk.GetArrayViewFromImage(uncertainty)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(lab.reshape(-1), minlength=len(session.organs) + 1)
    corrected = {i.organ for i in session.interactions}
    for entry in summary["organs"]:
        label = int(entry["label"])
        count = int(counts[label]) if label < len(counts) else 0
        entry["voxel_count"] = count
        entry["volume_ml"] = count * voxel_ml
        if entry["name"] in corrected:
            entry["mean_uncertainty"] = float(unc[lab == label].mean(dtype=np.float32)) if count else None
            entry["possible_continuation"] = []
            entry["max_uncertainty_slice"] = entry["max_uncertainty_position_mm"] = None
    summary["interactions"] = [i.to_dict() for i in session.interactions]
    summary["locked"] = sorted(session.locked)
    summary["outputs"] = {"segmentation": SEGMENTATION, "uncertainty": UNCERTAINTY,
                          "probabilities": {organ: probability_filename(organ) for organ in session.probability_organs}}
    summary.setdefault("input", {})["path"] = str(image_path.absolute())
    summary["refine"] = {"samples": session.samples, "seed": session.seed, "click_radius_mm": session.radius_mm,
                         "timings_s": {k: round(float(v), 4) for k, v in timings.items()}}
    return summary


__all__ = ["load_session", "result_probabilities", "read_result_summary", "result_suggestions", "run_refine",
           "refined_summary"]


def result_suggestions(result_dir: str | os.PathLike, organ: str, k: int = 3, *, model_free: bool = False,
                       image: str | os.PathLike | None = None) -> list[dict]:
    """Where to click next on ``organ`` of a result folder (no model needed: its maps and image geometry), away from
    the organ's earlier clicks."""
    import SimpleITK as sitk

    from .session import clicked_points, suggest_clicks

    folder = Path(result_dir).expanduser()
    summary = read_result_summary(folder)
    entry = next((o for o in summary["organs"] if organ.lower() in (o["name"].lower(), str(o.get("display_name", "")).lower())),
                 None)
    if entry is None:
        raise InputError(f"organ {organ!r} is not in {folder}; it has: {', '.join(o['name'] for o in summary['organs'])}")
    labels = sitk.ReadImage(str(folder / SEGMENTATION))
    unc_path = folder / UNCERTAINTY
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(unc_path), sitk.sitkFloat32)) if unc_path.is_file() else None
    if unc is None and not model_free:
        raise InputError(f"{folder} has no {UNCERTAINTY}; use --model-free")
    lab = sitk.GetArrayFromImage(labels)
    avoid = clicked_points([Interaction.from_dict(d) for d in summary.get("interactions") or []], entry["name"])
    found = suggest_clicks(labels, lab, unc if unc is not None else np.zeros(lab.shape, np.float32),
                           int(entry["label"]), entry["name"], k, model_free=model_free, avoid=avoid)
    return [x.to_dict() for x in found]
