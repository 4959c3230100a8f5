from .package import DEFAULT_INFERENCE, ModelPackage, Organ, save_package, sha256_file
from .store import (
    DEFAULT_MODEL,
    builtin_models_dir,
    export_zip,
    install_zip,
    list_packages,
    meddiffseg_home,
    package_origin,
    resolve_model,
    scan_packages,
    user_models_dir,
)

__all__ = [
    "DEFAULT_INFERENCE", "ModelPackage", "Organ", "save_package", "sha256_file",
    "DEFAULT_MODEL", "builtin_models_dir", "export_zip", "install_zip", "list_packages",
    "meddiffseg_home", "package_origin", "resolve_model", "scan_packages", "user_models_dir",
]
