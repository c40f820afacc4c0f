"""A study's images to Findings: crop (where the bundle says), letterbox, batch, classify
and detect, map back.

The pipeline is the only place that knows how model outputs become clinical numbers
(temperature-scaled probability, fused with the detector's best box score where the
bundle says so, the manifest's operating points, those of the image's body region where
the bundle has them, a heatmap and boxes on the source pixel grid), so every consumer
of a Finding sees the same interpretation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from fractured.engine.backends import Device, LoadedModels, open_models
from fractured.engine.bundle import FRACTURE_LABEL, Bundle
from fractured.engine.exposed_field import Field, field_for
from fractured.engine.findings import Box, DecisionLevel, Finding, ImageRef, ModelInfo
from fractured.engine.intended_use import (
    NOT_DECLARED_CHECK,
    IntendedUse,
    ScopeCheck,
    ScopeReason,
)
from fractured.engine.preprocess import Letterbox, letterbox, to_model_input
from fractured.engine.region_check import RegionSeen
from fractured.engine.regions import dataset_region

#: Test-time augmentations: (horizontal flip, zoom) — the image as it is, mirrored, and
#: shrunk to 90 % inside the letterbox. Small on purpose: a radiograph's anatomy is not
#: rotation- or scale-free, and each variant costs a full classifier pass.
TTA_VARIANTS: tuple[tuple[bool, float], ...] = ((False, 1.0), (True, 1.0), (False, 0.9))

#: The image decision a box needs to be reported ([engine].boxes). A box on an image
#: the classifier calls negative contradicts the verdict beside it, and most boxes on
#: such images are false (the measured trade of each gate is in docs/bundles.md and each
#: bundle's model card). The default is "likely"; "always" keeps every box at the
#: detector's own operating point.
BOX_GATES: dict[str, tuple[DecisionLevel, ...]] = {
    "possible": (DecisionLevel.POSSIBLE, DecisionLevel.LIKELY),
    "likely": (DecisionLevel.LIKELY,),
    "always": tuple(DecisionLevel),
}


class Pipeline:
    """Runs one bundle's models over display images (from `display_pixels`).

    `max_batch` bounds the images sent to a backend at once, which bounds memory
    whatever the size of the study; `tta` adds the TTA_VARIANTS and reports the spread
    of the probability over them; `boxes` (a BOX_GATES key) chooses the images whose
    boxes are reported; `device` places the torch backend ("auto": a CUDA GPU if torch
    sees one). A bundle whose `preprocessing.crop` is "exposed_field" sees each image
    cropped to its exposed field, found from the DICOM `datasets` given beside the images
    (shutter and collimator attributes) or else from the pixels; its detector likewise,
    or as `preprocessing.detector_crop` says where that is given. `scope` checks an image
    against the bundle's intended use, widened by `extra_body_parts` (an operator's
    explicit choice), before anything is run on it.
    """

    def __init__(self, bundle: Bundle, backend: str = "auto", max_batch: int = 8,
                 threads: int | None = None, *, tta: bool = False,
                 boxes: str = "likely", device: Device = "auto",
                 extra_body_parts: Sequence[str] = ()) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if boxes not in BOX_GATES:
            raise ValueError(f"boxes must be one of {', '.join(BOX_GATES)}, got {boxes!r}")
        self.bundle = bundle
        self.max_batch = max_batch
        self.tta = tta
        self.box_levels = BOX_GATES[boxes]
        self.models: LoadedModels = open_models(bundle, backend, threads=threads, device=device)
        self._fracture = bundle.manifest.classifier.labels.index(FRACTURE_LABEL)
        # Exposed fields are found side by side, one image a thread: the search is numpy
        # sorts and OpenCV filters, which release the GIL (bench/README.md has the gain).
        self._field_finders = ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1,
                                                 thread_name_prefix="exposed-field")
        declared = bundle.manifest.intended_use
        self.intended_use: IntendedUse | None = (
            declared.widened(extra_body_parts) if declared is not None else None)

    def scope(self, dataset: Dataset | None) -> ScopeCheck:
        """Whether an image (its DICOM header; None for a PNG or JPEG) is inside what
        this bundle may analyse (engine.intended_use); every image is, for a bundle that
        declares nothing."""
        if self.intended_use is None:
            return NOT_DECLARED_CHECK
        return self.intended_use.check(dataset)

    @property
    def backend_name(self) -> str:
        return self.models.backend

    @property
    def model(self) -> ModelInfo:
        return self.bundle.model_info

    def run(self, images: Sequence[tuple[ImageRef, np.ndarray]],
            datasets: Sequence[Dataset | None] | None = None) -> list[Finding]:
        """One Finding per image, in input order.

        Each array is a 2-D float32 display image in [0, 1] of any size; the heatmap of
        its finding has the same shape and its boxes are in its pixel coordinates.
        `datasets`, one per image where given, are the DICOM objects they came from.
        Each finding's `scope` is the image's intended-use check: the header's, or where
        the header cannot say, the region check's (whose region then also picks the
        operating points).
        """
        findings: list[Finding] = []
        spec = self.bundle.manifest.classifier
        sources = _datasets(datasets, len(images))
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            chunk_sources = sources[start:start + self.max_batch]
            headers = [self.scope(dataset) for dataset in chunk_sources]
            outputs = self._infer([image for _, image in chunk], chunk_sources,
                                  see=[self._needs_region_check(h) for h in headers])
            probabilities = self._probabilities(outputs)
            for i, (ref, _) in enumerate(chunk):
                spread = float(np.std(probabilities[i])) if self.tta else None
                probability = float(np.mean(probabilities[i]))
                scope, region = headers[i], dataset_region(chunk_sources[i])
                if (seen := outputs.seen[i]) is not None:
                    assert self.intended_use is not None  # seen only where it has a check
                    scope, region = self.intended_use.decide_from_image(seen), seen.region
                points, points_region = spec.points_for(region)
                shown = (outputs.boxes[i] if points.level(probability) in self.box_levels
                         else ())
                findings.append(Finding(
                    image=ref, probability=probability, operating_points=points,
                    heatmap=outputs.heatmaps[i], model=self.model, boxes=shown,
                    spread=spread, operating_region=points_region, scope=scope,
                    analysed_field=outputs.fields[i]))
        return findings

    def _needs_region_check(self, header: ScopeCheck) -> bool:
        """Whether an image's header left its scope to the region check."""
        return (header.reason is ScopeReason.UNKNOWN_BODY_PART
                and self.models.region_check is not None)

    def evidence(self, images: Sequence[np.ndarray],
                 datasets: Sequence[Dataset | None] | None = None) -> np.ndarray:
        """(n, 2): each image's calibrated classifier logit (the unaugmented pass) and the
        detector's best box score, the two numbers a bundle's `classifier.fusion` weighs.

        `fractured fuse` fits those weights on these, so they are the node's own numbers
        for the same pixels rather than a re-implementation's.
        """
        return self.examine(images, datasets).evidence

    def examine(self, images: Sequence[np.ndarray],
                datasets: Sequence[Dataset | None] | None = None) -> Examination:
        """`evidence`, every box the detector's graph returned on each image, the boxes
        the node would draw before any decision gates them, and the heatmap's peak: what
        a bundle is scored on, from the node's own pass, before a probability (which
        fusion may refit) decides anything; and what the region check saw where the
        header could not say (every image without one)."""
        rows = np.empty((len(images), 2))
        detections: list[Detections] = []
        boxes: list[tuple[Box, ...]] = []
        peaks: list[tuple[float, float] | None] = []
        seen: list[RegionSeen | None] = []
        sources = _datasets(datasets, len(images))
        for start in range(0, len(images), self.max_batch):
            chunk_sources = sources[start:start + self.max_batch]
            outputs = self._infer(list(images[start:start + self.max_batch]), chunk_sources,
                                  see=[self._needs_region_check(self.scope(dataset))
                                       for dataset in chunk_sources])
            rows[start:start + len(outputs.best_box), 0] = outputs.logits[:, 0]
            rows[start:start + len(outputs.best_box), 1] = outputs.best_box
            detections += outputs.detections
            boxes += outputs.boxes
            peaks += [heatmap_peak(heatmap) for heatmap in outputs.heatmaps]
            seen += outputs.seen
        return Examination(rows, detections, boxes, peaks, seen)

    def _infer(self, images: list[np.ndarray], datasets: Sequence[Dataset | None], *,
               see: Sequence[bool] = ()) -> _Outputs:
        """Both models on a batch, and the region check on the images `see` marks."""
        manifest = self.bundle.manifest
        pairs = list(zip(images, datasets, strict=True))
        fields = self._fields(manifest.crop, pairs)
        detector_fields = (fields if manifest.detector_crop == manifest.crop else
                           self._fields(manifest.detector_crop, pairs))
        logits, heatmaps, seen = self._classify(images, fields, see)
        boxes, best, detections = self._detect(images, detector_fields)
        return _Outputs(logits=logits, heatmaps=heatmaps, boxes=boxes, best_box=best,
                        detections=detections, seen=seen, fields=fields)

    def _fields(self, crop: str, pairs: list[tuple[np.ndarray, Dataset | None]],
                ) -> list[Field | None]:
        """Each image's field for a model trained with `crop` (field_for)."""
        if len(pairs) < 2:
            return [field_for(crop, image, dataset) for image, dataset in pairs]
        return list(self._field_finders.map(lambda pair: field_for(crop, *pair), pairs))

    def _probabilities(self, outputs: _Outputs) -> np.ndarray:
        """(n, variants): the calibrated probability of each pass, fused with the image's
        best box score where the bundle says so (the detector runs once, unaugmented)."""
        return self.bundle.manifest.classifier.probability(outputs.logits,
                                                           outputs.best_box[:, None])

    def _classify(self, images: list[np.ndarray], fields: list[Field | None],
                  see: Sequence[bool]) -> tuple[np.ndarray, list[np.ndarray],
                                                list[RegionSeen | None]]:
        """(logits / temperature (n, variants), heatmaps from the unaugmented pass, what
        the region check saw on the images `see` marks, from the same batch)."""
        spec = self.bundle.manifest.classifier
        variants = TTA_VARIANTS if self.tta else TTA_VARIANTS[:1]
        scaled = np.empty((len(images), len(variants)))
        heatmaps: list[np.ndarray] = []
        seen: list[RegionSeen | None] = [None] * len(images)
        for v, (flip, zoom) in enumerate(variants):
            boxed = [_letterbox(image, spec.input_size, field, flip=flip, zoom=zoom)
                     for image, field in zip(images, fields, strict=True)]
            batch = to_model_input([b for b, _ in boxed], self.bundle.manifest.mean,
                                   self.bundle.manifest.std)
            logits, cam = self.models.classifier.run(batch)
            scaled[:, v] = [float(row[self._fracture]) / spec.temperature for row in logits]
            if v == 0:
                heatmaps = [_heatmap(one[self._fracture], box)
                            for one, (_, box) in zip(cam, boxed, strict=True)]
                seen = self._see(batch, see)
        return scaled, heatmaps, seen

    def _see(self, batch: np.ndarray, see: Sequence[bool]) -> list[RegionSeen | None]:
        """The region check on the images of `batch` that `see` marks, None elsewhere."""
        marked = [i for i, wanted in enumerate(see) if wanted]
        seen: list[RegionSeen | None] = [None] * len(batch)
        if not marked or self.models.region_check is None or self.intended_use is None:
            return seen
        check = self.intended_use.region_check
        assert check is not None  # open_models opens the graph only with its spec
        for i, row in zip(marked, self.models.region_check.run(batch[marked]), strict=True):
            seen[i] = check.nearest(row)
        return seen

    def _detect(self, images: list[np.ndarray], fields: list[Field | None],
                ) -> tuple[list[tuple[Box, ...]], np.ndarray, list[Detections]]:
        """Boxes at or above the detector's high-sensitivity point, in source pixels; each
        image's best box score at any score (0 without a box or a detector); and every
        box the graph returned, in model-input pixels."""
        spec = self.bundle.manifest.detector
        detector = self.models.detector
        best = np.zeros(len(images))
        if spec is None or detector is None:
            return [() for _ in images], best, []
        boxed = [letterbox(image, spec.input_size, field)
                 for image, field in zip(images, fields, strict=True)]
        batch = to_model_input([b for b, _ in boxed], self.bundle.manifest.mean,
                               self.bundle.manifest.std)
        all_boxes, all_scores, all_labels = detector.run(batch)
        points = spec.operating_points
        found: list[tuple[Box, ...]] = []
        detections: list[Detections] = []
        for i, ((_, box), rows, scores, labels) in enumerate(
                zip(boxed, all_boxes, all_scores, all_labels, strict=True)):
            real = np.asarray(labels) >= 1  # padding slots have label 0
            detections.append(Detections(np.asarray(rows)[real], np.asarray(scores)[real], box))
            kept = []
            for (x0, y0, x1, y1), score, label in zip(rows, scores, labels, strict=True):
                if label < 1:
                    continue  # an empty (padding) slot
                sx0, sy0, sx1, sy1 = box.box_to_source(float(x0), float(y0), float(x1),
                                                       float(y1))
                if sx1 <= sx0 or sy1 <= sy0:
                    continue  # entirely on the letterbox padding (or outside the field)
                best[i] = max(best[i], float(score))
                if score >= points.high_sensitivity:
                    kept.append(Box(sx0, sy0, sx1, sy1, float(score),
                                    points.level(float(score)), spec.labels[int(label) - 1]))
            found.append(tuple(kept))
        return found, best, detections


