"""Modality (CT or MR): of a model, of an input, and whether they fit -- one set of rules for the CLI,
the worker and the 3D Slicer module.

**A model's modality** is ``preprocessing.modality`` in its ``model.json`` (``"CT"``: the input is
clipped to a window in Hounsfield units; ``"MR"``: scaled between percentiles of its own values).
:func:`read_package_modality` reads it from the file (no torch needed); a loaded package has
``ModelPackage.modality``.

**An input's modality** comes from, strongest first:

1. the DICOM ``Modality`` tag of a series (:func:`dicom_modality`): ``CT`` -> CT, ``MR`` -> MR; any
   other value (PT, US, OT...) is an :class:`~MedDiffSegLib.errors.InputError` naming it
   (:func:`input_modality`);
2. a declared modality: ``meddiffseg segment --modality CT|MR`` (NIfTI, NRRD and MHA files have no
   tag); a declaration that contradicts the tag is an InputError unless the mismatch is allowed;
3. its intensities (:func:`hu_plausibility`): used only to *check* a model, never to choose one.

**The default model** for a modality (:func:`pick_default`), used when no model is named: the package
named in :data:`DEFAULT_MODELS` when it is installed and declares that modality; else the first
installed package of :data:`FALLBACK_MODELS` (for CT the guided package shipped before the per-modality
defaults, ``abdomen-ct-guided``); else the only installed package of that modality; else none (the
registry then raises a ModelError saying no such model is installed and how to install one, or, when
several are installed, asking to choose one with ``--model``).

**Mismatch** (:func:`check_model_fits`), checked after the input is read and before anything is
written. The intensities are checked both ways, whatever the model:

- an input whose tag or declaration contradicts its own intensities is refused: one tagged or
  declared CT whose intensities are implausible as Hounsfield units, and one tagged or declared MR
  whose intensities are plausible as HU (an MR has no share of voxels at -50 or below);
- a model refuses an input whose tag or declaration says the other modality;
- with neither a tag nor a declaration, a CT model refuses intensities implausible as HU and an MR
  model intensities plausible as HU.

A refusal is a :class:`~MedDiffSegLib.errors.ModalityMismatchError` that says what the input
probably is, the flag that runs it so (``--modality CT|MR``, or ``--model``), and the installed models
that fit; ``allow_mismatch`` (``--allow-modality-mismatch``) turns it into a logged warning, and the
summary records it.

**HU plausibility** (:func:`hu_plausibility`): every CT in Hounsfield units has fat (about -100 HU)
and air (-1000 HU) somewhere in its field of view, also when it was windowed (BTCV's CTs are clipped
to [-125, 275]: fat and air sit at -125); a magnitude MR has no values below 0 beyond interpolation
ringing. So an image is plausible as HU when at least :data:`MIN_DARK_FRACTION` (5 %) of its voxels
are at or below :data:`HU_DARK_AT_MOST` (-50), after ignoring scanner padding below
:data:`HU_PADDING_BELOW` (-1100: -2048, -3024, -32768 outside the reconstructed circle), and the median
of its remaining soft-tissue voxels (above -50), if it has any, is at most :data:`MAX_TISSUE_MEDIAN`
(400 HU; soft tissue is about 0-100 HU, contrast-enhanced organs up to about 200). An image with a
single value (blank, or all padding) tells nothing: the check is then inconclusive and refuses no
model. On the real data beside the project, every CT has 58-82 % of its voxels at or below -50 and
a soft-tissue median of 25-76 HU; every MR has none at or below -50.

Nothing here imports torch (the Slicer module uses it in its own process; note that ``MedDiffSegLib.io``
does), nor numpy or SimpleITK at import time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import InputError, MedDiffSegError, ModalityMismatchError, ModelError

log = logging.getLogger(__name__)

#: The modalities a model can declare (the same as ``preprocessing.spec.MODALITIES``).
MODALITIES = ("CT", "MR")

#: The model used for each modality when none is named (see the module docstring for the fallback).
DEFAULT_MODELS: dict[str, str] = {"CT": "abdomen-ct", "MR": "abdomen-mr"}
#: Used, in this order, while the default of :data:`DEFAULT_MODELS` is not installed.
FALLBACK_MODELS: dict[str, tuple[str, ...]] = {"CT": ("abdomen-ct-guided",), "MR": ()}

#: Values below this are scanner padding outside the field of view, not tissue (HU check).
HU_PADDING_BELOW = -1100.0
#: Fat (about -100 HU) and air (-1000 HU) are at or below this in a CT.
HU_DARK_AT_MOST = -50.0
#: A CT in HU has at least this share of (non-padding) voxels at or below HU_DARK_AT_MOST.
MIN_DARK_FRACTION = 0.05
#: The median of a CT's voxels above HU_DARK_AT_MOST (soft tissue, organs, bone) is at most this.
MAX_TISSUE_MEDIAN = 400.0
#: The check looks at this many voxels at most (a fixed random sample of larger volumes).
MAX_SAMPLE = 2_000_000

_SOURCE_TEXT = {"dicom": "its DICOM Modality tag", "declared": "--modality", "intensities": "its intensities"}


# -- names --------------------------------------------------------------------------------------------


def normalise_modality(value: str | None, what: str = "modality") -> str | None:
    """``"CT"`` or ``"MR"`` (case-insensitive; ``MRI`` is MR); ``None`` stays ``None``; else an error."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if text == "MRI":
        text = "MR"
    if text not in MODALITIES:
        raise MedDiffSegError(f"{what} must be CT or MR, got {value!r}")
    return text


