"""Model packages: a folder with ``model.json`` + ``weights.safetensors``.

``model.json`` (format 1)::

    {
      "format": 1,
      "name": "abdomen-ct-guided", "version": "0.1.0", "description": "...",
      "method": "guided",                       # a registered Method name
      "config": {...},                          # the Method's constructor config
      "organs": [                               # organ id = position in this list
        {"name": "liver", "display_name": "Liver", "color": [221, 130, 101],
         "category": {"code": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
         "type": {"code": "10200004", "scheme": "SCT", "meaning": "Liver"}}
      ],
      "preprocessing": {...},                   # PreprocessSpec
      "inference": {"roi_size": [256, 256], "overlap": 0.25, "threshold": 0.5,
                    "steps": 1, "samples": 1, "scheduler": "ddim", "sw_batch_size": 8},
      "provenance": {...}, "metrics": {...},
      "weights_sha256": "<hex digest of weights.safetensors>"
    }

Weights are only ever read with ``safetensors`` (no pickle). The weights file's sha256 is
checked against ``weights_sha256`` before anything is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..preprocessing import PreprocessSpec
from .store import FORMAT_VERSION, MODEL_JSON, WEIGHTS, check_organ_names, organ_ids, read_model_json

DEFAULT_INFERENCE = {
    "roi_size": [256, 256],
    "overlap": 0.25,
    "threshold": 0.5,
    "steps": 1,
    "samples": 1,
    "scheduler": "ddim",
    "sw_batch_size": 8,
}


@dataclass(frozen=True)
class Organ:
    name: str
    display_name: str
    color: tuple[int, int, int]
    category: dict[str, str]
    type: dict[str, str]

    @classmethod
    def from_dict(cls, d: dict) -> "Organ":
        try:
            return cls(
                name=str(d["name"]),
                display_name=str(d.get("display_name", d["name"])),
                color=tuple(int(c) for c in d.get("color", (128, 174, 128))),  # type: ignore[arg-type]
                category=dict(d["category"]),
                type=dict(d["type"]),
            )
        except KeyError as exc:
            raise ModelError(f"organ entry {d.get('name', '?')!r} lacks required key {exc}") from None

    def to_dict(self) -> dict:
        return {"name": self.name, "display_name": self.display_name, "color": list(self.color),
                "category": dict(self.category), "type": dict(self.type)}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()



@dataclass
class ModelPackage:
    """A model package's metadata; :meth:`load_method` builds the network with its weights."""

    path: Path
    name: str
    version: str
    method_name: str
    config: dict[str, Any]
    organs: list[Organ]
    preprocessing: PreprocessSpec
    inference: dict[str, Any]
    weights_sha256: str
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ModelPackage":
        folder = Path(folder)
        meta_path, meta = read_model_json(folder)
        organs = [Organ.from_dict(o) for o in meta["organs"]]
        check_organ_names(meta_path, [o.name for o in organs])
        inference = dict(DEFAULT_INFERENCE)
        inference.update(meta.get("inference", {}))
        return cls(
            path=folder,
            name=str(meta["name"]),
            version=str(meta["version"]),
            method_name=str(meta["method"]),
            config=dict(meta["config"]),
            organs=organs,
            preprocessing=PreprocessSpec.from_dict(meta["preprocessing"]),
            inference=inference,
            weights_sha256=str(meta["weights_sha256"]).lower(),
            description=str(meta.get("description", "")),
            provenance=dict(meta.get("provenance", {})),
            metrics=dict(meta.get("metrics", {})),
        )

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def modality(self) -> str:
        """``"CT"`` or ``"MR"``: the modality the package is made for (``preprocessing.modality``).

        Without importing torch, :func:`MedDiffSegLib.modality.read_package_modality` reads it from
        the folder's ``model.json``.
        """
        return self.preprocessing.modality

    @property
    def organ_names(self) -> list[str]:
        return [o.name for o in self.organs]

    def organ_ids(self, organs: list[str]) -> list[int]:
        """Map organ names (case-insensitive, also display names) to ids; unknown names are an error.

        ``["all"]`` alone means every organ of the model, in the model's order.
        """
        return organ_ids(self.name, self.organs, organs)

    def verify(self) -> None:
        """Raise :class:`ModelError` unless the weights file exists and matches ``weights_sha256``."""
        if not self.weights_path.is_file():
            raise ModelError(f"model {self.name!r}: weights file {self.weights_path} not found")
        digest = sha256_file(self.weights_path)
        if digest != self.weights_sha256:
            raise ModelError(
                f"model {self.name!r}: {WEIGHTS} does not match its sha256 "
                f"(expected {self.weights_sha256[:16]}…, found {digest[:16]}…); the package is corrupt or was modified"
            )

    def load_method(self, device: str = "cpu"):
        """Verify the hash, build the Method from its config and load the safetensors weights."""
        from safetensors.torch import load_file

        from ..methods.base import build_method

        self.verify()
        method = build_method(self.method_name, self.config)
        state = load_file(str(self.weights_path), device="cpu")
        result = method.load_state_dict(state, strict=True)  # strict: a mismatch raises
        del result
        return method.to(device).eval()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "method": self.method_name,
            "config": self.config,
            "organs": [o.to_dict() for o in self.organs],
            "preprocessing": self.preprocessing.to_dict(),
            "inference": self.inference,
            "provenance": self.provenance,
            "metrics": self.metrics,
            "weights_sha256": self.weights_sha256,
        }


