"""Staged training of a Method from a JSON config, ending in an installable model package.

Config (JSON)::

    {"name": "abdomen-ct-guided", "version": "0.1.0", "method": "guided",
     "method_config": {...} | null | "tiny", # null: the method's default_config(num_organs)
     "organs": [{"name": ..., "display_name": ..., "color": [...], "category": {...}, "type": {...}}
                | "liver", ...],             # a name alone for the organs in training/organs.py
     "preprocessing": {...}, "inference": {...},
     "name_tables": {"ts_ct": {"liver": 5, ...}},
     "train": [{"image": "rel/or/abs", "label": "...", "table": "ts_ct", "slices": [0, 90]},
               {"dataset": "mydata/dataset.json", "split": "training"}],
     "validation": [...same...],
     "stages": {"autoencoder": {"steps": 1500, "lr": 0.002, "batch": 16},
                "denoiser": {"steps": 4000, "lr": 0.0005, "batch": 8}},
     "weight_decay": 0.0001, "seed": 0, "val_every": 500, "foreground_fraction": 0.67,
     "checkpoint_every": 500, "log_every": 25, "amp": "auto", "deterministic": false,
     "init_from": null, "augmentation": {...}}

``augmentation`` tunes the window augmentation (see :mod:`.augment`: zoom, intensity, noise,
blur, MR bias field, CT contrast-phase organ shifts). ``preprocessing.context_slices`` > 1
trains on the neighbouring slices as extra input channels (the method's ``image_channels``
follows it).

Data entries are either one labelled volume (``image`` file or DICOM folder, ``label`` map,
``table``: a key of ``name_tables`` or an inline ``{name: value}``; optional ``slices``
``[start, stop]`` of canonical slices and ``name``) or a whole ``dataset.json`` (Decathlon /
nnU-Net style, see :mod:`.datasets`; its own label table unless ``table`` is given; optional
``split``, ``cases`` (a subset by name) and ``slices``). Relative paths are resolved against
the data root. Training windows are drawn from a dataset picked uniformly (a volume entry is
a dataset of one), then a case of it uniformly, then an organ it labels uniformly.

Each stage (``method.stages``: mask autoencoder, then denoiser) uses AdamW with a linear
warm-up and cosine decay and trains only the stage's parameters. On CUDA the forward pass
runs under autocast (``amp``: ``auto`` = bf16 where supported, else fp16 with a gradient
scaler; ``off``; ``bf16``; ``fp16``). ``batch`` is per process: with ``torchrun`` each of the
N processes draws its own windows (its own seeds) and gradients are averaged by DDP.

Checkpoints (see :mod:`.checkpoint`) hold the model, the optimizer, the LR schedule, the
gradient scaler, every random state of every rank (torch generators, numpy bit generators of
the window sampler and of the augmentation, which seeds the MONAI transforms per window),
the stage and step, the running loss and the validation history. They are written every
``checkpoint_every`` steps, at the end of every stage and when a run is interrupted; a
resumed run continues from the same step and ends with the same parameters as an
uninterrupted one (bit for bit on CPU; on CUDA with ``deterministic: true``).

``init_from`` starts a fresh run from pretrained weights: a ``meddiffseg pretrain`` output
folder or its ``encoder.safetensors`` (``dts``: its conditional encoder), or a trained package
of the same method (a folder or an installed package's name: fine-tuning; ``sdseg``/``guided``
match organ prompts by name and widen a one-slice image encoder to the context slices),
loaded by the method's ``load_pretrained`` and recorded in the provenance. Relative paths are
resolved against the current folder. A resumed run takes every weight from its checkpoint
instead.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..errors import Cancelled, MedDiffSegError, ModelError
from ..methods.base import _METHODS, _import_builtin_methods, available_methods, build_method
from ..networks import DOWNSAMPLE
from ..preprocessing import PreprocessSpec
from ..preprocessing.spec import context_indices
from ..registry import ModelPackage, save_package
from .augment import augment_batch, augmentation_settings
from .interactive import error_weights, interactive_settings, simulate_prompts
from .checkpoint import (
    CheckpointError,
    b64,
    bytes_to_tensor,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tensor_to_bytes,
    unb64,
)
from .data import LabelledVolume, SliceWindowSampler, load_labelled_volume
from .datasets import normalise_label_table, read_dataset
from .distributed import DistContext, init_distributed
from .organs import organ_from_config

#: Stage settings used when the config omits them.
STAGE_DEFAULTS = {"steps": 1000, "lr": 1e-3, "batch": 8}
AMP_MODES = ("auto", "off", "bf16", "fp16")
LOG_COLUMNS = ["stage", "step", "loss", "terms", "lr", "seconds"]


class TrainingInterrupted(Cancelled):
    """Training stopped on request after writing a checkpoint; ``--resume`` continues it."""


@dataclass
class TrainConfig:
    name: str
    version: str
    method: str
    organs: list
    preprocessing: dict
    name_tables: dict[str, dict[str, int]] = field(default_factory=dict)
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    method_config: dict | str | None = None
    inference: dict = field(default_factory=dict)
    weight_decay: float = 1e-4
    seed: int = 0
    val_every: int = 500
    foreground_fraction: float = 0.67
    description: str = ""
    checkpoint_every: int = 500
    log_every: int = 25
    amp: str = "auto"
    deterministic: bool = False
    init_from: str | None = None
    augmentation: dict = field(default_factory=dict)
    #: train on each organ's area fraction of the model pixels instead of nearest-neighbour masks
    soft_targets: bool = False
    #: interactive training (clicks simulated from the model's own errors), see training/interactive.py
    interactive: dict = field(default_factory=dict)
    #: take a trained mask autoencoder and keep it fixed: a package name or folder, ``{"model": NAME,
    #: "version": V}``, or a ``weights.safetensors`` (latent methods: ``LatentMaskMethod.load_mask_autoencoder``)
    mask_autoencoder_from: str | dict | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MedDiffSegError(f"training config {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MedDiffSegError(f"cannot read training config {path}: {exc}") from None
        if not isinstance(d, dict):
            raise MedDiffSegError(f"{path}: a training config is a JSON object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedDiffSegError(f"{path}: unknown config keys {sorted(unknown)}")
        missing = [k for k in ("name", "version", "method", "organs", "preprocessing") if k not in d]
        if missing:
            raise MedDiffSegError(f"{path}: missing config keys {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


def apply_overrides(cfg: TrainConfig, *, method: str | None = None, max_steps: int | None = None) -> TrainConfig:
    """A copy of ``cfg`` with ``method`` replaced and every stage capped at ``max_steps`` steps.

    A method-config dict belongs to the config's own method: with another ``method`` the new
    method's default config is used instead (``"tiny"`` stays tiny).
    """
    cfg = copy.deepcopy(cfg)
    _import_builtin_methods()
    if method is not None and method != cfg.method:
        if method not in _METHODS:
            raise ModelError(f"unknown method {method!r}; available methods: {', '.join(available_methods())}")
        if isinstance(cfg.method_config, dict):
            cfg.method_config = None
        cfg.method = method
    if max_steps is not None:
        if int(max_steps) < 1:
            raise MedDiffSegError(f"--max-steps must be >= 1, got {max_steps}")
        if cfg.method not in _METHODS:
            raise ModelError(f"unknown method {cfg.method!r}; available methods: {', '.join(available_methods())}")
        for stage in _METHODS[cfg.method].stages:
            s = cfg.stages.setdefault(stage, {})
            s["steps"] = min(int(s.get("steps", STAGE_DEFAULTS["steps"])), int(max_steps))
    return cfg


def method_config_for(cfg: TrainConfig, num_organs: int) -> dict:
    _import_builtin_methods()
    if cfg.method not in _METHODS:
        raise ModelError(f"unknown method {cfg.method!r}; available methods: {', '.join(available_methods())}")
    cls = _METHODS[cfg.method]
    mc = cfg.method_config
    if mc is None or mc == "default":
        d = cls.default_config(num_organs)
    elif mc == "tiny":
        d = cls.tiny_config(num_organs)
    elif isinstance(mc, dict):
        d = dict(mc)
        d.setdefault("num_organs", num_organs)
        if int(d["num_organs"]) != num_organs:
            raise ModelError(f"method_config.num_organs is {d['num_organs']} but the config lists {num_organs} organs")
    else:
        raise ModelError(f"method_config must be null, \"default\", \"tiny\" or an object, got {mc!r}")
    context = int((cfg.preprocessing or {}).get("context_slices", 1))
    if "image_channels" in cls.default_config(num_organs):
        if isinstance(mc, dict) and "image_channels" in mc and int(mc["image_channels"]) != context:
            raise ModelError(f"method_config.image_channels is {d['image_channels']} but preprocessing.context_slices "
                             f"is {context}: they must agree (or leave image_channels out)")
        d["image_channels"] = context
    elif context != 1:
        raise ModelError(f"method {cfg.method!r} reads one slice per window: preprocessing.context_slices must be 1")
    return d


# -- data ------------------------------------------------------------------------------------------


def _resolve(p: str, root: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else root / q


@dataclass
class Split:
    volumes: list[LabelledVolume]
    groups: list[list[int]]  # one group per config entry (a dataset), of volume indices
    provenance: list[dict]


def _entry_table(e: dict, cfg: TrainConfig, default: dict[str, int] | None, where: str) -> dict[str, int]:
    t = e.get("table")
    if t is None:
        if default is None:
            raise MedDiffSegError(f"{where}: a volume entry needs a 'table' (a key of name_tables or a mapping)")
        return default
    if isinstance(t, dict):
        return normalise_label_table(t, f"{where} table")
    if t not in cfg.name_tables:
        raise MedDiffSegError(f"{where}: unknown table {t!r}; name_tables has: {', '.join(cfg.name_tables) or 'none'}")
    return {k: int(v) for k, v in cfg.name_tables[t].items()}


def load_split(entries: list[dict], cfg: TrainConfig, organs: list[str], spec: PreprocessSpec, root: Path,
               what: str = "train") -> Split:
    soft = bool(cfg.soft_targets) and what == "train"  # validation scores against the true masks
    vols: list[LabelledVolume] = []
    groups: list[list[int]] = []
    prov: list[dict] = []
    for n, e in enumerate(entries):
        where = f"{what}[{n}]"
        if not isinstance(e, dict):
            raise MedDiffSegError(f"{where}: a data entry is an object, got {e!r}")
        slices = tuple(e["slices"]) if e.get("slices") else None
        start = len(vols)
        if "dataset" in e:
            ds = read_dataset(_resolve(e["dataset"], root))
            if ds.modality != spec.modality:
                raise MedDiffSegError(f"{where}: dataset {ds.path} is {ds.modality} but the model's preprocessing "
                                      f"is for {spec.modality}")
            table = _entry_table(e, cfg, ds.labels, where)
            if not set(table) & set(organs):
                raise MedDiffSegError(f"{where}: dataset {ds.path} labels {', '.join(table)}; none of the model's "
                                      f"organs ({', '.join(organs)})")
            cases = ds.cases(e.get("split", "training"))
            if e.get("cases") is not None:
                wanted = list(e["cases"])
                names = {c.name for c in cases}
                unknown = [c for c in wanted if c not in names]
                if unknown:
                    raise MedDiffSegError(f"{where}: cases not in {ds.path}: {', '.join(unknown)}")
                cases = [c for c in cases if c.name in set(wanted)]
            if not cases:
                raise MedDiffSegError(f"{where}: dataset {ds.path} has no {e.get('split', 'training')} cases")
            for c in cases:
                vols.append(load_labelled_volume(c.image, c.label, table, organs, spec, slices,
                                                 name=f"{ds.name}/{c.name}", soft_targets=soft))
            prov.append({"dataset": str(e["dataset"]), "name": ds.name, "split": e.get("split", "training"),
                         "cases": [c.name for c in cases], "slices": [int(v.images.shape[0]) for v in vols[start:]],
                         "dataset_sha256": hashlib.sha256(ds.path.read_bytes()).hexdigest()})
        else:
            if "image" not in e or "label" not in e:
                raise MedDiffSegError(f"{where}: an entry needs 'image' and 'label', or 'dataset'")
            table = _entry_table(e, cfg, None, where)
            vols.append(load_labelled_volume(_resolve(e["image"], root), _resolve(e["label"], root), table,
                                             organs, spec, slices, name=e.get("name", e["image"]), soft_targets=soft))
            prov.append({"name": e.get("name", e["image"]), "image": e["image"], "label": e["label"],
                         "table": e["table"] if isinstance(e.get("table"), str) else "inline",
                         "slices": [int(vols[-1].images.shape[0])],
                         **({"slab": list(slices)} if slices else {})})
        groups.append(list(range(start, len(vols))))
    return Split(vols, groups, prov)


# -- validation ------------------------------------------------------------------------------------


@torch.no_grad()
def validate(method, volumes, num_organs: int, roi: int, generator_seed: int = 1234,
             device: torch.device | str | None = None, steps: int = 1,
             scheduler: str | None = None, context_slices: int = 1) -> dict[str, float]:
    """Per-organ Dice over all validation slices (1 sample of ``steps`` reverse steps with
    ``scheduler``, windows padded to ``roi``). The trainer passes the package's inference
    defaults, so the number reflects how the model will be used: the one-step estimate of an
    ε-predicting method can be far worse than its default few-step sampling.

    Organs a volume does not label do not count; an organ no validation volume labels, or
    that is empty in both prediction and ground truth everywhere, gets NaN.
    """
    device = torch.device(device or "cpu")
    was_training = method.training
    method.eval()
    inter = np.zeros(num_organs)
    total = np.zeros(num_organs)
    g = torch.Generator().manual_seed(generator_seed)
    for vol in volumes:
        S, H, W = vol.images.shape
        m = int(getattr(method, "size_multiple", 8))
        Hp, Wp = max(roi, math.ceil(H / m) * m), max(roi, math.ceil(W / m) * m)
        img = torch.full((S, Hp, Wp), -1.0)
        img[:, :H, :W] = vol.images
        keep = torch.from_numpy(vol.labelled)
        for s0 in range(0, S, 8):
            ks = torch.from_numpy(context_indices(S, s0, min(S, s0 + 8), context_slices, vol.context_offset))
            x = img[ks].to(device)  # [b, C, Hp, Wp]
            cond = method.condition(x)
            b = x.shape[0]
            cond = method.expand_condition(cond, num_organs)
            ids = torch.arange(num_organs, device=device).repeat(b)
            p = method.sample(cond, ids, 1, steps, g, scheduler)[:, 0, :H, :W].reshape(b, num_organs, H, W).float().cpu()
            pred = p >= 0.5
            gt = torch.stack([vol.labels[s0:s0 + 8] == o + 1 for o in range(num_organs)], 1)
            inter += ((pred & gt).flatten(2).sum(-1).sum(0) * keep).numpy()
            total += ((pred.flatten(2).sum(-1) + gt.flatten(2).sum(-1)).sum(0) * keep).numpy()
    method.train(was_training)
    return {str(o): (float(2 * inter[o] / total[o]) if total[o] > 0 else float("nan")) for o in range(num_organs)}


# -- helpers ---------------------------------------------------------------------------------------


def _lr_factor(steps: int) -> Callable[[int], float]:
    warm = max(1, steps // 50)
    return lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode not in AMP_MODES:
        raise MedDiffSegError(f"amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def package_inference(cfg: TrainConfig) -> dict:
    """The ``inference`` block a package of ``cfg`` declares: the config's, plus the click radius of an
    interactive model (how clicks are encoded is part of the model)."""
    inference = dict(cfg.inference)
    settings = interactive_settings(cfg.interactive)
    if settings is not None:
        inference["click_radius_mm"] = float(settings["click_radius_mm"])
    return inference


def state_digest(method: torch.nn.Module) -> str:
    """sha256 over every tensor of ``method``'s state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(method.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: Config keys added after runs had started: left out of the digest while at their default, so that
