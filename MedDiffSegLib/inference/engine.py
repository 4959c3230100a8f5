"""The volume engine (method-agnostic). CONTRACT — implementation pending (helper C).

segment_volume(image, package, organs, *, samples=None, steps=None, seed=0, device="cpu",
               scheduler=None, staple=False, largest_component=False,
               keep_probabilities=False, method=None, chunk_slices=None,
               progress=None, should_cancel=None) -> SegmentationResult
"""
