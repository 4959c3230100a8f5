from .package import DEFAULT_INFERENCE, ModelPackage, Organ, save_package, sha256_file

__all__ = ["DEFAULT_INFERENCE", "ModelPackage", "Organ", "save_package", "sha256_file"]
