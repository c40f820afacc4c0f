"""`fractured fuse`: the detector's best box score joined to the classifier's probability.

A box detector that is confident of a box somewhere on an image knows something an
image classifier may miss; on FracAtlas a logistic regression of the two lifted the
held-out AUC of the shipped classifier (docs/training/fracatlas-ensemble/NOTES.md). This
module fits that regression for a bundle that has both models and scores it:

- the two numbers per image (the calibrated classifier logit and the best box score)
  come from the node's own `Pipeline.evidence` on the bundle's graphs, so the weights
  are fitted on exactly what the node will compute;
- they are fitted on the validation part of the split the classifier was trained with
  (refused when the split's counts differ from the bundle's training record: fitting on
  training images would flatter the fusion), and the two operating points are chosen
  again on the fused probability with the classifier's own targets, and so are those
  per body region where the validation images have one (the source's, fitted on the
  unfused probability, would mean other things on the fused one);
- the test part is scored as `fractured evaluate` scores a run (metrics.json, report.md,
  plots, predictions.csv), the classifier alone beside it and a paired bootstrap
  interval of the AUC difference, so ML staff see whether fusion helped on images it
  was not fitted on before they roll the bundle out.

`build.build_fused_bundle` writes the new bundle (the same model files, a manifest with
`classifier.fusion`); `Fusion` in engine.bundle is the formula both sides use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from sklearn.linear_model import LogisticRegression

from fractured.engine.bundle import Bundle, Fusion, sigmoid
from fractured.engine.pipeline import Pipeline
from fractured.training.bundle_scoring import (
    PREDICTIONS_FILE,
    VALIDATION_FILE,
    Reference,
    masks_for,
    measure,
    open_split,
    write_rows,
    write_test_report,
)
from fractured.training.evaluation import choose_operating_points, paired_auc_difference
from fractured.training.evaluation.calibration import (
    expected_flag_rates,
    fit_region_points,
    points_rule,
)
from fractured.training.export import BuildError
from fractured.training.node_assessment import NodeView, check_fitted_on_val

log = structlog.get_logger()

#: Inverse L2 strength of the regression (scikit-learn's default, stated): three
#: parameters fitted on hundreds of images need little of it, and it keeps the weights
#: finite on a validation set the two scores separate perfectly.
REGULARISATION_C = 1.0


@dataclass(frozen=True)
class FusionResult:
    """What `fuse` found: the weights, the operating points on the fused probability,
    and the records the new bundle's manifest and model card keep."""

    source: Bundle
    fusion: Fusion
    operating_points: dict[str, float]  # high_sensitivity, high_specificity
    # the manifest's operating_points_by_region on the fused probability; {} = none
    operating_points_by_region: dict[str, dict[str, Any]]
    # the manifest's expected_flag_rates at those points, on the fused probability
    expected_flag_rates: dict[str, dict[str, Any]]
    summary: dict[str, Any]  # training.fusion of the new manifest
    report: dict[str, Any]  # the metrics.json written (for the held-out summary)
    report_path: Path


def fit_fusion(evidence: np.ndarray, labels: np.ndarray) -> Fusion:
    """The logistic regression of fracture on [calibrated logit, best box score].

    Refused (BuildError) when either weight comes out negative: a classifier whose
    fracture logit lowers the probability, or a detector whose confident boxes do, is a
    broken model or a wrong split, not something to ship with a formula that hides it.
    """
    if len(np.unique(labels)) < 2:
        raise BuildError(f"cannot fit a fusion on {len(labels)} images of one class: both "
                         "fractures and normals are needed")
    model = LogisticRegression(C=REGULARISATION_C).fit(evidence, labels)
    logit_weight, box_weight = (float(w) for w in model.coef_[0])
    fusion = Fusion(logit_weight=logit_weight, box_weight=box_weight,
                    intercept=float(model.intercept_[0]))
    if logit_weight <= 0 or box_weight < 0:
        raise BuildError(f"the fitted fusion weighs the classifier's logit {logit_weight:.3f} "
                         f"and the box score {box_weight:.3f}: a fracture score that lowers "
                         "the probability means a broken model or the wrong split; not fused")
    return fusion


def fused_probability(fusion: Fusion, evidence: np.ndarray) -> np.ndarray:
    return sigmoid(fusion.logit(evidence[:, 0], evidence[:, 1]))


