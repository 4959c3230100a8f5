"""Where model packages live, how they are found, installed and exported.

Two places hold packages (each a folder ``<name>/`` with ``model.json`` + ``weights.safetensors``):

- **built-in**: ``MedDiffSegLib/models/<name>/``, shipped inside the Python package;
- **user**: ``$MEDDIFFSEG_HOME/models/<name>/`` (default ``~/.meddiffseg/models``), filled by
  :func:`install_zip` (``meddiffseg models install``).

**Shadowing:** a user package with the same name as a built-in one takes precedence. This lets
a site install a newer or locally fine-tuned version of a shipped model without upgrading the
library; ``meddiffseg models list`` shows where each package comes from and which built-ins are
shadowed. Removing the user folder brings the built-in back.

**Defaults per modality:** a package declares its modality (``preprocessing.modality``, CT or MR).
When no model is named, :func:`default_model_for` picks ``DEFAULT_MODELS[modality]``
(``abdomen-ct`` for CT, ``abdomen-mr`` for MR) when installed, else the first installed package of
``FALLBACK_MODELS[modality]`` (``abdomen-ct-guided`` for CT, none for MR), else the only installed
package of that modality; otherwise a ModelError says that no such model is installed and how to
install one (the rule itself is :func:`MedDiffSegLib.modality.pick_default`). ``resolve_model(None)``
is the CT default.

Installation is offline, from a local zip (made by :func:`export_zip`), and never trusts the
archive: its own sha256 can be checked, member paths that would escape the destination
(absolute, ``..``, drive letters), symlinks and special files are refused, and the extracted
package must parse and its weights must match the sha256 recorded in its ``model.json``
before it is moved into place with a single rename. Nothing is ever unpickled.

**Without torch.** This module imports neither torch nor :mod:`.package` at import time (the
registry's ``__init__`` loads ``ModelPackage`` lazily). :func:`read_package_info` reads a package's
``model.json`` into a :class:`PackageInfo` (name, version, method, modality, organs, inference
settings, metrics) with the same checks as ``ModelPackage.from_folder`` bar the preprocessing
spec, and :func:`scan_package_infos` / :func:`list_package_infos` / :func:`package_info` /
:func:`default_package_info` are the torch-free twins of the listing, resolving and default-model
functions: the 3D Slicer module lists and installs models with them before PyTorch is installed
in Slicer's Python, and never imports torch in Slicer's process.

**Managing packages** (``meddiffseg models ...`` and the Slicer panel): :func:`install_package`
installs from a local zip *or an http(s) URL* (download streamed to the user folder with a
progress callback, size-bounded, cancellable; a URL needs the zip's sha256, checked before the
archive is opened), :func:`update_package` replaces an installed package by a newer version of
the same name (from a zip or URL), :func:`remove_package` deletes a user package (built-ins are
part of the library and cannot be removed). Model weights can so be published outside the
repository (a release asset, an institutional file server) with their sha256; :mod:`.catalogue`
lists the packages published so and installs them by name.

**Reproducible zips.** :func:`export_zip` writes the same bytes for the same package files, wherever
and whenever it runs (fixed member order, timestamps and permissions, no compression), so a
published zip's sha256 can be checked against a fresh export of the package.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

from ..errors import Cancelled, ModelError
from ..jsonfile import read_json_object
from ..modality import (
    DEFAULT_MODELS,
    FALLBACK_MODELS,
    MODALITIES,
    missing_default_message,
    normalise_modality,
    pick_default,
)

if TYPE_CHECKING:  # imported lazily: .package imports the preprocessing spec, which imports torch
    from .package import ModelPackage

log = logging.getLogger(__name__)

#: The organ name that stands for every organ of a model (``--organ all``).
ALL_ORGANS = "all"

#: The package files (:mod:`.package` takes these names from here).
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
#: The ``model.json`` format this version reads and writes.
FORMAT_VERSION = 1

#: Deprecated: the one default model before defaults were per modality, kept for existing imports; it
#: now names the CT default. The model used when none is named is :func:`default_model_for`
#: (``DEFAULT_MODELS`` / ``FALLBACK_MODELS``: ``abdomen-ct-guided``, the CT default until 2026-12-01 and no
#: longer shipped, is still used for CT when a user installed it and ``abdomen-ct`` is missing).
DEFAULT_MODEL = "abdomen-ct"
#: Files copied into an exported zip (when present), in this order.
PACKAGE_FILES = (MODEL_JSON, WEIGHTS, "MODEL_CARD.md")
#: The timestamp of every member of an exported zip (the earliest a zip can hold), so that exports are reproducible.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
#: Upper bound on the total uncompressed size of a package zip (guards against zip bombs).
MAX_UNCOMPRESSED_BYTES = 16 * 1024**3

#: Upper bound on a downloaded package zip, and the network timeout (seconds) of each connect and read.
MAX_DOWNLOAD_BYTES = 16 * 1024**3
DOWNLOAD_TIMEOUT_S = 60.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")

# Overridable in tests (monkeypatch) -- the folder holding the shipped packages.
BUILTIN_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def builtin_models_dir() -> Path:
    return Path(BUILTIN_MODELS_DIR)


def meddiffseg_home() -> Path:
    """``$MEDDIFFSEG_HOME`` or ``~/.meddiffseg``."""
    env = os.environ.get("MEDDIFFSEG_HOME")
    return Path(env).expanduser() if env else Path.home() / ".meddiffseg"


def user_models_dir() -> Path:
    return meddiffseg_home() / "models"


def package_origin(package) -> str:
    """``"user"``, ``"built-in"`` or ``"path"`` (a folder given directly) for a ModelPackage or PackageInfo."""
    try:
        parent = Path(package.path).resolve().parent
    except OSError:
        return "path"
    if parent == user_models_dir().resolve():
        return "user"
    if parent == builtin_models_dir().resolve():
        return "built-in"
    return "path"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (the same function as :func:`.package.sha256_file`, importable without torch)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# -- package metadata without torch ------------------------------------------------------------------


def organ_ids(model_name: str, known, organs) -> list[int]:
    """Ids of the organ names ``organs`` (case-insensitive, also display names) among a model's ``known``
    organs; ``["all"]`` alone is every organ in the model's order. Unknown or repeated names are an error."""
    if [str(o).strip().lower() for o in organs] == [ALL_ORGANS]:
        return list(range(len(known)))
    if any(str(o).strip().lower() == ALL_ORGANS for o in organs):
        raise ModelError(f"'{ALL_ORGANS}' means every organ of the model: give it alone, or name the organs")
    lookup: dict[str, int] = {}
    for i, o in enumerate(known):
        lookup[o.name.lower()] = i
        lookup[o.display_name.lower()] = i
    ids, unknown = [], []
    for name in organs:
        key = str(name).strip().lower()
        if key in lookup:
            ids.append(lookup[key])
        else:
            unknown.append(name)
    if unknown:
        raise ModelError(f"model {model_name!r} does not know organ(s) {', '.join(map(repr, unknown))}; "
                         f"it segments: {', '.join(o.name for o in known)}")
    if len(set(ids)) != len(ids):
        raise ModelError(f"an organ was given twice: {list(organs)}")
    return ids


