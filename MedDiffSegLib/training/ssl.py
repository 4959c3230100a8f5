"""Self-supervised pretraining of the ``dts`` conditional encoder τθ on unlabelled images.

Three pretext tasks on 2D windows of unlabelled CT/MR slices (labels, if any, are never read):

- **masked reconstruction** — ``mask_ratio`` (0.4) of the ``mask_patch``-pixel cells of a window
  are replaced by noise; a small head on τθ's finest decoded map reconstructs the window;
  ``L_rec`` = mean squared error over the masked pixels;
- **masked-location prediction** — in a second view one of ``location_grid``² regions is
  replaced by noise; a linear head on τθ's pooled deepest feature says which one;
  ``L_loc`` = cross-entropy over the region positions;
- **contrastive** — the pooled deepest features of the two views of a window, projected by a
  small MLP, are a positive pair and every other window of the batch a negative (NT-Xent with
  temperature ``temperature``); ``L_cl``.

Total ``L = L_rec + 0.1·L_loc + 0.01·L_cl`` (``loss_weights``). Only τθ is kept: the heads are
scaffolding. The result is ``OUT/encoder.safetensors`` (τθ's weights; its metadata records the
τθ configuration, the preprocessing and the steps), ``OUT/pretrain_log.csv`` and
``OUT/pretrain.json``; a training config starts from it with ``"init_from": "OUT"``.

Config (JSON)::

    {"name": "dts-ssl-ct-mr", "method": "dts", "method_config": null | "tiny" | {...},
     "preprocessing": {"modality": "CT", "orientation": "LPS", "spacing": [2.0, 2.0], ...},
     "images": [{"image": "totalsegmentator/example_ct.nii.gz"},
                {"image": "totalsegmentator/example_mr_sm.nii.gz", "modality": "MR"},
                {"dataset": "mydata/dataset.json", "split": "training"}],
     "roi": 128, "steps": 2000, "lr": 0.001, "batch": 8, "weight_decay": 0.0001, "seed": 0,
     "log_every": 25, "mask_ratio": 0.4, "mask_patch": 16, "location_grid": 4, "temperature": 0.5,
     "loss_weights": {"rec": 1.0, "loc": 0.1, "cl": 0.01}}

``method_config`` must describe the same τθ as the segmentation model's (``null`` = the default,
``"tiny"`` = the tiny test one); ``num_organs`` does not matter. An image entry may set its own
``modality`` (the other preprocessing settings are shared), ``slices`` ``[start, stop]`` and
``name``; ``label`` and ``table`` keys are accepted and ignored. Relative paths are resolved
against the data root. Windows are drawn like the segmentation trainer's: an entry uniformly,
a volume of it uniformly, a slice uniformly, then a window position.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..errors import MedDiffSegError, ModelError, OutputError
from ..io.volume import publish_file
from ..preprocessing import PreprocessSpec, inplane_size, normalise_intensity, resample_inplane
from ..preprocessing.spec import intensity_bounds

LOG_COLUMNS = ["step", "loss", "rec", "loc", "cl", "lr", "seconds"]
_ENTRY_KEYS = {"image", "modality", "slices", "name", "dataset", "split", "cases", "label", "table"}


@dataclass
class PretrainConfig:
    name: str
    preprocessing: dict
    images: list[dict]
    method: str = "dts"
    method_config: dict | str | None = None
    description: str = ""
    roi: int = 128
    steps: int = 1000
    lr: float = 1e-3
    batch: int = 8
    weight_decay: float = 1e-4
    seed: int = 0
    log_every: int = 25
    mask_ratio: float = 0.4
    mask_patch: int = 16
    location_grid: int = 4
    temperature: float = 0.5
    loss_weights: dict = field(default_factory=lambda: {"rec": 1.0, "loc": 0.1, "cl": 0.01})

    @classmethod
    def from_file(cls, path: str | Path) -> "PretrainConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MedDiffSegError(f"pretraining config {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MedDiffSegError(f"cannot read pretraining config {path}: {exc}") from None
        if not isinstance(d, dict):
            raise MedDiffSegError(f"{path}: a pretraining config is a JSON object")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedDiffSegError(f"{path}: unknown config keys {sorted(unknown)}")
        missing = [k for k in ("name", "preprocessing", "images") if k not in d]
        if missing:
            raise MedDiffSegError(f"{path}: missing config keys {missing}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise :class:`MedDiffSegError` for settings that cannot work (before any data is read)."""
        if self.method != "dts":
            raise MedDiffSegError(f"pretraining exists for the dts conditional encoder only, not {self.method!r}")
        if not isinstance(self.images, list) or not self.images:
            raise MedDiffSegError("the pretraining config lists no images ('images' is empty)")
        weights = dict(self.loss_weights)
        if set(weights) != {"rec", "loc", "cl"} or any(float(v) < 0 for v in weights.values()):
            raise MedDiffSegError(f"loss_weights needs non-negative 'rec', 'loc' and 'cl', got {self.loss_weights!r}")
        for key, low in (("roi", 1), ("steps", 1), ("batch", 2), ("mask_patch", 1), ("location_grid", 1),
                         ("log_every", 1)):
            if int(getattr(self, key)) < low:
                extra = " (the contrastive loss needs other windows as negatives)" if key == "batch" else ""
                raise MedDiffSegError(f"{key} must be >= {low}, got {getattr(self, key)}{extra}")
        if not 0 < float(self.mask_ratio) < 1:
            raise MedDiffSegError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.roi % self.mask_patch or self.roi % self.location_grid:
            raise MedDiffSegError(f"roi {self.roi} must be a multiple of mask_patch ({self.mask_patch}) and of "
                                  f"location_grid ({self.location_grid})")
        if float(self.temperature) <= 0 or float(self.lr) <= 0:
            raise MedDiffSegError("temperature and lr must be > 0")

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)


