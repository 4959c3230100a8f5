"""One segmentation run from files to files: what ``meddiffseg segment`` does.

:func:`run_segment` validates everything it can *before* touching the output folder, runs the
volume engine, then writes all outputs under temporary names inside the output folder and
renames them into place at the very end. A failed or cancelled run removes its temporary
files (and the output folder itself when the run created it), so it never leaves a partial
result behind. The input is only ever read.

Outputs (all in the input's exact voxel grid: size, spacing, origin and direction):

- ``segmentation.nii.gz`` -- uint8 label map, 0 = background, label ``i`` = the ``i``-th organ
  requested (1-based, in the order given);
- ``uncertainty.nii.gz`` -- float32 voxel-wise disagreement between the diffusion samples;
- ``probability_<organ>.nii.gz`` -- float32 mean foreground probability (only on request);
- ``segmentation.dcm`` and ``uncertainty_pmap.dcm`` -- DICOM-SEG (one segment per organ; BINARY,
  or FRACTIONAL from the mean probabilities) and the uncertainty as a DICOM Parametric Map,
  derived from the input series (only with ``dicom_seg``, and only for a DICOM series input);
- ``summary.json`` -- per-organ volumes and uncertainty, timings, model and software versions,
  run settings, the input's size, spacing and modality, and the modality check (whether the
  model's modality fits the input, and whether a mismatch was overridden). It never contains
  patient names, IDs, dates or any other DICOM tag. It records the input's path as given (made
  absolute), so that ``meddiffseg refine`` finds the image again.

Modality (:mod:`MedDiffSegLib.modality`): without ``model``, the default model for the input's
modality is used -- the DICOM Modality tag of a series, else the declared ``modality``; a plain
file with neither is an :class:`InputError` asking for it. After the input is read (and before
the network runs or anything is written) the model's modality is checked against the input's; a
mismatch is a :class:`ModalityMismatchError` unless ``allow_modality_mismatch``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import Cancelled, InputError, MedDiffSegError, ModelError, OutputError
from ..modality import (
    ModalityCheck,
    check_model_fits,
    dicom_modality,
    input_modality,
    modality_required_message,
    normalise_modality,
)
from ..registry.package import ModelPackage
from ..registry.store import default_model_for, models_for_modality, package_origin, resolve_model

SEGMENTATION = "segmentation.nii.gz"
UNCERTAINTY = "uncertainty.nii.gz"
SUMMARY = "summary.json"
PROBABILITY_TEMPLATE = "probability_{organ}.nii.gz"
DICOM_SEG = "segmentation.dcm"
UNCERTAINTY_PMAP = "uncertainty_pmap.dcm"
DICOM_SEG_TYPES = ("binary", "fractional")
SUMMARY_FORMAT = 1

ProgressFn = Callable[[str, float, str], None]

# Share of the whole run's progress bar per stage (the engine reports 0..1 over its three stages).
_PROGRESS_SPAN = {"read": (0.0, 0.04), "load": (0.04, 0.06), "engine": (0.06, 0.96), "write": (0.96, 1.0)}
_ENGINE_STAGES = ("preprocess", "network", "postprocess")


def _schedulers() -> tuple[str, ...]:
    from ..sampling.schedulers import SCHEDULERS

    return tuple(SCHEDULERS)


def probability_filename(organ: str) -> str:
    return PROBABILITY_TEMPLATE.format(organ=re.sub(r"[^A-Za-z0-9_.-]+", "_", organ))


# -- validation helpers ---------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise MedDiffSegError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise MedDiffSegError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _first_existing_ancestor(path: Path) -> tuple[Path, list[Path]]:
    """The nearest existing ancestor of ``path`` and the missing folders below it (top first)."""
    missing: list[Path] = []
    current = path
    while not (current.exists() or current.is_symlink()):
        missing.append(current)
        parent = current.parent
        if parent == current:
            break
        current = parent
    return current, list(reversed(missing))


def _check_output_dir(out_dir: Path, input_path: Path) -> list[Path]:
    """Raise OutputError unless ``out_dir`` can be created/written; returns the folders to create."""
    existing, missing = _first_existing_ancestor(out_dir)
    if not missing:
        if not out_dir.is_dir():
            raise OutputError(f"output folder {out_dir} exists and is not a folder")
    elif not existing.is_dir():
        raise OutputError(f"cannot create output folder {out_dir}: {existing} is not a folder")
    from ..io.volume import pseudo_filesystem

    kernel_fs = pseudo_filesystem(out_dir)
    if kernel_fs is not None:  # writable for root, perhaps, but no place for files: refused before the run
        raise OutputError(f"output folder {out_dir} is on {kernel_fs}, a kernel file system that holds no files; "
                          "choose a folder on a disk")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out_dir} is not writable (no write permission on {existing})")
    try:
        same = input_path.is_dir() and out_dir.exists() and os.path.samefile(out_dir, input_path)
    except OSError:
        same = False
    if same:
        raise OutputError(f"output folder {out_dir} is the input DICOM folder; choose another folder "
                          "(the input is never modified)")
    return missing


def _check_geometry(result_image, reference, what: str) -> None:
    """The engine promises the input's grid; refuse to write anything else (that would be a bug)."""
    if tuple(result_image.GetSize()) != tuple(reference.GetSize()):
        raise RuntimeError(f"engine returned {what} of size {result_image.GetSize()} for an input of size {reference.GetSize()}")
    for got, want, label in (
        (result_image.GetSpacing(), reference.GetSpacing(), "spacing"),
        (result_image.GetOrigin(), reference.GetOrigin(), "origin"),
        (result_image.GetDirection(), reference.GetDirection(), "direction"),
    ):
        if not np.allclose(got, want, rtol=1e-5, atol=1e-4):
            raise RuntimeError(f"engine returned {what} with {label} {got}, input has {want}")
    result_image.CopyInformation(reference)  # exact, not merely close