@dataclass(frozen=True)
class OrganInfo:
    """An organ of a package as ``model.json`` lists it (the fields of ``package.Organ``)."""

    name: str
    display_name: str
    color: tuple[int, int, int]
    category: dict
    type: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "display_name": self.display_name, "color": list(self.color),
                "category": dict(self.category), "type": dict(self.type)}


@dataclass
class PackageInfo:
    """What a package's ``model.json`` says, read without torch (see :func:`read_package_info`).

    The attributes a front end needs from a :class:`~.package.ModelPackage` have the same names
    (``name``, ``version``, ``method_name``, ``modality``, ``organs``, ``organ_names``,
    ``organ_ids``, ``inference``, ``weights_sha256``, ``metrics``, ``verify``); :meth:`load`
    gives the ModelPackage itself (which imports torch).
    """

    path: Path
    name: str
    version: str
    method_name: str
    modality: str
    organs: list[OrganInfo]
    preprocessing: dict[str, Any]
    inference: dict[str, Any]
    weights_sha256: str
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_path(self) -> Path:
        return Path(self.path) / WEIGHTS

    @property
    def organ_names(self) -> list[str]:
        return [o.name for o in self.organs]

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """The in-plane spacing (mm) the model works at, when its preprocessing gives one."""
        value = self.preprocessing.get("spacing")
        try:
            return tuple(float(v) for v in value) if value else None
        except (TypeError, ValueError):
            return None

    def organ_ids(self, organs: list[str]) -> list[int]:
        """Organ names (case-insensitive, also display names; ``["all"]``) -> ids, as ``ModelPackage.organ_ids``."""
        return organ_ids(self.name, self.organs, organs)

    def verify(self) -> None:
        """Raise :class:`ModelError` unless the weights file exists and matches ``weights_sha256``."""
        if not self.weights_path.is_file():
            raise ModelError(f"model {self.name!r}: weights file {self.weights_path} not found")
        digest = sha256_file(self.weights_path)
        if digest != self.weights_sha256:
            raise ModelError(f"model {self.name!r}: {WEIGHTS} does not match its sha256 (expected "
                             f"{self.weights_sha256[:16]}…, found {digest[:16]}…); the package is corrupt or was modified")

    def load(self) -> "ModelPackage":
        """The full :class:`~.package.ModelPackage` (imports torch)."""
        from .package import ModelPackage

        return ModelPackage.from_folder(self.path)