def dts_config_for_pretraining(method_config: dict | str | None) -> dict[str, Any]:
    """The normalised ``dts`` config whose τθ is pretrained (``num_organs`` is irrelevant: 1 unless given)."""
    from ..methods.dts import DTS

    if method_config is None or method_config == "default":
        return DTS.default_config(1)
    if method_config == "tiny":
        return DTS.tiny_config(1)
    if isinstance(method_config, dict):
        return DTS.normalise_config({"num_organs": 1, **method_config})
    raise ModelError(f"method_config must be null, \"default\", \"tiny\" or an object, got {method_config!r}")


# -- data ----------------------------------------------------------------------------------------


@dataclass
class UnlabelledVolume:
    name: str
    modality: str
    images: torch.Tensor  # [S, H, W] float32 in [-1, 1] at the model spacing


def load_unlabelled_volume(path: str | Path, spec: PreprocessSpec, slices: tuple[int, int] | None = None,
                           name: str | None = None) -> UnlabelledVolume:
    """Canonical slices of an image, normalised and resampled in-plane exactly as for segmentation."""
    from ..io import CanonicalView, read_volume

    image = read_volume(path)
    view = CanonicalView.from_image(image, spec.orientation)
    import SimpleITK as sitk

    img = view.to_canonical(sitk.GetArrayViewFromImage(image))
    if slices is not None:
        img = img[slices[0]:slices[1]]
    if img.shape[0] == 0:
        raise MedDiffSegError(f"{path}: the slice range {list(slices or [])} selects no slice")
    bounds = intensity_bounds(np.asarray(img), spec)
    _, sj, si = view.spacing_kji
    size = inplane_size(img.shape[1:], (sj, si), spec.spacing)
    x = normalise_intensity(torch.from_numpy(np.array(img, dtype=np.float32)), bounds)[:, None]
    x = resample_inplane(x, size)[:, 0].contiguous()
    return UnlabelledVolume(name or Path(path).name, spec.modality, x)


