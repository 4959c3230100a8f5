"""Cohorts: segment many studies with one model, resumable, on Ray workers or in-process (``meddiffseg batch``).

- :func:`run_batch` (:mod:`.batch`): the whole batch, from INPUTS to ``DIR/<id>/`` and ``DIR/batch.csv``;
- :func:`discover` (:mod:`.inputs`): the studies of a folder of volumes, of DICOM series, or a CSV;
- :class:`StudySegmenter` (:mod:`.segmenter`): one worker, the model loaded once, study after study;
- :mod:`.ray_engine`: the Ray actors and their supervision (needs ``pip install 'meddiffseg[cluster]'``);
- :mod:`.table`: ``batch.csv``.

Ray is imported only when a batch runs on it; the rest imports neither Ray nor torch.
"""

from .batch import BatchReport, run_batch
from .inputs import Study, discover
from .segmenter import DEFAULT_MAX_VOXELS, BatchSettings, StudySegmenter

__all__ = ["DEFAULT_MAX_VOXELS", "BatchReport", "BatchSettings", "Study", "StudySegmenter", "discover", "run_batch"]