def read_model_json(folder: Path) -> tuple[Path, dict[str, Any]]:
    """``folder``'s ``model.json`` path and contents, checked for the format version and the required keys
    (what every reader of a package checks first, with or without torch)."""
    meta_path = folder / MODEL_JSON
    if not meta_path.is_file():
        raise ModelError(f"{folder} is not a model package: {MODEL_JSON} not found")
    meta = read_json_object(meta_path, ModelError)
    if meta.get("format") != FORMAT_VERSION:
        raise ModelError(f"{meta_path}: unsupported package format {meta.get('format')!r} (this version reads {FORMAT_VERSION})")
    missing = [k for k in ("name", "version", "method", "config", "organs", "preprocessing", "weights_sha256") if k not in meta]
    if missing:
        raise ModelError(f"{meta_path} lacks required keys: {', '.join(missing)}")
    return meta_path, meta


def check_organ_names(meta_path: Path, names: list[str]) -> None:
    """A package lists at least one organ, and none twice."""
    if not names:
        raise ModelError(f"{meta_path} lists no organs")
    if len(set(names)) != len(names):
        raise ModelError(f"{meta_path} lists an organ twice: {names}")


def read_package_info(folder: str | os.PathLike) -> PackageInfo:
    """Read a package folder's ``model.json`` without torch; the same errors as ``ModelPackage.from_folder``
    for a missing file, a wrong format, missing keys, organs without codes, no or repeated organs, and
    for a modality other than CT or MR (the preprocessing spec itself is checked only when loaded)."""
    folder = Path(folder)
    meta_path, meta = read_model_json(folder)
    organs = []
    for o in meta["organs"] if isinstance(meta["organs"], list) else []:
        if not isinstance(o, dict):
            raise ModelError(f"{meta_path}: every organ entry must be a JSON object")
        try:
            organs.append(OrganInfo(name=str(o["name"]), display_name=str(o.get("display_name", o["name"])),
                                    color=tuple(int(c) for c in o.get("color", (128, 174, 128))),  # type: ignore[arg-type]
                                    category=dict(o["category"]), type=dict(o["type"])))
        except KeyError as exc:
            raise ModelError(f"organ entry {o.get('name', '?')!r} lacks required key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{meta_path}: organ entry {o.get('name', '?')!r} is malformed: {exc}") from None
    check_organ_names(meta_path, [o.name for o in organs])
    pre = meta["preprocessing"] if isinstance(meta["preprocessing"], dict) else {}
    modality = pre.get("modality", "CT")
    if modality not in MODALITIES:
        raise ModelError(f"{meta_path}: preprocessing.modality must be one of {MODALITIES}, got {modality!r}")
    inference = meta.get("inference", {})
    return PackageInfo(
        path=folder, name=str(meta["name"]), version=str(meta["version"]), method_name=str(meta["method"]),
        modality=str(modality), organs=organs, preprocessing=dict(pre),
        inference=dict(inference) if isinstance(inference, dict) else {},
        weights_sha256=str(meta["weights_sha256"]).lower(), description=str(meta.get("description", "")),
        provenance=dict(meta.get("provenance") or {}), metrics=dict(meta.get("metrics") or {}),
    )