def _resolve(p: str, root: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def load_images(cfg: PretrainConfig, root: Path) -> tuple[list[UnlabelledVolume], list[list[int]], list[dict]]:
    """Volumes, their groups (one per config entry) and a provenance record per entry."""
    from dataclasses import replace

    from .datasets import read_dataset

    base = PreprocessSpec.from_dict(cfg.preprocessing)
    vols: list[UnlabelledVolume] = []
    groups: list[list[int]] = []
    prov: list[dict] = []
    for n, e in enumerate(cfg.images):
        where = f"images[{n}]"
        if not isinstance(e, dict):
            raise MedDiffSegError(f"{where}: an image entry is an object, got {e!r}")
        unknown = set(e) - _ENTRY_KEYS
        if unknown:
            raise MedDiffSegError(f"{where}: unknown keys {sorted(unknown)}")
        slices = tuple(int(v) for v in e["slices"]) if e.get("slices") else None
        start = len(vols)
        if "dataset" in e:
            ds = read_dataset(_resolve(e["dataset"], root))
            spec = replace(base, modality=ds.modality)
            cases = ds.cases(e.get("split", "training"))
            if e.get("cases") is not None:
                wanted = set(e["cases"])
                cases = [c for c in cases if c.name in wanted]
            if not cases:
                raise MedDiffSegError(f"{where}: dataset {ds.path} has no {e.get('split', 'training')} cases")
            for c in cases:
                vols.append(load_unlabelled_volume(c.image, spec, slices, name=f"{ds.name}/{c.name}"))
            prov.append({"dataset": str(e["dataset"]), "name": ds.name, "split": e.get("split", "training"),
                         "modality": ds.modality, "cases": [c.name for c in cases],
                         "slices": [int(v.images.shape[0]) for v in vols[start:]]})
        elif "image" in e:
            modality = str(e.get("modality", base.modality)).upper()
            spec = replace(base, modality=modality)  # validated by PreprocessSpec
            vols.append(load_unlabelled_volume(_resolve(e["image"], root), spec, slices, name=e.get("name", e["image"])))
            prov.append({"name": e.get("name", e["image"]), "image": e["image"], "modality": modality,
                         "slices": [int(vols[-1].images.shape[0])], **({"slab": list(slices)} if slices else {})})
        else:
            raise MedDiffSegError(f"{where}: an entry needs 'image' or 'dataset'")
        groups.append(list(range(start, len(vols))))
    return vols, groups, prov


class UnlabelledWindowSampler:
    """Random ``roi``×``roi`` windows: an entry, a volume of it, a slice, a position (padding -1 = air)."""

    def __init__(self, volumes: list[UnlabelledVolume], roi: int, seed: int = 0, groups: list[list[int]] | None = None):
        self.volumes, self.roi = volumes, int(roi)
        self.rng = np.random.default_rng(seed)
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(volumes))]
        if not volumes or any(not g for g in self.groups):
            raise ValueError("every group of pretraining volumes must hold at least one volume")

    def draw(self) -> torch.Tensor:
        r = self.roi
        group = self.groups[self.rng.integers(len(self.groups))]
        vol = self.volumes[group[self.rng.integers(len(group))]]
        S, H, W = vol.images.shape
        s = int(self.rng.integers(S))
        jitter = r // 4
        if H <= r and W <= r:  # the whole slice fits: centre it, with jitter
            cy = H // 2 + int(self.rng.integers(-jitter, jitter + 1))
            cx = W // 2 + int(self.rng.integers(-jitter, jitter + 1))
        else:
            cy, cx = int(self.rng.integers(0, H)), int(self.rng.integers(0, W))
        out = torch.full((r, r), -1.0)
        y0, x0 = cy - r // 2, cx - r // 2
        ys, xs, ye, xe = max(0, y0), max(0, x0), min(H, y0 + r), min(W, x0 + r)
        out[ys - y0:ye - y0, xs - x0:xe - x0] = vol.images[s, ys:ye, xs:xe]
        return out[None]

    def batch(self, n: int) -> torch.Tensor:
        return torch.stack([self.draw() for _ in range(n)])


