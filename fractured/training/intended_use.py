"""The intended use `fractured build-engine` writes into a bundle, from its training data.

A model may speak for a body region only where its training data held enough fractures
of it to learn what one looks like there: FracAtlas's training part has hundreds of
hand and leg fractures but six of the hip and six of the shoulder, and its validation
and test parts one of each, so nothing could show that the model finds fractures
there. The regions with at least MIN_TRAINING_FRACTURES fractures in the classifier's
training part become the bundle's intended use (every Body Part Examined term
engine.regions maps to them), adults only; an operator may widen it on the node
([engine].extra_body_parts), explicitly and logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from fractured.engine.intended_use import IntendedUse
from fractured.engine.regions import Region, region_of
from fractured.training.datasets import open_dataset
from fractured.training.datasets.base import Sample
from fractured.training.splits import load_split

log = structlog.get_logger()

#: Fractures of a region the training part must hold for the region to be intended.
MIN_TRAINING_FRACTURES = 20


def body_part_counts(samples: Sequence[Sample]) -> dict[str, dict[str, int]]:
    """{body part label: {images, fractures}} of a split part, as a checkpoint records
    it ("" for images without a body part)."""
    images = Counter(sample.body_part for sample in samples)
    fractures = Counter(sample.body_part for sample in samples if sample.label)
    return {part: {"images": images[part], "fractures": fractures[part]}
            for part in sorted(images)}


def intended_use(provenance: Mapping[str, Any]) -> IntendedUse | None:
    """The intended use of a model whose checkpoint records `provenance`: from its
    training part's body parts (recorded, or else read again from its data set and
    split); None where neither can be read or no region has enough fractures, which
    build-engine logs (the node then analyses every image, as before intended uses)."""
    counts = provenance.get("body_parts")
    if counts is None:
        counts = _counted_again(provenance)
    if counts is None:
        return None
    fractures: Counter[Region] = Counter()
    for part, count in counts.items():
        region = region_of(part)
        if region is not None:
            fractures[region] += int(count["fractures"])
    regions = [region for region, n in fractures.items() if n >= MIN_TRAINING_FRACTURES]
    if not regions:
        log.warning("build.no_intended_use", reason="no body region has "
                    f"{MIN_TRAINING_FRACTURES} training fractures",
                    fractures={region.value: n for region, n in fractures.items()})
        return None
    return IntendedUse.for_regions(regions)


def _counted_again(provenance: Mapping[str, Any]) -> dict[str, dict[str, int]] | None:
    """The training part's body parts, for a checkpoint written before they were
    recorded: its data set and split read again."""
    try:
        sample_set = open_dataset(Path(provenance["dataset"]), provenance.get("format"))
        split = load_split(Path(provenance["split"]), sample_set)
        return body_part_counts(split.samples(sample_set, "train"))
    except (KeyError, OSError, ValueError) as exc:  # DatasetError is a ValueError
        log.warning("build.no_intended_use", reason="the training data's body parts are "
                    f"not recorded and cannot be read again: {exc}")
        return None
