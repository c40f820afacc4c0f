"""`fractured evaluate`: the numbers, plots and report ML staff judge a model by.

Everything here works on plain numpy arrays (labels, probabilities, boxes), so the
metrics can be tested against hand-computed answers without a model, and the same code
scores any model the lead wires in. Results are JSON-ready dicts: metrics.json is the
record, report.md the reading copy.
"""

from __future__ import annotations

from fractured.training.evaluation.calibration import (
    RegionRule,
    choose_operating_points,
    choose_region_operating_points,
    expected_calibration_error,
    fit_temperature,
    reliability_curve,
)
from fractured.training.evaluation.classification import (
    classification_metrics,
    paired_auc_difference,
    subset_metrics,
)
from fractured.training.evaluation.detection import detection_metrics
from fractured.training.evaluation.report import write_report

__all__ = [
    "RegionRule",
    "choose_operating_points",
    "choose_region_operating_points",
    "classification_metrics",
    "detection_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "paired_auc_difference",
    "reliability_curve",
    "subset_metrics",
    "write_report",
]