# -- pretext tasks -------------------------------------------------------------------------------


class SSLHeads(nn.Module):
    """Scaffolding heads on τθ: reconstruction (finest decoded map), location and projection (pooled deepest feature)."""

    def __init__(self, encoder, location_grid: int, projection_dim: int = 64, norm_groups: int = 8):
        super().__init__()
        from ..networks.dts import ConvNormAct

        c, w = encoder.channels, encoder.widths[-1]
        self.reconstruction = nn.Sequential(
            ConvNormAct(c, c, norm_groups),
            nn.Upsample(scale_factor=encoder.encoder.patch_size, mode="bilinear", align_corners=False),
            nn.Conv2d(c, 1, 3, padding=1),
        )
        self.location = nn.Linear(w, int(location_grid) ** 2)
        hidden = max(2 * projection_dim, w)
        self.projection = nn.Sequential(nn.Linear(w, hidden), nn.SiLU(), nn.Linear(hidden, projection_dim))


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def random_cell_mask(batch: int, size: tuple[int, int], cell: int, ratio: float,
                     generator: torch.Generator | None, device) -> torch.Tensor:
    """``[B,1,H,W]`` bool: exactly ``round(ratio · cells)`` (at least 1) random ``cell``×``cell`` cells per window."""
    ch, cw = size[0] // cell, size[1] // cell
    n = ch * cw
    k = min(n, max(1, int(round(ratio * n))))
    order = _uniform((batch, n), generator, device).argsort(dim=1)[:, :k]
    cells = torch.zeros(batch, n, device=device).scatter_(1, order, 1.0).view(batch, 1, ch, cw)
    return cells.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3).bool()


def region_mask(locations: torch.Tensor, size: tuple[int, int], grid: int) -> torch.Tensor:
    """``[B,1,H,W]`` bool: region ``locations[b]`` (row-major index in a ``grid``×``grid`` tiling) per window."""
    h, w = size
    rh, rw = h // grid, w // grid
    rows = torch.arange(h, device=locations.device) // rh
    cols = torch.arange(w, device=locations.device) // rw
    index = rows[:, None].clamp(max=grid - 1) * grid + cols[None, :].clamp(max=grid - 1)
    return (index[None] == locations[:, None, None])[:, None]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised-temperature cross-entropy: ``z1[i]`` and ``z2[i]`` are a positive pair, the rest negatives."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).to(torch.float32), dim=1)
    sim = z @ z.t() / float(temperature)
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