@dataclass(frozen=True)
class Detections:
    """Every box a detector graph returned on one image, before any threshold."""

    boxes: np.ndarray  # (K, 4) x0 y0 x1 y1 in model-input pixels
    scores: np.ndarray  # (K,)
    fit: Letterbox  # how the image was letterboxed into the detector's input


@dataclass(frozen=True)
class Examination:
    """What `Pipeline.examine` found on each of a batch of images."""

    evidence: np.ndarray  # (n, 2): calibrated classifier logit, best box score
    detections: list[Detections]  # every box returned, per image (none without detector)
    boxes: list[tuple[Box, ...]]  # at or above the detector's high-sensitivity point
    peaks: list[tuple[float, float] | None]  # (x, y) of the heatmap's peak, source pixels
    seen: list[RegionSeen | None]  # the region check's view (None: not asked, or none)


@dataclass(frozen=True)
class _Outputs:
    """Both models' outputs for a batch of images, before any decision."""

    logits: np.ndarray  # (n, variants): the fracture logit / temperature of each pass
    heatmaps: list[np.ndarray]  # on each image's own grid, from the unaugmented pass
    boxes: list[tuple[Box, ...]]  # at or above the detector's high-sensitivity point
    best_box: np.ndarray  # (n,): each image's best box score at any score, else 0
    detections: list[Detections]  # every box returned, per image (none without detector)
    seen: list[RegionSeen | None]  # the region check's view, where it was asked
    fields: list[Field | None]  # what the classifier saw of each image (None: all of it)