def read_package_modality(folder: str | os.PathLike) -> str:
    """The modality a package folder's ``model.json`` declares (``CT`` when it declares none, as
    ``PreprocessSpec`` does); read from the JSON alone, without importing torch."""
    meta_path = Path(folder) / "model.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {meta_path}: {exc}") from None
    pre = meta.get("preprocessing") if isinstance(meta, dict) else None
    value = pre.get("modality", "CT") if isinstance(pre, dict) else "CT"
    if value not in MODALITIES:
        raise ModelError(f"{meta_path}: preprocessing.modality must be one of {MODALITIES}, got {value!r}")
    return str(value)


def dicom_modality(path: str | os.PathLike) -> str:
    """The DICOM Modality tag (0008,0060) of a DICOM file, or of the first file of the one series in a folder.

    Reads one header (SimpleITK/GDCM). ``""`` when there is no tag, the path is not DICOM, or a folder
    does not hold exactly one readable series (reading the series reports those problems).
    """
    import SimpleITK as sitk

    p = Path(path)
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on stderr about folders without series
    try:
        if p.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
            if len(series) != 1:
                return ""
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), series[0])
            if not files:
                return ""
            p = Path(files[0])
        else:
            with open(p, "rb") as f:
                f.seek(128)
                if f.read(4) != b"DICM":
                    return ""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        return reader.GetMetaData("0008|0060").strip().upper() if reader.HasMetaDataKey("0008|0060") else ""
    except (RuntimeError, OSError):
        return ""
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# -- default model --------------------------------------------------------------------------------------


def pick_default(modality: str, installed: Mapping[str, str]) -> str | None:
    """Name of the default model for ``modality`` among ``installed`` (``{name: its modality}``), or None.

    The rule: :data:`DEFAULT_MODELS` ``[modality]``, else the first of :data:`FALLBACK_MODELS`
    ``[modality]``, else the only installed package of that modality -- each only when it is
    installed and declares ``modality``.
    """
    modality = normalise_modality(modality)
    for name in (DEFAULT_MODELS.get(modality), *FALLBACK_MODELS.get(modality, ())):
        if name and installed.get(name) == modality:
            return name
    candidates = sorted(n for n, m in installed.items() if m == modality)
    return candidates[0] if len(candidates) == 1 else None


def missing_default_message(modality: str, installed: Mapping[str, str]) -> str:
    """Why :func:`pick_default` found nothing (the caller adds how to install a model)."""
    modality = normalise_modality(modality)
    default = DEFAULT_MODELS.get(modality)
    fallbacks = FALLBACK_MODELS.get(modality, ())
    candidates = sorted(n for n, m in installed.items() if m == modality)
    if candidates:  # several, none of them the default
        return (f"the default {modality} model {default!r} is not installed and several {modality} models are "
                f"({', '.join(candidates)}): choose one with --model")
    named = f"the default {modality} model {default!r}"
    if fallbacks:
        named += " (or " + ", ".join(repr(f) for f in fallbacks) + ")"
    listed = ", ".join(f"{n} ({m})" for n, m in sorted(installed.items())) or "none"
    return f"no {modality} model is installed: {named} is not installed (installed models: {listed})"


# -- HU plausibility ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HUCheck:
    """Whether intensities are plausible as CT Hounsfield units, with the numbers behind it."""

    plausible: bool | None          # None: inconclusive (a single value, or nothing but padding)
    dark_fraction: float            # share of non-padding voxels at or below HU_DARK_AT_MOST
    tissue_median: float | None     # median of the voxels above HU_DARK_AT_MOST (None: there are none)
    reason: str = ""                # why not plausible ("" when plausible)

    def to_dict(self) -> dict[str, Any]:
        return {"plausible": self.plausible, "dark_fraction": round(self.dark_fraction, 4),
                "tissue_median": None if self.tissue_median is None else round(self.tissue_median, 1)}


