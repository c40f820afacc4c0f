"""The manifest's `training` record: what a bundle says of how its models were made.

Free-form by design (the manifest keeps it as an opaque mapping; the model card reads
it): a checkpoint's training summary, the held-out scores of a `fractured evaluate` or
`fuse`/`quantize` report, joined where a bundle takes one model from another bundle,
and the development notes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fractured.training.export import BuildError

#: a held-out summary's detector part
_BOX_SCORES = ("detection", "detection_report")


def training_summary(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """What the manifest and model card say about a model's training."""
    kind = state["kind"]
    provenance = state.get("provenance", {})
    settings = state["settings"][kind]
    members = {"ensemble": state["ensemble"]} if "ensemble" in state else {}
    return members | {
        "checkpoint": str(path),
        "epoch": state["epoch"],
        "best_metric": settings["best_metric"],
        "initial_weights": settings["initial_weights"],
        **({"pretrained": provenance["pretrained"]} if provenance.get("pretrained") else {}),
        "validation": state.get("metrics", {}),
        "achieved_on_val": state["calibration"].get("achieved_on_val", {}),
        # the shift is already in the weights; recorded so a reader knows it was applied
        "logit_shift": state["calibration"].get("logit_shift", 0.0),
        "data": {key: provenance.get(key) for key in (
            "dataset", "format", "images", "train_images", "train_positive",
            "val_images", "val_positive", "body_parts")}
        | {"unreadable": len(provenance.get("unreadable", ())),
           "split_csv_sha256": _split_sha(provenance)},
        "settings": settings,
    }


def _split_sha(provenance: dict[str, Any]) -> str | None:
    """The csv_sha256 of the split a model was trained on, where its folder is still
    there: what `fractured region-check --split` checks a split against."""
    from fractured.training.datasets import DatasetError
    from fractured.training.splits import read_written

    try:
        return str(read_written(provenance["split"])[0]["csv_sha256"])
    except (KeyError, OSError, DatasetError, ValueError):
        return None


def evaluation_summary(path: Path, checkpoints: dict[str, Path]) -> dict[str, Any]:
    """`held_out_summary` of a `fractured evaluate` report of these very checkpoints."""
    path = Path(path)
    metrics_file = path / "metrics.json" if path.is_dir() else path
    try:
        report = json.loads(metrics_file.read_text(encoding="utf-8"))
        model = report["model"]
        for kind, checkpoint_path in checkpoints.items():
            evaluated = (model.get(kind) or {}).get("checkpoint")
            if evaluated is None or Path(evaluated).resolve() != checkpoint_path.resolve():
                raise BuildError(f"{metrics_file}: evaluates {kind} {evaluated}, not "
                                 f"{checkpoint_path}; run fractured evaluate on this run first")
        return held_out_summary(report, metrics_file)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BuildError(f"{metrics_file}: not a fractured evaluate metrics.json "
                         f"({exc})") from exc


def held_out_summary(report: dict[str, Any], source: Path) -> dict[str, Any]:
    """What the manifest keeps of an evaluation report (`fractured evaluate`'s, or the
    one `fractured fuse` writes) read from `source`: the split, the image-level scores
    with their confidence intervals, the operating points as reached there, the
    calibration error, every subset, the detector's AP and FROC, and what the node
    shows per body region where the report assessed it (fuse, quantize)."""
    data = report["data"]
    scores = report.get("classification") or {}  # absent for a detector-only run

    def image_level(part: dict[str, Any]) -> dict[str, Any]:
        return {key: part.get(key) for key in (
            "n", "positives", "roc_auc", "roc_auc_ci95", "average_precision", "note")}

    summary: dict[str, Any] = {
        "report": str(source), "created": report.get("created"),
        "split": data.get("split"), "images": data.get("images"),
        "fracture": data.get("fracture"), "unreadable": len(data.get("unreadable") or ()),
        "classification": image_level(scores),
        "operating_points": {
            name: {key: point.get(key) for key in ("threshold", "sensitivity", "specificity")}
            for name, point in (report.get("operating_points") or {}).items()
            if isinstance(point, dict)},
        "ece_after": (report.get("calibration") or {}).get("ece_after"),
        "subsets": {name: image_level(part)
                    for name, part in (report.get("subsets") or {}).items()},
    }
    if report.get("node"):
        summary["node"] = report["node"]
    detection = report.get("detection")
    if detection:
        summary["detection_report"] = str(source)
        summary["detection"] = {key: detection.get(key) for key in (
            "images", "gt_boxes", "ap50", "ap50_95", "froc_score", "lesion_sensitivity",
            "at_threshold", "note")}
    return summary


def joined_held_out(classification: dict[str, Any] | None,
                    boxes: dict[str, Any] | None) -> dict[str, Any]:
    """One held-out summary from the classifier part of one and the box part of another
    (a bundle that takes one of its models from another bundle)."""
    return ({key: value for key, value in (classification or {}).items()
             if key not in _BOX_SCORES}
            | {key: value for key, value in (boxes or {}).items() if key in _BOX_SCORES})


def read_notes(path: Path) -> str:
    """The development notes' Markdown (what was tried, its effect), for the card."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: cannot read the notes ({exc})") from exc
    if not text:
        raise BuildError(f"{path}: the notes file is empty")
    return text
