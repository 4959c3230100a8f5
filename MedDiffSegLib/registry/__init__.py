"""Model packages: reading, finding, installing, updating and removing them.

Importing this package does not import torch: :mod:`.store` (finding, installing, the torch-free
:class:`~.store.PackageInfo`) is loaded at once, :mod:`.package` (``ModelPackage``, ``Organ``,
``save_package``, which need the preprocessing spec and so torch) on first use of one of its
names. ``from MedDiffSegLib.registry import ModelPackage`` works as before. :mod:`.card` turns what a
``model.json`` records into short text (scores, training data) for ``models info`` and the Slicer module.
:mod:`.catalogue` lists the packages published as zips (not shipped with the Slicer extension) and
installs them by name from a configurable base URL (a hospital's mirror).
"""

from .store import (
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    FALLBACK_MODELS,
    OrganInfo,
    PackageInfo,
    builtin_models_dir,
    default_model_for,
    default_package_info,
    download,
    export_zip,
    install_package,
    install_zip,
    list_package_infos,
    list_packages,
    meddiffseg_home,
    models_for_modality,
    package_info,
    package_origin,
    read_package_info,
    remove_package,
    resolve_model,
    scan_package_infos,
    scan_packages,
    sha256_file,
    update_package,
    user_models_dir,
)
from .catalogue import install_from_catalogue, load_catalogue

#: Names served by :mod:`.package`, imported when first asked for (it imports torch).
_FROM_PACKAGE = ("DEFAULT_INFERENCE", "ModelPackage", "Organ", "save_package")


def __getattr__(name: str):
    if name in _FROM_PACKAGE:
        from . import package

        value = getattr(package, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_PACKAGE))


__all__ = [
    "DEFAULT_INFERENCE", "ModelPackage", "Organ", "save_package", "sha256_file",
    "DEFAULT_MODEL", "DEFAULT_MODELS", "FALLBACK_MODELS", "OrganInfo", "PackageInfo", "builtin_models_dir",
    "default_model_for", "default_package_info", "download", "export_zip", "install_package", "install_zip",
    "list_package_infos", "list_packages", "meddiffseg_home", "models_for_modality", "package_info",
    "package_origin", "read_package_info", "remove_package", "resolve_model", "scan_package_infos",
    "scan_packages", "update_package", "user_models_dir", "install_from_catalogue", "load_catalogue",
]
