"""Evaluation: per-organ Dice, HD95 and ASSD in mm (MONAI), uncertainty AUROC and calibration (ECE)."""

from .evaluate import (
    LabelSpec,
    evaluate,
    format_report,
    geometry_differences,
    on_reference_grid,
    parse_label_specs,
    same_physical_grid,
    to_json_ready,
)
from .metrics import CONVENTIONS, OrganScore, mask_metrics, organ_score, summarise
from .uncertainty import auroc, calibration

__all__ = [
    "CONVENTIONS", "LabelSpec", "OrganScore", "auroc", "calibration", "evaluate", "format_report",
    "geometry_differences", "mask_metrics", "on_reference_grid", "organ_score", "parse_label_specs",
    "same_physical_grid", "summarise", "to_json_ready",
]
