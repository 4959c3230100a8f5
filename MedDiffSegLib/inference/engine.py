"""The volume engine: method-agnostic segmentation of a whole CT/MR volume.

:func:`segment_volume` takes a SimpleITK image in any orientation and returns labels and an
uncertainty map on exactly the input's voxel grid. The pipeline:

1. **Canonical view.** The input array is transposed/flipped (never interpolated) to the
   model's orientation (:class:`~MedDiffSegLib.io.geometry.CanonicalView`), giving axial
   slices ``[K, J, I]``. Intensity clip bounds are computed once for the whole volume.
   A model with ``context_slices`` C > 1 gets each slice with its neighbours as C channels
   (the slices ``context_offset`` apart, edge slices repeated), so windows are ``[C, h, w]``.
2. **Streaming.** Slices are processed in chunks so memory is bounded by the chunk size, not
   the volume: each chunk is converted to float32 ``[k, 1, J, I]``, normalised to [-1, 1],
   resampled in-plane to the model spacing, and run through MONAI's
   ``sliding_window_inference`` (2D windows of the model's ``roi_size``, Gaussian blending,
   overlap at most 0.5, padding with -1 = normalised air). For each batch of windows the
   predictor encodes the image **once** (``method.condition``) and draws the ``N`` samples of
   each organ in one ``method.sample`` call per organ; it returns each organ's mean and
   population variance over the samples (``[k, 2·O, h, w]`` after blending, see Uncertainty
   below), which are resampled back to the canonical in-plane grid.
3. **Labels.** A voxel takes the organ with the highest mean probability if that probability
   reaches the model's threshold (ties go to the organ named first). With ``staple=True`` the
   per-organ probability is instead SimpleITK's STAPLE fusion of the N thresholded samples.
   ``largest_component=True`` keeps each organ's largest 3D connected component.
4. **Back to the input grid** by the exact inverse transpose/flip, with the input's spacing,
   origin and direction copied over.

Stages shared with interactive correction
-----------------------------------------
A run is a :class:`_VolumeRun`, one named method per stage (``prepare``, ``allocate``,
``stream`` = ``network`` + ``postprocess_chunk`` per chunk, ``fuse_staple``,
``keep_largest_components``, ``organ_statistics``, ``result``). Step 1 (the canonical view,
intensity bounds and model grid), the network input of step 2 and step 4 are
:class:`PreparedVolume`'s ``prepare``, ``network_input`` and ``to_image``. The
interactive session (:class:`~MedDiffSegLib.interactive.session.InteractiveSession`) runs the
same stages on the slab of slices a click reaches, so a slice is prepared for a correction
exactly as for the automatic segmentation.

Randomness and chunking
-----------------------
One ``torch.Generator`` per organ on the compute device, seeded from ``seed`` and the organ
(:func:`organ_seed`), serves the whole run and is consumed window batch after window batch in
slice order. MONAI groups the windows of a
chunk into batches of ``sw_batch_size`` in (slice, window) order. The engine rounds every
chunk to a whole number of window batches (a multiple of ``sw_batch_size / gcd(windows per
slice, sw_batch_size)`` slices), so the sequence of batches - their exact contents and the
order the generator serves them - is identical whatever the chunk size. Streaming therefore
does not change a single bit of the result on CPU: the network sees the same batch tensors
with the same noise as in a single-chunk run (this also keeps results independent of batch
size effects inside convolution kernels, which per-slice generators would not).

Memory
------
The per-chunk working set (the float32 input, MONAI's ``[k, 2·O, h, w]`` blending buffer (plus
``O·N`` sample channels with STAPLE), the
mean/variance maps) is kept under a budget (1 GiB, ``$MEDDIFFSEG_CHUNK_MB`` to change) by the
chunk size; when the whole-volume arrays below exceed 1.5 GiB the budget shrinks by the excess
(to at least 256 MiB). What outlives a chunk scales with the volume ``V`` only as much as the options
need: always a uint8 label map and a float32 uncertainty map (labels are decided chunk by
chunk); ``largest_component`` adds one float32 map (the max variance, for voxels it turns
into background); ``keep_probabilities`` adds mean and variance per organ (8-bit codes, below);
``staple`` adds the variance per organ and the N binarised samples per organ as packed bits (N·O·V/8 bytes), which
STAPLE needs all at once because its EM estimates each sample's sensitivity and specificity
over the whole volume. STAPLE runs per organ inside the box around every voxel any sample
labels (``_staple_box``), so only that box is unpacked (one sample at a time) and fused; its EM
is capped at ``STAPLE_MAX_ITERATIONS`` and the iterations and seconds per organ are reported.
Organs are fused smallest box first and each organ's packed samples are released once it is
fused, so the largest fusion runs with the fewest other samples held (overlaps: higher fused
probability, ties to the organ named first, independent of that order).

Per-organ volumes (``keep_probabilities``, and the variances STAPLE needs) are kept as 8-bit
codes - the mean probability to 1/255 (a fractional DICOM-SEG's own resolution) and the standard
deviation to 1/510 - and decoded to float32 one organ at a time when read (:class:`OrganMaps`).
The main uncertainty map stays float32. A package with ``inference.calibration`` (per-organ
temperatures, :mod:`MedDiffSegLib.uncertainty.calibration`) has its reported probabilities (and
their entropy) calibrated; labels, variance and the missed-structure signal use the raw mean.

Uncertainty
-----------
Each window batch is encoded once; then every organ is sampled in its own call with its own
generator (seeded from the run's seed and the organ's index, :func:`organ_seed`), so the network
sees the same batch for an organ whatever else is prompted and the organ's maps are bit-identical
on CPU with or without other prompts. Overlaps between organs are resolved only afterwards, by
the highest mean probability. The predictor returns each organ's per-window mean and variance over
the samples, and MONAI blends those moments: blending the samples first would average independent
noise of overlapping windows and shrink the variance in the seams (to about half where two
windows overlap). The blended variance is the mean within-window sample variance at every voxel.

Speed
-----
The network is only asked for what can change the answer. A window with no voxel inside the
model's intensity window (:data:`EMPTY_WINDOW_LEVEL`: air beyond the body, padding) is outside the
body: probability 0, variance 0, no network call. With ``adaptive=True`` (the default; it only
matters for ``samples > 1``) each organ first gets one sample in every window of a batch; windows
where that sample peaks below the package's floor (:func:`adaptive_floor`; no trace of the organ) stop there, with that
sample as their mean and variance 0, and only the others get the remaining ``N - 1`` samples (from
the batch's encoding, :meth:`~MedDiffSegLib.methods.base.Method.select_condition`). The ensemble
is therefore spent where the organ is. What was drawn is reported in ``extras["sampling"]``
(windows, windows outside the body, samples drawn per organ). Both rules are decided per window
batch and per organ from that organ's own noise stream, so chunking and prompt independence
hold as above; ``adaptive=False`` draws every sample in every window inside the body.

With ``crop_body=True`` the windows are also cut to the body in-plane: the box of every voxel
inside the intensity window on any slice (a maximum projection through the volume, resampled to
the model grid, so the box holds every such voxel), plus :data:`BODY_MARGIN_PX` pixels of air,
and a window side shrinks to the box rounded up to the network's size multiple (never beyond the
model's ``roi_size``). A CT with a 410 mm field of view around a 330 × 250 mm body then runs
192 × 128-pixel windows instead of 224 × 224: half the network's work. Outside the box the
probability and variance are 0, as in a skipped window. The box is one for the whole volume, so
chunking and prompt independence hold. But the network sees less air around the body than in
the windows it was trained on (its normalisation statistics change): the shipped models lose
accuracy with it (docs/benchmarks.md: up to -0.5 Dice on a pancreas), so it is off unless the
package declares ``inference.body_crop: true`` (a model trained on windows of varying size) or
the caller asks for it. ``extras["sampling"]["window_hw"]`` and ``["body_box"]`` report the
windows run.

"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, DeviceError, InputError, ModelError
from ..preprocessing.spec import context_indices, inplane_size, intensity_bounds, normalise_intensity, resample_inplane
from ..uncertainty import binary_entropy, ensemble_mean_variance, keep_largest_component, staple_fuse
from ..uncertainty.calibration import apply_temperature, temperatures
from ..uncertainty.continuation import BLOCK_MM, block_size, coarse_mask, find_continuations
from ..uncertainty.ensemble import (dequantise_probability, dequantise_variance, quantise_probability,
                                    quantise_variance)
from .device import resolve_device, resolve_precision

ProgressFn = Callable[[str, float, str], None]

#: Default memory (bytes) the per-chunk working set may use; ``MEDDIFFSEG_CHUNK_MB`` overrides it.
DEFAULT_CHUNK_MEMORY = 1 << 30
#: Whole-volume arrays up to this size leave the chunk budget at its default; beyond it the budget
#: shrinks by the excess (down to MIN_CHUNK_MEMORY), so chunk + volume arrays stay near 2.5 GiB.
VOLUME_MEMORY_ALLOWANCE = 1536 << 20
MIN_CHUNK_MEMORY = 256 << 20
#: Largest overlap between neighbouring windows the engine accepts (0.8 = 20x the work for nothing).
MAX_OVERLAP = 0.5
#: Progress fractions: preprocess up to 2 %, network up to 95 %, then post-processing.
_P_NETWORK0, _P_NETWORK1 = 0.02, 0.95
#: STAPLE's EM stops after this many iterations if it has not converged (SimpleITK's own default
#: is unbounded); the iterations used and the seconds per organ are reported in ``extras``.
STAPLE_MAX_ITERATIONS = 100
#: A window whose every voxel (all context channels) is at most this normalised value holds nothing
#: inside the model's intensity window (CT: nothing above the window's floor, -125 HU for the
#: default model, so only air, lung or fat below it; padding is -1): it is outside the body, gets
#: probability 0 and no network call. -1 is the floor exactly; the margin (0.05 % of the window,
#: 0.2 HU for a 400 HU window) only absorbs rounding in the in-plane resampling.
EMPTY_WINDOW_LEVEL = -0.999
#: Adaptive sampling (``adaptive=True``): a window whose first sample of an organ peaks below this
#: probability gets no further samples of that organ (its mean is that sample, its variance 0).
#: A package may set its own (``inference.adaptive_floor``): a model trained on soft targets decodes
#: a constant background above 0.01 (abdomen-ct 2.0.0: 0.012 everywhere), which this default would
#: take for a trace of the organ in every window.
ADAPTIVE_FLOOR = 0.01
#: Body crop (``crop_body=True``): model-grid pixels of air kept around the body's in-plane box.
BODY_MARGIN_PX = 8
#: Post-processing of a chunk runs in slabs of slices whose per-organ float32 maps take about this much.
POST_SLAB_BYTES = 16 << 20


def adaptive_floor(package, threshold: float) -> float:
    """The package's adaptive-sampling floor (``inference.adaptive_floor``, default :data:`ADAPTIVE_FLOOR`)."""
    value = package.inference.get("adaptive_floor", ADAPTIVE_FLOOR)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < threshold:
        raise ModelError(f"model {getattr(package, 'name', '?')!r}: inference.adaptive_floor must be a probability "
                         f">= 0 and below the threshold {threshold}, got {value!r}")
    return float(value)