def _datasets(datasets: Sequence[Dataset | None] | None, count: int) -> list[Dataset | None]:
    if datasets is None:
        return [None] * count
    if len(datasets) != count:
        raise ValueError(f"{len(datasets)} datasets for {count} images")
    return list(datasets)


def _letterbox(image: np.ndarray, size: int, field: Field | None, *, flip: bool,
               zoom: float) -> tuple[np.ndarray, Letterbox]:
    """Letterbox the image's field, optionally mirrored, and optionally shrunk to `zoom`
    of the square and centred in it."""
    if flip:
        image = np.fliplr(image)
        field = field.mirrored(image.shape[1]) if field is not None else None
    if zoom == 1.0:
        return letterbox(image, size, field)
    inner = max(1, round(size * zoom))
    small, box = letterbox(image, inner, field)
    out = np.zeros((size, size), dtype=small.dtype)
    top = left = (size - inner) // 2
    out[top:top + inner, left:left + inner] = small
    return out, box


def heatmap_peak(heatmap: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of a heatmap's maximum in its own pixels (the first of ties): where the
    overlay is hottest, which the pointing game and the exposed-field check score.
    None where nothing is hot (the CAM was nowhere positive: the overlay shows none)."""
    if not heatmap.size or float(heatmap.max()) <= 0.0:
        return None
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float(column), float(row)


def _heatmap(cam: np.ndarray, box: Letterbox) -> np.ndarray:
    """The label's CAM, positive part only, on the source grid, scaled to peak at 1.

    Scaling happens after the padding is cropped away, so the hottest spot inside the
    image is 1 even when the map's overall peak fell on the letterbox padding.
    """
    heat = box.heatmap_to_source(np.maximum(cam, 0.0))
    peak = float(heat.max())
    if peak <= 0.0:
        return np.zeros_like(heat, dtype=np.float32)
    return (heat / peak).astype(np.float32)