def _load_package(folder: Path) -> "ModelPackage":
    from .package import ModelPackage

    return ModelPackage.from_folder(folder)


# -- finding packages ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokenPackage:
    path: Path
    reason: str


@dataclass
class Scan:
    """Result of looking through both package folders (ModelPackages, or PackageInfos for the ``*_info`` functions)."""

    packages: list      # effective packages, one per name (user shadows built-in)
    shadowed: list      # built-ins hidden by a user package of the same name
    broken: list[BrokenPackage]


Loader = Callable[[Path], Any]


def _scan_dir(root: Path, broken: list[BrokenPackage], loader: Loader = _load_package) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        # Hidden entries are our own in-progress installs (".install-*") or editor debris.
        if entry.name.startswith(".") or entry.name.startswith("__") or not entry.is_dir():
            continue
        try:
            pkg = loader(entry)
        except ModelError as exc:
            broken.append(BrokenPackage(entry, str(exc)))
            continue
        except Exception as exc:  # a malformed model.json must not break the listing
            broken.append(BrokenPackage(entry, f"{type(exc).__name__}: {exc}"))
            continue
        if pkg.name != entry.name:
            broken.append(BrokenPackage(entry, f"folder name does not match the package name {pkg.name!r}"))
            continue
        found[pkg.name] = pkg
    return found


def _scan(loader: Loader) -> Scan:
    broken: list[BrokenPackage] = []
    builtin = _scan_dir(builtin_models_dir(), broken, loader)
    user = _scan_dir(user_models_dir(), broken, loader)
    merged = dict(builtin)
    merged.update(user)
    shadowed = [builtin[n] for n in sorted(builtin) if n in user]
    return Scan(packages=[merged[n] for n in sorted(merged)], shadowed=shadowed, broken=broken)


def scan_packages() -> Scan:
    return _scan(_load_package)


def scan_package_infos() -> Scan:
    """:func:`scan_packages` with :class:`PackageInfo` entries (no torch)."""
    return _scan(read_package_info)


def _warn_broken(scan: Scan) -> Scan:
    for b in scan.broken:
        log.warning("skipping model folder %s: %s", b.path, b.reason)
    return scan


def list_packages() -> list[ModelPackage]:
    """Installed packages sorted by name (a user package hides a built-in of the same name).

    Folders that are not valid packages are skipped with a warning on the
    ``MedDiffSegLib.registry.store`` logger; the listing itself never fails on them.
    """
    return _warn_broken(scan_packages()).packages


def list_package_infos() -> list[PackageInfo]:
    """:func:`list_packages` as :class:`PackageInfo` (no torch)."""
    return _warn_broken(scan_package_infos()).packages


def _install_hint() -> str:
    return (f"install one with 'meddiffseg models install PACKAGE.zip' (it goes to {user_models_dir()}), "
            "or pass the path of a package folder with --model")


def models_for_modality(modality: str, packages: list | None = None) -> list:
    """Installed packages (or ``packages``: ModelPackages or PackageInfos) made for ``modality``, sorted by name."""
    modality = normalise_modality(modality)
    packages = list_packages() if packages is None else packages
    return [p for p in packages if p.modality == modality]


def _default_for(modality: str, scan: Scan):
    modality = normalise_modality(modality)
    _warn_broken(scan)
    installed = {p.name: p.modality for p in scan.packages}
    name = pick_default(modality, installed)
    if name is None:
        message = missing_default_message(modality, installed)
        if not any(m == modality for m in installed.values()):
            message += f"; {_install_hint()}"
        raise ModelError(message)
    default = DEFAULT_MODELS.get(modality)
    if name != default:
        log.debug("default %s model %r is not installed; using %r", modality, default, name)
    return next(p for p in scan.packages if p.name == name)


def default_model_for(modality: str) -> ModelPackage:
    """The package used for a ``modality`` input when no model is named (see the module docstring).

    Raises :class:`ModelError` when none fits: no package of that modality is installed (the
    message says how to install one), or several are and none is the default (choose one).
    """
    return _default_for(modality, scan_packages())


def default_package_info(modality: str) -> PackageInfo:
    """:func:`default_model_for` as a :class:`PackageInfo` (no torch)."""
    return _default_for(modality, scan_package_infos())


