"""Evaluation: per-organ Dice, HD95 and ASSD in mm (MONAI), uncertainty AUROC and calibration (ECE), near the organ too."""

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
from .uncertainty import auroc, calibration, near_band, organ_uncertainty, spearman

__all__ = [
    "CONVENTIONS", "LabelSpec", "OrganScore", "auroc", "calibration", "evaluate", "format_report",
    "geometry_differences", "mask_metrics", "near_band", "on_reference_grid", "organ_score", "organ_uncertainty",
    "parse_label_specs", "same_physical_grid", "spearman", "summarise", "to_json_ready",
]
