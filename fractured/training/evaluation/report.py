"""metrics.json and report.md: the record of an evaluation and its reading copy.

metrics.json holds every number (with intervals, operating points and what model and
data they describe) for tools and for comparing runs; report.md is for people, with the
headline tables and the plots next to each other. A model that was never trained gets
a banner no reader can miss: its plots look like results and are not.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fractured.training.evaluation.node_report import node_markdown

UNTRAINED_BANNER = (
    "> [!WARNING]\n"
    "> **UNTRAINED MODEL: THESE NUMBERS MEAN NOTHING.** The weights were never trained, "
    "so every metric, curve and operating point below describes random output. Do not use "
    "them to judge, compare or deploy anything.")
_RESERVED = ("title", "created", "trained", "model", "data", "plots")


def write_report(out_dir: Path, *, title: str, metrics: Mapping[str, Any],
                 plots: Mapping[str, Path], model: Mapping[str, Any],
                 data: Mapping[str, Any], trained: bool) -> Path:
    """Write out_dir/metrics.json and out_dir/report.md; return the report's path.

    `data["unreadable"]` ({path, reason} each) is listed in its own section at the end;
    `data["leakage_warning"]` (groups crossing a shipped split) is a banner at the top.
    `metrics` sections the report knows, each optional: classification
    (`classification_metrics`), operating_points (`choose_operating_points`'
    description), calibration ({temperature, ece_before, ece_after}), subsets
    (`subset_metrics`), detection (`detection_metrics`), node
    (`node_assessment.NodeView.assessed`). Other sections go to
    metrics.json only. `plots` names PNGs to embed (relative links, so the folder can
    be moved or zipped); a named plot that was not written is listed as missing.
    """
    clash = sorted(set(metrics) & set(_RESERVED))
    if clash:
        raise ValueError(f"metrics must not use the report's own keys {clash}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    links = {name: Path(os.path.relpath(Path(plot).resolve(), out_dir.resolve())).as_posix()
             for name, plot in plots.items()}
    record = {"title": title, "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "trained": trained, "model": model, "data": data, "plots": links, **metrics}
    (out_dir / "metrics.json").write_text(
        json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    lines = [f"# {title}" if trained else f"# {title} (UNTRAINED MODEL)", ""]
    if not trained:
        lines += [UNTRAINED_BANNER, ""]
    if data.get("leakage_warning"):
        lines += [f"> [!WARNING]\n> **Leakage:** {data['leakage_warning']}.", ""]
    lines += [f"Generated {record['created']}; every number is in `metrics.json`.", ""]
    unreadable = data.get("unreadable") or []
    shown = {key: value for key, value in data.items() if key != "unreadable"}
    if unreadable:
        shown["unreadable"] = f"{len(unreadable)} images left out (listed below)"
    lines += _key_values("Model", model) + _key_values("Data", shown)
    if "classification" in metrics:
        lines += _classification(metrics["classification"])
    if "operating_points" in metrics:
        lines += _operating_points(metrics["operating_points"])
    if "calibration" in metrics:
        lines += _calibration(metrics["calibration"])
    if "fusion" in metrics:
        lines += _fusion(metrics["fusion"])
    if "quantization" in metrics:
        lines += _quantization(metrics["quantization"])
    if metrics.get("subsets"):
        lines += _subsets(metrics["subsets"])
    if "detection" in metrics:
        lines += _detection(metrics["detection"])
    if "node" in metrics:
        lines += node_markdown(metrics["node"])
    lines += _plots(out_dir, plots, links)
    lines += _unreadable(unreadable)
    report = out_dir / "report.md"
    report.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return report


def _classification(result: Mapping[str, Any]) -> list[str]:
    confusion = result["confusion"]
    ci = result.get("roc_auc_ci95")
    lines = [f"## Classification ({result['n']} images, {result['positives']} with fracture)", ""]
    lines += _note(result)
    lines += [f"Calls are `probability >= {_number(result['threshold'])}`.", ""]
    lines += _table(("Metric", "Value", "95 % CI"), [
        ("ROC AUC", _number(result["roc_auc"]),
         f"{_number(ci[0])}-{_number(ci[1])} ({result['bootstrap']} stratified bootstraps)"
         if ci else "-"),
        ("Average precision", _number(result["average_precision"]), ""),
        ("Sensitivity (recall)", _share(result["sensitivity"], confusion["tp"],
                                        result["positives"]), ""),
        ("Specificity", _share(result["specificity"], confusion["tn"], result["negatives"]), ""),
        ("Precision (PPV)", _share(result["precision"], confusion["tp"],
                                   confusion["tp"] + confusion["fp"]), ""),
        ("Accuracy", _share(result["accuracy"], confusion["tp"] + confusion["tn"], result["n"]),
         ""),
        ("F1", _number(result["f1"]), ""),
        ("Cohen's kappa", _number(result["kappa"]), ""),
    ])
    lines += ["### Confusion matrix", ""]
    lines += _table(("", "Called fracture", "Called no fracture"), [
        ("Fracture", str(confusion["tp"]), str(confusion["fn"])),
        ("No fracture", str(confusion["fp"]), str(confusion["tn"])),
    ])
    fixed = [(f"specificity >= {_percent(point['target'])}", point)
             for point in result.get("sensitivity_at_specificity") or ()]
    fixed += [(f"sensitivity >= {_percent(point['target'])}", point)
              for point in result.get("specificity_at_sensitivity") or ()]
    if fixed:
        lines += ["### Fixed sensitivity and specificity", ""]
        lines += _table(("Target", "Threshold", "Sensitivity", "Specificity"), [
            (target, _number(point["threshold"]), _percent(point["sensitivity"]),
             _percent(point["specificity"])) for target, point in fixed])
    return lines


def _operating_points(description: Mapping[str, Any]) -> list[str]:
    lines = ["## Operating points", ""]
    lines += _note(description)
    rows = [(label, _number(point["threshold"]), _percent(point["target"]),
             _percent(point["sensitivity"]), _percent(point["specificity"]))
            for label, point in (("High sensitivity (possible fracture)",
                                  description["high_sensitivity"]),
                                 ("High specificity (likely fracture)",
                                  description["high_specificity"]))]
    return lines + _table(("Point", "Threshold", "Target", "Sensitivity", "Specificity"), rows)


def _calibration(result: Mapping[str, Any]) -> list[str]:
    row = (_number(result.get("logit_shift")), _number(result.get("temperature")),
           _number(result.get("ece_before")), _number(result.get("ece_after")))
    formula = result.get("formula") or ("probability = sigmoid((logit + shift) / "
                                         "temperature), fitted on validation")
    return ["## Calibration", "", f"{formula[0].upper()}{formula[1:]}.", "",
            *_table(("Logit shift", "Temperature", "ECE before", "ECE after"), [row])]


def _fusion(result: Mapping[str, Any]) -> list[str]:
    """`fractured fuse`: the weights, and the AUC of the classifier alone against the
    fused probability on each part, with the paired interval of the difference."""
    weights, fitted = result["weights"], result["fitted_on"]
    lines = ["## Fusion with the detector's best box score", "",
             f"Fitted on {fitted['n']} validation images ({fitted['positives']} with "
             f"fracture) of {result['source']}: logit weight "
             f"{_number(weights['logit_weight'])}, box-score weight "
             f"{_number(weights['box_weight'])}, intercept {_number(weights['intercept'])}.",
             ""]
    return lines + _auc_comparison(result["auc"], "classifier alone", "fused")


def _quantization(result: Mapping[str, Any]) -> list[str]:
    """`fractured quantize`: the source's AUC against the INT8 graphs', and how far the
    INT8 graphs moved each image's numbers and decisions."""
    calibration = result["calibration"]
    lines = ["## INT8 quantization", "",
             f"The {' and '.join(result['models'])} of {result['source']}: "
             f"{result['method']}; ranges from {calibration['images']} training images "
             f"(ONNX Runtime {result['onnxruntime']}). Refused beyond a validation AUC drop "
             f"of {result['max_auc_drop']:g}.", ""]
    lines += _auc_comparison(result["auc"], "source", "INT8")
    rows = [(part, str(changed["images"]),
             " / ".join(str(n) for n in changed["decisions_changed"].values()),
             _number(changed["max_probability_change"]), _number(changed["max_logit_change"]),
             _number(changed["max_box_score_change"]))
            for part, changed in result["changes"].items()]
    lines += _table(("Images", "n", "Decisions changed (possible / likely)",
                     "Largest change: probability", "logit", "best box score"), rows)
    parts = {"validation": result.get("detection_validation") or {},
             "test": result.get("detection") or {}}
    rows = [(f"{name}, {part}", _number(scores["ap50"]), _number(scores["ap50_95"]),
             _number(scores["froc_score"]), _percent(scores["lesion_sensitivity"]))
            for part, detectors in parts.items() for name, scores in detectors.items()]
    if rows:
        lines += _table(("Detector", "AP@0.5", "AP@[.5:.95]", "FROC score",
                         "Lesion sensitivity"), rows)
    return lines