def fuse(source: Path, split_dir: Path, report_dir: Path, *, dataset: Path | None = None,
         subsets: Sequence[str] = (), bootstrap: int = 1000, backend: str = "onnxruntime",
         threads: int | None = None) -> FusionResult:
    """Fit the fusion of bundle `source` on the validation part of `split_dir` and score
    it on the test part; the report (metrics.json, report.md, plots, predictions.csv,
    validation.csv) goes to `report_dir`."""
    bundle = Bundle.load(source)
    manifest = bundle.manifest
    label = f"{manifest.name}-{manifest.version}"
    if not manifest.trained:
        raise BuildError(f"{source}: an untrained bundle has nothing to fuse")
    if manifest.detector is None:
        raise BuildError(f"{source}: has no box detector, so there is no box score to fuse")
    if manifest.classifier.fusion is not None:
        raise BuildError(f"{source}: already fused; fuse the bundle it was made from")
    split = open_split(bundle, split_dir, dataset, subsets)

    pipeline = Pipeline(bundle, backend=backend, threads=threads, boxes="always")
    log.info("fuse.start", bundle=label, backend=pipeline.backend_name,
             val=len(split.parts["val"]), test=len(split.parts["test"]))
    val = measure({label: pipeline}, split.parts["val"], desc="validation")[label]
    test = measure({label: pipeline}, split.parts["test"], desc="test")[label]
    fusion = fit_fusion(val.evidence, val.labels)
    val_prob = fused_probability(fusion, val.evidence)
    points, achieved = choose_operating_points(val.labels, val_prob, **split.targets)
    chosen = {"high_sensitivity": points.high_sensitivity,
              "high_specificity": points.high_specificity}
    by_region = fit_region_points(val.labels, val_prob,
                                  [sample.body_part for sample in val.samples], points,
                                  split.region_rule, **split.targets)
    log.info("fuse.fitted", logit_weight=round(fusion.logit_weight, 4),
             box_weight=round(fusion.box_weight, 4), intercept=round(fusion.intercept, 4),
             high_sensitivity=round(points.high_sensitivity, 4),
             high_specificity=round(points.high_specificity, 4))

    report_dir.mkdir(parents=True, exist_ok=True)
    test_prob = fused_probability(fusion, test.evidence)
    alone = sigmoid(test.evidence[:, 0])
    write_rows(report_dir / VALIDATION_FILE, val,
               {"classifier_probability": sigmoid(val.evidence[:, 0]), "probability": val_prob})
    write_rows(report_dir / PREDICTIONS_FILE, test,
               {"classifier_probability": alone, "probability": test_prob})
    comparison = {
        "validation": paired_auc_difference(val.labels, val.evidence[:, 0], val_prob,
                                            bootstrap=0),
        "test": paired_auc_difference(test.labels, test.evidence[:, 0], test_prob,
                                      bootstrap=bootstrap),
        **{f"test, {name}": paired_auc_difference(test.labels[mask], test.evidence[mask, 0],
                                                  test_prob[mask], bootstrap=bootstrap)
           for name, mask in masks_for(test, subsets).items()
           if not name.startswith("body_part")},
    }
    summary = {
        "source": label,
        "weights": {"logit_weight": fusion.logit_weight, "box_weight": fusion.box_weight,
                    "intercept": fusion.intercept},
        "regularisation_c": REGULARISATION_C,
        "fitted_on": {"split": "val", "split_source": str(split_dir), "n": len(val.labels),
                      "positives": int(val.labels.sum()), "unreadable": len(val.unreadable)},
        "achieved_on_val": achieved,
        "auc": comparison,
        "report": str(report_dir / "metrics.json"),
    }
    report = write_test_report(
        report_dir, title=f"Fusion of {label}'s classifier and detector on its test split",
        split=split, test=test, probability=test_prob,
        reference=Reference("the classifier's probability alone", alone), points=chosen,
        temperature=manifest.classifier.temperature,
        formula=f"probability = {fusion.formula()}, fitted on validation", subsets=subsets,
        bootstrap=bootstrap, sections={"fusion": summary},
        model={"bundle": str(source), "backend": pipeline.backend_name},
        data={"fitted_on": f"its val split ({len(val.labels)} readable images, "
                           f"{len(val.unreadable)} unreadable)"},
        node=NodeView(val, val_prob, points_rule(chosen, by_region or None),
                      check_fitted_on_val=check_fitted_on_val(manifest)))
    log.info("fuse.scored", report=str(report_dir / "report.md"),
             **{f"{part}_auc_{key}": round(comparison[part][key], 4)
                for part in ("validation", "test") for key in ("before", "after")
                if comparison[part][key] is not None})
    rates = expected_flag_rates(val_prob, [sample.body_part for sample in val.samples],
                                points_rule(chosen, by_region))
    return FusionResult(source=bundle, fusion=fusion, operating_points=chosen,
                        operating_points_by_region=by_region, expected_flag_rates=rates,
                        summary=summary, report=report,
                        report_path=report_dir / "metrics.json")