def place_outputs(out_dir: Path, to_create: list[Path], write: Callable[[Path], None], names: Sequence[str],
                  make_summary: Callable[[], dict], check_cancel: Callable[[], None]) -> dict:
    """Write a run's outputs so that ``out_dir`` never holds a partial set, and return the summary.

    ``write(staging)`` writes the files ``names`` into a staging folder inside ``out_dir``; then the
    summary from ``make_summary()`` is written there too, and everything is renamed into place,
    ``summary.json`` last (its presence marks a complete set). On any failure or cancellation the
    staging folder, the files already renamed and the folders this run created are removed.
    """
    created: list[Path] = []
    staging: Path | None = None
    placed: list[Path] = []
    try:
        try:
            for folder in to_create:
                folder.mkdir()
                created.append(folder)
            staging = Path(tempfile.mkdtemp(prefix=".meddiffseg-partial-", dir=out_dir))
        except OSError as exc:
            raise OutputError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
        write(staging)
        summary = make_summary()
        try:
            (staging / SUMMARY).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {out_dir / SUMMARY}: {exc.strerror or exc}") from None
        check_cancel()
        try:
            for fname in list(names) + [SUMMARY]:
                os.replace(staging / fname, out_dir / fname)
                placed.append(out_dir / fname)
        except OSError as exc:
            raise OutputError(f"cannot move outputs into {out_dir}: {exc.strerror or exc}") from None
        done_staging, staging = staging, None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        else:
            for p in placed:  # only files this run renamed into an existing folder
                try:
                    p.unlink()
                except OSError:
                    pass
        raise
    try:
        done_staging.rmdir()  # empty by now; the outputs are already in place
    except OSError:
        pass
    return summary


