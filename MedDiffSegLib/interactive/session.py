"""An interactive session: the image, the model and the encoded windows kept in memory between clicks.

A radiologist corrects a result with clicks (positive: "this is the organ", negative: "this is
not") and an optional box, one organ at a time. Each correction re-samples only the slices it
reaches, with the model's prompt channels (:mod:`MedDiffSegLib.interactive.prompts`), and
updates the label map and the uncertainty map there. Starting Python, torch and MONAI for every
click would cost more than the click itself, so :class:`InteractiveSession` keeps everything a
click needs: the canonical view of the image, its intensity bounds, each slice's network input
and image encoding (computed on first use, then reused by every later click), the model, and the
current result.

The stages of one correction, in the order :meth:`InteractiveSession.refine` runs them:

1. **Locate** (:meth:`~InteractiveSession.locate`): the clicks and box, world coordinates in mm
   (LPS, as SimpleITK reports them), become canonical voxel positions; a point outside the image is
   an error before anything changes.
2. **Slab**: the slices the correction can reach: the slices of the box, and every slice within the
   model's click radius (``inference.click_radius_mm``) of a click of this organ.
3. **Sample, outwards from the clicks**: the core (the slices of the new clicks and box) first, then
   batches of :data:`SLAB_BATCH` slices outwards in each direction. Per slice: its input and image
   encoding (cached, :meth:`~InteractiveSession.encode`; :meth:`~InteractiveSession.encode_all`
   encodes the whole volume ahead of the first click), and its prompt maps
   (:meth:`~InteractiveSession.prompts_for`): every click of this organ so far as a 3D distance map
   (weaker on slices farther from it, nothing beyond the click radius), the box on the slices it
   spans, and the current mask as the previous-mask channel. A direction stops where no click or
   box reaches, where the organ ends (absent before and after), or where the change dies out
   (fewer than :data:`MIN_CHANGE_PIXELS` voxels changed).
4. **Write back** into the label map with two rules: a correction of one organ never changes another
   organ's voxels (it takes only background and gives back only background), and a locked organ
   never changes (refining it is refused). The uncertainty map takes the organ's new variance on the
   voxels the organ holds or gave up; the organ's calibrated mean probability, where the session
   keeps one, is replaced on the re-sampled slices.

Every correction is recorded (:attr:`InteractiveSession.interactions`): clicks accumulate, and a
session resumed from a refined result starts with its clicks. The corrections made in this session
can be undone and redone (:meth:`~InteractiveSession.undo`, :meth:`~InteractiveSession.redo`): each
keeps the voxels it changed, before and after, so both restore the maps exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import Cancelled, InputError, ModelError
from ..preprocessing.spec import resample_inplane
from ..uncertainty.calibration import apply_temperature, temperatures
from ..uncertainty.ensemble import dequantise_probability, quantise_probability
from .prompts import BOX, NEGATIVE, POSITIVE, PREVIOUS, PROMPT_CHANNELS, Click, box_map, click_map, deepest_point

#: A slice beyond the slab's core whose mask changed by fewer voxels than this ends the propagation.
MIN_CHANGE_PIXELS = 4
#: Slices re-sampled together when a correction spreads outwards from its core.
SLAB_BATCH = 6
#: Corrections that :meth:`InteractiveSession.undo` can take back (the oldest are forgotten first).
UNDO_LIMIT = 100

Point = tuple[float, float, float]


@dataclass
class Interaction:
    """One correction: an organ, its clicks (LPS mm) and box, and what it changed."""

    organ: str
    positive: list[Point] = field(default_factory=list)
    negative: list[Point] = field(default_factory=list)
    box: tuple[float, float, float, float, float, float] | None = None
    slices: list[int] = field(default_factory=list)  # input slice indices re-sampled
    slice_axis: int = 0  # numpy axis of the input array those indices count along
    changed_voxels: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"organ": self.organ,
                "clicks": ([{"point_mm": [float(v) for v in p], "positive": True} for p in self.positive]
                           + [{"point_mm": [float(v) for v in p], "positive": False} for p in self.negative]),
                "box_mm": None if self.box is None else [float(v) for v in self.box],
                "slices": [int(k) for k in self.slices], "slice_axis": int(self.slice_axis),
                "changed_voxels": int(self.changed_voxels), "seconds": round(float(self.seconds), 4)}

    @classmethod
    def from_dict(cls, d: dict) -> "Interaction":
        try:
            clicks = d.get("clicks", [])
            return cls(organ=str(d["organ"]),
                       positive=[tuple(float(v) for v in c["point_mm"]) for c in clicks if c["positive"]],
                       negative=[tuple(float(v) for v in c["point_mm"]) for c in clicks if not c["positive"]],
                       box=None if d.get("box_mm") is None else tuple(float(v) for v in d["box_mm"]),
                       slices=[int(k) for k in d.get("slices", [])], slice_axis=int(d.get("slice_axis", 0)),
                       changed_voxels=int(d.get("changed_voxels", 0)), seconds=float(d.get("seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"a recorded interaction cannot be read ({type(exc).__name__}: {exc}): {d!r}") from None


@dataclass
class Suggestion:
    """A place to click next (see :meth:`InteractiveSession.suggest`)."""

    organ: str
    point_mm: Point  # LPS
    positive: bool  # the model's guess: a positive click (organ probably missing there) or a negative one
    confidence: float  # the chance that the current label at the point is wrong
    expected_wrong_ml: float  # the expected volume of wrong voxels within the suggestion's reach
    region_ml: float  # the volume of the uncertain voxels within its reach
    slice_index: int  # along the input's slice axis

    def to_dict(self) -> dict[str, Any]:
        return {"organ": self.organ, "point_mm": [round(v, 2) for v in self.point_mm], "positive": self.positive,
                "confidence": round(self.confidence, 4), "expected_wrong_ml": round(self.expected_wrong_ml, 3),
                "region_ml": round(self.region_ml, 3), "slice": self.slice_index}


@dataclass
class _Change:
    """The voxels one correction changed on one canonical slice of one of the session's maps (labels,
    uncertainty, an organ's probability): the map, flat indices into the slice, values before and after."""

    volume: np.ndarray
    k: int
    index: np.ndarray
    values: tuple[np.ndarray, np.ndarray]  # (before, after)

    @classmethod
    def between(cls, volume: np.ndarray, k: int, new: np.ndarray) -> "_Change":
        """The change from ``volume[k]`` to ``new``: only the voxels that differ are kept."""
        differ = (volume[k] != new).reshape(-1)
        index = np.flatnonzero(differ).astype(np.int32 if differ.size < 2**31 else np.int64)
        return cls(volume, k, index, (volume[k].reshape(-1)[index], new.reshape(-1)[index]))

    def apply(self, which: int) -> None:
        self.volume[self.k].reshape(-1)[self.index] = self.values[which]


