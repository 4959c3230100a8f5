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
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ModelError
from ..modality import DEFAULT_MODELS, FALLBACK_MODELS, missing_default_message, normalise_modality, pick_default
from .package import MODEL_JSON, WEIGHTS, ModelPackage, sha256_file

log = logging.getLogger(__name__)

#: Deprecated: the one default model before defaults were per modality. Kept for existing imports: it
#: names the guided CT package shipped with the library, which is now the CT *fallback*. The model used
#: when none is named is :func:`default_model_for` (``DEFAULT_MODELS`` / ``FALLBACK_MODELS``).
DEFAULT_MODEL = "abdomen-ct-guided"
#: Files copied into an exported zip (when present).
PACKAGE_FILES = (MODEL_JSON, WEIGHTS, "MODEL_CARD.md")
#: Upper bound on the total uncompressed size of a package zip (guards against zip bombs).
MAX_UNCOMPRESSED_BYTES = 16 * 1024**3

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


def package_origin(package: ModelPackage) -> str:
    """``"user"``, ``"built-in"`` or ``"path"`` (a folder given directly)."""
    try:
        parent = Path(package.path).resolve().parent
    except OSError:
        return "path"
    if parent == user_models_dir().resolve():
        return "user"
    if parent == builtin_models_dir().resolve():
        return "built-in"
    return "path"


@dataclass(frozen=True)
class BrokenPackage:
    path: Path
    reason: str


@dataclass
class Scan:
    """Result of looking through both package folders."""

    packages: list[ModelPackage]      # effective packages, one per name (user shadows built-in)
    shadowed: list[ModelPackage]      # built-ins hidden by a user package of the same name
    broken: list[BrokenPackage]


def _scan_dir(root: Path, broken: list[BrokenPackage]) -> dict[str, ModelPackage]:
    found: dict[str, ModelPackage] = {}
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        # Hidden entries are our own in-progress installs (".install-*") or editor debris.
        if entry.name.startswith(".") or entry.name.startswith("__") or not entry.is_dir():
            continue
        try:
            pkg = ModelPackage.from_folder(entry)
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


def scan_packages() -> Scan:
    broken: list[BrokenPackage] = []
    builtin = _scan_dir(builtin_models_dir(), broken)
    user = _scan_dir(user_models_dir(), broken)
    merged = dict(builtin)
    merged.update(user)
    shadowed = [builtin[n] for n in sorted(builtin) if n in user]
    return Scan(packages=[merged[n] for n in sorted(merged)], shadowed=shadowed, broken=broken)


def list_packages() -> list[ModelPackage]:
    """Installed packages sorted by name (a user package hides a built-in of the same name).

    Folders that are not valid packages are skipped with a warning on the
    ``MedDiffSegLib.registry.store`` logger; the listing itself never fails on them.
    """
    scan = scan_packages()
    for b in scan.broken:
        log.warning("skipping model folder %s: %s", b.path, b.reason)
    return scan.packages


def _install_hint() -> str:
    return (f"install one with 'meddiffseg models install PACKAGE.zip' (it goes to {user_models_dir()}), "
            "or pass the path of a package folder with --model")


def models_for_modality(modality: str, packages: list[ModelPackage] | None = None) -> list[ModelPackage]:
    """Installed packages (or ``packages``) made for ``modality``, sorted by name."""
    modality = normalise_modality(modality)
    packages = list_packages() if packages is None else packages
    return [p for p in packages if p.modality == modality]


def default_model_for(modality: str) -> ModelPackage:
    """The package used for a ``modality`` input when no model is named (see the module docstring).

    Raises :class:`ModelError` when none fits: no package of that modality is installed (the
    message says how to install one), or several are and none is the default (choose one).
    """
    modality = normalise_modality(modality)
    scan = scan_packages()
    for b in scan.broken:
        log.warning("skipping model folder %s: %s", b.path, b.reason)
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