def _finite_or_none(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# -- the run --------------------------------------------------------------------------------------


def run_segment(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    organs: Sequence[str],
    *,
    model: str | os.PathLike | ModelPackage | None = None,
    samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str = "auto",
    scheduler: str | None = None,
    staple: bool = False,
    largest_component: bool | None = None,
    save_probabilities: bool = False,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
    dicom_seg: str | None = None,
    modality: str | None = None,
    allow_modality_mismatch: bool = False,
    adaptive: bool = True,
    crop_body: bool | None = None,
    precision: str = "auto",
    method: Any = None,
) -> dict:
    """Segment ``organs`` in the volume or DICOM folder ``input_path`` and write the outputs to ``out_dir``.

    ``model``: an installed package name, a package folder, a :class:`ModelPackage`, or ``None``
    for the default model of the input's modality. ``modality``: ``"CT"`` or ``"MR"``, what the
    input is (needed without ``model`` for a file, which has no DICOM Modality tag); checked
    against a DICOM series' tag. ``allow_modality_mismatch``: run a model made for another modality
    than the input's (a warning is logged) instead of raising :class:`ModalityMismatchError`.
    ``samples``/``steps``/``scheduler``: ``None`` uses the model's defaults. ``adaptive``: stop
    sampling an organ after one sample in windows where it shows no trace (the engine's default;
    False draws every sample everywhere). ``crop_body``: cut the windows to the body's in-plane box
    (None: as the package says, ``inference.body_crop``, off for the shipped models).
    ``precision``: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (GPU) for the network (:func:`~MedDiffSegLib.inference.device.resolve_precision`).
    ``method``: the network of ``model`` already loaded on ``device`` by ``model.load_method``
    (``model`` must then be that :class:`ModelPackage`): it checked the weights' sha256 when it
    loaded them, so they are neither hashed nor read again (a batch worker loads once and segments
    many inputs; ``timings_s.load_model`` is then 0). The results are the same as without it.
    Returns the summary (the content of ``summary.json``).

    ``progress(stage, fraction, message)`` is called with ``stage`` one of ``read``, ``load``,
    ``preprocess``, ``network``, ``postprocess``, ``write`` and ``fraction`` the share of the
    whole run done so far (0..1, never decreasing). ``should_cancel()`` is polled between
    stages and by the engine before every window batch.

    ``dicom_seg``: ``"binary"`` or ``"fractional"`` also writes ``segmentation.dcm`` (DICOM-SEG of
    that type) and ``uncertainty_pmap.dcm`` (Parametric Map), derived from the input series; the
    input must then be a DICOM series folder. An empty segmentation is an error then (before
    any output is written), as a DICOM-SEG without any segmented voxel is refused.

    Raises :class:`MedDiffSegError` subclasses for anything the user can fix -- all of them
    before the output folder is touched -- and :class:`Cancelled` when ``should_cancel()``
    becomes true or the run is interrupted; no output file is left behind in either case.
    """
    t_start = time.perf_counter()

    def report(stage: str, fraction: float, message: str) -> None:
        """Forward progress as the fraction of the whole run (the engine's share is scaled in)."""
        if progress is not None:
            lo, hi = _PROGRESS_SPAN["engine" if stage in _ENGINE_STAGES else stage]
            progress(stage, lo + (hi - lo) * min(max(float(fraction), 0.0), 1.0), message)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled("segmentation cancelled; no output was written")

    # 1. cheap argument checks
    samples = _check_int("samples", samples, 1)
    steps = _check_int("steps", steps, 1)
    seed_int = _check_int("seed", seed, 0)
    seed = 0 if seed_int is None else seed_int
    if seed >= 2**63:
        raise MedDiffSegError(f"seed must be below 2**63, got {seed}")
    if scheduler is not None and scheduler not in _schedulers():
        raise MedDiffSegError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(_schedulers())}")
    if isinstance(organs, str):
        organs = [organs]
    organs = list(organs)
    if dicom_seg is not None and dicom_seg not in DICOM_SEG_TYPES:
        raise MedDiffSegError(f"dicom_seg must be one of {', '.join(DICOM_SEG_TYPES)}, got {dicom_seg!r}")
    if dicom_seg is not None and not Path(input_path).expanduser().is_dir():
        raise InputError(f"a DICOM-SEG can only be derived from a DICOM series: {input_path} is not a folder. "
                         "Pass the folder of the series as INPUT (or export later with 'meddiffseg export-dicom-seg')")
    declared = normalise_modality(modality, "modality")
    allow_modality_mismatch = bool(allow_modality_mismatch)
    shown = os.fspath(input_path)

    # 2. device
    from .device import device_description, resolve_device, resolve_precision

    torch_device = resolve_device(device)
    resolve_precision(precision, torch_device)  # a bad value fails here, before anything heavy
    device_text = device_description(torch_device)

    # 3. model + weights hash; without a model, the default for the input's modality
    from ..io.volume import read_volume

    info = None
    if model is None:
        source = Path(input_path).expanduser()
        info = input_modality(dicom_tag=dicom_modality(source), declared=declared,
                              allow_mismatch=allow_modality_mismatch, shown=shown)
        if info.modality is None:
            read_volume(source)  # a missing or unreadable input says so first
            raise InputError(modality_required_message(shown))
        package = default_model_for(info.modality)
    else:
        package = model if isinstance(model, ModelPackage) else resolve_model(model)
    if method is not None and package is not model:
        raise TypeError("run_segment: a preloaded method needs the ModelPackage it was loaded from as model")
    if method is None:  # a preloaded method's weights were checked when they were loaded
        package.verify()

    # 4. organs known to the model
    if not organs:
        raise ModelError(f"no organ requested; model {package.name!r} segments: {', '.join(package.organ_names)}")
    organ_ids = package.organ_ids(organs)
    organ_names = [package.organs[i].name for i in organ_ids]
    if len(organ_names) > 255:
        raise MedDiffSegError(f"at most 255 organs fit a uint8 label map, got {len(organ_names)}")
    effective_samples = samples if samples is not None else int(package.inference.get("samples", 1))
    if staple and effective_samples < 2:
        raise MedDiffSegError(f"STAPLE fuses several samples and needs samples >= 2 (got {effective_samples})")

    # 5. output folder (checked, not created)
    input_path = Path(input_path).expanduser()
    out_dir = Path(out_dir).expanduser().absolute()
    to_create = _check_output_dir(out_dir, input_path)

    # 6. input
    from ..io.volume import read_dicom_series

    check_cancel()
    report("read", 0.0, "reading input")
    t0 = time.perf_counter()
    dicom_source = None
    dicom_files: list[str] = []
    if input_path.is_dir():
        image, dicom_files = read_dicom_series(input_path)
    else:
        image = read_volume(input_path)
    if dicom_seg is not None:
        from ..dicom.source import load_source_series

        dicom_source = load_source_series(dicom_files, grid=image)  # checks the headers before the network runs
    t_read = time.perf_counter() - t0

    # 6b. the model's modality fits the input's (tag, declaration, intensities)
    import SimpleITK as sitk

    if info is None:
        info = input_modality(dicom_tag=dicom_modality(dicom_files[0] if dicom_files else input_path),
                              declared=declared, allow_mismatch=allow_modality_mismatch, shown=shown)
    modality_check = check_model_fits(
        package.modality, package.name, info, sitk.GetArrayViewFromImage(image),
        allow_mismatch=allow_modality_mismatch,
        fitting_models=lambda m: [p.name for p in models_for_modality(m)],
    )
    report("read", 1.0, "input read")

    # 7. network (a weights/config mismatch is a model problem, reported before any output)
    check_cancel()
    report("load", 0.0, f"loading model {package.name}")
    t0 = time.perf_counter()
    try:
        if method is None:
            method = package.load_method(str(torch_device))
    except MedDiffSegError:
        raise
    except Exception as exc:
        raise ModelError(f"model {package.name!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    t_load = time.perf_counter() - t0
    report("load", 1.0, "model loaded")

    # 8. segment
    from .engine import segment_volume

    check_cancel()
    result = segment_volume(
        image, package, organ_names,
        samples=samples, steps=steps, seed=seed, device=str(torch_device), scheduler=scheduler,
        staple=staple, largest_component=largest_component, adaptive=adaptive, crop_body=crop_body, precision=precision,
        keep_probabilities=save_probabilities or dicom_seg == "fractional",
        method=method, progress=report, should_cancel=should_cancel,
    )
    del method
    check_cancel()

    # 9. write everything under temporary names, then rename
    report("write", 0.0, "writing outputs")
    t0 = time.perf_counter()
    from ..io.volume import write_image_atomic

    labels = result.labels
    if labels.GetPixelID() != sitk.sitkUInt8:
        labels = sitk.Cast(labels, sitk.sitkUInt8)
    uncertainty = result.uncertainty
    if uncertainty.GetPixelID() != sitk.sitkFloat32:
        uncertainty = sitk.Cast(uncertainty, sitk.sitkFloat32)
    _check_geometry(labels, image, "the segmentation")
    _check_geometry(uncertainty, image, "the uncertainty map")

    # What is written (NIfTI and Parametric Map alike): float32 still, without the variance dust that
    # makes the map slow to compress, to 10 mantissa bits (uncertainty.ensemble.variance_for_storage).
    from ..uncertainty.ensemble import variance_for_storage

    stored = sitk.GetImageFromArray(variance_for_storage(sitk.GetArrayViewFromImage(uncertainty)))
    stored.CopyInformation(uncertainty)
    uncertainty = stored
    images: list[tuple[str, Any]] = [(SEGMENTATION, labels), (UNCERTAINTY, uncertainty)]
    prob_files: dict[str, str] = {}
    if save_probabilities:
        probs = getattr(result, "probabilities", None) or {}
        for name in organ_names:
            if name not in probs:
                raise RuntimeError(f"engine returned no probability map for {name!r} although it was requested")

            def load(name=name):  # built when written: one organ's float32 volume in memory at a time
                prob = probs[name]
                if prob.GetPixelID() != sitk.sitkFloat32:
                    prob = sitk.Cast(prob, sitk.sitkFloat32)
                _check_geometry(prob, image, f"the probability map of {name}")
                return prob

            fname = probability_filename(name)
            prob_files[name] = fname
            images.append((fname, load))
    dicom_datasets: list[tuple[str, Any]] = []
    if dicom_source is not None:  # built in memory: every DICOM check fails before any output exists
        from ..dicom.export import build_dicom_outputs

        probs = getattr(result, "probabilities", None) or {}
        seg_ds, _, pmap_ds, _ = build_dicom_outputs(
            labels, dicom_source, [package.organs[i] for i in organ_ids], uncertainty=uncertainty,
            fractional_probabilities=_OrganSequence(probs, organ_names) if dicom_seg == "fractional" else None,
            model_name=package.name, model_version=package.version,
            algorithm_parameters={"method": package.method_name, "samples": getattr(result, "samples", None) or samples,
                                  "steps": getattr(result, "steps", None) or steps, "seed": seed},
        )
        dicom_datasets = [(DICOM_SEG, seg_ds), (UNCERTAINTY_PMAP, pmap_ds)]

    def write_images(staging: Path) -> None:
        for i, (fname, img) in enumerate(images):
            check_cancel()
            write_image_atomic(img() if callable(img) else img, staging / fname)
            report("write", (i + 1) / (len(images) + 1), f"wrote {fname}")
        if dicom_datasets:
            from ..dicom.source import write_dataset_atomic

            for fname, ds in dicom_datasets:
                check_cancel()
                write_dataset_atomic(ds, staging / fname)

    def make_summary() -> dict:
        summary = _summary(
            image=image, labels=labels, result=result, package=package, organ_names=organ_names,
            samples=samples, steps=steps, seed=seed, scheduler=scheduler, staple=staple,
            largest_component=largest_component, device_text=device_text,
            prob_files=prob_files,
            timings={"read": t_read, "load_model": t_load, "write": time.perf_counter() - t0,
                     "total": time.perf_counter() - t_start},
            engine_timings=dict(getattr(result, "timings", {}) or {}),
            input_kind="dicom-series" if input_path.is_dir() else "file",
            modality_check=modality_check,
        )
        summary["input"]["path"] = str(input_path.absolute())
        if dicom_datasets:
            summary["outputs"]["dicom_seg"] = DICOM_SEG
            summary["outputs"]["dicom_seg_type"] = dicom_seg.upper()  # type: ignore[union-attr]
            summary["outputs"]["uncertainty_pmap"] = UNCERTAINTY_PMAP
        return summary

    summary = place_outputs(out_dir, to_create, write_images, [f for f, _ in images] + [f for f, _ in dicom_datasets],
                            make_summary, check_cancel)
    report("write", 1.0, f"outputs written to {out_dir}")
    return summary


def _summary(*, image, labels, result, package: ModelPackage, organ_names, samples, steps, seed,
             scheduler, staple, largest_component, device_text, prob_files, timings, engine_timings,
             input_kind, modality_check: ModalityCheck) -> dict:
    import SimpleITK as sitk
    import torch

    from .. import __version__

    spacing = [float(s) for s in image.GetSpacing()]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    label_arr = sitk.GetArrayViewFromImage(labels)
    counts = np.bincount(label_arr.reshape(-1), minlength=len(organ_names) + 1)
    engine_stats = {getattr(s, "name", None): s for s in (getattr(result, "stats", None) or [])}
    organs_out = []
    for label, name in enumerate(organ_names, start=1):
        organ = package.organs[package.organ_names.index(name)]
        count = int(counts[label])  # from the label map actually written, so volume_ml matches it
        entry = {"name": name, "display_name": organ.display_name, "label": label, "voxel_count": count,
                 "color": list(organ.color), "category": dict(organ.category), "type": dict(organ.type),
                 "volume_ml": count * voxel_ml, "mean_uncertainty": None, "max_uncertainty_slice": None,
                 "slice_axis": None, "slice_axis_ijk": None, "max_uncertainty_position_mm": None,
                 "possible_continuation": []}
        st = engine_stats.get(name)  # the engine's per-organ statistics (OrganStats)
        if st is not None:  # also for an empty mask: "not segmented" is the signal that matters then
            entry["possible_continuation"] = [dict(c) for c in (getattr(st, "possible_continuation", None) or [])]
            # the axis the slice indices count along: numpy order (0 = z) and as ITK / Slicer name it (K = z)
            axis = getattr(st, "slice_axis", None)
            entry["slice_axis"] = None if axis is None else int(axis)
            entry["slice_axis_ijk"] = getattr(st, "slice_axis_ijk", None)
        if count and st is not None and st.mean_uncertainty is not None:
            entry["mean_uncertainty"] = _finite_or_none(st.mean_uncertainty)
            if getattr(st, "max_uncertainty_slice", None) is not None:
                entry["max_uncertainty_slice"] = int(st.max_uncertainty_slice)
                pos = getattr(st, "max_uncertainty_position", None)
                entry["max_uncertainty_position_mm"] = None if pos is None else [float(v) for v in pos]
        organs_out.append(entry)
    t = {
        "read": timings["read"],
        "load_model": timings["load_model"],
        "preprocess": float(engine_timings.get("preprocess", 0.0)),
        "network": float(engine_timings.get("network", 0.0)),
        "postprocess": float(engine_timings.get("postprocess", 0.0)),
        "write": timings["write"],
        "total": timings["total"],
    }
    return {
        "format": SUMMARY_FORMAT,
        "outputs": {"segmentation": SEGMENTATION, "uncertainty": UNCERTAINTY, "probabilities": prob_files},
        "uncertainty": ("per voxel: variance over the samples of the assigned organ's foreground probability; "
                        "background voxels: the largest variance over the requested organs"),
        "organs": organs_out,
        "model": {
            "name": package.name, "version": package.version, "method": package.method_name,
            "weights_sha256": package.weights_sha256, "origin": package_origin(package),
            "modality": package.modality,
        },
        "settings": {
            "samples": int(getattr(result, "samples", None) or samples or package.inference["samples"]),
            "steps": int(getattr(result, "steps", None) or steps or package.inference["steps"]),
            "scheduler": getattr(result, "scheduler", None) or scheduler or package.inference.get("scheduler"),
            "seed": int(seed),
            "threshold": float(getattr(result, "threshold", package.inference.get("threshold", 0.5))),
            "staple": bool(staple),
            "largest_component": bool(getattr(result, "largest_component", largest_component)),
            "largest_component_organs": list((getattr(result, "extras", None) or {}).get("largest_component_organs", [])),
            "device": device_text,
            # per-organ temperatures applied to the reported probabilities (None: uncalibrated)
            "calibration": (getattr(result, "extras", None) or {}).get("calibration"),
            "precision": (getattr(result, "extras", None) or {}).get("precision", "fp32"),
        },
        # what the network was asked for: windows, windows outside the body (skipped), and per organ
        # the samples drawn (adaptive sampling stops after one where the organ shows no trace)
        "sampling": (getattr(result, "extras", None) or {}).get("sampling"),
        "timings_s": {k: round(float(v), 4) for k, v in t.items()},
        # STAPLE's EM per organ: iterations used (capped), voxels of the box it ran in, seconds.
        "staple": [dict(v) for v in (getattr(result, "extras", None) or {}).get("staple", [])] or None,
        "input": {
            "kind": input_kind,
            "size": [int(s) for s in image.GetSize()],
            "spacing_mm": spacing,
            "voxel_volume_ml": voxel_ml,
            "pixel_type": image.GetPixelIDTypeAsString(),
            "modality": modality_check.input_modality,
            "modality_source": modality_check.input_source,
        },
        "modality_check": modality_check.to_dict(),
        "software": {
            "meddiffseg": __version__,
            "torch": torch.__version__,
            "python": ".".join(map(str, sys.version_info[:3])),
        },
    }


class _OrganSequence(Sequence):
    """The organs' maps in label order, each built from the engine's compact storage when indexed."""

    def __init__(self, maps, names: list[str]):
        self._maps, self._names = maps, list(names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._maps[n] for n in self._names[i]]
        return self._maps[self._names[i]]

    def __len__(self) -> int:
        return len(self._names)
