"""A study's images to Findings: letterbox, batch, run the classifier, map back.

The pipeline is the only place that knows how model outputs become clinical numbers
(temperature-scaled probability, the manifest's threshold, a heatmap on the source
pixel grid), so every consumer of a Finding sees the same interpretation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fractured.engine.backends import open_classifier
from fractured.engine.bundle import FRACTURE_LABEL, Bundle
from fractured.engine.findings import Finding, ImageRef, ModelInfo
from fractured.engine.preprocess import Letterbox, letterbox, to_model_input


class Pipeline:
    """Runs one bundle's classifier over display images (from `display_pixels`).

    `max_batch` bounds the images sent to the backend at once, which bounds memory
    whatever the size of the study; `threads` is passed on to the backend.
    """

    def __init__(self, bundle: Bundle, backend: str = "auto", max_batch: int = 8,
                 threads: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.bundle = bundle
        self.max_batch = max_batch
        self._classifier = open_classifier(bundle, backend, threads=threads)
        self._fracture_index = bundle.manifest.labels.index(FRACTURE_LABEL)

    @property
    def backend_name(self) -> str:
        return self._classifier.name

    @property
    def model(self) -> ModelInfo:
        return self.bundle.model_info

    def run(self, images: Sequence[tuple[ImageRef, np.ndarray]]) -> list[Finding]:
        """One Finding per image, in input order.

        Each array is a 2-D float32 display image in [0, 1] of any size; the heatmap of
        its finding has the same shape.
        """
        manifest = self.bundle.manifest
        findings: list[Finding] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start:start + self.max_batch]
            boxed = [letterbox(pixels, manifest.input_size) for _, pixels in chunk]
            batch = to_model_input([image for image, _ in boxed], manifest.mean, manifest.std)
            logits, cam = self._classifier.run(batch)
            for (ref, _), (_, box), logit, cam_one in zip(chunk, boxed, logits, cam,
                                                          strict=True):
                findings.append(Finding(
                    image=ref,
                    probability=_sigmoid(float(logit[self._fracture_index])
                                         / manifest.temperature),
                    threshold=manifest.threshold,
                    heatmap=_heatmap(cam_one[self._fracture_index], box),
                    model=self.model,
                ))
        return findings


def _sigmoid(value: float) -> float:
    # tanh form: no overflow for large |value|, unlike 1 / (1 + exp(-value))
    return 0.5 * (1.0 + math.tanh(0.5 * value))


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
