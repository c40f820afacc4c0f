"""Box-level metrics of a fracture detector: COCO AP and FROC.

AP@0.5 and AP@[.5:.95] are computed by pycocotools, the reference implementation every
detection paper's numbers come from, so ours compare with theirs. FROC (recall against
false positives per image) is the curve lesion-detection studies report, because it
answers a reader's question: how many fractures are found if I accept one false box
per image?

Boxes are x0, y0, x1, y1 in pixels. An image without ground truth is a normal image:
every box on it is a false positive.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

#: Mean false positives per image at which FROC recall is reported (the LUNA16 levels).
FROC_LEVELS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: IoU at which a predicted box hits a ground-truth box, for FROC and sensitivity.
HIT_IOU = 0.5
#: FROC curve points kept for metrics.json.
CURVE_POINTS = 200


def detection_metrics(predictions: Sequence[tuple[ArrayLike, ArrayLike]],
                      ground_truths: Sequence[ArrayLike], *,
                      threshold: float | None = None) -> dict[str, Any]:
    """AP, FROC and lesion counts for a detector over a set of images.

    `predictions[i]` is (boxes (K, 4), scores (K,)) for image i and `ground_truths[i]`
    its true boxes (M, 4). Keys: images, images_with_fracture, gt_boxes, predictions;
    ap50 and ap50_95 (COCO, at most 100 boxes per image); froc ({fppi, recall} at each
    of FROC_LEVELS), froc_score (their mean, the LUNA16 competition metric), froc_curve
    {fppi, recall, thresholds}; lesion_sensitivity (fraction of true boxes hit by some
    box) and image_sensitivity (fraction of fractured images with at least one hit),
    both over every box given. With `threshold`, at_threshold repeats the sensitivities
    and adds false_positives_per_image for boxes scoring >= threshold: the deployed
    detector's numbers. `note` says why a number is None (no ground truth at all).
    """
    images = _validate(predictions, ground_truths)
    result: dict[str, Any] = {
        "images": len(images.truths),
        "images_with_fracture": images.fractured,
        "gt_boxes": images.gt_boxes,
        "predictions": len(images.scores),
        "note": None,
    }
    if not images.gt_boxes:
        result["note"] = ("no ground-truth boxes: AP, FROC and sensitivity need at least one "
                          "fracture box")
        result.update(ap50=None, ap50_95=None, froc=None, froc_score=None, froc_curve=None,
                      lesion_sensitivity=None, image_sensitivity=None)
        if threshold is not None:
            result["at_threshold"] = None
        return result

    result.update(_coco_ap(images))
    hits = _greedy_hits(images)
    result.update(_froc(images, hits))
    result.update(_sensitivities(images, hits, min_score=-np.inf))
    if threshold is not None:
        above = images.scores >= threshold
        result["at_threshold"] = {
            "threshold": threshold,
            **_sensitivities(images, hits, min_score=threshold),
            "false_positives_per_image": int((above & (hits < 0)).sum()) / len(images.truths),
        }
    return result


def score_threshold_at_fp(predictions: Sequence[tuple[ArrayLike, ArrayLike]],
                          ground_truths: Sequence[ArrayLike],
                          fp_per_image: float) -> dict[str, float]:
    """The lowest box-score threshold whose false positives per image stay within
    `fp_per_image`: a detector operating point chosen on validation data.

    Returns threshold (1.0 when even the best-scoring box is over budget), the achieved
    false_positives_per_image and the lesion and image sensitivities at it.
    """
    if fp_per_image < 0:
        raise ValueError(f"fp_per_image must be >= 0, got {fp_per_image}")
    images = _validate(predictions, ground_truths)
    if not images.gt_boxes:
        raise ValueError("no ground-truth boxes: an operating point needs fracture boxes")
    hits = _greedy_hits(images)
    false_so_far = np.cumsum(hits < 0) / len(images.truths)
    # A tie in score is one threshold: it can only stop after its last prediction.
    last_of_tie = np.append(images.scores[1:] != images.scores[:-1], True)
    within = np.flatnonzero(last_of_tie & (false_so_far <= fp_per_image))
    threshold = float(images.scores[within[-1]]) if len(within) else 1.0
    above = images.scores >= threshold
    return {"threshold": threshold, "fp_budget": fp_per_image,
            "false_positives_per_image": int((above & (hits < 0)).sum()) / len(images.truths),
            **_sensitivities(images, hits, min_score=threshold)}


class _Images:
    """All predictions flattened, sorted by descending score, with their image index."""

    def __init__(self, boxes: list[np.ndarray], scores: list[np.ndarray],
                 truths: list[np.ndarray]) -> None:
        self.truths = truths
        self.gt_boxes = sum(len(truth) for truth in truths)
        self.fractured = sum(1 for truth in truths if len(truth))
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-all_scores, kind="stable")
        self.scores = all_scores[order]
        self.boxes = (np.concatenate(boxes) if boxes else np.zeros((0, 4)))[order]
        self.image = np.repeat(np.arange(len(scores)), [len(s) for s in scores])[order]


def _validate(predictions: Sequence[tuple[ArrayLike, ArrayLike]],
              ground_truths: Sequence[ArrayLike]) -> _Images:
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} images have predictions but "
                         f"{len(ground_truths)} have ground truth: they must pair up")
    boxes, scores, truths = [], [], []
    for index, ((predicted, score), truth) in enumerate(
            zip(predictions, ground_truths, strict=True)):
        predicted = _boxes(predicted, f"image {index}: predicted boxes")
        truth = _boxes(truth, f"image {index}: ground-truth boxes")
        score = np.asarray(score, dtype=np.float64).reshape(-1)
        if len(score) != len(predicted):
            raise ValueError(f"image {index}: {len(predicted)} predicted boxes but "
                             f"{len(score)} scores")
        if not np.isfinite(score).all():
            raise ValueError(f"image {index}: scores must be finite")
        boxes.append(predicted)
        scores.append(score)
        truths.append(truth)
    return _Images(boxes, scores, truths)


def _boxes(values: ArrayLike, what: str) -> np.ndarray:
    boxes = np.asarray(values, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape (N, 4) as x0, y0, x1, y1, got {boxes.shape}")
    if not np.isfinite(boxes).all() or (boxes[:, 2] <= boxes[:, 0]).any() \
            or (boxes[:, 3] <= boxes[:, 1]).any():
        raise ValueError(f"{what} must be finite with x1 > x0 and y1 > y0")
    return boxes


def _coco_ap(images: _Images) -> dict[str, float]:
    """AP@0.5 and AP@[.5:.95] from pycocotools, its console chatter swallowed."""
    categories = [{"id": 1, "name": "fracture"}]
    image_entries = [{"id": index + 1} for index in range(len(images.truths))]
    truth = [_annotation(box, index + 1) for index, boxes in enumerate(images.truths)
             for box in boxes]
    detected = [_annotation(box, int(image) + 1, float(score))
                for box, image, score in zip(images.boxes, images.image, images.scores,
                                             strict=True)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_truth = _coco(image_entries, truth, categories)
        coco_detected = _coco(image_entries, detected, categories)
        evaluation = COCOeval(coco_truth, coco_detected, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"ap50": float(evaluation.stats[1]),
            "ap50_95": float(evaluation.stats[0])}


def _annotation(box: np.ndarray, image_id: int, score: float | None = None) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(value) for value in box)
    entry: dict[str, Any] = {"image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
    if score is not None:
        entry["score"] = score
    return entry


def _coco(images: list[dict[str, Any]], annotations: list[dict[str, Any]],
          categories: list[dict[str, Any]]) -> COCO:
    """A COCO index built in memory (COCOeval treats annotation id 0 as "unmatched")."""
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories,
                    "annotations": [dict(entry, id=index + 1)
                                    for index, entry in enumerate(annotations)]}
    coco.createIndex()
    return coco


def _greedy_hits(images: _Images) -> np.ndarray:
    """For each prediction (in score order) the global index of the true box it hits, or -1.

    Each prediction takes the unclaimed true box in its image with the highest IoU, if
    that is >= HIT_IOU; each true box is counted once, so a second box on the same
    fracture is a false positive (it is clutter a reader must dismiss), as in COCO.
    """
    offsets = np.cumsum([0] + [len(truth) for truth in images.truths])
    claimed = np.zeros(offsets[-1], dtype=bool)
    hits = np.full(len(images.scores), -1)
    for index, (box, image) in enumerate(zip(images.boxes, images.image, strict=True)):
        truth = images.truths[image]
        if not len(truth):
            continue
        overlap = _iou(box, truth)
        overlap[claimed[offsets[image]:offsets[image + 1]]] = -1.0
        best = int(np.argmax(overlap))
        if overlap[best] >= HIT_IOU:
            hits[index] = offsets[image] + best
            claimed[hits[index]] = True
    return hits


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter)


def _froc(images: _Images, hits: np.ndarray) -> dict[str, Any]:
    """Recall against mean false positives per image, one point per distinct score.

    Recall at a level is the best reached without exceeding that many false positives
    per image; a tie in score is one threshold, so only its last prediction makes a point.
    """
    recall = np.concatenate([[0.0], np.cumsum(hits >= 0) / images.gt_boxes])
    fppi = np.concatenate([[0.0], np.cumsum(hits < 0) / len(images.truths)])
    thresholds = np.concatenate([[np.inf], images.scores])
    last_of_tie = np.append(images.scores[1:] != images.scores[:-1], True)
    keep = np.concatenate([[True], last_of_tie[:len(images.scores)]])
    recall, fppi, thresholds = recall[keep], fppi[keep], thresholds[keep]
    levels = [{"fppi": level, "recall": float(recall[fppi <= level].max())}
              for level in FROC_LEVELS]
    thin = np.unique(np.linspace(0, len(recall) - 1,
                                 min(len(recall), CURVE_POINTS)).round().astype(int))
    return {
        "froc": levels,
        "froc_score": float(np.mean([level["recall"] for level in levels])),
        "froc_curve": {"fppi": fppi[thin].tolist(), "recall": recall[thin].tolist(),
                       "thresholds": [float(t) if np.isfinite(t) else None
                                      for t in thresholds[thin]]},
    }


def _sensitivities(images: _Images, hits: np.ndarray, *, min_score: float) -> dict[str, float]:
    hit = hits[(hits >= 0) & (images.scores >= min_score)]
    image_of_truth = np.repeat(np.arange(len(images.truths)),
                               [len(truth) for truth in images.truths])
    return {"lesion_sensitivity": len(hit) / images.gt_boxes,
            "image_sensitivity": len(np.unique(image_of_truth[hit])) / images.fractured}