def _resolve(name_or_path, scan_fn: Callable[[], Scan], loader: Loader, default_fn: Callable[[str], Any]):
    if name_or_path is None:
        return default_fn("CT")
    requested = os.fspath(name_or_path)
    if not requested.strip():
        raise ModelError("empty model name")
    as_path = Path(requested).expanduser()
    explicit_path = (os.sep in requested or bool(os.altsep and os.altsep in requested)
                     or requested.startswith((".", "~")))
    if not explicit_path:
        scan = scan_fn()
        for pkg in scan.packages:
            if pkg.name == requested:
                return pkg
        for b in scan.broken:
            if b.path.name == requested:
                raise ModelError(f"model {requested!r} at {b.path} is broken: {b.reason}")
    if explicit_path or as_path.is_dir():
        if not as_path.exists():
            raise ModelError(f"model folder {requested} does not exist")
        if not as_path.is_dir():
            raise ModelError(f"{requested} is not a model package folder (to install a zip use 'meddiffseg models install')")
        return loader(as_path)
    installed = ", ".join(p.name for p in scan.packages) or "none"
    raise ModelError(f"model {requested!r} is not installed (installed models: {installed}); {_install_hint()}")


def resolve_model(name_or_path: str | os.PathLike | None = None) -> ModelPackage:
    """Find a package by installed name, or load it from a folder path; ``None`` means the default
    CT model (:func:`default_model_for` ``("CT")``; use that function for another modality).

    The weights hash is *not* checked here (call :meth:`ModelPackage.verify`); unknown names raise
    :class:`ModelError` listing what is installed and how to install more.
    """
    return _resolve(name_or_path, scan_packages, _load_package, default_model_for)


def package_info(name_or_path: str | os.PathLike | None = None) -> PackageInfo:
    """:func:`resolve_model` as a :class:`PackageInfo` (no torch)."""
    return _resolve(name_or_path, scan_package_infos, read_package_info, default_package_info)



# -- zip export / install ----------------------------------------------------------------------


def export_zip(package: ModelPackage | PackageInfo | str | os.PathLike, out_zip: str | os.PathLike) -> Path:
    """Write ``package`` (a ModelPackage or PackageInfo, a name or a folder) as ``out_zip`` with one top folder
    ``<name>/``.

    The weights are verified first so a corrupt package is never passed on. Written to a temp
    name beside ``out_zip`` and renamed into place. The zip is reproducible: the same package files
    give the same bytes (members in :data:`PACKAGE_FILES` order, stored uncompressed, dated
    :data:`ZIP_DATE_TIME`, mode 0644, made on "Unix"), whatever the files' times and modes, the
    platform or the zlib, so that its sha256 can be published and checked (:mod:`.catalogue`).
    """
    if isinstance(package, (str, os.PathLike)):
        package = resolve_model(package)
    package.verify()
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_zip.name}.", suffix=".tmp", dir=out_zip.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp_name, "w") as zf:
            for fname in PACKAGE_FILES:
                src = Path(package.path) / fname
                if src.is_file():
                    member = zipfile.ZipInfo(f"{package.name}/{fname}", date_time=ZIP_DATE_TIME)
                    member.compress_type = zipfile.ZIP_STORED  # weights barely compress; deflate varies with zlib
                    member.create_system = 3  # "Unix", wherever it runs (the default is 0 on Windows)
                    member.external_attr = (stat.S_IFREG | 0o644) << 16
                    member.file_size = src.stat().st_size
                    with open(src, "rb") as f, zf.open(member, "w") as out:
                        shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp_name, out_zip)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out_zip