def hu_plausibility(array) -> HUCheck:
    """Are the values of ``array`` (any shape and numeric type) plausible as a CT in Hounsfield units?

    See the module docstring for the rule. Volumes above :data:`MAX_SAMPLE` voxels are judged on a
    fixed random sample of that many voxels (the same result every time).
    """
    import numpy as np  # here: the CLI imports this module for --help

    values = np.asarray(array).reshape(-1)
    if values.size > MAX_SAMPLE:
        index = np.random.default_rng(0).integers(0, values.size, MAX_SAMPLE)
        values = values[index]
    values = values.astype(np.float32, copy=False)
    values = values[np.isfinite(values) & (values >= HU_PADDING_BELOW)]
    if values.size == 0 or values.min() == values.max():
        return HUCheck(None, 0.0, None,
                       "its voxels all have one value (or are all padding): the intensities tell nothing")
    dark = float(np.count_nonzero(values <= HU_DARK_AT_MOST)) / values.size
    tissue = values[values > HU_DARK_AT_MOST]
    median = float(np.median(tissue)) if tissue.size else None
    if dark < MIN_DARK_FRACTION:
        reason = (f"only {dark:.1%} of its voxels are at or below {HU_DARK_AT_MOST:g} (a CT in Hounsfield units has "
                  f"fat and air there, at least {MIN_DARK_FRACTION:.0%} of the voxels; an MR has almost none)")
    elif median is not None and median > MAX_TISSUE_MEDIAN:  # all air/fat (no median) is HU-like too
        reason = (f"the median of its voxels above {HU_DARK_AT_MOST:g} is {median:.0f} (soft tissue is about 0-100 HU; "
                  f"at most {MAX_TISSUE_MEDIAN:g} expected)")
    else:
        reason = ""
    return HUCheck(not reason, dark, median, reason)


# -- the input's modality --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputModality:
    """What is known of an input's modality before its intensities are looked at."""

    modality: str | None            # "CT", "MR" or None (unknown)
    source: str | None              # "dicom" (the series' Modality tag), "declared" (--modality), None
    dicom_tag: str = ""             # the raw Modality tag of a DICOM input ("" for files or no tag)

    def describe(self) -> str:
        if self.modality is None:
            return "of unknown modality"
        return f"{self.modality} ({_SOURCE_TEXT.get(self.source or '', self.source)})"


def input_modality(*, dicom_tag: str | None = None, declared: str | None = None, allow_mismatch: bool = False,
                   shown: str = "the input") -> InputModality:
    """Combine a DICOM Modality tag and a declared modality (see the module docstring).

    A tag other than CT or MR, or a declaration contradicting the tag, is an :class:`InputError`;
    with ``allow_mismatch`` the declaration wins (a warning is logged) and no error is raised for a
    tag other than CT or MR when a modality is declared.
    """
    declared = normalise_modality(declared, "--modality")
    tag = (dicom_tag or "").strip().upper()
    if not tag:
        return InputModality(declared, "declared" if declared else None, "")
    if tag in MODALITIES:
        if declared is None or declared == tag:
            return InputModality(tag, "dicom", tag)
        if not allow_mismatch:
            raise InputError(f"--modality {declared} contradicts the DICOM Modality tag {tag} of {shown}; leave "
                             "--modality out (the tag is used), or add --allow-modality-mismatch to treat it as "
                             f"{declared}")
        log.warning("%s is tagged %s in DICOM; treated as %s as declared (--allow-modality-mismatch)",
                    shown, tag, declared)
        return InputModality(declared, "declared", tag)
    if declared is not None and allow_mismatch:
        log.warning("%s is a DICOM %s series; treated as %s as declared (--allow-modality-mismatch)",
                    shown, tag, declared)
        return InputModality(declared, "declared", tag)
    raise InputError(f"{shown} is a DICOM {tag} series (its Modality tag), not CT or MR: MedDiffSeg's models segment "
                     "CT and MR. If it really is a CT or MR, pass --modality CT|MR with --allow-modality-mismatch")


def modality_required_message(shown: str) -> str:
    """The message asking for ``--modality`` when neither a model nor a modality is known."""
    return (f"{shown} has no modality tag (only DICOM series have one), so the default model cannot be chosen: "
            "pass --modality CT or --modality MR (the default model for it is used), or name a model with --model")


# -- model vs input --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModalityCheck:
    """The outcome of :func:`check_model_fits` (recorded in ``summary.json``)."""

    model_modality: str
    input: InputModality
    hu: HUCheck | None
    mismatch: bool
    overridden: bool
    reason: str = ""

    @property
    def input_modality(self) -> str | None:
        """The input's modality: tag or declaration, else CT when its intensities are plausible HU."""
        if self.input.modality is not None:
            return self.input.modality
        return "CT" if self.hu is not None and self.hu.plausible is True else None

    @property
    def input_source(self) -> str | None:
        if self.input.modality is not None:
            return self.input.source
        return "intensities" if self.input_modality is not None else None

    def to_dict(self) -> dict[str, Any]:
        """The ``modality_check`` block of ``summary.json`` (the input's modality goes under ``input``)."""
        return {"model_modality": self.model_modality,
                "hu_plausible": None if self.hu is None else self.hu.plausible,
                "mismatch": self.mismatch, "overridden": self.overridden, "reason": self.reason or None}