#: the checkpoints of those runs still resume.
_LATER_KEYS = {"mask_autoencoder_from": None}


def config_digest(cfg: TrainConfig) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if not (k in _LATER_KEYS and v == _LATER_KEYS[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _keep_rows(path: Path, order: dict[str, int], upto: tuple[int, int], header: list[str]) -> None:
    """Keep the header and the rows at or before (stage index, step) ``upto`` (rows after a checkpoint are redone)."""
    rows: list[list[str]] = []
    if path.is_file():
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for r in reader:
                if len(r) >= 2 and r[0] in order and r[1].isdigit() and (order[r[0]], int(r[1])) <= upto:
                    rows.append(r)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)


class _StageLoss(torch.nn.Module):
    """``forward`` = the method's training loss for one stage (what DDP wraps)."""

    def __init__(self, method, stage: str):
        super().__init__()
        self.method = method
        self.stage = stage

    def forward(self, images, masks, organ_ids, generator, prompts=None, weights=None):
        extra = {} if prompts is None else {"prompts": prompts}
        if weights is not None:
            extra["weights"] = weights
        return self.method.training_loss(images, masks, organ_ids, generator=generator, stage=self.stage, **extra)


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class _Progress:
    stage_index: int = 0
    step: int = 0  # steps completed in the stage stage_index
    running: float | None = None
    history: dict = field(default_factory=lambda: {"stages": {}, "validation": []})
    elapsed_s: float = 0.0
    resumed_at: list = field(default_factory=list)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    log: Callable[[str], None] = print,
    device: str | torch.device = "auto",
    resume: bool = False,
    method: str | None = None,
    max_steps: int | None = None,
    checkpoint_every: int | None = None,
    amp: str | None = None,
    progress: bool = False,
    tensorboard: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> ModelPackage | None:
    """Train ``cfg`` into ``out_dir/<name>/`` (a model package; also ``out_dir/<name>.zip``).

    ``out_dir`` also receives ``train_log.csv``, ``validation.csv``, ``history.json`` and
    ``checkpoints/``. ``resume`` continues from the newest checkpoint (starting afresh when
    there is none). ``amp`` replaces the config's ``amp`` for this run: like ``checkpoint_every`` it is
    a run setting, not part of the recipe, so a resumed run may change it (a CPU with bf16 units
    trains about twice as fast under ``"bf16"``); each resume records the mode it ran with.
    ``should_stop()`` is polled after every step: when it returns True a
    checkpoint is written and :class:`TrainingInterrupted` is raised. Under ``torchrun`` only
    rank 0 writes and returns the package; other ranks return None.
    """
    from ..inference.device import resolve_device

    cfg = apply_overrides(cfg, method=method, max_steps=max_steps)
    root = Path(data_root or os.environ.get("MEDDIFFSEG_DATA", "../shared/data")).resolve()
    dev = resolve_device(device)
    ctx = init_distributed(dev)
    try:
        return _Run(cfg, Path(out_dir), root, ctx, log=log, resume=resume,
                    checkpoint_every=checkpoint_every or cfg.checkpoint_every, amp=amp or cfg.amp, progress=progress,
                    tensorboard=tensorboard, should_stop=should_stop).run()
    finally:
        ctx.close()


class _Run:
    def __init__(self, cfg: TrainConfig, out_dir: Path, root: Path, ctx: DistContext, *, log, resume: bool,
                 checkpoint_every: int, progress: bool, tensorboard: bool, should_stop, amp: str = "auto"):
        self.cfg, self.out_dir, self.root, self.ctx = cfg, out_dir, root, ctx
        self.amp = amp
        self._log = log
        self.resume = resume
        self.checkpoint_every = int(checkpoint_every)
        if self.checkpoint_every < 1:
            raise MedDiffSegError(f"checkpoint interval must be >= 1 step, got {checkpoint_every}")
        self.progress = progress
        self.tensorboard = tensorboard
        self.should_stop = should_stop or (lambda: False)
        self.device = ctx.device

    def log(self, msg: str) -> None:
        if self.ctx.is_main:
            self._log(msg)

    # -- setup -------------------------------------------------------------------------
    def _check_out_dir(self) -> Path | None:
        """The checkpoint to resume from (or None); refuses to reuse a run folder without --resume."""
        pkg_dir = self.out_dir / self.cfg.name
        ckpt = latest_checkpoint(self.out_dir)
        if not self.resume:
            if ckpt is not None or pkg_dir.exists():
                raise MedDiffSegError(f"{self.out_dir} already holds a training run; pass --resume to continue it, "
                                      "or choose another output folder")
            return None
        if ckpt is None:
            self.log(f"no checkpoint in {self.out_dir}: starting from the beginning")
        return ckpt

    def _rank_seeds(self) -> tuple[Any, Any, int]:
        s, r = int(self.cfg.seed), self.ctx.rank
        if r == 0:  # rank 0 (and a single process) uses the original seeds
            return s, s + 1, s + 2
        return [s, r], [s + 1, r], int(np.random.SeedSequence([s + 2, r]).generate_state(1)[0])

    def run(self) -> ModelPackage | None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        ckpt_path = self._check_out_dir()
        pkg_dir = self.out_dir / cfg.name
        if self.resume and pkg_dir.exists() and (pkg_dir / "model.json").is_file():
            self.log(f"{pkg_dir} exists: this run already finished")
            return ModelPackage.from_folder(pkg_dir) if ctx.is_main else None

        torch.manual_seed(cfg.seed)
        _import_builtin_methods()
        organs = [organ_from_config(o) for o in cfg.organs]
        names = [o.name for o in organs]
        if len(set(names)) != len(names):
            raise MedDiffSegError(f"an organ is listed twice: {names}")
        spec = PreprocessSpec.from_dict(cfg.preprocessing)
        method = build_method(cfg.method, method_config_for(cfg, len(organs)))
        roi = int(cfg.inference.get("roi_size", [224, 224])[0])
        if roi % int(getattr(method, "size_multiple", 8)):
            raise MedDiffSegError(f"inference.roi_size {roi} must be a multiple of {method.size_multiple} for this model")
        n_params = sum(p.numel() for p in method.parameters())
        self.amp_dtype = _amp_dtype(self.amp, self.device)
        self.log(f"method {cfg.method}: {n_params / 1e6:.2f} M parameters; organs {names}; device {self.device}"
                 + (f" × {ctx.world_size} processes" if ctx.enabled else "")
                 + (f"; autocast {str(self.amp_dtype).replace('torch.', '')}" if self.amp_dtype else ""))

        t0 = time.time()
        train_split = load_split(cfg.train, cfg, names, spec, self.root, "train")
        if not train_split.volumes:
            raise MedDiffSegError("the config lists no training data ('train' is empty)")
        val_split = load_split(cfg.validation, cfg, names, spec, self.root, "validation")
        self.log(f"data: {len(train_split.volumes)} training volume(s) in {len(train_split.groups)} dataset(s), "
                 f"{sum(v.images.shape[0] for v in train_split.volumes)} slices; {len(val_split.volumes)} validation "
                 f"volume(s) ({time.time() - t0:.1f} s)")
        s_seed, a_seed, g_seed = self._rank_seeds()
        try:
            self.augmentation = augmentation_settings(cfg.augmentation)
            shift = self.augmentation["organ_shift"]
            if self.augmentation["organ_shift_hu"] is not None:
                if spec.modality != "CT":
                    raise ValueError("augmentation.organ_shift_hu is for CT models (use organ_shift, in normalised units)")
                lo, hi = spec.ct_window
                shift = [float(v) * 2.0 / (hi - lo) for v in self.augmentation["organ_shift_hu"]]
            sampler = SliceWindowSampler(train_split.volumes, len(organs), roi, cfg.foreground_fraction,
                                         seed=s_seed, groups=train_split.groups,
                                         context_slices=spec.context_slices, organ_shift=shift,
                                         organ_shift_prob=float(self.augmentation["organ_shift_prob"]))
        except ValueError as exc:
            raise MedDiffSegError(str(exc)) from None
        self.context_slices = spec.context_slices
        try:
            self.interactive = interactive_settings(cfg.interactive)
        except ValueError as exc:
            raise MedDiffSegError(str(exc)) from None
        if self.interactive is not None and method.prompt_channels == 0:
            raise MedDiffSegError(f"the config's 'interactive' block needs a method with prompt channels "
                                  f"(method_config.prompt_channels: 4); {cfg.method} has none here")
        aug_rng = np.random.default_rng(a_seed)
        gen = torch.Generator().manual_seed(g_seed)
        method.to(self.device)

        st = _Progress()
        ck_tensors: dict[str, torch.Tensor] = {}
        ck_meta: dict = {}
        digest = config_digest(cfg)
        if ckpt_path is not None:
            ck_tensors, ck_meta = load_checkpoint(ckpt_path)
            if ck_meta.get("config_digest") != digest:
                raise CheckpointError(
                    f"the checkpoint in {self.out_dir} was written for another configuration (config file, "
                    "--method or --max-steps differ); resume with the same options, or train into another folder")
            if int(ck_meta.get("world_size", 1)) != ctx.world_size:
                raise CheckpointError(f"the checkpoint was written by {ck_meta.get('world_size')} process(es); "
                                      f"resume with the same number (now {ctx.world_size})")
            model_state = {k[len("model."):]: v for k, v in ck_tensors.items() if k.startswith("model.")}
            method.load_state_dict(model_state, strict=True)
            rng = ck_meta["rng"][ctx.rank]
            sampler.set_state(rng["sampler"])
            aug_rng.bit_generator.state = rng["augment"]
            gen.set_state(ck_tensors[f"rng.{ctx.rank}.torch_generator"])
            torch.set_rng_state(ck_tensors[f"rng.{ctx.rank}.torch_global"])
            if torch.cuda.is_available() and f"rng.{ctx.rank}.cuda" in ck_tensors and self.device.type == "cuda":
                torch.cuda.set_rng_state(ck_tensors[f"rng.{ctx.rank}.cuda"], self.device)
            st = _Progress(int(ck_meta["stage_index"]), int(ck_meta["step"]), ck_meta.get("running"),
                           ck_meta["history"], float(ck_meta.get("elapsed_s", 0.0)), list(ck_meta.get("resumed_at", [])))
            st.resumed_at.append({"stage": method.stages[st.stage_index], "step": st.step, "amp": self.amp})
            self.log(f"resuming from {ckpt_path.name}: stage {method.stages[st.stage_index]}, step {st.step}")
        elif cfg.init_from:
            load_pretrained = getattr(method, "load_pretrained", None)
            if load_pretrained is None:
                raise MedDiffSegError(f"method {cfg.method!r} cannot start from pretrained weights ('init_from')")
            import inspect

            kwargs = {"organs": names} if "organs" in inspect.signature(load_pretrained).parameters else {}
            st.history["init_from"] = load_pretrained(Path(cfg.init_from).expanduser(), **kwargs)
            self.log(f"initialised from {st.history['init_from']['path']}")
        if cfg.mask_autoencoder_from:
            self._fix_mask_autoencoder(method, st, load=ckpt_path is None)
        for stage in method.stages:
            if int(cfg.stages.get(stage, {}).get("steps", STAGE_DEFAULTS["steps"])) > 0 and not method.stage_parameters(stage):
                raise MedDiffSegError(f"stage {stage!r} has nothing to train (the mask autoencoder comes from "
                                      f"'mask_autoencoder_from'): set stages.{stage}.steps to 0")

        self.out_dir.mkdir(parents=True, exist_ok=True)
        order = {s: i for i, s in enumerate(method.stages)}
        log_path, val_path = self.out_dir / "train_log.csv", self.out_dir / "validation.csv"
        val_header = ["stage", "step", *names, "mean"]
        if ctx.is_main:
            upto = (st.stage_index, st.step) if ckpt_path is not None else (-1, -1)
            _keep_rows(log_path, order, upto, LOG_COLUMNS)
            _keep_rows(val_path, order, upto, val_header)
        ctx.barrier()

        writer = None
        if self.tensorboard and ctx.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MedDiffSegError("TensorBoard logging needs the 'tensorboard' package (pip install tensorboard)") from None
            writer = SummaryWriter(str(self.out_dir / "tensorboard"))

        stage_steps = {s: int(cfg.stages.get(s, {}).get("steps", STAGE_DEFAULTS["steps"])) for s in method.stages}
        total = sum(max(0, n) for n in stage_steps.values())
        done = sum(max(0, stage_steps[s]) for s in method.stages[:st.stage_index]) + st.step
        bar = None
        if self.progress and ctx.is_main:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=done, file=sys.stderr, dynamic_ncols=True, leave=False, unit="step")
        segment_start = time.time()

        def elapsed() -> float:
            return st.elapsed_s + (time.time() - segment_start)

        try:
            for si, stage in enumerate(method.stages):
                steps = stage_steps[stage]
                if si < st.stage_index or steps <= 0:
                    continue
                start_step = st.step if si == st.stage_index else 0
                if start_step >= steps:
                    continue
                scfg = cfg.stages.get(stage, {})
                lr = float(scfg.get("lr", STAGE_DEFAULTS["lr"]))
                bs = int(scfg.get("batch", STAGE_DEFAULTS["batch"]))
                params = method.stage_parameters(stage)
                for p in method.parameters():
                    p.requires_grad_(False)
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(steps))
                scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
                if start_step > 0:  # resuming inside this stage
                    self._load_optimizer(opt, sched, scaler, ck_tensors, ck_meta)
                else:
                    st.running = None
                loss_module = _StageLoss(method, stage)
                if ctx.enabled:
                    from torch.nn.parallel import DistributedDataParallel as DDP

                    loss_module = DDP(loss_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                method.train()
                if bar is not None:
                    bar.set_description_str(stage, refresh=False)
                stage_t0 = time.time() - float(st.history.get("stage_elapsed", {}).get(stage, 0.0))
                for step in range(start_step + 1, steps + 1):
                    x, y, ids = sampler.batch(bs)
                    x, y = augment_batch(x, y, aug_rng, self.augmentation, soft=bool(cfg.soft_targets))
                    x, y, ids = x.to(self.device), y.to(self.device), ids.to(self.device)
                    prompts = weights = None
                    if self.interactive is not None and si == len(method.stages) - 1:
                        # clicks from the model's own errors (numpy choices from the augmentation stream)
                        with self._autocast():
                            prompts = simulate_prompts(method, x, y, ids, aug_rng, gen, self.interactive, spec.spacing)
                        weights = error_weights(prompts, y, float(self.interactive["error_weight"]), DOWNSAMPLE)
                    with self._autocast():
                        losses = loss_module(x, y, ids, gen, prompts, weights)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(losses["loss"]).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    losses = {k: v.detach() if k != "loss" else v for k, v in losses.items()}
                    lv = float(losses["loss"].detach())
                    st.running = lv if st.running is None else 0.98 * st.running + 0.02 * lv
                    st.step, st.stage_index = step, si
                    seconds = time.time() - stage_t0
                    st.history.setdefault("stage_elapsed", {})[stage] = seconds
                    if ctx.is_main and (step % cfg.log_every == 0 or step == steps):
                        terms = {k: round(float(v), 5) for k, v in losses.items() if k != "loss"}
                        with open(log_path, "a", newline="") as fh:
                            csv.writer(fh).writerow([stage, step, f"{lv:.5f}", json.dumps(terms),
                                                     f"{sched.get_last_lr()[0]:.2e}", f"{seconds:.1f}"])
                        if writer is not None:
                            gstep = done + step - start_step
                            writer.add_scalar(f"{stage}/loss", lv, gstep)
                            for k, v in terms.items():
                                writer.add_scalar(f"{stage}/{k}", v, gstep)
                            writer.add_scalar(f"{stage}/lr", sched.get_last_lr()[0], gstep)
                    if step % 100 == 0 or step == steps:
                        self.log(f"[{stage}] step {step}/{steps} loss {st.running:.4f} ({seconds:.0f} s)")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"loss {st.running:.4f}", refresh=False)
                    if (ctx.is_main and si == len(method.stages) - 1 and val_split.volumes
                            and (step % cfg.val_every == 0 or step == steps)):
                        self._validate(method, val_split, names, roi, stage, step, st, val_path, writer, done + step - start_step)
                    if step == steps:
                        st.history["stages"][stage] = {"steps": steps, "lr": lr, "batch": bs,
                                                       "seconds": round(seconds, 1)}
                    saved = False
                    if step % self.checkpoint_every == 0 or step == steps:
                        self._save(method, opt, sched, scaler, gen, aug_rng, sampler, st, digest, elapsed())
                        saved = True
                    if ctx.any_true(bool(self.should_stop())):
                        if not saved:
                            self._save(method, opt, sched, scaler, gen, aug_rng, sampler, st, digest, elapsed())
                        raise TrainingInterrupted(
                            f"training interrupted at stage {stage}, step {step}/{steps}; checkpoint written to "
                            f"{self.out_dir / 'checkpoints'}: run again with --resume to continue")
                done += steps - start_step
                st.step = 0
                st.stage_index = si + 1
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()

        for p in method.parameters():
            p.requires_grad_(True)
        method.eval()
        wall = elapsed()
        local_digest = state_digest(method)
        digests = [d.decode() for d in ctx.gather_bytes(local_digest.encode())]
        if len(set(digests)) != 1:
            raise MedDiffSegError(f"the processes ended with different parameters ({digests}): distributed training "
                                  "went out of sync")
        pkg = None
        if ctx.is_main:
            pkg = self._write_package(method, organs, spec, train_split, val_split, st, wall, n_params, local_digest)
        ctx.barrier()
        return pkg

    # -- pieces ------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _fix_mask_autoencoder(self, method, st: _Progress, load: bool) -> None:
        """``mask_autoencoder_from``: a fresh run takes that model's mask autoencoder; every run keeps it fixed."""
        src = self.cfg.mask_autoencoder_from
        if not hasattr(method, "load_mask_autoencoder"):
            raise MedDiffSegError(f"method {self.cfg.method!r} has no mask autoencoder ('mask_autoencoder_from' is for "
                                  "the latent methods: sdseg, guided, meddelinea)")
        if isinstance(src, dict):
            unknown = set(src) - {"model", "version"}
            if unknown or "model" not in src:
                raise MedDiffSegError(f"mask_autoencoder_from: give a package name or path, or {{\"model\": ..., "
                                      f"\"version\": ...}}; got {src!r}")
            where, version = str(src["model"]), (None if src.get("version") is None else str(src["version"]))
        else:
            where, version = str(src), None
        if load:  # on resume the (unchanged) autoencoder comes back with the checkpoint
            st.history["mask_autoencoder_from"] = method.load_mask_autoencoder(where, version)
            info = st.history["mask_autoencoder_from"]
            self.log(f"mask autoencoder from {info.get('package', info['path'])} {info.get('version', '')}".rstrip()
                     + " (kept fixed)")
        method.mask_autoencoder_fixed = True

    def _validate(self, method, val_split, names, roi, stage, step, st, val_path, writer, gstep) -> None:
        inference = self.cfg.inference
        dice = validate(method, val_split.volumes, len(names), roi, device=self.device,
                        steps=int(inference.get("steps", 1)), scheduler=inference.get("scheduler"),
                        context_slices=self.context_slices)
        per = {names[int(k)]: v for k, v in dice.items()}
        finite = [v for v in per.values() if math.isfinite(v)]
        mean = float(np.mean(finite)) if finite else float("nan")
        self.log(f"[{stage}] step {step} validation Dice " + ", ".join(f"{k} {v:.3f}" for k, v in per.items()))
        st.history.setdefault("validation", []).append(
            {"stage": stage, "step": step, "dice": {k: _finite(v) for k, v in per.items()}, "mean_dice": _finite(mean)})
        with open(val_path, "a", newline="") as fh:
            csv.writer(fh).writerow([stage, step, *(f"{per[n]:.4f}" for n in names), f"{mean:.4f}"])
        if writer is not None:
            for k, v in per.items():
                if math.isfinite(v):
                    writer.add_scalar(f"validation_dice/{k}", v, gstep)

    def _load_optimizer(self, opt, sched, scaler, tensors, meta) -> None:
        o = meta["optimizer"]
        state: dict[int, dict] = {}
        for key, t in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = t
        for idx, scalars in o.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": o["param_groups"]})
        sd = dict(meta["scheduler"])
        sd["lr_lambdas"] = [None] * len(opt.param_groups)
        sched.load_state_dict(sd)
        if meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])

    def _save(self, method, opt, sched, scaler, gen, aug_rng, sampler, st: _Progress, digest: str, elapsed: float) -> None:
        ctx = self.ctx
        mine = {"sampler": sampler.state(), "augment": aug_rng.bit_generator.state,
                "torch_generator": b64(tensor_to_bytes(gen.get_state())),
                "torch_global": b64(tensor_to_bytes(torch.get_rng_state()))}
        if self.device.type == "cuda":
            mine["cuda"] = b64(tensor_to_bytes(torch.cuda.get_rng_state(self.device)))
        every = [json.loads(b) for b in ctx.gather_bytes(json.dumps(mine).encode())]
        if ctx.is_main:
            tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in method.state_dict().items()}
            sd = opt.state_dict()
            scalars: dict[str, dict] = {}
            for idx, s in sd["state"].items():
                for name, v in s.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optimizer.{idx}.{name}"] = v
                    else:
                        scalars.setdefault(str(idx), {})[name] = v
            rng_json = []
            for r, rs in enumerate(every):
                tensors[f"rng.{r}.torch_generator"] = bytes_to_tensor(unb64(rs.pop("torch_generator")))
                tensors[f"rng.{r}.torch_global"] = bytes_to_tensor(unb64(rs.pop("torch_global")))
                if "cuda" in rs:
                    tensors[f"rng.{r}.cuda"] = bytes_to_tensor(unb64(rs.pop("cuda")))
                rng_json.append(rs)
            sched_sd = {k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}
            meta = {
                "config_digest": digest,
                "world_size": ctx.world_size,
                "method": method.name,
                "stages": list(method.stages),
                "stage_index": st.stage_index,
                "stage": method.stages[st.stage_index],
                "step": st.step,
                "running": st.running,
                "history": st.history,
                "elapsed_s": elapsed,
                "resumed_at": st.resumed_at,
                "optimizer": {"param_groups": _jsonable(sd["param_groups"]), "scalars": scalars},
                "scheduler": _jsonable(sched_sd),
                "scaler": _jsonable(scaler.state_dict()) if scaler.is_enabled() else {},
                "rng": rng_json,
                "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            save_checkpoint(self.out_dir, f"{st.stage_index}-{st.step:07d}", tensors, meta)
        ctx.barrier()

    def _write_package(self, method, organs, spec, train_split: Split, val_split: Split, st: _Progress,
                       wall: float, n_params: int, digest: str) -> ModelPackage:
        from ..inference.device import device_description
        from ..registry import export_zip

        cfg = self.cfg
        import monai

        hardware = {"device": device_description(self.device), "processes": self.ctx.world_size,
                    "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads()}
        if self.device.type == "cuda":
            hardware["cuda"] = torch.version.cuda
        vals = st.history.get("validation", [])
        provenance = {
            "trained": True,
            "config": cfg.to_dict(),
            "data": {"train": train_split.provenance, "validation": val_split.provenance},
            "stages": st.history["stages"],
            "steps": {s: v["steps"] for s, v in st.history["stages"].items()},
            "wall_time_s": round(wall, 1),
            "hardware": hardware,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "torch": torch.__version__,
            "monai": monai.__version__,
            "meddiffseg": __version__,
            "parameters": n_params,
            "parameters_sha256": digest,
            "resumed_at": st.resumed_at,
            **({"init_from": st.history["init_from"]} if st.history.get("init_from") else {}),
            **({"mask_autoencoder_from": st.history["mask_autoencoder_from"]}
               if st.history.get("mask_autoencoder_from") else {}),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.ctx.enabled:
            provenance["ranks_in_sync"] = True
        metrics: dict[str, Any] = {}
        if vals:
            last = vals[-1]
            metrics = {"validation_dice_last": last["dice"],
                       "validation": {"step": last["step"], "dice": last["dice"], "mean_dice": last["mean_dice"],
                                      "data": [v.name for v in val_split.volumes],
                                      "protocol": "2D slices at the model spacing, 1 sample of the package's default "
                                                  "steps and scheduler, threshold 0.5"}}
        pkg_dir = self.out_dir / cfg.name
        pkg = save_package(pkg_dir, method, name=cfg.name, version=cfg.version, organs=organs, preprocessing=spec,
                           inference=package_inference(cfg), description=cfg.description, provenance=provenance,
                           metrics=metrics)
        export_zip(pkg, self.out_dir / f"{cfg.name}.zip")
        (self.out_dir / "history.json").write_text(json.dumps(_jsonable(st.history), indent=2))
        self.log(f"wrote {pkg_dir} and {self.out_dir / (cfg.name + '.zip')} ({wall / 60:.1f} min)")
        return pkg