def organ_seed(seed: int, organ_index: int) -> int:
    """The seed of one organ's noise stream: a hash of the run's seed and the organ's index in the
    model (numpy's SeedSequence), so an organ's samples never depend on which other organs are prompted."""
    state = np.random.SeedSequence([int(seed), int(organ_index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # < 2**63


@dataclass
class OrganStats:
    """Per-organ numbers of one run (in the input's geometry)."""

    name: str
    display_name: str
    label: int
    voxel_count: int
    volume_ml: float
    #: Mean of the uncertainty map inside the organ's mask (None when the mask is empty).
    mean_uncertainty: float | None
    #: Index along the input image's slice axis (the input array axis that becomes the canonical
    #: axial axis) of the axial slice where this organ's summed variance is highest; None when
    #: the samples agree everywhere (no variance anywhere).
    max_uncertainty_slice: int | None
    #: Physical (LPS, mm) position of that slice's centre.
    max_uncertainty_position: tuple[float, float, float] | None = None
    #: numpy axis (0 = z, 1 = y, 2 = x) of the input array that ``max_uncertainty_slice`` indexes
    #: (and the slices of ``possible_continuation``); :attr:`slice_axis_ijk` names it as ITK and Slicer do.
    slice_axis: int | None = None
    #: Where the organ probably continues unsegmented (see :mod:`MedDiffSegLib.uncertainty.continuation`):
    #: one dict per run of slices, with input slice indices, the anatomical side and the peak slice's position.
    possible_continuation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def slice_axis_ijk(self) -> str | None:
        """The slice axis as ITK / 3D Slicer name the image's index axes: "I", "J" or "K" (numpy axis 0 is K).

        A slice index counts the same way in both: slice 12 along K is voxel index k = 12 (0-based)."""
        return None if self.slice_axis is None else "IJK"[2 - int(self.slice_axis)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "display_name": self.display_name, "label": self.label,
            "voxel_count": self.voxel_count, "volume_ml": self.volume_ml,
            "mean_uncertainty": self.mean_uncertainty,
            "max_uncertainty_slice": self.max_uncertainty_slice,
            "max_uncertainty_position_mm": list(self.max_uncertainty_position) if self.max_uncertainty_position else None,
            "slice_axis": self.slice_axis, "slice_axis_ijk": self.slice_axis_ijk,
            "possible_continuation": [dict(c) for c in self.possible_continuation],
        }


@dataclass
class SegmentationResult:
    """What :func:`segment_volume` returns. Every image has the input's exact geometry."""

    labels: sitk.Image  # uint8: 0 background, i = i-th organ requested
    uncertainty: sitk.Image  # float32: variance of the assigned organ; background: max over organs
    organs: list  # package Organ objects in the order requested
    stats: list[OrganStats]
    timings: dict[str, float]
    samples: int
    steps: int
    scheduler: str | None
    seed: int
    device: str
    threshold: float = 0.5
    staple: bool = False
    largest_component: bool = False
    chunk_slices: int = 0
    # Per-organ maps (with keep_probabilities): read-only mappings organ name -> float32 image, built
    # on access from 8-bit storage (see OrganMaps), so that only one organ's float32 volume exists at a time.
    probabilities: Mapping[str, sitk.Image] | None = None  # mean foreground probability per organ
    variances: Mapping[str, sitk.Image] | None = None  # population variance over samples per organ
    entropy: Mapping[str, sitk.Image] | None = None  # binary entropy (bits) of the mean probability
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The run's numbers (no images), JSON-ready."""
        return {
            "organs": [s.to_dict() for s in self.stats],
            "samples": self.samples, "steps": self.steps, "scheduler": self.scheduler, "seed": self.seed,
            "device": self.device, "threshold": self.threshold, "staple": self.staple,
            "largest_component": self.largest_component, "chunk_slices": self.chunk_slices,
            "timings": dict(self.timings),
        }


class OrganMaps(Mapping):
    """Organ name -> float32 image on the input grid, decoded from compact per-organ storage on access.

    The engine keeps per-organ volumes as uint8 codes (probability to 1/255, standard deviation to
    1/510; :mod:`MedDiffSegLib.uncertainty.ensemble`): 8 organs of a 512×512×300 CT take 629 MB per
    kind instead of 2.5 GB. Indexing builds that one organ's float32 image (and nothing is cached),
    so writers that take one organ at a time never hold more than one float32 volume.
    """

    def __init__(self, names: list[str], codes: np.ndarray, decode: Callable[[np.ndarray], np.ndarray],
                 to_image: Callable[..., sitk.Image]):
        self._index = {n: i for i, n in enumerate(names)}
        self._codes, self._decode, self._to_image = codes, decode, to_image

    def __getitem__(self, name: str) -> sitk.Image:
        # ``to_image`` reorients the uint8 codes (a view) and decodes them on the input grid: one
        # float32 array plus SimpleITK's copy, nothing else of the volume's size.
        return self._to_image(self._codes[self._index[name]], self._decode)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


# ----------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------
def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise InputError(f"{what} must be at least 1, got {value}")
    return int(value)


def _inference_settings(package) -> tuple[tuple[int, int], float, int, float]:
    inf = package.inference
    name = getattr(package, "name", "?")
    roi = inf.get("roi_size")
    if isinstance(roi, (int, np.integer)):
        roi = [roi, roi]
    try:
        roi_t = tuple(int(v) for v in roi)
    except (TypeError, ValueError):
        raise ModelError(f"model {name!r}: inference.roi_size must be two positive integers, got {roi!r}") from None
    if len(roi_t) != 2 or min(roi_t) < 1:
        raise ModelError(f"model {name!r}: inference.roi_size must be two positive integers, got {roi!r}")
    overlap = inf.get("overlap", 0.25)
    if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0.0 <= float(overlap) <= MAX_OVERLAP:
        raise ModelError(
            f"model {name!r}: sliding-window overlap must be between 0 and {MAX_OVERLAP}, got {overlap!r} "
            f"(more overlap multiplies the work without improving the blend)"
        )
    swb = inf.get("sw_batch_size", 8)
    if isinstance(swb, bool) or not isinstance(swb, (int, np.integer)) or swb < 1:
        raise ModelError(f"model {name!r}: inference.sw_batch_size must be an integer >= 1, got {swb!r}")
    thr = inf.get("threshold", 0.5)
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not 0.0 < float(thr) <= 1.0:
        raise ModelError(f"model {name!r}: inference.threshold must be in (0, 1], got {thr!r}")
    return roi_t, float(overlap), int(swb), float(thr)  # type: ignore[return-value]


def largest_component_organs(package, organs: list[str], requested: bool | Sequence[str] | None) -> list[bool]:
    """Per requested organ: keep only its largest 3D connected component?

    ``True``/``False``: every organ / none. A sequence of organ names: those. ``None``: what the
    package declares in ``inference.largest_component`` (a list of organ names, chosen on held-out
    training patients, see ``bench/choose_postprocessing.py``; none when absent).
    """
    if requested is None:
        requested = package.inference.get("largest_component", False)
    if isinstance(requested, (bool, np.bool_)):
        return [bool(requested)] * len(organs)
    if isinstance(requested, str) or not all(isinstance(o, str) for o in requested):
        raise ModelError(f"largest_component must be true, false or a list of organ names, got {requested!r}")
    known = set(package.organ_names)
    unknown = [o for o in requested if o not in known]
    if unknown:
        raise ModelError(f"largest_component names organ(s) the model does not know: {', '.join(unknown)}")
    return [o in set(requested) for o in organs]


def windows_per_slice(size_hw: tuple[int, int], roi: tuple[int, int], overlap: float) -> int:
    """Number of sliding windows MONAI places on one ``size_hw`` slice (MONAI's own placement rule)."""
    from monai.data.utils import dense_patch_slices

    padded = tuple(max(s, r) for s, r in zip(size_hw, roi))
    # MONAI's scan interval: the window size if it spans the image, else int(roi * (1 - overlap)) >= 1.
    interval = tuple(r if r == s else max(1, int(r * (1 - overlap))) for s, r in zip(padded, roi))
    return len(dense_patch_slices(padded, roi, interval))


def _chunk_unit(num_win: int, sw_batch_size: int) -> int:
    """Smallest slice count whose windows fill whole batches of ``sw_batch_size``."""
    return sw_batch_size // math.gcd(num_win, sw_batch_size)


def _memory_budget(volume_bytes: int = 0) -> int:
    """Bytes the per-chunk working set may use: ``$MEDDIFFSEG_CHUNK_MB`` if set, else 1 GiB, less what
    the run's whole-volume arrays (``volume_bytes``) take beyond :data:`VOLUME_MEMORY_ALLOWANCE`, and
    never under :data:`MIN_CHUNK_MEMORY` (many organs and samples on a long CT keep ~2.4 GB of
    whole-volume arrays; the chunks then shrink so that the total stays bounded)."""
    env = os.environ.get("MEDDIFFSEG_CHUNK_MB")
    if env:
        try:
            return max(1, int(float(env) * (1 << 20)))
        except ValueError:
            pass
    return max(MIN_CHUNK_MEMORY, min(DEFAULT_CHUNK_MEMORY, DEFAULT_CHUNK_MEMORY + VOLUME_MEMORY_ALLOWANCE - volume_bytes))


def _volume_bytes(n_voxels: int, n_organs: int, n_samples: int, *, staple: bool, keep_probabilities: bool,
                  largest_component: bool) -> int:
    """Bytes of the whole-volume arrays a run keeps (labels, uncertainty, per-organ codes, STAPLE's bits)."""
    per_voxel = 1 + 4  # uint8 labels, float32 uncertainty
    per_voxel += 4 if (largest_component and not staple) else 0
    per_voxel += n_organs if keep_probabilities else 0  # mean codes
    per_voxel += n_organs if (keep_probabilities or staple) else 0  # variance codes
    per_voxel += n_organs * n_samples / 8 if staple else 0  # packed binary samples
    return int(n_voxels * per_voxel)


def _bytes_per_slice(model_hw, canon_hw, roi, n_organs: int, n_samples: int, staple: bool, channels: int = 1) -> int:
    """Rough float32 working set of one slice in a chunk (MONAI buffers, stats, resampled maps)."""
    p = max(model_hw[0], roi[0]) * max(model_hw[1], roi[1])
    q = canon_hw[0] * canon_hw[1]
    out = 2 * n_organs + (n_organs * n_samples if staple else 0)  # blended mean and variance (+ samples for STAPLE)
    model_side = p * (out * 2 + 2 + channels)  # output buffer + in-place products, input
    canon_side = q * (1 + channels + 2 * n_organs + 2 * n_organs + (n_samples if staple else 0))  # one organ's samples
    return 4 * (model_side + canon_side)


def _choose_chunk(n_slices: int, unit: int, per_slice: int, chunk_slices: int | None, volume_bytes: int = 0) -> int:
    if chunk_slices is not None:
        requested = _positive_int(chunk_slices, "chunk_slices")
        chunk = -(-requested // unit) * unit  # round up to whole window batches
    else:
        fit = max(1, _memory_budget(volume_bytes) // max(1, per_slice))
        chunk = max(unit, (fit // unit) * unit)
    return max(1, min(chunk, n_slices))


# ----------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------
def segment_volume(
    image: sitk.Image,
    package,
    organs: list[str],
    *,
    samples: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    scheduler: str | None = None,
    staple: bool = False,
    largest_component: bool | Sequence[str] | None = None,
    keep_probabilities: bool = False,
    adaptive: bool = True,
    crop_body: bool | None = None,
    precision: str | None = "auto",
    method=None,
    chunk_slices: int | None = None,
    progress: ProgressFn | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> SegmentationResult:
    """Segment ``organs`` in ``image`` with ``package``'s method; see the module docstring.

    ``samples``/``steps``/``scheduler`` default to the package's inference settings.
    ``method`` is an already loaded Method (else ``package.load_method(device)``, which checks
    the weights' sha256). ``progress(stage, fraction, message)`` receives the overall fraction
    done (0..1) with stage ``"preprocess"``, ``"network"`` or ``"postprocess"``.
    ``should_cancel()`` is polled before every window batch and between post-processing steps;
    when it returns True, :class:`~MedDiffSegLib.errors.Cancelled` is raised.

    ``adaptive`` (default True) stops sampling an organ after one sample in windows where that
    sample shows no trace of it (see "Speed" in the module docstring); False draws all ``samples``
    in every window inside the body. ``crop_body`` cuts the windows to the body's in-plane box (see
    "Speed"); None (default) does so only for a package whose ``inference.body_crop`` is true.
    False runs the model's ``roi_size`` windows over whole slices.

    ``chunk_slices`` sets how many axial slices are processed at once (default: as many as fit
    the chunk memory budget, 1 GiB or ``$MEDDIFFSEG_CHUNK_MB``); it is rounded up to whole
    window batches so that the result does not depend on it (see the module docstring). The
    chunk size used is reported in ``result.chunk_slices``.
    """
    t_start = time.perf_counter()
    timings = {"preprocess": 0.0, "network": 0.0, "postprocess": 0.0}

    shown = [0.0]

    def report(stage: str, fraction: float, message: str) -> None:
        if progress is not None:
            shown[0] = max(shown[0], float(min(1.0, max(0.0, fraction))))  # never backwards (a retried chunk)
            progress(stage, shown[0], message)

    def check_cancel() -> None:
        if should_cancel is not None and should_cancel():
            raise Cancelled("segmentation cancelled")

    # ---- validate everything before any heavy work --------------------------------------
    if not isinstance(image, sitk.Image):
        raise InputError(f"segment_volume needs a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"the input must be a 3D volume, got a {image.GetDimension()}D image of size {image.GetSize()}")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"the input must be a scalar (grey-level) volume, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
        )
    from ..io.volume import check_image

    check_image(image, "the input")  # a regular grid and finite voxel values (an image not read by read_volume)
    if isinstance(organs, str):
        organs = [organs]
    organs = list(organs or [])
    if not organs:
        raise InputError(f"name at least one organ to segment; model {package.name!r} segments: {', '.join(package.organ_names)}")
    if len(organs) > 255:
        raise InputError(f"at most 255 organs fit a uint8 label map, got {len(organs)}")
    organ_ids = package.organ_ids(organs)
    organ_objs = [package.organs[i] for i in organ_ids]
    n_org = len(organ_ids)

    inf = package.inference
    samples = _positive_int(inf.get("samples", 1) if samples is None else samples, "samples")
    steps = _positive_int(inf.get("steps", 1) if steps is None else steps, "steps")
    if scheduler is None:
        scheduler = inf.get("scheduler")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
        raise InputError(f"seed must be a whole number in [0, 2**63), got {seed!r}")
    seed = int(seed)
    if staple and samples < 2:
        raise InputError(f"STAPLE fuses several samples and needs samples >= 2, got samples={samples}")
    roi, overlap, swb, threshold = _inference_settings(package)
    floor = adaptive_floor(package, threshold)  # a bad package fails before any work
    keep_largest = largest_component_organs(package, [o.name for o in organ_objs], largest_component)
    spec = package.preprocessing
    dev = resolve_device(device)
    cpu_auto = inf.get("cpu_precision", "fp32")
    if cpu_auto not in ("fp32", "bf16"):
        raise ModelError(f"model {package.name!r}: inference.cpu_precision must be 'fp32' or 'bf16' (the precision "
                         f"whose accuracy the package was checked in), got {cpu_auto!r}")
    amp_dtype = resolve_precision(precision, dev, cpu_auto)
    if crop_body is None:
        crop_body = inf.get("body_crop", False)
        if not isinstance(crop_body, bool):
            raise ModelError(f"model {package.name!r}: inference.body_crop must be true or false, got {crop_body!r}")

    if method is None:
        method = package.load_method(str(dev))
    channels = int(getattr(method, "image_channels", 1))
    if channels != spec.context_slices:
        raise ModelError(f"model {package.name!r}: its network reads {channels} slice(s) per window but its "
                         f"preprocessing.context_slices is {spec.context_slices}")
    was_training = bool(getattr(method, "training", False))
    # channels-last convolutions: ~1.5x faster on CPU (oneDNN) and what tensor cores want; results
    # differ from the default layout only by float rounding (~1e-7). Undone afterwards.
    method.to(dev, memory_format=torch.channels_last)
    method.eval()
    try:
        with torch.inference_mode():
            result = _run(
                image, package, method, organ_ids, organ_objs, organs, samples=samples, steps=steps, seed=seed,
                dev=dev, scheduler=scheduler, staple=staple, largest_component=keep_largest,
                keep_probabilities=keep_probabilities, adaptive=bool(adaptive), floor=floor, crop_body=bool(crop_body),
                chunk_slices=chunk_slices, roi=roi,
                overlap=overlap,
                swb=swb, threshold=threshold, spec=spec, n_org=n_org, timings=timings, report=report, amp_dtype=amp_dtype,
                check_cancel=check_cancel,
            )
    finally:
        method.to(memory_format=torch.contiguous_format)
        if was_training:
            method.train()
    timings["total"] = time.perf_counter() - t_start
    result.timings = timings
    return result


def _run(image, package, method, organ_ids, organ_objs, organs, **settings) -> SegmentationResult:
    """One Segment run: the stages of :class:`_VolumeRun`, in order."""
    return _VolumeRun(image, package, method, organ_ids, organ_objs, organs, **settings).run()


class _VolumeRun:
    """One automatic segmentation of a volume, stage by stage (like a diffusers pipeline's numbered steps).

    1. :meth:`prepare`: the volume as the model sees it (:class:`PreparedVolume`), the windows
       (optionally cut to the body), the chunk size, one noise stream per organ;
    2. :meth:`allocate`: the canonical-space outputs;
    3. :meth:`stream`: chunks of slices through :meth:`network` (MONAI's sliding windows over
       :meth:`predictor`, which encodes each window once and samples each organ in its own call)
       and :meth:`postprocess_chunk` (back to the canonical in-plane grid, labels, uncertainty,
       the compact per-organ maps);
    4. :meth:`fuse_staple` (with ``staple``) and :meth:`keep_largest_components`;
    5. :meth:`organ_statistics` and :meth:`result` (back on the input's exact grid).
    """

    def __init__(self, image, package, method, organ_ids, organ_objs, organs, *, samples, steps, seed, dev,
                 scheduler, staple, largest_component, keep_probabilities, adaptive, floor, crop_body, chunk_slices, roi,
                 overlap, swb, threshold, spec, n_org, timings, report, check_cancel, amp_dtype):
        self.image, self.package, self.method = image, package, method
        self.organ_ids, self.organ_objs, self.organs = organ_ids, organ_objs, organs
        self.samples, self.steps, self.seed, self.dev, self.scheduler = samples, steps, seed, dev, scheduler
        self.staple, self.largest_component = staple, largest_component
        self.keep_probabilities, self.adaptive, self.floor, self.crop_body = keep_probabilities, adaptive, floor, crop_body
        self.chunk_slices, self.roi, self.overlap, self.swb, self.threshold = chunk_slices, roi, overlap, swb, threshold
        self.spec, self.n_org, self.timings, self.report = spec, n_org, timings, report
        self.check_cancel, self.amp_dtype = check_cancel, amp_dtype
        self.name = getattr(method, "name", type(method).__name__)
        self.extras: dict[str, Any] = {}
        self.extras_oom: list[dict] = []  # chunks retried smaller after running out of GPU memory
        self.state = {"batches": 0}
        # What the run drew: windows in all, windows outside the body (no network call), and per organ
        # the samples drawn and the windows that got every sample (the rest stopped after the first).
        self.drawn = {"windows": 0, "windows_outside_body": 0, "samples": [0] * n_org, "full_windows": [0] * n_org}

    def run(self) -> SegmentationResult:
        self.prepare()
        self.allocate()
        self.stream()
        t0 = time.perf_counter()
        if self.staple:
            self.fuse_staple()
        self.keep_largest_components()
        self.check_cancel()
        stats = self.organ_statistics()
        result = self.result(stats)
        self.timings["postprocess"] += time.perf_counter() - t0
        self.report("postprocess", 1.0, "done")
        return result

    # ---- 1. canonical view, intensity bounds, sizes (PreparedVolume, shared with refine) --------
    def prepare(self) -> None:
        t0 = time.perf_counter()
        self.report("preprocess", 0.0, "preparing the volume")
        self.vol = vol = PreparedVolume.prepare(self.image, self.spec)
        self.n_k, self.n_j, self.n_i = vol.shape_kji
        self.full_hw, self.body = vol.model_hw, None
        model_hw = vol.model_hw
        multiple = int(getattr(self.method, "size_multiple", 0) or 0)
        if self.crop_body and multiple > 0:
            found = body_box(vol.canon, vol.bounds, model_hw, self.roi, multiple)
            if found is not None:
                self.body, self.roi = found
                model_hw = (self.body[0][1] - self.body[0][0], self.body[1][1] - self.body[1][0])  # the network's grid
        self.num_win = windows_per_slice(model_hw, self.roi, self.overlap)
        self.unit = _chunk_unit(self.num_win, self.swb)
        # the whole slice's grid: the input is resampled whole and the box's output pasted back into it
        per_slice = _bytes_per_slice(self.full_hw, vol.canon_hw, self.roi, self.n_org, self.samples, self.staple,
                                     self.spec.context_slices)
        volume_bytes = _volume_bytes(self.n_k * self.n_j * self.n_i, self.n_org, self.samples, staple=self.staple,
                                     keep_probabilities=self.keep_probabilities,
                                     largest_component=any(self.largest_component))
        self.chunk = _choose_chunk(self.n_k, self.unit, per_slice, self.chunk_slices, volume_bytes)
        self.total_batches = -(-(self.n_k * self.num_win) // self.swb)
        # One noise stream per organ (seeded from the run's seed and the organ's index in the model):
        # an organ's samples depend on the seed, the organ and the image only, never on the other prompts.
        self.ids_row = torch.tensor(self.organ_ids, dtype=torch.long, device=self.dev)
        # Temperature calibration of the probabilities the run reports (labels use the raw mean).
        self.temps = temperatures(self.package.inference, [o.name for o in self.organ_objs], self.package.name)
        self.temp_col = torch.tensor(self.temps, dtype=torch.float32, device=self.dev).view(1, -1, 1, 1)
        self.generators = []
        for oid in self.organ_ids:
            g = torch.Generator(device=self.dev)
            g.manual_seed(organ_seed(self.seed, oid))
            self.generators.append(g)
        self.n_out = 2 * self.n_org + (self.n_org * self.samples if self.staple else 0)
        self.timings["preprocess"] += time.perf_counter() - t0

    # ---- 2. canonical-space outputs -------------------------------------------------------------
    def allocate(self) -> None:
        t0 = time.perf_counter()
        n_org, n_k, n_j, n_i = self.n_org, self.n_k, self.n_j, self.n_i
        self.labels_c = np.zeros((n_k, n_j, n_i), dtype=np.uint8)
        self.unc_c = np.zeros((n_k, n_j, n_i), dtype=np.float32)
        # Voxels that largest_component turns into background need "max variance over organs".
        self.maxvar_c = (np.zeros((n_k, n_j, n_i), dtype=np.float32)
                         if (any(self.largest_component) and not self.staple) else None)
        # Per-organ volumes are kept as 8-bit codes (OrganMaps): 2 bytes per organ and voxel for both maps.
        self.mean_q = np.zeros((n_org, n_k, n_j, n_i), dtype=np.uint8) if self.keep_probabilities else None
        self.var_q = (np.zeros((n_org, n_k, n_j, n_i), dtype=np.uint8)
                      if (self.keep_probabilities or self.staple) else None)
        # STAPLE needs every binarised sample of the whole volume (its EM is global). They are kept
        # as bits packed along the column axis: N·O·V/8 bytes instead of N·O·V as uint8 (and 32x
        # less than float32), then unpacked to uint8 for one organ at a time just before fusion.
        packed_i = (n_i + 7) // 8
        # One array per organ, so that each is released as soon as that organ is fused.
        self.bits_c = ([np.zeros((self.samples, n_k, n_j, packed_i), dtype=np.uint8) for _ in range(n_org)]
                       if self.staple else None)
        self.slice_var = np.zeros((n_org, n_k), dtype=np.float32)  # per-organ variance summed over each slice
        # Block-mean of each organ's mean probability on a ~4 mm in-plane grid: the missed-structure signal.
        self.blk = block_size(self.vol.spacing_kji[1:], BLOCK_MM)
        self.coarse_hw = (-(-n_j // self.blk[0]), -(-n_i // self.blk[1]))
        self.coarse_q = np.zeros((n_org, n_k, *self.coarse_hw), dtype=np.uint8)
        self.timings["preprocess"] += time.perf_counter() - t0
        self.report("preprocess", _P_NETWORK0, f"{n_k} slices in chunks of {self.chunk}, {self.num_win} window(s) "
                    f"per slice, {n_org} organ(s) x {self.samples} sample(s)")

    # ---- 3. the network over the windows of a chunk ------------------------------------------
    def draw(self, cond, rows: torch.Tensor, o: int, n: int, h: int, w: int) -> torch.Tensor:
        """``n`` samples of organ ``o`` for the windows ``rows`` of the batch: ``[len(rows), n, h, w]``."""
        ids = self.ids_row[o:o + 1].repeat(int(rows.numel()))
        probs = self.method.sample(self.method.select_condition(cond, rows), ids, n, self.steps, self.generators[o],
                                   self.scheduler)
        if tuple(probs.shape) != (int(rows.numel()), n, h, w):
            raise ModelError(f"method {self.name!r} returned probabilities of shape {tuple(probs.shape)}, "
                             f"expected {(int(rows.numel()), n, h, w)}")
        if not bool(torch.isfinite(probs).all()):
            raise ModelError(f"method {self.name!r} produced non-finite probabilities")
        self.drawn["samples"][o] += int(rows.numel()) * n
        return probs.to(torch.float32)

    def predictor(self, x: torch.Tensor) -> torch.Tensor:
        """Per window: each organ's ensemble mean and variance (+ its samples for STAPLE) as channels.

        The moments are taken per window and blended by MONAI like any channel, so the variance is
        the within-window sample variance everywhere: blending samples first would average
        independent noise across overlapping windows and shrink the variance in the seams.
        Each organ is sampled in its own call with its own generator, so the batch the network
        sees, and therefore every bit of the organ's result on CPU, is the same whatever else is
        prompted.

        Work is skipped where it cannot change the answer (see "Speed" in the module docstring):
        windows with no voxel inside the model's intensity window (outside the body) get
        probability 0 without a network call, and with ``adaptive`` an organ whose first sample
        has no trace of it in a window (peak probability below the package's ``adaptive_floor``) gets no more
        samples there (mean = that sample, variance 0).
        """
        self.check_cancel()
        n_org, samples, staple, drawn = self.n_org, self.samples, self.staple, self.drawn
        b, h, w = int(x.shape[0]), int(x.shape[-2]), int(x.shape[-1])
        out = torch.zeros((b, self.n_out, h, w), dtype=torch.float32, device=x.device)
        body = torch.nonzero(x.flatten(1).amax(dim=1) > EMPTY_WINDOW_LEVEL).flatten()
        drawn["windows"] += b
        drawn["windows_outside_body"] += b - int(body.numel())
        if body.numel():
            cond = self.method.condition(x[body])
            everyone = torch.arange(int(body.numel()), device=body.device)
            for o in range(n_org):
                if self.adaptive and samples > 1:
                    first = self.draw(cond, everyone, o, 1, h, w)  # [b', 1, h, w]
                    rest = torch.nonzero(first.flatten(1).amax(dim=1) >= self.floor).flatten()
                    m, v = first[:, 0].clone(), torch.zeros_like(first[:, 0])  # stopped windows: that sample, no variance
                    full = None
                    if rest.numel():
                        full = torch.cat([first[rest], self.draw(cond, rest, o, samples - 1, h, w)], dim=1)
                        m[rest], v[rest] = ensemble_mean_variance(full, dim=1)
                    if staple:  # STAPLE's N channels: the stopped windows' first sample repeated
                        probs = first.expand(-1, samples, -1, -1).clone()
                        if full is not None:
                            probs[rest] = full
                    drawn["full_windows"][o] += int(rest.numel())
                else:
                    probs = self.draw(cond, everyone, o, samples, h, w)
                    drawn["full_windows"][o] += int(body.numel())
                    m, v = ensemble_mean_variance(probs, dim=1)
                out[body, o] = m
                out[body, n_org + o] = v
                if staple:
                    c0 = 2 * n_org + o * samples
                    out[body, c0:c0 + samples] = probs
        self.state["batches"] += 1
        done = self.state["batches"] / max(1, self.total_batches)
        self.report("network", _P_NETWORK0 + (_P_NETWORK1 - _P_NETWORK0) * done,
                    f"window batch {self.state['batches']}/{self.total_batches}")
        return out

    def network(self, k0: int, k1: int) -> torch.Tensor:
        """The blended per-window outputs ``[k, n_out, h, w]`` of canonical slices ``k0..k1-1`` (model grid)."""
        from monai.inferers import sliding_window_inference

        t0 = time.perf_counter()
        x = self.vol.network_input(k0, k1, self.dev)
        if self.body is not None:
            x = x[..., self.body[0][0]:self.body[0][1], self.body[1][0]:self.body[1][1]]
        self.timings["preprocess"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.autocast(self.dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            out = sliding_window_inference(
                x.contiguous(memory_format=torch.channels_last), roi_size=self.roi, sw_batch_size=self.swb,
                predictor=self.predictor, overlap=self.overlap, mode="gaussian", padding_mode="constant", cval=-1.0,
            )
        del x
        if self.body is not None:  # back onto the whole slice: outside the box as a skipped window (0, 0)
            (j0, j1), (i0, i1) = self.body
            out = torch.nn.functional.pad(out, (i0, self.full_hw[1] - i1, j0, self.full_hw[0] - j1))
        self.timings["network"] += time.perf_counter() - t0
        return out

    def stream(self) -> None:
        """Every chunk of slices through the network and post-processing.

        A chunk that runs the GPU out of memory is retried with half as many slices (whole window
        batches, from the same generator states), so the result is the one a run that fitted would give.
        """
        k0 = 0
        while k0 < self.n_k:
            k1 = min(self.n_k, k0 + self.chunk)
            self.check_cancel()
            rewind = ([g.get_state() for g in self.generators], dict(self.state),
                      {k: (list(v) if isinstance(v, list) else v) for k, v in self.drawn.items()})
            try:
                out = self.network(k0, k1)
            except torch.OutOfMemoryError:
                out = None
                if self.dev.type == "cuda":
                    torch.cuda.empty_cache()
                if self.chunk <= self.unit:
                    raise DeviceError(
                        f"{self.dev} ran out of memory on one batch of {self.swb} windows x {self.n_org} organ(s) x "
                        f"{self.samples} sample(s); use fewer samples, or --device cpu") from None
                self.chunk = max(self.unit, (self.chunk // 2 // self.unit) * self.unit)
                for g, st in zip(self.generators, rewind[0]):
                    g.set_state(st)
                self.state.clear(); self.state.update(rewind[1])
                self.drawn.clear(); self.drawn.update(rewind[2])
                self.extras_oom.append({"at_slice": int(k0), "chunk_slices": int(self.chunk)})
                continue
            self.postprocess_chunk(out, k0, k1)
            del out
            k0 = k1

    def postprocess_chunk(self, out: torch.Tensor, k0: int, k1: int) -> None:
        """A chunk's outputs back on the canonical in-plane grid: labels, uncertainty and the per-organ maps."""
        t0 = time.perf_counter()
        n_org, samples, threshold, canon_hw = self.n_org, self.samples, self.threshold, self.vol.canon_hw
        # Slabs of a few slices: every map here is per slice, and small temporaries are reused from
        # the heap where chunk-sized ones (100+ MB each) would be fresh pages every time.
        slab = max(1, POST_SLAB_BYTES // (4 * max(1, n_org) * self.n_j * self.n_i))
        for s0 in range(0, k1 - k0, slab):
            a0, a1 = k0 + s0, min(k1, k0 + s0 + slab)
            part = out[s0:s0 + (a1 - a0)]
            mean = resample_inplane(part[:, :n_org], canon_hw).clamp_(0.0, 1.0)  # [slab, O, J, I]
            var = resample_inplane(part[:, n_org:2 * n_org], canon_hw).clamp_(min=0.0)
            if self.staple:
                # One organ's samples at a time on the input grid ([slab, N, J, I] float32, not all O·N channels).
                for o in range(n_org):
                    c0 = 2 * n_org + o * samples
                    full = resample_inplane(part[:, c0:c0 + samples], canon_hw)
                    binary = (full >= threshold).permute(1, 0, 2, 3)  # [N, slab, J, I]
                    self.bits_c[o][:, a0:a1] = np.packbits(binary.cpu().numpy(), axis=-1)
                    del full, binary
            self.slice_var[:, a0:a1] = var.sum(dim=(2, 3)).transpose(0, 1).cpu().numpy()
            pooled = torch.nn.functional.avg_pool2d(mean, self.blk, ceil_mode=True)  # partial blocks: mean of their pixels
            self.coarse_q[:, a0:a1] = quantise_probability(pooled).transpose(1, 0, 2, 3)
            if not self.staple:
                best_p, best_o = _best_organ(mean)
                lab = best_o.to(torch.uint8).add_(1).mul_(best_p >= threshold)  # 0 below the threshold (uint8 throughout)
                vmax = var.amax(dim=1)
                unc = torch.where(lab > 0, var.gather(1, best_o.unsqueeze(1)).squeeze(1), vmax)
                self.labels_c[a0:a1] = lab.to(torch.uint8).cpu().numpy()
                self.unc_c[a0:a1] = unc.cpu().numpy()
                if self.maxvar_c is not None:
                    self.maxvar_c[a0:a1] = vmax.cpu().numpy()
            if self.mean_q is not None:
                self.mean_q[:, a0:a1] = quantise_probability(apply_temperature(mean, self.temp_col)).transpose(1, 0, 2, 3)
            if self.var_q is not None:
                self.var_q[:, a0:a1] = quantise_variance(var).transpose(1, 0, 2, 3)
            del mean, var, pooled
        self.timings["postprocess"] += time.perf_counter() - t0

    # ---- 4. labels: STAPLE, largest component -------------------------------------------------
    def fuse_staple(self) -> None:
        """Each organ's N binarised samples fused by STAPLE into its labels; the variance per organ.

        Organs are fused smallest box first and each organ's samples are released once fused, so
        the largest fusion (liver) runs with the fewest other samples still held. Overlaps go to the
        higher fused probability; on a tie the organ named first wins, whatever the fusion order.
        """
        n_org, bits_c, labels_c = self.n_org, self.bits_c, self.labels_c
        boxes = [_staple_box(bits_c[o], self.n_i) for o in range(n_org)]
        order = sorted(range(n_org), key=lambda o: 0 if boxes[o] is None else math.prod(b - a for a, b in boxes[o]))
        # The best fused probability so far, kept over the union of the boxes only.
        present = [b for b in boxes if b is not None]
        union = tuple((min(b[d][0] for b in present), max(b[d][1] for b in present)) for d in range(3)) if present else None
        best = np.zeros(tuple(b - a for a, b in union), dtype=np.float32) if present else None
        staple_info: list[dict] = [{} for _ in range(n_org)]
        for step, o in enumerate(order):
            self.check_cancel()
            self.report("postprocess", _P_NETWORK1 + 0.03 * step / n_org, f"STAPLE fusion of {self.organs[o]}")
            t_s = time.perf_counter()
            sbox = boxes[o]
            info = {"organ": self.organs[o], "iterations": 0, "max_iterations": STAPLE_MAX_ITERATIONS, "voxels": 0}
            if sbox is not None:
                (k_lo, k_hi), (j_lo, j_hi), (i_lo, i_hi) = sbox
                b_lo, b_hi = i_lo // 8, -(-i_hi // 8)  # whole bytes of packed columns
                packed = bits_c[o][:, k_lo:k_hi, j_lo:j_hi, b_lo:b_hi]
                # One sample unpacked at a time (STAPLE keeps its own copy of each): [k, j, i] uint8, the box only.
                unpacked = (np.unpackbits(packed[s_], axis=-1)[..., i_lo - 8 * b_lo:i_hi - 8 * b_lo]
                            for s_ in range(self.samples))
                fused = staple_fuse(unpacked, max_iterations=STAPLE_MAX_ITERATIONS, return_details=True)
                del packed, unpacked
                prob = fused.probability
                region = (slice(k_lo, k_hi), slice(j_lo, j_hi), slice(i_lo, i_hi))
                best_r = best[tuple(slice(a - u[0], b - u[0]) for (a, b), u in zip(sbox, union))]
                cur = labels_c[region]
                take = (prob >= self.threshold) & ((prob > best_r) | ((prob == best_r) & (cur > o + 1)))
                cur[take] = o + 1
                best_r[take] = prob[take]
                info.update(iterations=fused.iterations, voxels=int(prob.size))
                del prob, take, fused, cur, best_r
            bits_c[o] = None  # this organ's samples are no longer needed
            info["seconds"] = time.perf_counter() - t_s
            staple_info[o] = info
        self.bits_c = None
        del best
        self.extras["staple"] = staple_info
        vmax_q = self.var_q.max(axis=0)  # codes are monotonic in the variance
        np.take(dequantise_variance(np.arange(256, dtype=np.uint8)), vmax_q, out=self.unc_c)  # no float32 temporary
        for o in range(n_org):
            sel = labels_c == o + 1
            self.unc_c[sel] = dequantise_variance(self.var_q[o][sel])
        self.maxvar_c = dequantise_variance(vmax_q) if any(self.largest_component) else None

    def keep_largest_components(self) -> None:
        """For the organs chosen, only the largest 3D connected component stays (the rest: background)."""
        for o in range(self.n_org):
            if not self.largest_component[o]:
                continue
            self.check_cancel()
            self.report("postprocess", 0.98, f"largest connected component of {self.organs[o]}")
            mask = self.labels_c == o + 1
            if not mask.any():
                continue
            removed = mask & ~keep_largest_component(mask)
            self.labels_c[removed] = 0
            self.unc_c[removed] = self.maxvar_c[removed]

    # ---- 5. statistics and the input's exact grid ----------------------------------------------
    def slice_centre(self, k: int) -> tuple[int, int, tuple[float, float, float]]:
        """(input array axis, input slice index, LPS centre in mm) of canonical slice ``k``."""
        view = self.vol.view
        axis, index = view.input_index_of_canonical_slice(k)
        z0, y0, x0 = view.input_index_of_canonical((k, 0, 0))
        z1, y1, x1 = view.input_index_of_canonical((k, self.n_j - 1, self.n_i - 1))
        centre = ((x0 + x1) / 2.0, (y0 + y1) / 2.0, (z0 + z1) / 2.0)
        return int(axis), int(index), tuple(float(v) for v in self.image.TransformContinuousIndexToPhysicalPoint(centre))

    def organ_statistics(self) -> list[OrganStats]:
        labels_c, unc_c, n_org, blk, coarse_hw = self.labels_c, self.unc_c, self.n_org, self.blk, self.coarse_hw
        sk, sj, si = self.vol.spacing_kji
        view = self.vol.view
        spacing = self.image.GetSpacing()
        voxel_ml = float(spacing[0]) * float(spacing[1]) * float(spacing[2]) / 1000.0
        per_slice = np.stack([np.bincount(labels_c[k].reshape(-1), minlength=n_org + 1) for k in range(self.n_k)])
        counts = per_slice.sum(axis=0)  # (one bincount of the whole volume would make an int64 copy of it)
        toward = _SIDE[view.orientation[2]]  # where the canonical slice index increases (e.g. "superior" for LPS)
        away = _SIDE[_OPPOSITE[view.orientation[2]]]
        stats: list[OrganStats] = []
        for o in range(n_org):
            label = o + 1
            count = int(counts[label])
            mean_unc = None
            if count:
                mean_unc = float(unc_c[labels_c == label].mean(dtype=np.float32))
            axis, index, position = view.input_index_of_canonical_slice(0)[0], None, None
            if self.slice_var[o].max() > 0:  # no slice stands out when the samples agree everywhere
                axis, index, position = self.slice_centre(int(np.argmax(self.slice_var[o])))
            runs = find_continuations(
                dequantise_probability(self.coarse_q[o]), per_slice[:, label],
                lambda k, lab=label: coarse_mask(labels_c[k] == lab, blk, coarse_hw),
                block_mm=(blk[0] * sj, blk[1] * si), slice_mm=sk,
            )
            continuation = []
            for run in runs:
                _, peak_index, peak_pos = self.slice_centre(run.peak_slice)
                continuation.append({
                    "kind": "beyond_mask" if run.kind in ("before", "after") else run.kind,
                    "side": toward if run.kind == "after" else away if run.kind == "before" else None,
                    "slices": [self.slice_centre(k)[1] for k in run.slices],
                    "extent_mm": float(len(run.slices) * sk),
                    "area_mm2": [round(a, 1) for a in run.area_mm2],
                    "peak_slice": peak_index, "peak_position_mm": list(peak_pos),
                })
            org = self.organ_objs[o]
            stats.append(OrganStats(
                name=org.name, display_name=org.display_name, label=label, voxel_count=count,
                volume_ml=count * voxel_ml, mean_uncertainty=mean_unc,
                max_uncertainty_slice=None if index is None else int(index),
                max_uncertainty_position=position, slice_axis=int(axis),  # type: ignore[arg-type]
                possible_continuation=continuation,
            ))
        self.coarse_q = None
        return stats

    def result(self, stats: list[OrganStats]) -> SegmentationResult:
        """Everything back on the input's exact grid (the per-organ maps decoded when read)."""
        to_image = self.vol.to_image
        labels_img = to_image(self.labels_c)
        unc_img = to_image(self.unc_c)
        self.labels_c = self.unc_c = None
        probabilities = variances = entropy = None
        if self.keep_probabilities:
            names = [o.name for o in self.organ_objs]
            probabilities = OrganMaps(names, self.mean_q, dequantise_probability, to_image)
            variances = OrganMaps(names, self.var_q, dequantise_variance, to_image)
            entropy = OrganMaps(names, self.mean_q, lambda q: binary_entropy(dequantise_probability(q)), to_image)
        body = self.body
        return SegmentationResult(
            labels=labels_img, uncertainty=unc_img, organs=self.organ_objs, stats=stats, timings=self.timings,
            samples=self.samples, steps=self.steps, scheduler=self.scheduler, seed=self.seed, device=str(self.dev),
            threshold=self.threshold, staple=bool(self.staple), largest_component=any(self.largest_component),
            chunk_slices=self.chunk, probabilities=probabilities, variances=variances, entropy=entropy,
            extras={"calibration": {o.name: t for o, t in zip(self.organ_objs, self.temps) if t != 1.0} or None,
                    "windows_per_slice": self.num_win, "model_inplane_size": list(self.full_hw),
                    "intensity_bounds": list(self.vol.bounds),
                    "sampling": {**_sampling_report(self.drawn, self.organs, self.samples, self.adaptive),
                                 "window_hw": [int(r) for r in self.roi],
                                 "body_box": None if body is None else [[int(a), int(b)] for a, b in body]},
                    "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype],
                    "out_of_memory_retries": self.extras_oom,
                    "largest_component_organs": [o for o, keep in zip(self.organs, self.largest_component) if keep],
                    **self.extras},
        )


@dataclass
class PreparedVolume:
    """Stage 1 of Segment and Refine: an image as the model sees it, before any network runs.

    ``canon`` is the input array in the model's canonical orientation (a view: transposed and
    flipped, never interpolated); ``bounds`` the intensity clip bounds of the whole volume;
    ``model_hw`` the in-plane size of a slice at the model's spacing. :meth:`network_input` is
    stage 2 (slices normalised and resampled to the model grid, with their context slices as
    channels) and :meth:`to_image` the last stage (a canonical array back on the input's exact
    grid). The volume engine (:func:`segment_volume`) and the interactive session
    (:class:`~MedDiffSegLib.interactive.session.InteractiveSession`) both run these stages.
    """

    image: sitk.Image
    view: Any  # CanonicalView
    canon: np.ndarray
    spec: Any  # PreprocessSpec
    bounds: tuple[float, float]
    canon_hw: tuple[int, int]
    model_hw: tuple[int, int]
    spacing_kji: tuple[float, float, float]

    @classmethod
    def prepare(cls, image: sitk.Image, spec, source: np.ndarray | None = None) -> "PreparedVolume":
        """The prepared ``image``; ``source`` is its array (default: a view into the image, no copy;
        a caller that keeps the result beyond the image's life passes an owned copy)."""
        from ..io.geometry import CanonicalView

        view = CanonicalView.from_image(image, spec.orientation)
        canon = view.to_canonical(sitk.GetArrayViewFromImage(image) if source is None else source)
        sk, sj, si = view.spacing_kji
        canon_hw = (int(canon.shape[1]), int(canon.shape[2]))
        return cls(image=image, view=view, canon=canon, spec=spec, bounds=intensity_bounds(canon, spec),
                   canon_hw=canon_hw, model_hw=inplane_size(canon_hw, (sj, si), spec.spacing),
                   spacing_kji=(float(sk), float(sj), float(si)))

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.canon.shape)  # type: ignore[return-value]

    def network_input(self, k0: int, k1: int, dev: torch.device) -> torch.Tensor:
        """Stage 2: canonical slices ``k0..k1-1`` as the network's input ``[k, C, h, w]`` on ``dev``."""
        return _chunk_input(self.canon, k0, k1, self.spec, self.spacing_kji[0], self.bounds, self.model_hw, dev)

    def to_image(self, array_kji: np.ndarray, decode: Callable[[np.ndarray], np.ndarray] | None = None) -> sitk.Image:
        """Last stage: a canonical array back on the input's exact grid (``decode`` maps stored codes first)."""
        array = self.view.from_canonical(array_kji)  # a view
        if decode is not None:
            array = decode(array)  # a new C-ordered array: no second copy below
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.CopyInformation(self.image)
        return img


def _chunk_input(canon: np.ndarray, k0: int, k1: int, spec, slice_mm: float, bounds: tuple[float, float],
                 model_hw: tuple[int, int], dev: torch.device) -> torch.Tensor:
    """The network input of canonical slices ``k0..k1-1``: ``[k, C, h, w]`` float32 on ``dev``, each
    slice normalised and resampled to the model grid, with its ``C`` context slices as channels.

    Every slice the chunk needs (its own and its neighbours', a contiguous range) is normalised and
    resampled **once** and the context channels are then gathered from the resampled slices: with
    3 context slices that is a third of the work of resampling ``[k, 3, J, I]`` (per-plane
    arithmetic, so the result is bit-identical), and the normalisation works in place.
    """
    n_k = canon.shape[0]
    if spec.context_slices == 1:
        lo, hi, ks = k0, k1, None
    else:
        ks = context_indices(n_k, k0, k1, spec.context_slices, spec.context_offset(slice_mm))  # [k, C]
        lo, hi = int(ks.min()), int(ks.max()) + 1
    planes = torch.from_numpy(np.array(canon[lo:hi], dtype=np.float32)).unsqueeze(1)  # [n, 1, J, I], a copy
    planes = normalise_intensity(planes, bounds, inplace=True)
    if dev.type == "cuda":  # pinned memory: the copy to the GPU is a DMA transfer, not a staged one
        planes = planes.pin_memory().to(dev, non_blocking=True)
    planes = resample_inplane(planes, model_hw)
    if ks is None:
        return planes
    return planes[torch.from_numpy(ks - lo).to(planes.device), 0]  # [k, C, h, w]


def body_box(canon: np.ndarray, bounds: tuple[float, float], model_hw: tuple[int, int], roi: tuple[int, int],
             multiple: int, margin: int = BODY_MARGIN_PX) -> tuple[tuple[tuple[int, int], tuple[int, int]], tuple[int, int]] | None:
    """The in-plane box of the body on the model grid and the window size for it, or None to keep
    the whole slice and ``roi`` (nothing inside the intensity window, or no smaller window).

    The body is every pixel of the volume's maximum projection along the slices that is inside the
    intensity window after normalisation and resampling (as the network input is made, so the
    bilinear weights make it hold every pixel any slice has inside), grown by ``margin`` pixels.
    Per axis the window is that extent rounded up to ``multiple``, at most ``roi``; the box is
    then widened to at least the window (within the slice), so MONAI pads only a slice that is
    itself smaller than the window.
    """
    proj = torch.from_numpy(np.ascontiguousarray(canon.max(axis=0), dtype=np.float32))[None, None]
    proj = resample_inplane(normalise_intensity(proj, bounds, inplace=True), model_hw)[0, 0]
    inside = proj > EMPTY_WINDOW_LEVEL
    if not bool(inside.any()):
        return None
    box, window = [], []
    for axis, (n, r) in enumerate(zip(model_hw, roi)):
        hits = torch.nonzero(inside.any(dim=1 - axis)).flatten()
        lo, hi = max(0, int(hits[0]) - margin), min(n, int(hits[-1]) + 1 + margin)
        w = min(int(r), -(-(hi - lo) // multiple) * multiple)
        if hi - lo < w:  # widen to the window, centred, within the slice
            lo = max(0, min(lo - (w - (hi - lo)) // 2, n - w))
            hi = min(n, lo + w)
        box.append((lo, hi))
        window.append(w)
    if tuple(window) == tuple(int(r) for r in roi) and all(b == (0, n) for b, n in zip(box, model_hw)):
        return None
    return (box[0], box[1]), (window[0], window[1])


def _sampling_report(drawn: dict, organs: list[str], samples: int, adaptive: bool) -> dict[str, Any]:
    """What the network was asked for: windows, those skipped as outside the body, and per organ the
    samples drawn (``samples_per_window``: their mean over the body's windows, N when every window got all)."""
    inside = drawn["windows"] - drawn["windows_outside_body"]
    return {
        "adaptive": bool(adaptive and samples > 1), "samples_requested": int(samples),
        "windows": int(drawn["windows"]), "windows_outside_body": int(drawn["windows_outside_body"]),
        "organs": {
            name: {"samples_drawn": int(n), "windows_with_all_samples": int(full),
                   "samples_per_window": round(n / inside, 3) if inside else 0.0}
            for name, n, full in zip(organs, drawn["samples"], drawn["full_windows"])
        },
    }


#: Voxels added on each side of the box STAPLE runs in (see :func:`_staple_box`).
STAPLE_MARGIN = 4


def _staple_box(packed: np.ndarray, n_i: int) -> tuple[tuple[int, int], ...] | None:
    """Index box ``((k0, k1), (j0, j1), (i0, i1))`` around every voxel that any sample labels, plus
    :data:`STAPLE_MARGIN` voxels; None when no sample labels anything.

    STAPLE runs inside this box only. Outside it every sample says background, the fused
    probability would be near 0 (below any threshold) and nothing is labelled, so the box saves
    the memory and time of the whole volume (a 512×512×300 CT with 10 samples: 0.8 GB of samples
    and a float64 volume per organ). The EM's specificity is estimated over the box's background
    instead of the whole volume's; that is the one difference from fusing the whole volume.
    """
    any_sample = np.bitwise_or.reduce(packed, axis=0)  # [K, J, packed I]
    if not any_sample.any():
        return None
    k = np.flatnonzero(any_sample.any(axis=(1, 2)))
    j = np.flatnonzero(any_sample.any(axis=(0, 2)))
    cols = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(any_sample.reshape(-1, any_sample.shape[-1]), axis=0),
                                        count=n_i))
    m = STAPLE_MARGIN
    shape = (packed.shape[1], packed.shape[2], n_i)
    return tuple((max(0, int(a[0]) - m), min(n, int(a[-1]) + m + 1)) for a, n in zip((k, j, cols), shape))


_SIDE = {"S": "superior", "I": "inferior", "L": "left", "R": "right", "A": "anterior", "P": "posterior"}
_OPPOSITE = {"S": "I", "I": "S", "L": "R", "R": "L", "A": "P", "P": "A"}


def _best_organ(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest mean probability over organs (dim 1) and its index; ties go to the lowest index.

    ``max(dim=1)`` (torch documents: the index of the first maximal value) rather than ``argmax`` +
    ``gather``: the same values and indices, but ~14x faster on CPU for [slab, O, J, I] (argmax
    over the strided organ axis is not vectorised: 8.8 s of an 8-organ run's 12 s post-processing).
    """
    best, idx = mean.max(dim=1)
    return best, idx