@contextlib.contextmanager
def _staged_package_folder(folder: Path):
    """A temporary folder beside ``folder`` that is renamed to it when the block succeeds (removed otherwise)."""
    import shutil

    if folder.exists():
        raise ModelError(f"{folder} already exists; refusing to overwrite a model package")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_package(
    folder: str | os.PathLike,
    method,
    *,
    name: str,
    version: str,
    organs: list[Organ],
    preprocessing: PreprocessSpec,
    inference: dict[str, Any] | None = None,
    description: str = "",
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> ModelPackage:
    """Write ``method`` (a Method module) as a package folder, atomically (temp folder, then rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with _staged_package_folder(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"method": method.name, "name": name, "version": version})
        inf = dict(DEFAULT_INFERENCE)
        inf.update(inference or {})
        pkg = ModelPackage(
            path=folder, name=name, version=version, method_name=method.name, config=dict(method.config),
            organs=list(organs), preprocessing=preprocessing, inference=inf,
            weights_sha256=sha256_file(tmp / WEIGHTS), description=description,
            provenance=dict(provenance or {}), metrics=dict(metrics or {}),
        )
        (tmp / MODEL_JSON).write_text(json.dumps(pkg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return pkg


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, keeping the file's permissions."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_metrics(folder: str | os.PathLike, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into the ``metrics`` of the package in ``folder`` (atomic; weights untouched)."""
    _update_section(folder, "metrics", updates)


def update_inference(folder: str | os.PathLike, updates: dict[str, Any]) -> None:
    """Merge ``updates`` into the ``inference`` settings of the package in ``folder`` (atomic; weights untouched)."""
    _update_section(folder, "inference", updates)


def _update_section(folder: str | os.PathLike, section: str, updates: dict[str, Any]) -> None:
    path = Path(folder) / MODEL_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    merged = data.get(section) or {}
    merged.update(updates)
    data[section] = merged
    _write_json_atomic(path, data)


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float16") -> ModelPackage:
    """Copy the package in ``src`` to a new folder ``dst`` with floating-point weights stored as ``dtype``.

    fp16 halves the size on disk; loading casts back to the module's float32 parameters
    (``load_state_dict`` copies with a dtype conversion), so only the rounding of the weights
    differs. Check the scores of the converted package before shipping it. The new
    ``model.json`` records the storage dtype and the source's sha256 under ``provenance``.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    source = ModelPackage.from_folder(src)
    source.verify()
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ModelError(f"unsupported storage dtype {dtype!r}; use float16, bfloat16 or float32")
    dst = Path(dst)
    with _staged_package_folder(dst) as tmp:
        state = load_file(str(source.weights_path), device="cpu")
        state = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"method": source.method_name, "name": source.name,
                                                        "version": source.version, "dtype": dtype})
        data = json.loads((Path(src) / MODEL_JSON).read_text(encoding="utf-8"))
        data["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        prov = data.get("provenance") or {}
        prov["weights_storage"] = {"dtype": dtype, "converted_from_sha256": source.weights_sha256}
        data["provenance"] = prov
        (tmp / MODEL_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        card = Path(src) / "MODEL_CARD.md"
        if card.is_file():
            shutil.copy2(card, tmp / "MODEL_CARD.md")
    return ModelPackage.from_folder(dst)