def _safe_member_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """Validated path components of a zip member, or ModelError when it is unsafe."""
    name = info.filename
    if "\x00" in name:
        raise ModelError(f"refusing zip member with a NUL byte in its name: {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise ModelError(f"refusing zip member with an absolute path: {name!r}")
    parts = tuple(p for p in PurePosixPath(norm).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise ModelError(f"refusing zip member that escapes the destination folder: {name!r}")
    mode = (info.external_attr >> 16) & 0xFFFF
    ftype = stat.S_IFMT(mode)
    if ftype:  # a Unix file type is recorded (many tools store permissions only)
        if ftype == stat.S_IFLNK:
            raise ModelError(f"refusing zip member that is a symbolic link: {name!r}")
        if ftype not in (stat.S_IFREG, stat.S_IFDIR):
            raise ModelError(f"refusing zip member that is not a regular file or folder: {name!r}")
    if info.flag_bits & 0x1:
        raise ModelError(f"refusing encrypted zip member: {name!r}")
    return parts


def _extract_safely(zf: zipfile.ZipFile, dest: Path) -> None:
    infos = zf.infolist()
    total = sum(i.file_size for i in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise ModelError(f"zip expands to {total} bytes, more than the {MAX_UNCOMPRESSED_BYTES} allowed for a model package")
    checked = [(info, _safe_member_parts(info)) for info in infos]  # refuse before writing anything
    dest_resolved = dest.resolve()
    for info, parts in checked:
        if not parts:
            continue
        target = dest.joinpath(*parts)
        if dest_resolved not in target.resolve().parents and target.resolve() != dest_resolved:
            raise ModelError(f"refusing zip member that escapes the destination folder: {info.filename!r}")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def _package_root(extracted: Path) -> Path:
    """The folder holding model.json: the zip root or its single top-level folder."""
    if (extracted / MODEL_JSON).is_file():
        return extracted
    entries = [p for p in extracted.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / MODEL_JSON).is_file():
        return entries[0]
    raise ModelError(f"the zip holds no model package: expected {MODEL_JSON} at its root or in one top-level folder")


ProgressCallback = Callable[[str, float, str], None]
"""``progress(stage, fraction, message)``: stage ``download`` / ``verify`` / ``extract`` / ``install``;
``fraction`` in [0, 1] of that stage (-1 when the size is unknown)."""


def _check_hex(sha256: str | None, what: str = "--sha256") -> str | None:
    if sha256 is None:
        return None
    expected = sha256.strip().lower()
    if not _HEX_RE.match(expected):
        raise ModelError(f"{what} must be 64 hexadecimal digits, got {sha256!r}")
    return expected


def is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class NetworkError(ModelError):
    """A download failed on the network: the server could not be reached, refused or broke off."""


def download(url: str, dest: str | os.PathLike, sha256: str | None, *, progress: ProgressCallback | None = None,
             should_cancel: Callable[[], bool] | None = None, timeout: float = DOWNLOAD_TIMEOUT_S,
             max_bytes: int = MAX_DOWNLOAD_BYTES, expect_size: int | None = None) -> Path:
    """Download ``url`` (http or https) to ``dest`` and check its sha256 while it streams.

    Raises :class:`NetworkError` (a :class:`ModelError`) when the server cannot be reached or breaks
    off, :class:`ModelError` on a response larger than ``max_bytes``, of another size than
    ``expect_size`` (when given: a truncated download says so) or with a wrong hash (the file is
    then removed), and :class:`~MedDiffSegLib.errors.Cancelled` when ``should_cancel()`` turns true;
    ``timeout`` bounds each connect and read.
    """
    import http.client
    import urllib.error
    import urllib.request

    expected = _check_hex(sha256) if sha256 else None
    if expected is None:
        raise ModelError(f"installing from a URL needs the sha256 of the zip (published with it): {url}")
    if not is_url(url):
        raise ModelError(f"only http:// and https:// URLs can be downloaded, got {url!r}")
    dest = Path(dest)
    h = hashlib.sha256()
    done, total = 0, None
    limit, limit_text = max_bytes, f"the {max_bytes} bytes allowed for a model package"
    if expect_size is not None:
        limit, limit_text = min(max_bytes, expect_size), f"the {expect_size} bytes expected"
    request = urllib.request.Request(url, headers={"User-Agent": "MedDiffSeg model installer"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "xb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise ModelError(f"{url} is {total} bytes, more than the {max_bytes} allowed for a model package")
            if expect_size is not None:
                if total is not None and total != expect_size:
                    raise ModelError(f"{url} is {total} bytes, not the {expect_size} expected; not installed")
                total = expect_size
            if progress is not None:
                progress("download", 0.0 if total else -1.0, f"downloading {url}")
            while True:
                if should_cancel is not None and should_cancel():
                    raise Cancelled("download cancelled")
                block = response.read(1 << 16)
                if not block:
                    break
                done += len(block)
                if done > limit:
                    raise ModelError(f"{url} sends more than {limit_text}; not installed")
                h.update(block)
                out.write(block)
                if progress is not None:
                    progress("download", done / total if total else -1.0, f"{done / 1e6:.1f} MB"
                             + (f" of {total / 1e6:.1f} MB" if total else ""))
        if total is not None and done != total:
            raise ModelError(f"the download of {url} stopped after {done} of {total} bytes (truncated); not installed")
    except (ModelError, Cancelled):
        dest.unlink(missing_ok=True)
        raise
    except http.client.IncompleteRead as exc:  # the server closed the connection before the announced length
        dest.unlink(missing_ok=True)
        raise ModelError(f"the download of {url} stopped after {done + len(exc.partial)} of "
                         f"{total if total is not None else '?'} bytes (truncated); not installed") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        dest.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise NetworkError(f"cannot download {url}: {reason}") from None
    actual = h.hexdigest()
    if actual != expected:
        dest.unlink(missing_ok=True)
        raise ModelError(f"{url} does not match the expected sha256 (expected {expected[:16]}…, found {actual[:16]}…); "
                         "not installed")
    if progress is not None:
        progress("download", 1.0, f"{done / 1e6:.1f} MB, sha256 verified")
    return dest


def _numeric_version(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", str(version)))


def is_newer(version: str, than: str) -> bool:
    """Whether package version ``version`` is newer than ``than`` (PEP 440 when both parse, else numeric parts)."""
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pragma: no cover - packaging ships with pip
        return _numeric_version(version) > _numeric_version(than)
    try:
        return Version(str(version)) > Version(str(than))
    except InvalidVersion:
        return _numeric_version(version) > _numeric_version(than)


def install_package(source: str | os.PathLike, sha256: str | None = None, force: bool = False, *,
                    progress: ProgressCallback | None = None, should_cancel: Callable[[], bool] | None = None,
                    full_check: bool = True, expect_name: str | None = None,
                    require_newer_than: str | None = None, expect_version: str | None = None,
                    expect_size: int | None = None) -> PackageInfo:
    """Install a package from a local zip or an http(s) URL into the user models folder.

    ``sha256``: the expected hex digest of the zip itself (required for a URL, checked before the
    archive is opened). ``force``: replace an installed user package of the same name.
    ``full_check``: also parse the package with the library (its preprocessing spec and method:
    imports torch); without it (the Slicer module's process) the method is checked when the model
    first runs. ``expect_name`` / ``require_newer_than``: what :func:`update_package` asks of the
    new package; ``expect_version`` / ``expect_size`` (of a downloaded zip, in bytes): what a
    catalogue entry says. A failed or cancelled install leaves the models folder as it was.
    """
    def report(stage: str, fraction: float, message: str) -> None:
        if progress is not None:
            progress(stage, fraction, message)
        if should_cancel is not None and should_cancel():
            raise Cancelled("model installation cancelled")

    users = user_models_dir()
    try:
        users.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the user models folder {users}: {exc.strerror or exc}") from None
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=users))
    try:
        if is_url(source):
            zip_path = download(str(source), staging / "package.zip", sha256, progress=progress,
                                should_cancel=should_cancel, expect_size=expect_size)
        else:
            zip_path = Path(source).expanduser()
            if not zip_path.is_file():
                raise ModelError(f"package zip {zip_path} not found")
            expected = _check_hex(sha256)
            if expected is not None:
                report("verify", 0.0, f"checking the sha256 of {zip_path.name}")
                actual = sha256_file(zip_path)
                if actual != expected:
                    raise ModelError(f"{zip_path} does not match the expected sha256 "
                                     f"(expected {expected[:16]}…, found {actual[:16]}…); not installed")
        report("extract", 0.0, f"extracting {zip_path.name}")
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _extract_safely(zf, staging / "x")
        except zipfile.BadZipFile as exc:
            raise ModelError(f"{zip_path} is not a valid zip file: {exc}") from None
        except (OSError, EOFError, RuntimeError, NotImplementedError) as exc:
            raise ModelError(f"cannot extract {zip_path}: {exc}") from None
        root = _package_root(staging / "x")
        info = read_package_info(root)
        if not _NAME_RE.match(info.name):
            raise ModelError(f"package name {info.name!r} is not usable as a folder name "
                             "(letters, digits, '.', '_' and '-' only)")
        if expect_name is not None and info.name != expect_name:
            raise ModelError(f"the package holds model {info.name!r}, not {expect_name!r}; not installed")
        if expect_version is not None and info.version != expect_version:
            raise ModelError(f"the package holds {info.name} {info.version}, not version {expect_version}; not installed")
        if require_newer_than is not None and not is_newer(info.version, require_newer_than):
            raise ModelError(f"the package holds {info.name} {info.version}, which is not newer than the installed "
                             f"{require_newer_than}; not installed (use --allow-downgrade to install it anyway)")
        report("verify", 0.5, f"checking the weights of {info.name}")
        info.verify()
        if full_check:
            from ..methods.base import available_methods

            info.load()  # the preprocessing spec parses
            if info.method_name not in available_methods():
                raise ModelError(f"package {info.name!r} needs method {info.method_name!r}, which this version of "
                                 f"MedDiffSeg does not have (available: {', '.join(available_methods())})")
        report("install", 0.0, f"installing {info.name} {info.version}")
        dest = users / info.name
        old: Path | None = None
        if dest.exists() or dest.is_symlink():
            if not force:
                raise ModelError(f"model {info.name!r} is already installed at {dest}; use --force to replace it")
            old = staging / "previous"
            os.replace(dest, old)
        try:
            os.replace(root, dest)
        except OSError as exc:
            if old is not None:
                os.replace(old, dest)
            raise ModelError(f"cannot move the package into {dest}: {exc.strerror or exc}") from None
        if progress is not None:
            progress("install", 1.0, f"installed {info.name} {info.version}")
        return read_package_info(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_zip(zip_path: str | os.PathLike, sha256: str | None = None, force: bool = False) -> ModelPackage:
    """Install a package from a local zip into the user models folder (no network).

    ``sha256``: expected hex digest of the zip file itself (checked before it is opened).
    ``force``: replace an installed user package of the same name. A failed install leaves
    the models folder as it was. (:func:`install_package` also takes URLs and works without torch.)
    """
    if is_url(zip_path):
        raise ModelError(f"{zip_path} is a URL; use install_package (meddiffseg models install --url ...)")
    return install_package(zip_path, sha256=sha256, force=force).load()


def update_package(name: str, source: str | os.PathLike, sha256: str | None = None, *,
                   allow_downgrade: bool = False, progress: ProgressCallback | None = None,
                   should_cancel: Callable[[], bool] | None = None, full_check: bool = True) -> tuple[PackageInfo, PackageInfo]:
    """Replace installed model ``name`` by the package in ``source`` (a zip or an http(s) URL).

    The new package must have the same name and, unless ``allow_downgrade``, a newer version.
    It goes to the user folder (a built-in package is then shadowed, not changed). Returns
    ``(the package before, the package now)``.
    """
    before = package_info(name)
    if os.sep in name or name.startswith((".", "~")):
        raise ModelError(f"give the name of an installed model to update, not a path: {name!r}")
    after = install_package(source, sha256=sha256, force=True, progress=progress, should_cancel=should_cancel,
                            full_check=full_check, expect_name=before.name,
                            require_newer_than=None if allow_downgrade else before.version)
    return before, after


def remove_package(name: str) -> Path:
    """Delete the user package ``name``; returns the folder removed.

    Built-in packages are part of the library and cannot be removed (a user package of the same
    name can: the built-in one is then used again). A half-removed package is never left behind:
    the folder is first renamed out of the listing.
    """
    if not _NAME_RE.match(name or ""):
        raise ModelError(f"{name!r} is not a model name")
    dest = user_models_dir() / name
    if not dest.is_dir() or dest.is_symlink():
        if (builtin_models_dir() / name).is_dir():
            raise ModelError(f"model {name!r} is built in (shipped with MedDiffSeg in {builtin_models_dir()}) "
                             "and cannot be removed")
        installed = ", ".join(p.name for p in list_package_infos()) or "none"
        raise ModelError(f"model {name!r} is not installed in {user_models_dir()} (installed models: {installed})")
    trash = Path(tempfile.mkdtemp(prefix=".remove-", dir=user_models_dir()))
    try:
        os.replace(dest, trash / name)
    except OSError as exc:
        shutil.rmtree(trash, ignore_errors=True)
        raise ModelError(f"cannot remove {dest}: {exc.strerror or exc}") from None
    shutil.rmtree(trash, ignore_errors=True)
    return dest