@dataclass
class _Located:
    """Clicks and box in canonical continuous voxel coordinates ``(k, j, i)``."""

    clicks: list[tuple[tuple[float, float, float], bool]]
    box: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] | None  # (k, j, i) ranges


class InteractiveSession:
    """Refine a segmentation with clicks; see the module docstring.

    ``labels``: the current label map (uint8, label ``i`` = ``organs[i-1]``) on ``image``'s grid;
    ``uncertainty``: its uncertainty map (float32) or None. ``organs``: the organ names in label order.
    ``probabilities``: organ -> its calibrated mean probability (as ``segment --save-probabilities``
    writes it), for the organs that have one: each correction of the organ updates it, so that a
    refined result's probability maps agree with its labels (:meth:`probability`).
    ``samples`` per correction (the variance needs 2 or more), ``seed`` for the noise.
    """

    def __init__(self, image: sitk.Image, package, organs: Sequence[str], labels: sitk.Image,
                 uncertainty: sitk.Image | None = None, *, method=None, device: str = "cpu", samples: int = 1,
                 steps: int | None = None, seed: int = 0, precision: str | None = "auto",
                 locked: Sequence[str] = (), interactions: Sequence[Interaction] = (),
                 probabilities: Mapping[str, sitk.Image] | None = None):
        from ..inference.device import resolve_device, resolve_precision
        from ..inference.engine import PreparedVolume, _inference_settings

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError("the image must be a scalar 3D volume")
        def check_grid(what: str, img: sitk.Image | None) -> None:
            if img is not None and (img.GetSize() != image.GetSize()
                                    or not np.allclose(img.GetSpacing(), image.GetSpacing(), atol=1e-4)
                                    or not np.allclose(img.GetOrigin(), image.GetOrigin(), atol=1e-3)
                                    or not np.allclose(img.GetDirection(), image.GetDirection(), atol=1e-5)):
                raise InputError(f"the {what} is not on the image's voxel grid (size {img.GetSize()} vs "
                                 f"{image.GetSize()}): it was not made from this image")

        check_grid("label map", labels)
        check_grid("uncertainty map", uncertainty)
        self.package = package
        self.organs = [str(o) for o in organs]
        self._ids = package.organ_ids(self.organs)  # unknown organs are an error here
        self.samples = int(samples)
        if self.samples < 1:
            raise InputError(f"samples must be >= 1, got {samples}")
        self.steps = int(steps or package.inference.get("steps", 1))
        self.seed = int(seed)
        self.locked = {self.canonical_name(o) for o in locked}
        self.interactions = list(interactions)
        self._undo: list[tuple[Interaction, list[_Change]]] = []  # this session's corrections, oldest first
        self._redo: list[tuple[Interaction, list[_Change]]] = []
        self.radius_mm = float(package.inference.get("click_radius_mm", 0.0))
        self.roi, self.overlap, _, self.threshold = _inference_settings(package)
        self.spec = package.preprocessing
        self.device = resolve_device(device)
        self.amp_dtype = resolve_precision(precision, self.device, package.inference.get("cpu_precision", "fp32"))
        # stage 0: the model, once
        self.method = method if method is not None else package.load_method(str(self.device))
        if int(getattr(self.method, "prompt_channels", 0)) != PROMPT_CHANNELS or self.radius_mm <= 0:
            raise ModelError(f"model {package.name!r} was not trained for interactive correction (no prompt "
                             "channels or no inference.click_radius_mm); use a model that was, e.g. abdomen-ct 2.0")
        self.method.to(self.device, memory_format=torch.channels_last).eval()
        # stage 1, as Segment runs it: the canonical view of the image and everything derived from it
        # (from an owned copy of the voxels: the session outlives the caller's views of the image)
        self.volume = PreparedVolume.prepare(image, self.spec, source=sitk.GetArrayFromImage(image))
        self.image, self.view, self.canon, self.bounds = image, self.volume.view, self.volume.canon, self.volume.bounds
        self.spacing_kji = self.volume.spacing_kji
        self.canon_hw, self.model_hw = self.volume.canon_hw, self.volume.model_hw
        self.model_spacing = (self.spacing_kji[1] * self.canon_hw[0] / self.model_hw[0],
                              self.spacing_kji[2] * self.canon_hw[1] / self.model_hw[1])
        self.labels_c = np.array(self.view.to_canonical(sitk.GetArrayViewFromImage(labels)), dtype=np.uint8)
        if int(self.labels_c.max(initial=0)) > len(self.organs):
            raise InputError(f"the label map has label {int(self.labels_c.max())} but only {len(self.organs)} organs "
                             "are named")
        self.unc_c = (np.array(self.view.to_canonical(sitk.GetArrayViewFromImage(uncertainty)), dtype=np.float32)
                      if uncertainty is not None else np.zeros(self.labels_c.shape, dtype=np.float32))
        # The organs' calibrated mean probabilities, where the caller has them (label -> 8-bit codes, canonical),
        # each kept up to date by the organ's corrections.
        # One organ's float32 map at a time: a lazy mapping (as load_session passes) reads each when it is reached.
        self.temperatures = temperatures(package.inference, self.organs, package.name)
        self.prob_c: dict[int, np.ndarray] = {}
        for o, m in (probabilities or {}).items():
            label = self.organs.index(self.canonical_name(o)) + 1
            check_grid(f"probability map of {o}", m)
            self.prob_c[label] = quantise_probability(self.view.to_canonical(sitk.GetArrayViewFromImage(m)))
        self._inputs: dict[int, torch.Tensor] = {}  # canonical slice -> network input [1, C, h, w]
        self._encoded: dict[int, torch.Tensor] = {}  # canonical slice -> image encoding (one-window slices)
        self._window_codes: dict[tuple[int, int], torch.Tensor] = {}  # (slice, MONAI batch) -> encodings

    # -- names and geometry --------------------------------------------------------------------
    def canonical_name(self, organ: str) -> str:
        """The organ's name as the session's organs spell it (display names and case are accepted)."""
        ids = self.package.organ_ids([organ])
        if len(ids) != 1:  # 'all'
            raise InputError(f"a correction is for one organ; this result has: {', '.join(self.organs)}")
        name = self.package.organs[ids[0]].name
        if name not in self.organs:
            raise InputError(f"organ {organ!r} is not in this result; it has: {', '.join(self.organs)}")
        return name

    def locate(self, positive: Sequence[Point] = (), negative: Sequence[Point] = (),
               box: Sequence[float] | None = None) -> _Located:
        """Stage 1: world points (LPS mm) to canonical voxel coordinates; outside the image is an error."""
        shape = self.canon.shape

        def canon(p: Sequence[float], what: str) -> tuple[float, float, float]:
            if len(p) != 3 or not all(math.isfinite(float(v)) for v in p):
                raise InputError(f"{what} must be three finite numbers X,Y,Z in mm, got {list(p)}")
            x, y, z = self.image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in p))
            kji = self.view.canonical_of_input_index((z, y, x))
            if not all(-0.5 <= c <= n - 0.5 for c, n in zip(kji, shape)):
                lo = self.image.TransformIndexToPhysicalPoint((0, 0, 0))
                hi = self.image.TransformIndexToPhysicalPoint(tuple(int(s) - 1 for s in self.image.GetSize()))
                raise InputError(f"{what} ({', '.join(f'{float(v):.1f}' for v in p)}) mm lies outside the image "
                                 f"(its voxel centres span {tuple(round(v, 1) for v in lo)} to "
                                 f"{tuple(round(v, 1) for v in hi)} mm, LPS)")
            return kji

        clicks = [(canon(p, "a click"), True) for p in positive] + [(canon(p, "a negative click"), False) for p in negative]
        located_box = None
        if box is not None:
            if len(box) != 6:
                raise InputError(f"a box is 6 numbers X0,Y0,Z0,X1,Y1,Z1 in mm, got {list(box)}")
            a, b = canon(box[:3], "the box's first corner"), canon(box[3:], "the box's second corner")
            located_box = tuple((min(u, v), max(u, v)) for u, v in zip(a, b))  # type: ignore[assignment]
        return _Located(clicks, located_box)  # type: ignore[arg-type]

    def _to_model(self, j: float, i: float) -> tuple[float, float]:
        """Canonical in-plane (j, i) to model-grid (row, col) (pixel areas onto pixel areas)."""
        return ((j + 0.5) * self.model_hw[0] / self.canon_hw[0] - 0.5,
                (i + 0.5) * self.model_hw[1] / self.canon_hw[1] - 0.5)

    # -- stages of one slice -------------------------------------------------------------------
    def encoded_slice(self, k: int) -> torch.Tensor:
        """The network input of canonical slice ``k`` (``[1, C, h, w]``, normalised, at the model grid), cached."""
        x = self._inputs.get(k)
        if x is None:
            x = self._inputs[k] = self.volume.network_input(k, k + 1, self.device)
        return x

    def prompts_for(self, k: int, label: int, located: _Located) -> torch.Tensor:
        """The four prompt maps of canonical slice ``k`` for the organ with ``label`` (``[4, h, w]``)."""
        h, w = self.model_hw
        sk = self.spacing_kji[0]
        out = torch.zeros((PROMPT_CHANNELS, h, w), dtype=torch.float32)
        clicks = []
        for (ck, cj, ci), positive in located.clicks:
            row, col = self._to_model(cj, ci)
            clicks.append(Click(row, col, positive, abs(k - ck) * sk))
        for channel, sign in ((POSITIVE, True), (NEGATIVE, False)):
            click_map((h, w), self.model_spacing, clicks, self.radius_mm, sign, out[channel])
        if located.box is not None:
            (k0, k1), (j0, j1), (i0, i1) = located.box
            if k0 - 0.5 <= k <= k1 + 0.5:  # a box speaks for the slices it spans only
                r0, c0 = self._to_model(j0, i0)
                r1, c1 = self._to_model(j1, i1)
                box_map((h, w), (int(math.floor(r0)), int(math.floor(c0)), int(math.ceil(r1)) + 1,
                                 int(math.ceil(c1)) + 1), out[BOX])
        mask = torch.from_numpy(self.labels_c[k] == label).float()[None, None]
        out[PREVIOUS] = (resample_inplane(mask, self.model_hw)[0, 0] >= 0.5).float() * 2.0 - 1.0
        return out

    def encode(self, ks: Sequence[int]) -> None:
        """Image encodings of the canonical slices ``ks`` that are not cached yet (one batch).

        Only for slices that fit one window (the model grid no larger than the window, as for every
        abdominal CT at 2 mm); :meth:`encode_all` calls it for the whole volume, e.g. while the user
        reviews the automatic result, so that no click pays for it.
        """
        todo = [k for k in ks if k not in self._encoded]
        if not todo or not self._one_window:
            return
        x = torch.cat([self._padded_input(k) for k in todo])
        with torch.inference_mode(), self._autocast():
            cond = self.method.condition(x.contiguous(memory_format=torch.channels_last))
        for k, c in zip(todo, cond):
            self._encoded[k] = c[None]

    def encode_all(self, batch: int = 16, should_cancel: Callable[[], bool] | None = None) -> None:
        """Encode every slice now (see :meth:`encode`)."""
        for k0 in range(0, self.canon.shape[0], batch):
            if should_cancel is not None and should_cancel():
                raise Cancelled("encoding cancelled")
            self.encode(range(k0, min(self.canon.shape[0], k0 + batch)))

    @property
    def _one_window(self) -> bool:
        return self.model_hw[0] <= self.roi[0] and self.model_hw[1] <= self.roi[1]

    def _padded_input(self, k: int) -> torch.Tensor:
        """Slice ``k``'s input padded to the window with air (``[1, C, rh, rw]``), as MONAI pads it."""
        x = self.encoded_slice(k)
        h, w = self.model_hw
        rh, rw = max(h, self.roi[0]), max(w, self.roi[1])
        if (rh, rw) == (h, w):
            return x
        out = torch.full((1, x.shape[1], rh, rw), -1.0, dtype=x.dtype, device=x.device)
        out[..., :h, :w] = x
        return out

    def _padded_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        """Prompt maps ``[n, 4, h, w]`` padded to the window as outside the organ (box and previous mask: -1)."""
        n = prompts.shape[0]
        h, w = self.model_hw
        rh, rw = max(h, self.roi[0]), max(w, self.roi[1])
        out = torch.zeros((n, PROMPT_CHANNELS, rh, rw), dtype=torch.float32, device=self.device)
        out[:, PREVIOUS] = -1.0
        has_box = (prompts[:, BOX] != 0).flatten(1).any(1)
        out[has_box, BOX] = -1.0
        out[..., :h, :w] = prompts.to(self.device)
        return out

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def sample_slices(self, ks: Sequence[int], organ_id: int, prompts: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance ``[n, h, w]`` (model grid) of the organ on canonical slices ``ks`` under ``prompts`` ``[n, 4, h, w]``.

        A slice that fits one window (the usual case) is sampled in one batch with the others, from its
        cached encoding; a larger one goes through MONAI's sliding windows with Gaussian blending, its
        image and prompts cropped together.
        """
        from ..uncertainty import ensemble_mean_variance

        ks = list(ks)
        h, w = self.model_hw
        n = self.samples
        if self._one_window:
            self.encode(ks)
            cond = torch.cat([self._encoded[k] for k in ks])
            ids = torch.full((len(ks),), organ_id, dtype=torch.long, device=self.device)
            with torch.inference_mode(), self._autocast():
                probs = self.method.sample(cond, ids, n, self.steps, generator, prompts=self._padded_prompts(prompts))
            mean, var = ensemble_mean_variance(probs.float(), dim=1)
            return mean[:, :h, :w].clamp(0.0, 1.0), var[:, :h, :w].clamp(min=0.0)
        means, variances = [], []
        for k, p in zip(ks, prompts):
            m, v = self._sample_windows(k, organ_id, p, generator)
            means.append(m)
            variances.append(v)
        return torch.stack(means), torch.stack(variances)

    def _sample_windows(self, k: int, organ_id: int, prompts: torch.Tensor,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from monai.inferers import sliding_window_inference

        from ..uncertainty import ensemble_mean_variance

        x = self.encoded_slice(k)
        c = x.shape[1]
        h, w = self.model_hw
        stack = torch.cat([self._padded_input(k), self._padded_prompts(prompts[None])], dim=1)
        ids = torch.tensor([organ_id], dtype=torch.long, device=self.device)
        calls = [0]

        def predictor(win: torch.Tensor) -> torch.Tensor:
            # MONAI cuts the same windows in the same order every time: the n-th batch of slice k is
            # always the same windows, so its encoding is cached under (k, n).
            key = (k, calls[0])
            calls[0] += 1
            with self._autocast():
                cond = self._window_codes.get(key)
                if cond is None or cond.shape[0] != win.shape[0]:
                    cond = self._window_codes[key] = self.method.condition(win[:, :c].contiguous())
                probs = self.method.sample(cond, ids.repeat(win.shape[0]), self.samples, self.steps, generator,
                                           prompts=win[:, c:].contiguous())
            m, v = ensemble_mean_variance(probs.float(), dim=1)
            return torch.stack([m, v], dim=1)

        with torch.inference_mode():
            out = sliding_window_inference(stack, roi_size=self.roi, sw_batch_size=16, predictor=predictor,
                                           overlap=self.overlap, mode="gaussian")
        out = out[0, :, :h, :w].float()
        return out[0].clamp(0.0, 1.0), out[1].clamp(min=0.0)

    # -- one correction ------------------------------------------------------------------------
    def refine(self, organ: str, positive: Sequence[Point] = (), negative: Sequence[Point] = (),
               box: Sequence[float] | None = None, *, should_cancel: Callable[[], bool] | None = None) -> Interaction:
        """Correct ``organ`` with clicks (LPS mm) and/or a box; returns the recorded interaction.

        Nothing changes when an argument is bad (unknown or locked organ, a point outside the
        image, no click and no box), and a cancelled correction leaves the result as it was.
        """
        t0 = time.perf_counter()
        name = self.canonical_name(organ)
        if name in self.locked:
            raise InputError(f"{name} is locked: unlock it before correcting it")
        if not positive and not negative and box is None:
            raise InputError("a correction needs at least one click or a box")
        new = self.locate(positive, negative, box)
        earlier = [i for i in self.interactions if i.organ == name]
        all_pos = [p for i in earlier for p in i.positive] + [tuple(map(float, p)) for p in positive]
        all_neg = [p for i in earlier for p in i.negative] + [tuple(map(float, p)) for p in negative]
        last_box = box if box is not None else next((i.box for i in reversed(earlier) if i.box is not None), None)
        located = self.locate(all_pos, all_neg, last_box)  # every click of this organ so far (they accumulate)
        label = self.organs.index(name) + 1
        organ_id = self._ids[self.organs.index(name)]

        from ..inference.engine import organ_seed

        generator = torch.Generator(device=self.device)
        generator.manual_seed(organ_seed(self.seed + len(self.interactions), organ_id))
        n_k = self.canon.shape[0]
        sk = self.spacing_kji[0]
        # The slab's core: the slices of this correction's clicks and of its box.
        ks = [kji[0] for kji, _ in new.clicks] + (list(new.box[0]) if new.box is not None else [])
        core_lo = min(n_k - 1, max(0, int(math.floor(min(ks) + 0.5))))
        core_hi = min(n_k - 1, max(0, int(math.floor(max(ks) + 0.5))))
        click_slices = [kji[0] for kji, _ in located.clicks]

        def reached(k: int) -> bool:
            dz = min((abs(k - c) * sk for c in click_slices), default=math.inf)
            return dz < self.radius_mm or (located.box is not None and
                                           located.box[0][0] - 0.5 <= k <= located.box[0][1] + 0.5)

        updates: dict[int, tuple] = {}  # slice -> (labels, uncertainty, the organ's probability or None) staged
        changed = 0

        def run(batch: list[int]) -> list[tuple[int, bool]]:
            """Re-sample the slices ``batch`` in one pass; per slice: (voxels changed, organ present)."""
            if should_cancel is not None and should_cancel():
                raise Cancelled("correction cancelled; the result is unchanged")
            prompts = torch.stack([self.prompts_for(k, label, located) for k in batch])
            mean, var = self.sample_slices(batch, organ_id, prompts, generator)
            want_all = resample_inplane(mean[:, None], self.canon_hw)[:, 0] >= self.threshold
            var_all = resample_inplane(var[:, None], self.canon_hw)[:, 0].clamp_(min=0.0).numpy()
            prob_all = (quantise_probability(resample_inplane(apply_temperature(mean, self.temperatures[label - 1])[:, None],
                                                              self.canon_hw)[:, 0])
                        if label in self.prob_c else None)
            out = []
            for j, k in enumerate(batch):
                want = want_all[j].numpy()
                cur = self.labels_c[k].copy()
                unc = self.unc_c[k].copy()
                gain = want & (cur == 0)  # only background becomes this organ
                lose = ~want & (cur == label)  # only this organ becomes background
                cur[gain] = label
                cur[lose] = 0
                mine = gain | lose | (cur == label)
                unc[mine] = var_all[j][mine]
                updates[k] = (cur, unc, None if prob_all is None else prob_all[j])
                present = bool((prompts[j, PREVIOUS] > 0).any() or (mean[j] >= self.threshold).any())
                out.append((int(gain.sum() + lose.sum()), present))
            return out

        for d, _ in run(list(range(core_lo, core_hi + 1))):
            changed += d
        # Outwards from the core in batches of SLAB_BATCH slices, while a click or the box reaches, and
        # until the organ ends or the change dies out.
        for step, edge in ((1, core_hi), (-1, core_lo)):
            k = edge + step
            going = True
            while going and 0 <= k < n_k and reached(k):
                batch = []
                while len(batch) < SLAB_BATCH and 0 <= k < n_k and reached(k):
                    batch.append(k)
                    k += step
                for kk, (d, present) in zip(batch, run(batch)):
                    changed += d
                    if not present or d < MIN_CHANGE_PIXELS:
                        going = False  # slices past this one in the batch are kept as computed
        changes = []
        for k, (lab, unc, prob) in updates.items():
            for volume, new_slice in ((self.labels_c, lab), (self.unc_c, unc), (self.prob_c.get(label), prob)):
                if new_slice is not None:
                    changes.append(_Change.between(volume, k, new_slice))
                    volume[k] = new_slice
        touched = sorted(updates)
        axis, _ = self.view.input_index_of_canonical_slice(0)
        inter = Interaction(
            organ=name, positive=[tuple(map(float, p)) for p in positive],
            negative=[tuple(map(float, p)) for p in negative],
            box=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            slices=sorted(self.view.input_index_of_canonical_slice(k)[1] for k in touched), slice_axis=int(axis),
            changed_voxels=changed, seconds=time.perf_counter() - t0)
        self.interactions.append(inter)
        self._undo = (self._undo + [(inter, changes)])[-UNDO_LIMIT:]
        self._redo.clear()
        return inter

    # -- undo and redo -------------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> Interaction | None:
        """Take back the last correction of this session (the maps as they were before it, exactly, and its
        clicks forgotten); returns it, or None when there is nothing to undo. A locked organ is not
        changed: undoing a correction of an organ locked since then is refused."""
        inter = self._replay(self._undo, self._redo, 0, "undoing")
        if inter is not None and self.interactions and self.interactions[-1] is inter:
            self.interactions.pop()
        return inter

    def redo(self) -> Interaction | None:
        """Apply again the last correction :meth:`undo` took back (exactly as it was computed, without
        sampling again); returns it, or None when there is nothing to redo."""
        inter = self._replay(self._redo, self._undo, 1, "redoing")
        if inter is not None:
            self.interactions.append(inter)
        return inter

    def _replay(self, source: list, target: list, which: int, doing: str) -> Interaction | None:
        """Move the last step of ``source`` to ``target``, writing its voxels before (0) or after (1) it."""
        if not source:
            return None
        inter, changes = source[-1]
        if inter.organ in self.locked:
            raise InputError(f"{inter.organ} is locked: unlock it before {doing} its correction")
        source.pop()
        for change in changes:
            change.apply(which)
        target.append((inter, changes))
        return inter

    # -- where to click next ------------------------------------------------------------------
    def suggest(self, organ: str, k: int = 3, *, use_probability: bool = False, **options) -> list["Suggestion"]:
        """Up to ``k`` places where a click on ``organ`` is most likely to help (:func:`suggest_clicks`), away
        from the places this organ was already clicked. The error chance comes from the variance, or with
        ``use_probability`` from the organ's calibrated mean probability where the session keeps one (on the
        CT default's validation patients that ranked worse: docs/interactive.md)."""
        name = self.canonical_name(organ)
        label = self.organs.index(name) + 1
        options.setdefault("avoid", clicked_points(self.interactions, name))
        if use_probability and label in self.prob_c:
            options.setdefault("probability", self.view.from_canonical(self.prob_c[label]))
        return suggest_clicks(self.image, self.view.from_canonical(self.labels_c), self.view.from_canonical(self.unc_c),
                              label, name, k, **options)

    # -- results -------------------------------------------------------------------------------
    def lock(self, organ: str) -> None:
        self.locked.add(self.canonical_name(organ))

    def unlock(self, organ: str) -> None:
        self.locked.discard(self.canonical_name(organ))

    @property
    def labels(self) -> sitk.Image:
        """The current label map on the image's grid (uint8)."""
        return self.volume.to_image(self.labels_c)

    @property
    def uncertainty(self) -> sitk.Image:
        """The current uncertainty map on the image's grid (float32)."""
        return self.volume.to_image(self.unc_c)

    @property
    def probability_organs(self) -> list[str]:
        """The organs the session keeps a probability map of, in label order."""
        return [self.organs[label - 1] for label in sorted(self.prob_c)]

    def probability(self, organ: str) -> sitk.Image:
        """The organ's current calibrated mean probability on the image's grid (float32; one volume built
        per call)."""
        name = self.canonical_name(organ)
        label = self.organs.index(name) + 1
        if label not in self.prob_c:
            raise InputError(f"this session keeps no probability map of {name}; it has: "
                             f"{', '.join(self.probability_organs) or 'none'}")
        return self.volume.to_image(dequantise_probability(self.prob_c[label]))


def clicked_points(interactions: Sequence[Interaction], organ: str) -> list[Point]:
    """Every click (positive and negative, LPS mm) recorded for ``organ``: the places a suggestion avoids."""
    return [p for i in interactions if i.organ == organ for p in (*i.positive, *i.negative)]


def suggest_clicks(image: sitk.Image, labels: np.ndarray, uncertainty: np.ndarray, label: int, organ: str, k: int = 3,
                   *, band_mm: float = 10.0, min_variance: float = 0.02, reach_mm: float = 20.0,
                   avoid: Sequence[Point] = (), avoid_mm: float = 10.0, model_free: bool = False,
                   probability: np.ndarray | None = None) -> list[Suggestion]:
    """Up to ``k`` places where a click on the organ with ``label`` is most likely to help, best first.

    ``labels`` and ``uncertainty`` are the result's maps as arrays on ``image``'s grid (``[z, y, x]``).
    From the uncertainty map (the samples' variance ``v`` of the organ's probability; for samples
    that are each 0 or 1, ``v = p(1 - p)``, so the chance that the current label is wrong there is
    ``e = (1 - sqrt(1 - 4v)) / 2``), the candidates are the voxels within ``band_mm`` of the organ's
    mask, this organ or background, with ``v >= min_variance``. A click corrects a neighbourhood, not
    a voxel, so the candidates are ranked by the expected number of wrong voxels around them (``e``
    smoothed with a Gaussian of ``reach_mm / 2``): the best is the candidate with the most expected
    error within reach, the next the best one farther than ``reach_mm`` from it, and so on. Places
    within ``avoid_mm`` of ``avoid`` (LPS mm: the organ's earlier clicks) are not suggested again.

    Each suggestion's ``positive`` is the model's guess (the point is outside the current mask: the
    organ probably missing there; inside: probably over-segmented); the radiologist who looks at
    the point decides. ``confidence`` is ``e`` at the point (the chance its current label is wrong),
    ``expected_wrong_ml`` the sum of ``e`` over the candidates within ``reach_mm`` of it and
    ``region_ml`` their volume.

    ``probability``: the organ's calibrated mean probability ``p`` on the same grid (float in [0, 1],
    or the 8-bit codes ``round(p · 255)`` the session keeps). With it, ``e`` is the chance that the
    current label is wrong as the probability says it: ``1 - p`` inside the mask, ``p`` outside
    (the variance of a few samples that each output a probability underestimates it: they can agree
    on a voxel the mean still calls a toss-up). The candidates are then the band's voxels with
    ``e`` at least what ``min_variance`` means for binary samples, ``(1 - sqrt(1 - 4 v)) / 2``.
    Measured on the CT default's validation patients, this ranks worse than the variance (the
    probability's doubt covers the whole boundary; the samples disagree where the errors are).

    ``model_free`` ignores the uncertainty and ranks the 3D regions of a band of 2 voxels on both
    sides of the mask's boundary by size, each suggested at its deepest voxel: the reference a
    suggestion must beat (it also works with 1 sample). Returns an empty list when nothing stands
    out (e.g. a 1-sample result, whose uncertainty map is all zero).
    """
    from scipy import ndimage

    from ..io.geometry import CanonicalView

    labels = np.asarray(labels)
    mask = labels == label
    if not mask.any():
        return []
    sp = np.array([float(v) for v in image.GetSpacing()[::-1]])  # [z, y, x]
    voxel_ml = float(np.prod(sp)) / 1000.0
    # Everything happens in the box of the mask grown by the band (or by 3 voxels for the model-free band).
    margin = np.full(3, 3) if model_free else np.ceil(band_mm / sp).astype(int) + 1
    extent = [np.flatnonzero(mask.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    crop = tuple(slice(max(0, int(a[0]) - m), min(n, int(a[-1]) + m + 1)) for a, m, n in zip(extent, margin, mask.shape))
    origin = np.array([c.start for c in crop])
    mask_c = mask[crop]
    mine = (labels[crop] == 0) | mask_c
    def within(centre_zyx, radius_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
        """The ball of ``radius_mm`` around ``centre_zyx`` (crop voxels): its box in the crop and the ball in that box."""
        c = np.asarray(centre_zyx, dtype=np.float64)
        lo = np.clip(np.floor(c - radius_mm / sp).astype(int), 0, mask_c.shape)
        hi = np.clip(np.ceil(c + radius_mm / sp).astype(int) + 1, 0, mask_c.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grid = np.ogrid[box]
        return box, sum(((g - ci) * s) ** 2 for g, ci, s in zip(grid, c, sp)) <= radius_mm ** 2

    allowed = np.ones(mask_c.shape, dtype=bool)
    for p in avoid:
        box, ball = within(np.array(image.TransformPhysicalPointToContinuousIndex(tuple(map(float, p)))[::-1]) - origin,
                           avoid_mm)
        allowed[box] &= ~ball
    view = CanonicalView.from_image(image, "LPS")

    def suggestion(zyx, confidence: float, wrong: float, size: float) -> Suggestion:
        z, y, x = (int(v) for v in np.asarray(zyx) + origin)
        point = image.TransformIndexToPhysicalPoint((x, y, z))
        kk = int(round(view.canonical_of_input_index((z, y, x))[0]))
        return Suggestion(organ=organ, point_mm=tuple(float(v) for v in point), positive=not bool(mask[z, y, x]),
                          confidence=confidence, expected_wrong_ml=wrong * voxel_ml, region_ml=size * voxel_ml,
                          slice_index=int(view.input_index_of_canonical_slice(kk)[1]))

    if model_free:
        cand = ((mask_c & ~ndimage.binary_erosion(mask_c, iterations=2))
                | (ndimage.binary_dilation(mask_c, iterations=2) & ~mask_c)) & mine & allowed
        regions, n = ndimage.label(cand, structure=np.ones((3, 3, 3), bool))
        size = np.bincount(regions.ravel(), minlength=n + 1)[1:]
        boxes = ndimage.find_objects(regions)
        return [suggestion(deepest_point(regions, int(r) + 1, boxes[r], sp), 1.0, float(size[r]), float(size[r]))
                for r in np.argsort(-size, kind="stable")[:k]]
    # the band: distance to the mask in mm (ITK's Maurer transform: a third of scipy's EDT time on an organ's box)
    mask_img = sitk.GetImageFromArray(mask_c.astype(np.uint8))
    mask_img.SetSpacing(tuple(float(v) for v in sp[::-1]))
    distance = sitk.SignedMaurerDistanceMap(mask_img, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    near = sitk.GetArrayFromImage(distance) <= band_mm
    if probability is not None:
        p = np.asarray(probability)[crop]
        p = dequantise_probability(p) if p.dtype == np.uint8 else np.clip(p.astype(np.float32), 0.0, 1.0)
        e = np.where(mask_c, np.float32(1.0) - p, p)
    else:
        unc = np.clip(np.asarray(uncertainty)[crop].astype(np.float32, copy=False), 0.0, 0.25)
        e = (1.0 - np.sqrt(1.0 - 4.0 * unc)) / 2.0
    min_error = (1.0 - math.sqrt(1.0 - 4.0 * min(max(min_variance, 0.0), 0.25))) / 2.0
    cand = near & mine & allowed & (e >= min_error)
    err = np.where(cand, e, np.float32(0.0)).astype(np.float32, copy=False)
    density = ndimage.gaussian_filter(err, sigma=tuple(reach_mm / 2.0 / sp), mode="constant")
    density[~cand] = -1.0
    out: list[Suggestion] = []
    while len(out) < k:
        at = np.unravel_index(int(np.argmax(density)), density.shape)
        if density[at] <= 0.0:
            break
        box, ball = within(at, reach_mm)
        out.append(suggestion(at, float(err[at]), float(err[box][ball].sum()), float((ball & cand[box]).sum())))
        density[box][ball] = -1.0  # the next suggestion is out of this one's reach
    return out
