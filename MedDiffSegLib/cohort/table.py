"""``DIR/batch.csv``: one row per study, rewritten atomically as studies finish.

Columns: ``id``, ``path``, ``status`` (``ok``: segmented by this run; ``skipped``: complete outputs
of the same model and settings were already there; ``error``; ``cancelled``: stopped by a cancel,
nothing written; ``pending``: not run, the batch stopped first), ``error``, ``seconds`` (the study's
wall time in its worker, model load included for a worker's first study), ``worker``
(``<label>@<host>:<pid>``), ``attempts`` (more than 1 when a worker died during it), ``model`` and
``modality`` (of the input, with where it came from), then per requested organ, in ``--organ``
order: ``<organ>_volume_ml``, ``<organ>_mean_uncertainty`` (empty for an empty mask or one
sample), ``<organ>_review`` (where the organ probably continues unsegmented, the summary's
``possible_continuation``) and ``<organ>_review_slice`` (the slice to look at first: the strongest
possible miss, else the most uncertain slice), and ``modality_overridden``.

A skipped study's figures come from its ``summary.json``; its ``seconds``, ``worker`` and
``attempts`` from the previous table, when that has them.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..uncertainty.continuation import describe_run
from .inputs import Study

TABLE = "batch.csv"
STATUSES = ("ok", "skipped", "error", "cancelled", "pending")
BASE_COLUMNS = ("id", "path", "status", "error", "seconds", "worker", "attempts", "model", "modality")
ORGAN_COLUMNS = ("volume_ml", "mean_uncertainty", "review", "review_slice")


def organ_key(organ: str) -> str:
    """An organ as given to ``--organ``, as the start of its column names (``portal vein`` -> ``portal_vein``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", organ.strip()).strip("_").lower() or "organ"


def columns(organs: Sequence[str]) -> list[str]:
    cols = list(BASE_COLUMNS)
    for organ in organs:
        cols += [f"{organ_key(organ)}_{c}" for c in ORGAN_COLUMNS]
    return cols + ["modality_overridden"]


def _review_slice(organ: dict, samples: int | None) -> int | None:
    runs = [r for r in organ.get("possible_continuation") or [] if r.get("peak_slice") is not None]
    if runs:
        return int(max(runs, key=lambda r: max(r.get("area_mm2") or [0.0]))["peak_slice"])
    if (samples or 0) > 1 and organ.get("max_uncertainty_slice") is not None:
        return int(organ["max_uncertainty_slice"])
    return None


def row(study: Study, organs: Sequence[str], *, status: str, error: str = "", seconds: float | None = None,
        worker: str = "", attempts: int | None = None, summary: dict | None = None) -> dict[str, str]:
    """The table row of ``study``; figures from ``summary`` (labels in ``organs`` order, as ``segment`` writes)."""
    assert status in STATUSES, status
    r = {c: "" for c in columns(organs)}
    r.update(id=study.id, path=str(study.path), status=status, error=" ".join(str(error).split()),
             seconds="" if seconds is None else f"{seconds:.2f}", worker=worker,
             attempts="" if not attempts else str(attempts))
    if summary:
        model = summary.get("model") or {}
        r["model"] = f"{model.get('name', '')} {model.get('version', '')}".strip()
        inp = summary.get("input") or {}
        if inp.get("modality"):
            r["modality"] = f"{inp['modality']} ({inp.get('modality_source') or '?'})"
        samples = (summary.get("settings") or {}).get("samples")
        by_label = {o.get("label"): o for o in summary.get("organs") or []}
        for label, organ in enumerate(organs, start=1):
            o, key = by_label.get(label), organ_key(organ)
            if o is None:
                continue
            r[f"{key}_volume_ml"] = f"{float(o['volume_ml']):.3f}"
            if o.get("mean_uncertainty") is not None:
                r[f"{key}_mean_uncertainty"] = f"{float(o['mean_uncertainty']):.6g}"
            r[f"{key}_review"] = "; ".join(describe_run(run, o.get("slice_axis_ijk")) for run in o.get("possible_continuation") or [])
            target = _review_slice(o, samples)
            r[f"{key}_review_slice"] = "" if target is None else str(target)
        r["modality_overridden"] = "yes" if (summary.get("modality_check") or {}).get("overridden") else "no"
    return r


def write_table(out_dir: Path, rows: Sequence[dict[str, str]], organs: Sequence[str]) -> Path:
    """Write ``out_dir/batch.csv`` through a temporary file and a rename: it is always a complete table."""
    path = Path(out_dir) / TABLE
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(organs), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{TABLE}.", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_table(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The rows of an earlier ``batch.csv`` by id ({} when there is none or it cannot be read)."""
    try:
        with open(Path(out_dir) / TABLE, encoding="utf-8", newline="") as fh:
            return {r["id"]: r for r in csv.DictReader(fh) if r.get("id")}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return {}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
