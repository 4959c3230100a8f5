"""The model catalogue: packages that are published as zips rather than shipped with the library.

The 3D Slicer extension installs the library with the two modality defaults only (``abdomen-ct``,
``abdomen-mr``); every other package is listed in ``catalogue.json`` beside this module: its name,
version, method, modality, organs, the zip's URL (relative to the catalogue's base URL), sha256 and
size. :func:`install_from_catalogue` (``meddiffseg models install NAME``, the Slicer panel's
*Install from catalogue*) downloads the zip with a progress callback, checks its size and sha256
while it streams, and installs it into the user models folder with all the checks of
:func:`~.store.install_package`; a failed, cancelled or truncated download leaves nothing behind.

**The base URL** is a configuration point, strongest first:

1. an explicit ``base_url`` (``meddiffseg models install NAME --catalogue-url URL``);
2. the environment variable ``MEDDIFFSEG_CATALOGUE_URL``;
3. the setting ``catalogue_url`` in ``$MEDDIFFSEG_HOME/settings.json``
   (``meddiffseg models catalogue --set-url URL``; the Slicer panel writes the same file);
4. ``base_url`` in ``catalogue.json``.

A hospital whose network cannot reach the internet copies the zips (their names are the entries'
``url``) to a server of its own and points the base URL at it. There is no public release server
yet: the ``base_url`` shipped in ``catalogue.json`` is a placeholder under the reserved ``.example``
domain (RFC 2606), and installing from it says so instead of trying the network.

The entries' sha256 and size are those of the zips :func:`~.store.export_zip` writes for the
packages (it writes the same bytes for the same package files); :func:`catalogue_entry_for` computes
an entry from a package folder. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from ..errors import ModelError
from ..jsonfile import read_json_object
from .store import (
    _HEX_RE,
    _NAME_RE,
    NetworkError,
    PackageInfo,
    ProgressCallback,
    export_zip,
    install_package,
    meddiffseg_home,
    read_package_info,
    sha256_file,
    user_models_dir,
)

#: The catalogue shipped with the library.
CATALOGUE_FILE = Path(__file__).resolve().with_name("catalogue.json")
#: The ``catalogue.json`` format this version reads.
CATALOGUE_FORMAT = 1
#: Environment variable that sets the catalogue's base URL (a mirror).
CATALOGUE_URL_ENV = "MEDDIFFSEG_CATALOGUE_URL"
#: Key of the base URL in ``$MEDDIFFSEG_HOME/settings.json``.
CATALOGUE_URL_SETTING = "catalogue_url"
#: Hosts under this reserved top-level domain (RFC 2606) are placeholders: no server answers there.
PLACEHOLDER_DOMAIN = ".example"

_ENTRY_KEYS = ("name", "version", "method", "modality", "organs", "url", "sha256", "size")


@dataclass(frozen=True)
class CatalogueEntry:
    """One package of the catalogue (``url`` relative to the base URL, or absolute)."""

    name: str
    version: str
    method: str
    modality: str
    organs: tuple[str, ...]
    url: str
    sha256: str
    size: int
    description: str = ""

    def download_url(self, base_url: str) -> str:
        return urljoin(base_url, self.url)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in _ENTRY_KEYS}
        d["organs"] = list(self.organs)
        if self.description:
            d["description"] = self.description
        return d


@dataclass(frozen=True)
class Catalogue:
    path: Path
    base_url: str
    entries: tuple[CatalogueEntry, ...]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> CatalogueEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ModelError(f"model {name!r} is not in the catalogue {self.path} (it lists: {', '.join(self.names()) or 'none'})")


def _check_base_url(url: str, where: str) -> str:
    url = str(url).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ModelError(f"the catalogue's base URL ({where}) must be an http:// or https:// URL, got {url!r}")
    return url if url.endswith("/") else url + "/"


def load_catalogue(path: str | os.PathLike | None = None) -> Catalogue:
    """Read and check ``catalogue.json`` (default: the library's); a :class:`ModelError` says what is wrong."""
    path = Path(path) if path is not None else CATALOGUE_FILE
    data = read_json_object(path, ModelError, shown=f"the model catalogue {path}")
    if data.get("format") != CATALOGUE_FORMAT:
        raise ModelError(f"{path}: not a model catalogue of format {CATALOGUE_FORMAT}")
    base = _check_base_url(data.get("base_url", ""), f"base_url in {path}")
    entries, seen = [], set()
    for i, raw in enumerate(data.get("packages") or []):
        what = f"{path}: package {i + 1}"
        if not isinstance(raw, dict):
            raise ModelError(f"{what} must be a JSON object")
        missing = [k for k in _ENTRY_KEYS if k not in raw]
        if missing:
            raise ModelError(f"{what} ({raw.get('name', '?')}) lacks {', '.join(missing)}")
        name = str(raw["name"])
        if not _NAME_RE.match(name) or name in seen:
            raise ModelError(f"{what}: {name!r} is not a usable package name, or is listed twice")
        sha = str(raw["sha256"]).lower()
        size = raw["size"]
        if not _HEX_RE.match(sha) or isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ModelError(f"{what} ({name}): sha256 must be 64 hexadecimal digits and size a positive byte count")
        organs = raw["organs"]
        if not isinstance(organs, list) or not organs or not all(isinstance(o, str) for o in organs):
            raise ModelError(f"{what} ({name}): organs must be a non-empty list of names")
        url = str(raw["url"])
        if not url or urlsplit(url).scheme not in ("", "http", "https"):
            raise ModelError(f"{what} ({name}): url must be a file name relative to the base URL, or an http(s) URL")
        seen.add(name)
        entries.append(CatalogueEntry(name, str(raw["version"]), str(raw["method"]), str(raw["modality"]),
                                      tuple(organs), url, sha, size, str(raw.get("description", ""))))
    return Catalogue(path, base, tuple(entries))


# -- the base URL: argument, environment, setting, catalogue ------------------------------------------


def settings_path() -> Path:
    """``$MEDDIFFSEG_HOME/settings.json``: the user's settings (a JSON object)."""
    return meddiffseg_home() / "settings.json"


def read_settings() -> dict[str, Any]:
    path = settings_path()
    return read_json_object(path, ModelError, shown=f"the settings {path}") if path.is_file() else {}


def write_setting(key: str, value: Any) -> Path:
    """Set (``value`` not None) or remove (None) one setting; written to a temp name, then renamed."""
    settings = read_settings()
    if value is None:
        settings.pop(key, None)
    else:
        settings[key] = value
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".settings.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(settings, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ModelError(f"cannot write the settings {path}: {exc.strerror or exc}") from None
    return path


def set_catalogue_url(url: str | None) -> Path:
    """Store the catalogue's base URL in the settings (None: remove it, back to the catalogue's own)."""
    return write_setting(CATALOGUE_URL_SETTING, None if url is None else _check_base_url(url, "the setting"))


def catalogue_base_url(base_url: str | None = None, catalogue: Catalogue | None = None) -> tuple[str, str]:
    """``(base URL, where it comes from)``: the argument, ``$MEDDIFFSEG_CATALOGUE_URL``, the setting, or the catalogue."""
    if base_url:
        return _check_base_url(base_url, "given"), "the URL given"
    env = os.environ.get(CATALOGUE_URL_ENV, "").strip()
    if env:
        return _check_base_url(env, f"${CATALOGUE_URL_ENV}"), f"${CATALOGUE_URL_ENV}"
    setting = read_settings().get(CATALOGUE_URL_SETTING)
    if setting:
        return _check_base_url(setting, f"{CATALOGUE_URL_SETTING} in {settings_path()}"), f"the setting in {settings_path()}"
    catalogue = catalogue or load_catalogue()
    return catalogue.base_url, f"base_url in {catalogue.path.name}"


def is_placeholder(url: str) -> bool:
    """Whether ``url`` is on a reserved placeholder host (``*.example``), where no server answers."""
    host = (urlsplit(url).hostname or "").lower()
    return host == PLACEHOLDER_DOMAIN[1:] or host.endswith(PLACEHOLDER_DOMAIN)


# -- installing --------------------------------------------------------------------------------------


def install_from_catalogue(name: str, *, base_url: str | None = None, force: bool = False,
                           progress: ProgressCallback | None = None, should_cancel: Callable[[], bool] | None = None,
                           full_check: bool = True, catalogue: Catalogue | None = None) -> PackageInfo:
    """Download catalogue package ``name`` and install it into the user models folder.

    The zip must have the entry's size and sha256 (checked while it streams, before it is opened), and
    hold the entry's package name and version. ``force`` replaces an installed user package of that
    name. Errors are :class:`ModelError` (the download's name the URL and where the base URL came
    from); a cancel is :class:`~MedDiffSegLib.errors.Cancelled`. Nothing is left half-installed.
    """
    catalogue = catalogue or load_catalogue()
    entry = catalogue.entry(name)
    installed = user_models_dir() / entry.name
    if not force and (installed.exists() or installed.is_symlink()):  # say so before downloading
        raise ModelError(f"model {entry.name!r} is already installed at {installed}; use --force to replace it")
    base, source = catalogue_base_url(base_url, catalogue)
    url = entry.download_url(base)
    if is_placeholder(url):
        raise ModelError(f"the model catalogue has no download server yet: {url} (base URL from {source}) is a "
                         f"placeholder. Set ${CATALOGUE_URL_ENV}, or 'meddiffseg models catalogue --set-url URL', to a "
                         f"server or mirror that holds {entry.url}")
    try:
        return install_package(url, sha256=entry.sha256, force=force, progress=progress, should_cancel=should_cancel,
                               full_check=full_check, expect_name=entry.name, expect_version=entry.version,
                               expect_size=entry.size)
    except NetworkError as exc:
        raise ModelError(f"{exc} (catalogue base URL {base}, from {source}; a hospital mirror is set with "
                         f"${CATALOGUE_URL_ENV} or 'meddiffseg models catalogue --set-url URL')") from None


def catalogue_entry_for(folder: str | os.PathLike, url: str | None = None) -> dict[str, Any]:
    """The catalogue entry of the package in ``folder``: its metadata, and the sha256 and size of the zip
    :func:`~.store.export_zip` writes for it (written to a temporary folder, then deleted). ``url``
    defaults to ``<name>-<version>.zip``."""
    info = read_package_info(folder)
    with tempfile.TemporaryDirectory(prefix="meddiffseg-catalogue-") as tmp:
        zip_path = export_zip(info, Path(tmp) / f"{info.name}-{info.version}.zip")
        sha, size = sha256_file(zip_path), zip_path.stat().st_size
    entry = CatalogueEntry(info.name, info.version, info.method_name, info.modality, tuple(info.organ_names),
                           url or f"{info.name}-{info.version}.zip", sha, size, info.description)
    return entry.to_dict()


__all__ = [
    "CATALOGUE_FILE", "CATALOGUE_URL_ENV", "Catalogue", "CatalogueEntry", "catalogue_base_url", "catalogue_entry_for",
    "install_from_catalogue", "is_placeholder", "load_catalogue", "read_settings", "set_catalogue_url",
    "settings_path", "write_setting",
]