def ssl_losses(encoder, heads: SSLHeads, images: torch.Tensor, generator: torch.Generator | None, *,
               mask_ratio: float = 0.4, mask_patch: int = 16, location_grid: int = 4, temperature: float = 0.5,
               weights: dict | None = None) -> dict[str, torch.Tensor]:
    """The three pretext losses on a batch of windows ``[B,1,H,W]``, and their weighted sum ``"loss"``."""
    w = {"rec": 1.0, "loc": 0.1, "cl": 0.01, **(weights or {})}
    b, _, h, wd = images.shape
    dev = images.device
    x = images.to(torch.float32)
    # view 1: random cells replaced by noise (masked reconstruction)
    cells = random_cell_mask(b, (h, wd), int(mask_patch), float(mask_ratio), generator, dev)
    view1 = torch.where(cells, _uniform(x.shape, generator, dev) * 2 - 1, x)
    # view 2: one region replaced by noise (where?), with a small intensity jitter
    loc = (_uniform((b,), generator, dev) * location_grid**2).long().clamp(max=location_grid**2 - 1)
    region = region_mask(loc, (h, wd), int(location_grid))
    scale = 1 + 0.2 * (_uniform((b, 1, 1, 1), generator, dev) - 0.5)
    shift = 0.2 * (_uniform((b, 1, 1, 1), generator, dev) - 0.5)
    view2 = torch.where(region, _uniform(x.shape, generator, dev) * 2 - 1, x * scale + shift)

    feats1, decoded1 = encoder.forward_features(view1)
    feats2, _ = encoder.forward_features(view2)
    recon = heads.reconstruction(decoded1[0]).to(torch.float32)
    m = cells.to(torch.float32)
    l_rec = ((recon - x) ** 2 * m).sum() / m.sum().clamp_min(1.0)
    pooled1 = feats1[-1].mean(dim=(2, 3))
    pooled2 = feats2[-1].mean(dim=(2, 3))
    l_loc = F.cross_entropy(heads.location(pooled2).to(torch.float32), loc)
    l_cl = nt_xent(heads.projection(pooled1), heads.projection(pooled2), temperature)
    total = w["rec"] * l_rec + w["loc"] * l_loc + w["cl"] * l_cl
    return {"loss": total, "rec": l_rec, "loc": l_loc, "cl": l_cl}


# -- the run -------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    out_dir: Path
    encoder_path: Path
    summary: dict


