"""The Markdown of a node assessment (`training.node_assessment`), for report and card.

One renderer for both, so the evaluation report ML staff read and the model card the
governance committee reads cannot word the same numbers differently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The parts an assessment holds, in the order and with the names they are shown.
PARTS = {"test": "Test part alone", "validation_and_test": "Validation and test pooled"}


def node_markdown(node: Mapping[str, Any], heading: str = "##") -> list[str]:
    """Per-region decisions, boxes and heatmap peaks as the node shows them."""
    gate = node.get("gate")
    lines = [f"{heading} As the node shows it, per body region", "",
             "Each image is decided at the operating points the node applies to it: its "
             "body region's own where the bundle has them, otherwise the pooled pair "
             "(column *Points*). *Possible* is the high-sensitivity point, *likely* the "
             "high-specificity point. Boxes are drawn only on images whose decision "
             f"passes the node's box gate ([engine].boxes = \"{gate}\"). Proportions are k/n "
             "with exact (Clopper-Pearson) 95 % intervals; AUC intervals by bootstrap. The "
             "validation part chose the epoch, the temperature and the thresholds, so "
             "the pooled rows flatter the model; the test part alone does not.", ""]
    for key, title in PARTS.items():
        part = node.get(key)
        if part:
            lines += [f"**{title}** ({part['images']} images)", "", *_regions(part["regions"]),
                      *_localisation(part), ""]
    return lines


def _regions(regions: Mapping[str, Mapping[str, Any]]) -> list[str]:
    lines = ["| Region | Points | Fractures / normals | ROC AUC (95 % CI) | Possible: "
             "sensitivity | Possible: specificity | Likely: sensitivity | Likely: "
             "specificity |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in regions.items():
        low, high = row.get("roc_auc_ci95") or (None, None)
        auc = _num(row.get("roc_auc")) + (f" ({_num(low)}-{_num(high)})" if low is not None
                                          else "")
        cells = [_share(row[point][measure]) for point in ("high_sensitivity",
                                                            "high_specificity")
                 for measure in ("sensitivity", "specificity")]
        lines.append(f"| {name} | {row['points']} | {row['fractures']} / {row['normals']} | "
                     f"{auc} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _localisation(part: Mapping[str, Any]) -> list[str]:
    lines = []
    boxes = part.get("boxes")
    if boxes:
        lines.append(
            f"- Boxes drawn: they touch {_share(boxes['fracture_boxes_touched'])} of the "
            f"true fracture boxes and outline {_share(boxes['fracture_boxes_outlined'])} "
            f"(IoU >= 0.5); {_share(boxes['fractured_images_found'])} of fractured images "
            "with true boxes get a box on a fracture; "
            f"{boxes['boxes_on_normal_images']} boxes on {boxes['normal_images']} normal "
            f"images ({_num(boxes['boxes_per_normal_image'])} per normal image) and "
            f"{boxes['stray_boxes_on_fractured_images']} boxes away from the fracture on "
            "fractured images.")
    game = part.get("pointing_game") or {}
    if game.get("images"):
        lines.append(
            f"- Pointing game: the heatmap's peak falls in a true fracture box on "
            f"{_share(game['strict'])} of fractured images with boxes, within "
            f"{game['tolerance_px']:g} px of one on {_share(game['within_tolerance'])}.")
    field = part.get("peak_in_field")
    if field and field.get("n"):
        lines.append(f"- The heatmap's peak lies inside the exposed field (not on "
                     f"collimation or a border) on {_share(field)} of images.")
    studies = part.get("studies")
    if studies and studies.get("studies"):
        lines.append(
            f"- Study-level verdict (the highest level of a study's images) on "
            f"{studies['studies']} simulated studies ({studies['fractured']} fractured; "
            f"{studies['how']}): at *possible* sensitivity "
            f"{_share(studies['high_sensitivity']['sensitivity'])}, specificity "
            f"{_share(studies['high_sensitivity']['specificity'])}; at *likely* "
            f"sensitivity {_share(studies['high_specificity']['sensitivity'])}, "
            f"specificity {_share(studies['high_specificity']['specificity'])}.")
    check = part.get("region_check")
    if check:
        regions = ", ".join(f"{name} {_share(share)}"
                            for name, share in check["per_region"].items())
        accepted = ", ".join(f"{name} {_share(share)}"
                             for name, share in check.get("accepted_per_region", {}).items())
        lines.append(
            f"- Region check, with the body part hidden from the node: it accepts "
            f"{_share(check['accepted'])} of images as like the training images, and its "
            f"region is the labelled one on {_share(check['region_correct'])} ({regions})."
            + (f" Accepted, by labelled region: {accepted}." if accepted else ""))
    return lines


def _share(p: Mapping[str, Any]) -> str:
    """"0.935 (29/31; 0.786-0.992)", or "-" of none."""
    if not p or not p.get("n"):
        return "-"
    low, high = p["interval"]
    return f"{p['rate']:.3f} ({p['k']}/{p['n']}; {low:.3f}-{high:.3f})"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
