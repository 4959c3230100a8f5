from .package import DEFAULT_INFERENCE, ModelPackage, Organ, save_package, sha256_file
from .store import (
    DEFAULT_MODEL,
    DEFAULT_MODELS,
    FALLBACK_MODELS,
    builtin_models_dir,
    default_model_for,
    export_zip,
    install_zip,
    list_packages,
    meddiffseg_home,
    models_for_modality,
    package_origin,
    resolve_model,
    scan_packages,
    user_models_dir,
)

__all__ = [
    "DEFAULT_INFERENCE", "ModelPackage", "Organ", "save_package", "sha256_file",
    "DEFAULT_MODEL", "DEFAULT_MODELS", "FALLBACK_MODELS", "builtin_models_dir", "default_model_for",
    "export_zip", "install_zip", "list_packages", "meddiffseg_home", "models_for_modality", "package_origin",
    "resolve_model", "scan_packages", "user_models_dir",
]