def _article(modality: str) -> str:
    return "an" if modality == "MR" else "a"


def _fitting_text(modality: str, fitting_models: Callable[[str], Sequence[str]] | None) -> str:
    """The installed models of ``modality`` (its default marked), or how to install one; "" when unknown."""
    if fitting_models is None:
        return ""
    try:
        names = list(fitting_models(modality))
    except Exception as exc:  # listing must never hide the real problem
        log.debug("listing %s models failed: %s", modality, exc)
        return ""
    if not names:
        return f"no {modality} model is installed (install one with 'meddiffseg models install PACKAGE.zip')"
    default = pick_default(modality, {n: modality for n in names})
    return f"installed {modality} models: " + ", ".join(n + (" (the default)" if n == default else "") for n in names)


def _intensities_say(hu: HUCheck) -> str:
    """What plausible or implausible HU intensities say, for a message."""
    if hu.plausible:
        return (f"its intensities look like a CT in Hounsfield units ({hu.dark_fraction:.0%} of the voxels are at or "
                f"below {HU_DARK_AT_MOST:g}, as fat and air in a CT; an MR has almost none)")
    return f"its intensities are implausible as Hounsfield units: {hu.reason}"


def check_model_fits(model_modality: str, model_name: str, info: InputModality, array=None, *,
                     hu: HUCheck | None = None, allow_mismatch: bool = False,
                     fitting_models: Callable[[str], Sequence[str]] | None = None) -> ModalityCheck:
    """Check that a ``model_modality`` model fits an input (see the module docstring for the rules).

    ``array``: the input's voxels, for the intensity check (or pass ``hu``). ``fitting_models(m)``
    lists installed model names of modality ``m`` for the error message. Raises
    :class:`ModalityMismatchError` on a mismatch unless ``allow_mismatch``, which logs a warning.
    """
    model_modality = normalise_modality(model_modality)
    if hu is None and array is not None:
        hu = hu_plausibility(array)
    model_text = f"model {model_name!r} is {_article(model_modality)} {model_modality} model"
    said = info.modality
    by_intensities = None if hu is None or hu.plausible is None else ("CT" if hu.plausible else "MR")
    reason, hints = "", []
    if said is not None and by_intensities is not None and said != by_intensities:
        # The input contradicts itself: its tag or declaration against its intensities.
        joint = " and" if said == model_modality else ","
        reason = f"{model_text}{joint} the input is {info.describe()}, but {_intensities_say(hu)}"  # type: ignore[arg-type]
        flag = f"--modality {by_intensities}"
        if info.source == "dicom":
            flag += f" with --allow-modality-mismatch (overriding its DICOM Modality tag {said})"
        hints.append(f"if it is {_article(by_intensities)} {by_intensities}, pass {flag}")
        hints.append(_fitting_text(by_intensities, fitting_models))
        if said == "CT":
            hints.append("if it is a CT, check that it is stored in Hounsfield units (rescale slope and intercept "
                         "applied)")
    elif said is not None and said != model_modality:
        reason = f"{model_text} but the input is {info.describe()}"
        selects = f"--modality {said}" if info.source == "declared" else "its DICOM Modality tag"
        hints.append(f"choose {_article(said)} {said} model with --model, or leave --model out ({selects} then "
                     f"selects the default {said} model)")
        hints.append(_fitting_text(said, fitting_models))
    elif said is None and by_intensities is not None and by_intensities != model_modality:
        reason = f"{model_text} but the input's " + _intensities_say(hu).removeprefix("its ")  # type: ignore[arg-type]
        hints.append(f"if it is {_article(by_intensities)} {by_intensities}, pass --modality {by_intensities} instead "
                     f"of --model (the default {by_intensities} model is used) or choose one with --model")
        hints.append(_fitting_text(by_intensities, fitting_models))
    if not reason:
        return ModalityCheck(model_modality, info, hu, False, False)
    if allow_mismatch:
        log.warning("modality mismatch overridden (--allow-modality-mismatch): %s", reason)
        return ModalityCheck(model_modality, info, hu, True, True, reason)
    parts = [reason, *(h for h in hints if h)]
    parts.append(f"pass --allow-modality-mismatch to run {model_name!r} anyway")
    raise ModalityMismatchError("; ".join(parts))