def _auc_comparison(comparison: Mapping[str, Mapping[str, Any]], before: str,
                    after: str) -> list[str]:
    """Two scores' AUC on the same images, and the paired interval of the difference."""
    rows = []
    for part, auc in comparison.items():
        ci = auc.get("difference_ci95")
        rows.append((part, str(auc["n"]), str(auc["positives"]), _number(auc["before"]),
                     _number(auc["after"]), _signed(auc["difference"]),
                     f"{_signed(ci[0])} to {_signed(ci[1])}" if ci else "-"))
    header = ("Images", "n", "Fractures", f"AUC, {before}", f"AUC, {after}", "Difference",
              "95 % CI (paired)")
    return _table(header, rows)


def _subsets(subsets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = []
    for name, result in subsets.items():
        ci = result.get("roc_auc_ci95")
        auc = _number(result["roc_auc"]) + (f" ({_number(ci[0])}-{_number(ci[1])})" if ci else "")
        rows.append((name, str(result["n"]), str(result["positives"]), auc,
                     _percent(result["sensitivity"]), _percent(result["specificity"]),
                     result.get("note") or ""))
    header = ("Subset", "Images", "Fractures", "ROC AUC (95 % CI)", "Sensitivity",
              "Specificity", "Note")
    return ["## Subsets", "", *_table(header, rows)]


def _detection(result: Mapping[str, Any]) -> list[str]:
    lines = [f"## Detector ({result['images']} images, {result['images_with_fracture']} with "
             f"fracture, {result['gt_boxes']} true boxes, {result['predictions']} predicted)", ""]
    lines += _note(result)
    lines += _table(("Metric", "Value"), [
        ("AP@0.5", _number(result["ap50"])),
        ("AP@[.5:.95]", _number(result["ap50_95"])),
        ("FROC score (mean recall at the levels below)", _number(result["froc_score"])),
        ("Lesion sensitivity (every box)", _percent(result["lesion_sensitivity"])),
        ("Image sensitivity (every box)", _percent(result["image_sensitivity"])),
    ])
    if result.get("froc"):
        lines += ["### FROC", ""]
        lines += _table(("False positives per image", "Lesion recall"),
                        [(f"{level['fppi']:g}", _percent(level["recall"]))
                         for level in result["froc"]])
    at = result.get("at_threshold")
    if at:
        lines += [f"### At score >= {_number(at['threshold'])}", ""]
        lines += _table(("Lesion sensitivity", "Image sensitivity", "False positives per image"),
                        [(_percent(at["lesion_sensitivity"]), _percent(at["image_sensitivity"]),
                          _number(at["false_positives_per_image"]))])
    return lines


def _plots(out_dir: Path, plots: Mapping[str, Path], links: Mapping[str, str]) -> list[str]:
    if not plots:
        return []
    lines = ["## Plots", ""]
    for name, link in links.items():
        if (out_dir / link).is_file():
            lines += [f"### {name}", "", f"![{name}]({link})", ""]
        else:
            lines += [f"### {name}", "", f"_missing: {plots[name]} was not written_", ""]
    return lines


def _unreadable(items: Sequence[Mapping[str, str]]) -> list[str]:
    """The images no metric counts because they could not be decoded, each with why."""
    if not items:
        return []
    lines = [f"## Left out: {len(items)} unreadable images", "",
             "These files could not be decoded, so no number above includes them.", ""]
    return lines + _table(("Image", "Reason"), [(item["path"], item["reason"]) for item in items])


def _key_values(heading: str, values: Mapping[str, Any]) -> list[str]:
    if not values:
        return []
    rows = [(str(key), _inline(value)) for key, value in values.items()]
    return [f"## {heading}", "", *_table(("Field", "Value"), rows)]


def _inline(value: Any) -> str:
    """A table cell for a value: mappings as `key: value` pairs, lists comma-separated."""
    if isinstance(value, Mapping):
        return "; ".join(f"{key}: {_inline(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_inline(item) for item in value)
    return str(jsonable(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def row(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [row(header), row(["---"] * len(header)), *map(row, rows), ""]


def _note(result: Mapping[str, Any]) -> list[str]:
    return [f"_Note: {result['note']}_", ""] if result.get("note") else []


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _share(value: float | None, numerator: int, denominator: int) -> str:
    return "-" if value is None else f"{_percent(value)} ({numerator}/{denominator})"


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays, paths, dataclasses and tuples
    converted, NaN and infinity as null (strict JSON has neither)."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, np.ndarray | list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