def resolve_model(name_or_path: str | os.PathLike | None = None) -> ModelPackage:
    """Find a package by installed name, or load it from a folder path; ``None`` means the default
    CT model (:func:`default_model_for` ``("CT")``; use that function for another modality).

    The weights hash is *not* checked here (call :meth:`ModelPackage.verify`); unknown names raise
    :class:`ModelError` listing what is installed and how to install more.
    """
    if name_or_path is None:
        return default_model_for("CT")
    requested = os.fspath(name_or_path)
    if not requested.strip():
        raise ModelError("empty model name")
    as_path = Path(requested).expanduser()
    explicit_path = (os.sep in requested or bool(os.altsep and os.altsep in requested)
                     or requested.startswith((".", "~")))
    if not explicit_path:
        scan = scan_packages()
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
        return ModelPackage.from_folder(as_path)
    installed = ", ".join(p.name for p in scan.packages) or "none"
    raise ModelError(f"model {requested!r} is not installed (installed models: {installed}); {_install_hint()}")


# -- zip export / install ----------------------------------------------------------------------


def export_zip(package: ModelPackage | str | os.PathLike, out_zip: str | os.PathLike) -> Path:
    """Write ``package`` (a ModelPackage, a name or a folder) as ``out_zip`` with one top folder ``<name>/``.

    The weights are verified first so a corrupt package is never passed on. Written to a temp
    name beside ``out_zip`` and renamed into place.
    """
    if not isinstance(package, ModelPackage):
        package = resolve_model(package)
    package.verify()
    out_zip = Path(out_zip)
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_zip.name}.", suffix=".tmp", dir=out_zip.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp_name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for fname in PACKAGE_FILES:
                src = Path(package.path) / fname
                if src.is_file():
                    # Weights barely compress; store them to keep export/install fast.
                    ctype = zipfile.ZIP_STORED if fname == WEIGHTS else zipfile.ZIP_DEFLATED
                    zf.write(src, f"{package.name}/{fname}", compress_type=ctype)
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


def install_zip(zip_path: str | os.PathLike, sha256: str | None = None, force: bool = False) -> ModelPackage:
    """Install a package from a local zip into the user models folder (no network).

    ``sha256``: expected hex digest of the zip file itself (checked before it is opened).
    ``force``: replace an installed user package of the same name. A failed install leaves
    the models folder as it was.
    """
    zip_path = Path(zip_path).expanduser()
    if not zip_path.is_file():
        raise ModelError(f"package zip {zip_path} not found")
    if sha256 is not None:
        expected = sha256.strip().lower()
        if not _HEX_RE.match(expected):
            raise ModelError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
        actual = sha256_file(zip_path)
        if actual != expected:
            raise ModelError(f"{zip_path} does not match the expected sha256 "
                             f"(expected {expected[:16]}…, found {actual[:16]}…); not installed")
    users = user_models_dir()
    try:
        users.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the user models folder {users}: {exc.strerror or exc}") from None
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=users))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _extract_safely(zf, staging / "x")
        except zipfile.BadZipFile as exc:
            raise ModelError(f"{zip_path} is not a valid zip file: {exc}") from None
        except (OSError, EOFError, RuntimeError, NotImplementedError) as exc:
            raise ModelError(f"cannot extract {zip_path}: {exc}") from None
        root = _package_root(staging / "x")
        pkg = ModelPackage.from_folder(root)
        if not _NAME_RE.match(pkg.name):
            raise ModelError(f"package name {pkg.name!r} is not usable as a folder name "
                             "(letters, digits, '.', '_' and '-' only)")
        pkg.verify()
        from ..methods.base import available_methods

        if pkg.method_name not in available_methods():
            raise ModelError(f"package {pkg.name!r} needs method {pkg.method_name!r}, which this version of "
                             f"MedDiffSeg does not have (available: {', '.join(available_methods())})")
        dest = users / pkg.name
        old: Path | None = None
        if dest.exists() or dest.is_symlink():
            if not force:
                raise ModelError(f"model {pkg.name!r} is already installed at {dest}; use --force to replace it")
            old = staging / "previous"
            os.replace(dest, old)
        try:
            os.replace(root, dest)
        except OSError as exc:
            if old is not None:
                os.replace(old, dest)
            raise ModelError(f"cannot move the package into {dest}: {exc.strerror or exc}") from None
        return ModelPackage.from_folder(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
