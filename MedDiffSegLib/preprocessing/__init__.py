from .spec import PreprocessSpec, normalise_intensity, resample_inplane, inplane_size

__all__ = ["PreprocessSpec", "normalise_intensity", "resample_inplane", "inplane_size"]