def _lr_factor(steps: int) -> Callable[[int], float]:
    warm = max(1, steps // 50)
    return lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pretrain(
    cfg: PretrainConfig,
    out_dir: str | Path,
    *,
    data_root: str | Path | None = None,
    log: Callable[[str], None] = print,
    device: str | torch.device = "auto",
    max_steps: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> PretrainResult:
    """Pretrain τθ per ``cfg`` and write ``out_dir/encoder.safetensors``, ``pretrain_log.csv`` and ``pretrain.json``.

    Nothing is written before the last step: an interrupted run leaves no partial result.
    """
    from safetensors.torch import save_file

    from ..inference.device import device_description, resolve_device
    from ..methods.dts import ENCODER_FILE, ENCODER_FORMAT, build_conditional_encoder, encoder_config
    from ..registry.package import sha256_file

    cfg = copy.deepcopy(cfg)
    cfg.check()
    if max_steps is not None:
        if int(max_steps) < 1:
            raise MedDiffSegError(f"--max-steps must be >= 1, got {max_steps}")
        cfg.steps = min(int(cfg.steps), int(max_steps))
    out = Path(out_dir)
    if (out / ENCODER_FILE).exists() and not force:
        raise MedDiffSegError(f"{out / ENCODER_FILE} already exists; choose another output folder or pass --force")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    root = Path(data_root or os.environ.get("MEDDIFFSEG_DATA", "../shared/data")).resolve()
    dev = resolve_device(device)

    torch.manual_seed(int(cfg.seed))
    mcfg = dts_config_for_pretraining(cfg.method_config)
    encoder = build_conditional_encoder(mcfg)
    if cfg.roi % encoder.size_multiple:
        raise MedDiffSegError(f"roi {cfg.roi} must be a multiple of {encoder.size_multiple} for this encoder")
    heads = SSLHeads(encoder, cfg.location_grid, norm_groups=mcfg["norm_groups"])
    n_enc = sum(p.numel() for p in encoder.parameters())
    n_heads = sum(p.numel() for p in heads.parameters())
    log(f"pretraining the dts conditional encoder ({n_enc / 1e6:.3f} M parameters; heads {n_heads / 1e6:.3f} M) "
        f"on {dev}")

    t0 = time.time()
    vols, groups, prov = load_images(cfg, root)
    log(f"data: {len(vols)} volume(s) in {len(groups)} entr{'y' if len(groups) == 1 else 'ies'}, "
        f"{sum(v.images.shape[0] for v in vols)} slices ({time.time() - t0:.1f} s)")
    sampler = UnlabelledWindowSampler(vols, cfg.roi, seed=int(cfg.seed), groups=groups)
    gen = torch.Generator().manual_seed(int(cfg.seed) + 2)
    encoder.to(dev).train()
    heads.to(dev).train()
    params = list(encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=float(cfg.lr), weight_decay=float(cfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(cfg.steps))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, file=sys.stderr, dynamic_ncols=True, leave=False, unit="step", desc="pretrain")
    rows: list[list[str]] = []
    history: list[dict[str, float]] = []
    start = time.time()
    running = None
    try:
        for step in range(1, cfg.steps + 1):
            x = sampler.batch(cfg.batch).to(dev)
            terms = ssl_losses(encoder, heads, x, gen, mask_ratio=cfg.mask_ratio, mask_patch=cfg.mask_patch,
                               location_grid=cfg.location_grid, temperature=cfg.temperature,
                               weights=cfg.loss_weights)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            vals = {k: float(v.detach()) for k, v in terms.items()}
            if not all(math.isfinite(v) for v in vals.values()):
                raise MedDiffSegError(f"pretraining diverged at step {step} (losses {vals}); lower lr")
            history.append(vals)
            running = vals["loss"] if running is None else 0.98 * running + 0.02 * vals["loss"]
            seconds = time.time() - start
            if step % cfg.log_every == 0 or step == cfg.steps:
                rows.append([str(step), *(f"{vals[k]:.5f}" for k in ("loss", "rec", "loc", "cl")),
                             f"{sched.get_last_lr()[0]:.2e}", f"{seconds:.1f}"])
            if step % 100 == 0 or step == cfg.steps:
                log(f"[pretrain] step {step}/{cfg.steps} loss {running:.4f} (rec {vals['rec']:.4f}, "
                    f"loc {vals['loc']:.4f}, cl {vals['cl']:.4f}; {seconds:.0f} s)")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"loss {running:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    wall = time.time() - start

    def window_mean(part: list[dict]) -> dict:
        return {k: round(float(np.mean([h[k] for h in part])), 5) for k in ("loss", "rec", "loc", "cl")}

    n = max(1, min(cfg.log_every, len(history) // 2 or 1))
    spec = PreprocessSpec.from_dict(cfg.preprocessing)
    encoder.eval()
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    meta = {"format": ENCODER_FORMAT, "method": "dts", "name": cfg.name, "steps": str(cfg.steps),
            "encoder_config": json.dumps(encoder_config(mcfg), sort_keys=True),
            "preprocessing": json.dumps(spec.to_dict(), sort_keys=True), "roi": str(cfg.roi),
            "meddiffseg": __version__}
    out.mkdir(parents=True, exist_ok=True)
    enc_path = out / ENCODER_FILE
    tmp = out / f".{ENCODER_FILE}.tmp"
    try:
        save_file(state, str(tmp), metadata=meta)
        publish_file(tmp, enc_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LOG_COLUMNS)
    w.writerows(rows)
    _write_atomic(out / "pretrain_log.csv", buf.getvalue().encode())
    import monai

    summary = {
        "name": cfg.name,
        "description": cfg.description,
        "encoder": ENCODER_FILE,
        "encoder_sha256": sha256_file(enc_path),
        "encoder_config": encoder_config(mcfg),
        "parameters": {"encoder": n_enc, "heads": n_heads},
        "config": cfg.to_dict(),
        "data": prov,
        "steps": cfg.steps,
        "losses": {"first": window_mean(history[:n]), "last": window_mean(history[-n:]), "averaged_steps": n},
        "wall_time_s": round(wall, 1),
        "hardware": {"device": device_description(dev), "platform": platform.platform(),
                     "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "monai": monai.__version__,
        "meddiffseg": __version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_atomic(out / "pretrain.json", (json.dumps(summary, indent=2) + "\n").encode())
    log(f"wrote {enc_path} ({wall / 60:.1f} min)")
    return PretrainResult(out, enc_path, summary)
