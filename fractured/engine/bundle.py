"""An engine bundle on disk: manifest.json, the model files, and their checksums.

A bundle is built once by ML staff and never changed: the node refuses to run one whose
files no longer match the sha256 sums in its manifest, so what is named in every result
(name and version) is exactly what produced it. A manifest with an unknown or missing
key is refused too, rather than guessed at, because a silently ignored `threshold` or
`temperature` would change clinical decisions without anyone noticing.

`Manifest` is the one type of a manifest both ways: `Manifest.from_dict` reads and
checks manifest.json, `Manifest.to_dict` gives it back as written, and `write_bundle`
writes a `Manifest` built in memory (training.build) through the same check, so a
bundle is never written that the node would refuse to read.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from fractured.durable import fsync_path
from fractured.engine.exposed_field import CROPS, NO_CROP
from fractured.engine.findings import ModelInfo, OperatingPoints
from fractured.engine.intended_use import IntendedUse
from fractured.engine.region_check import REGION_CHECK_FILE, RegionCheck
from fractured.engine.regions import POOLED, REGION_GROUPS, PointsRegion, Region

SCHEMA_VERSION = 2
MANIFEST_FILE = "manifest.json"
CLASSIFIER_FILE = "classifier.onnx"
MODEL_CARD_FILE = "MODEL_CARD.md"
CLASSIFIER_WEIGHTS = "classifier.pt"  # state dict, for the torch backend
DETECTOR_FILE = "detector.onnx"
DETECTOR_WEIGHTS = "detector.pt"
CLASSIFIER_PLAN = "classifier.plan"  # TensorRT plans, built on the GPU that runs them
DETECTOR_PLAN = "detector.plan"
#: the manifest's `tensorrt` record: what the plans were built for
PLAN_TARGET_KEYS = ("gpu_name", "compute_capability", "tensorrt_version")
FRACTURE_LABEL = "fracture"
#: The backends a bundle may hold (manifest `backends`); a node may also ask for "auto".
BACKENDS = ("onnxruntime", "torch", "tensorrt")
#: The classifier's optional points per body region (see RegionPoints)
BY_REGION = "operating_points_by_region"
#: A region's `source`: its own points, fitted on its validation images, or the pooled
#: pair it fell back to (regions.POOLED) for want of cases
OWN_POINTS: Final = "region"
POINT_SOURCES = (OWN_POINTS, POOLED)


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and the key or reason."""


#: Field metadata: a dataclass field left out of manifest.json while it is None, so a
#: manifest without an optional table (`classifier.fusion`) reads and writes back as it
#: was instead of gaining `null` keys that older nodes would refuse.
OMIT_IF_NONE = types.MappingProxyType({"omit_if_none": True})


@dataclass(frozen=True)
class Fusion:
    """The detector's evidence joined to the classifier's in one image probability.

    probability = sigmoid(logit_weight * logit / temperature + box_weight * best box
    score + intercept), where the best box score is the highest score of any box the
    detector finds on the image (0 where it finds none), whatever its operating points.
    A logistic regression fitted on validation images (`fractured fuse`): it is itself
    the calibration, and the classifier's operating points apply to its probability.
    """

    logit_weight: float
    box_weight: float
    intercept: float

    def logit(self, scaled_logit: Any, box_score: Any) -> Any:
        """The fused logit, for floats or numpy arrays alike (`scaled_logit` is the
        classifier's logit already divided by its temperature)."""
        return (self.logit_weight * scaled_logit + self.box_weight * box_score
                + self.intercept)

    def formula(self) -> str:
        """The probability in words and numbers, for reports and model cards."""
        return (f"sigmoid({self.logit_weight:.3f} x logit / T {_signed(self.box_weight)} x "
                f"best box score {_signed(self.intercept)})")


@dataclass(frozen=True)
class Reached:
    """What an operating point reached on a region's validation images: None where the
    region had no image of that class (a fallback region may have no fracture at all)."""

    sensitivity: float | None
    specificity: float | None


@dataclass(frozen=True)
class RegionFit:
    """The validation images a region's points were fitted on (or, for a fallback, the
    pooled points were measured on), and what each point reached there.

    `floor_applied`: the high-sensitivity threshold was raised to keep the region's
    specificity at the configured floor, so its sensitivity is below the target (the
    reached sensitivity says how far)."""

    fractures: int
    normals: int
    high_sensitivity: Reached
    high_specificity: Reached
    floor_applied: bool


@dataclass(frozen=True)
class RegionPoints:
    """One body region's two thresholds on the image probability, and their record.

    `source` "region": fitted on the region's own validation images; "pooled": the
    region had too few of them, so it carries the pooled points (the node then cites
    "pooled", since nothing about them is the region's)."""

    high_sensitivity: float
    high_specificity: float
    source: str  # POINT_SOURCES
    fitted_on: RegionFit

    @property
    def points(self) -> OperatingPoints:
        return OperatingPoints(self.high_sensitivity, self.high_specificity)

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry as plain JSON-ready data (what build-engine writes)."""
        return _plain(self)


@dataclass(frozen=True)
class FlagRates:
    """What share of a group's validation images each operating point flagged, as the
    node decides them (each image at its region's points): the rate a site's own share
    is watched against for drift. It depends on the validation part's prevalence, which a
    site's need not share: a difference is a question, not proof of a fault."""

    images: int
    high_sensitivity: float
    high_specificity: float


@dataclass(frozen=True)
class ClassifierSpec:
    """The image-level classifier: what it is, what it outputs and how to read it."""

    architecture: str
    variant: str  # EfficientNet b0-b4, or resnet18/34/50 (engine.models)
    labels: tuple[str, ...]
    input_size: int
    temperature: float  # calibration: probability = sigmoid(logit / temperature)
    operating_points: OperatingPoints  # on the calibrated fracture probability
    # Networks averaged into one (engine.models.ClassifierEnsemble); absent = 1, as in
    # bundles written before ensembles.
    members: int = 1
    # Points per body region, fitted on each region's validation images; absent = the
    # pooled points for every image, as in bundles written before regions.
    operating_points_by_region: Mapping[Region, RegionPoints] | None = field(
        default=None, metadata=OMIT_IF_NONE)
    # The probability fused with the detector's best box score; absent = the classifier's
    # calibrated probability alone, as in bundles written before fusion.
    fusion: Fusion | None = field(default=None, metadata=OMIT_IF_NONE)
    # Per regions.REGION_GROUPS key, the share of validation images flagged at each point;
    # absent in bundles written before it (their drift has no expectation to meet).
    expected_flag_rates: Mapping[str, FlagRates] | None = field(
        default=None, metadata=OMIT_IF_NONE)

    def points_for(self, region: Region | None) -> tuple[OperatingPoints, PointsRegion | None]:
        """The operating points for an image of `region` (None: not known), and whose
        they are, as a Finding records it: the region where it has points of its own,
        "pooled" where the bundle has regions but not this one's, None where the bundle
        has no regions at all."""
        by_region = self.operating_points_by_region
        if by_region is None:
            return self.operating_points, None
        entry = by_region.get(region) if region is not None else None
        if entry is None or entry.source != OWN_POINTS:
            return self.operating_points, POOLED
        return entry.points, region

    def probability(self, scaled_logit: Any, box_score: Any) -> Any:
        """The image's fracture probability from its calibrated logit (logit / T) and its
        best box score (used only where fused), for floats or numpy arrays: the one
        formula the pipeline and every report of a bundle apply."""
        logit = (scaled_logit if self.fusion is None
                 else self.fusion.logit(scaled_logit, box_score))
        return sigmoid(logit)


@dataclass(frozen=True)
class DetectorSpec:
    """The fracture-box detector; its operating points apply to box scores."""

    architecture: str
    backbone: str
    labels: tuple[str, ...]
    input_size: int
    detections_per_image: int
    operating_points: OperatingPoints


@dataclass(frozen=True)
class Preprocessing:
    """What is done to a display image before it is letterboxed, as the models were
    trained: `crop` "exposed_field" crops it to its exposed field (engine.exposed_field),
    "none" keeps it whole. `detector_crop`, where given, is the detector's own (a
    detector trained one way beside a classifier trained the other); absent, the
    detector crops as the classifier."""

    crop: str
    detector_crop: str | None = field(default=None, metadata=OMIT_IF_NONE)

    @classmethod
    def of(cls, crop: str, detector_crop: str | None = None) -> Preprocessing | None:
        """The manifest's record of these crops: None for the whole image alone (a
        manifest without it reads as those of bundles built before crops), and
        `detector_crop` only where it differs from the classifier's."""
        if crop == NO_CROP and detector_crop in (None, NO_CROP):
            return None
        return cls(crop, detector_crop if detector_crop != crop else None)


@dataclass(frozen=True)
class Manifest:
    """The contents of manifest.json (see docs/architecture.md, "Engine bundle")."""

    schema_version: int
    name: str
    version: str
    created: str  # ISO 8601, UTC
    trained: bool
    mean: tuple[float, float, float]  # input normalisation, shared by both models
    std: tuple[float, float, float]
    classifier: ClassifierSpec
    detector: DetectorSpec | None
    files: Mapping[str, str]  # file name -> sha256 hex digest
    backends: tuple[str, ...]
    training: Mapping[str, Any]  # free-form summary: data, epochs, metrics
    #: what the TensorRT plans were built for (gpu_name, compute_capability,
    #: tensorrt_version): a plan runs only there; present when backends has tensorrt
    tensorrt: Mapping[str, str] | None = field(default=None, metadata=OMIT_IF_NONE)
    #: absent in bundles built before the crop (and in those trained without it): the
    #: image is letterboxed whole
    preprocessing: Preprocessing | None = field(default=None, metadata=OMIT_IF_NONE)
    #: the body parts and ages the model may analyse (engine.intended_use); absent in
    #: bundles built before it, whose every image is analysed
    intended_use: IntendedUse | None = field(default=None, metadata=OMIT_IF_NONE)

    @property
    def crop(self) -> str:
        """The crop the classifier was trained with (a CROPS value)."""
        return self.preprocessing.crop if self.preprocessing is not None else NO_CROP

    @property
    def detector_crop(self) -> str:
        """The crop the detector was trained with: its own where the manifest names one,
        else the classifier's."""
        own = self.preprocessing.detector_crop if self.preprocessing is not None else None
        return own if own is not None else self.crop

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = MANIFEST_FILE) -> Manifest:
        """Validate a parsed manifest; BundleError names `source` and the offending key."""
        top = _Reader(data, str(source), "")
        version = top.integer("schema_version")
        if version != SCHEMA_VERSION:
            raise top.fail("schema_version", f"is not supported (this node reads "
                           f"{SCHEMA_VERSION}; rebuild the bundle with this version)")
        detector = top.table_or_null("detector")
        manifest = cls(
            schema_version=version,
            name=top.text("name"),
            version=top.text("version"),
            created=top.timestamp("created"),
            trained=top.boolean("trained"),
            mean=top.triple("mean"),
            std=top.triple("std"),
            classifier=_classifier(top.table("classifier")),
            detector=_detector(detector) if detector is not None else None,
            files=top.digests("files"),
            backends=top.choices("backends", BACKENDS),
            training=types.MappingProxyType(dict(top.table("training").data)),
            tensorrt=_plan_target(top.table("tensorrt")) if "tensorrt" in data else None,
            preprocessing=(_preprocessing(top.table("preprocessing"))
                           if "preprocessing" in data else None),
            intended_use=(_intended_use(top.table("intended_use"))
                          if "intended_use" in data else None),
        )
        top.done()
        if manifest.classifier.fusion is not None and manifest.detector is None:
            raise top.fail("classifier", "has a fusion with the detector's box score, but "
                           "the bundle has no detector")
        required = ([CLASSIFIER_FILE] + ([DETECTOR_FILE] if manifest.detector else [])
                    + ([REGION_CHECK_FILE] if manifest.intended_use is not None
                       and manifest.intended_use.region_check is not None else []))
        for name in required:
            if name not in manifest.files:
                raise top.fail("files", f"must include {name!r}")
        if "torch" in manifest.backends:
            for name in [CLASSIFIER_WEIGHTS] + ([DETECTOR_WEIGHTS] if manifest.detector else []):
                if name not in manifest.files:
                    raise top.fail("files", f"must include {name!r} for the torch backend")
        if "tensorrt" in manifest.backends:
            if manifest.tensorrt is None:
                raise top.fail("tensorrt", "must record the GPU and TensorRT version the "
                               "plans were built for (backends has tensorrt)")
            for name in [CLASSIFIER_PLAN] + ([DETECTOR_PLAN] if manifest.detector else []):
                if name not in manifest.files:
                    raise top.fail("files", f"must include {name!r} for the tensorrt backend")
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON-ready data (lists and dicts), keys in field order:
        the inverse of `from_dict`."""
        return _plain(self)


def points_by_region(data: Any, pooled: OperatingPoints,
                     source: str) -> Mapping[Region, RegionPoints]:
    """Checked points per region from their plain form (a calibration's record, as
    `RegionPoints.to_dict` writes each), for a manifest being built; BundleError names
    `source` and the key."""
    return _by_region(_Reader({BY_REGION: data}, source, "").table(BY_REGION), pooled)


def flag_rates(data: Any, source: str) -> Mapping[str, FlagRates]:
    """Checked expected flag rates from their plain form (a calibration's record), for
    a manifest being built; BundleError names `source` and the key."""
    key = "expected_flag_rates"
    return _flag_rates(_Reader({key: data}, source, "").table(key))


def _classifier(r: _Reader) -> ClassifierSpec:
    points = r.points("operating_points")
    spec = ClassifierSpec(
        architecture=r.text("architecture"), variant=r.text("variant"),
        labels=r.labels("labels"), input_size=r.integer("input_size"),
        temperature=r.positive("temperature"), operating_points=points,
        members=r.integer("members") if "members" in r.data else 1,
        operating_points_by_region=(_by_region(r.table(BY_REGION), points)
                                    if BY_REGION in r.data else None),
        fusion=_fusion(r.table("fusion")) if "fusion" in r.data else None,
        expected_flag_rates=(_flag_rates(r.table("expected_flag_rates"))
                             if "expected_flag_rates" in r.data else None))
    r.done()
    return spec


def _flag_rates(r: _Reader) -> Mapping[str, FlagRates]:
    unknown = [name for name in r.data if name not in REGION_GROUPS]
    if unknown:
        raise r.fail(unknown[0], f"is no group; expected_flag_rates has "
                     f"{', '.join(REGION_GROUPS)}")
    rates = {}
    for name in list(r.data):
        entry = r.table(name)
        rates[name] = FlagRates(entry.count("images"), entry.share("high_sensitivity"),
                                entry.share("high_specificity"))
        entry.done()
    r.done()
    return types.MappingProxyType(rates)


def _by_region(r: _Reader, pooled: OperatingPoints) -> Mapping[Region, RegionPoints]:
    """The points per region; a name that is no Region is refused, not ignored, since
    the node would never use it and nobody would notice."""
    known = [region.value for region in Region]
    for name in r.data:
        if name not in known:
            raise BundleError(f"{r.source}: key '{r.prefix}{name}' is not a region (known: "
                              f"{', '.join(known)})")
    if not r.data:
        raise BundleError(f"{r.source}: key '{r.prefix.removesuffix('.')}' names no region "
                          "(leave it out for the pooled points alone)")
    entries = {Region(name): _region_points(r.table(name), pooled)
               for name in known if name in r.data}
    r.done()
    return types.MappingProxyType(entries)


def _region_points(r: _Reader, pooled: OperatingPoints) -> RegionPoints:
    sensitive, specific = r.fraction("high_sensitivity"), r.fraction("high_specificity")
    if specific < sensitive:
        raise r.fail("high_specificity", f"is below high_sensitivity ({sensitive})")
    source = r.choice("source", POINT_SOURCES)
    if source == POOLED and (sensitive, specific) != (pooled.high_sensitivity,
                                                      pooled.high_specificity):
        raise r.fail("source", "says the pooled points, but the thresholds are not "
                     "classifier.operating_points'")
    fit = r.table("fitted_on")
    entry = RegionPoints(
        high_sensitivity=sensitive, high_specificity=specific, source=source,
        fitted_on=RegionFit(fractures=fit.count("fractures"), normals=fit.count("normals"),
                            high_sensitivity=_reached(fit.table("high_sensitivity")),
                            high_specificity=_reached(fit.table("high_specificity")),
                            floor_applied=fit.boolean("floor_applied")))
    fit.done()
    r.done()
    return entry


def _reached(r: _Reader) -> Reached:
    reached = Reached(sensitivity=r.rate("sensitivity"), specificity=r.rate("specificity"))
    r.done()
    return reached


def _fusion(r: _Reader) -> Fusion:
    fusion = Fusion(logit_weight=r.finite("logit_weight"), box_weight=r.finite("box_weight"),
                    intercept=r.finite("intercept"))
    r.done()
    return fusion


def _preprocessing(r: _Reader) -> Preprocessing:
    preprocessing = Preprocessing(
        crop=r.choice("crop", CROPS),
        detector_crop=r.choice("detector_crop", CROPS) if "detector_crop" in r.data else None)
    r.done()
    return preprocessing


def _intended_use(r: _Reader) -> IntendedUse:
    check = r.table("region_check") if "region_check" in r.data else None
    intended = IntendedUse(r.terms("body_parts"), r.count("min_age_years"),
                           _region_check(check) if check is not None else None)
    r.done()
    return intended


def _region_check(r: _Reader) -> RegionCheck:
    classes = r.choices("classes", REGION_GROUPS)
    if len(set(classes)) != len(classes):
        raise r.fail("classes", "must not repeat a class")
    check = RegionCheck(classes=classes, threshold=r.positive("threshold"),
                        backbone=r.text("backbone"),
                        validation=types.MappingProxyType(dict(r.table("validation").data)))
    r.done()
    return check


def _plan_target(r: _Reader) -> Mapping[str, str]:
    target = {key: r.text(key) for key in PLAN_TARGET_KEYS}
    r.done()
    return types.MappingProxyType(target)


def _detector(r: _Reader) -> DetectorSpec:
    spec = DetectorSpec(
        architecture=r.text("architecture"), backbone=r.text("backbone"),
        labels=r.labels("labels"), input_size=r.integer("input_size"),
        detections_per_image=r.integer("detections_per_image"),
        operating_points=r.points("operating_points"))
    r.done()
    return spec


class _Reader:
    """Reads one JSON object of the manifest, naming `prefix.key` in every error."""

    def __init__(self, data: Any, source: str, prefix: str) -> None:
        if not isinstance(data, dict):
            raise BundleError(f"{source}: {prefix or 'the manifest'} must be a JSON object, "
                              f"got {type(data).__name__}")
        self.data, self.source, self.prefix = data, source, prefix
        self._seen: set[str] = set()

    def fail(self, key: str, why: str) -> BundleError:
        got = f" (got {self.data[key]!r})" if key in self.data else ""
        return BundleError(f"{self.source}: key '{self.prefix}{key}' {why}{got}")

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise BundleError(f"{self.source}: missing key '{self.prefix}{key}'")
        self._seen.add(key)
        return self.data[key]

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._seen)
        if unknown:
            names = ", ".join(f"'{self.prefix}{k}'" for k in unknown)
            raise BundleError(f"{self.source}: unknown key(s) {names}")

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, "must be a non-empty string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if not _is_int(value) or value < 1:
            raise self.fail(key, "must be a positive integer")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def positive(self, key: str) -> float:
        value = self._get(key)
        if not _is_number(value) or not 0 < value < float("inf"):
            raise self.fail(key, "must be a positive finite number")
        return float(value)

    def count(self, key: str) -> int:
        value = self._get(key)
        if not _is_int(value) or value < 0:
            raise self.fail(key, "must be an integer, 0 or more")
        return value

    def fraction(self, key: str) -> float:
        value = self._get(key)
        if not _is_number(value) or not 0 < value < 1:
            raise self.fail(key, "must be a number between 0 and 1, both excluded")
        return float(value)

    def share(self, key: str) -> float:
        """A proportion in [0, 1]."""
        value = self._get(key)
        if not _is_number(value) or not 0 <= value <= 1:
            raise self.fail(key, "must be a number from 0 to 1")
        return float(value)

    def rate(self, key: str) -> float | None:
        """A proportion in [0, 1], or null where it is undefined (no case to count)."""
        value = self._get(key)
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            raise self.fail(key, "must be a number from 0 to 1, or null")
        return None if value is None else float(value)

    def finite(self, key: str) -> float:
        value = self._get(key)
        if not _is_number(value) or not math.isfinite(value):
            raise self.fail(key, "must be a finite number")
        return float(value)

    def timestamp(self, key: str) -> str:
        value = self.text(key)
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise self.fail(key, "must be an ISO 8601 date and time") from None
        return value

    def triple(self, key: str) -> tuple[float, float, float]:
        value = self._get(key)
        if not (isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))):
            raise self.fail(key, "must be a list of 3 numbers")
        return (float(value[0]), float(value[1]), float(value[2]))

    def labels(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if not (isinstance(value, list) and value
                and all(isinstance(item, str) and item for item in value)):
            raise self.fail(key, "must be a non-empty list of strings")
        if FRACTURE_LABEL not in value:
            raise self.fail(key, f"must include {FRACTURE_LABEL!r}")
        return tuple(value)

    def terms(self, key: str) -> tuple[str, ...]:
        value = self._get(key)
        if not (isinstance(value, list) and value and all(
                isinstance(term, str) and re.fullmatch(r"[A-Z0-9_]+", term) for term in value)):
            raise self.fail(key, "must be a non-empty list of Body Part Examined terms "
                            "(upper case letters, digits, underscores)")
        return tuple(value)

    def choices(self, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key)
        if not (isinstance(value, list) and value and all(item in allowed for item in value)):
            raise self.fail(key, f"must be a non-empty list of {', '.join(allowed)}")
        return tuple(value)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self._get(key)
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(map(repr, allowed))}")
        return value

    def points(self, key: str) -> OperatingPoints:
        r = self.table(key)
        values = [r._get(name) for name in ("high_sensitivity", "high_specificity")]
        r.done()
        if not all(_is_number(v) for v in values):
            raise self.fail(key, "must hold two numbers")
        try:
            return OperatingPoints(float(values[0]), float(values[1]))
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None

    def table(self, key: str) -> _Reader:
        value = self._get(key)
        if not isinstance(value, dict):
            raise self.fail(key, "must be an object")
        return _Reader(value, self.source, f"{self.prefix}{key}.")

    def table_or_null(self, key: str) -> _Reader | None:
        return None if self._get(key) is None else self.table(key)

    def digests(self, key: str) -> Mapping[str, str]:
        value = self._get(key)
        if not (isinstance(value, dict) and value
                and all(_is_plain_name(name) and _is_sha256(digest)
                        for name, digest in value.items())):
            raise self.fail(key, "must map plain file names to sha256 hex digests")
        return types.MappingProxyType(dict(value))


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as JSON-ready dicts and lists."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest is valid and whose files match their checksums."""

    path: Path
    manifest: Manifest

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read and verify a bundle; BundleError names the file that is wrong and why."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{manifest_path}: missing (is {path} an engine bundle?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: unreadable ({exc})") from exc
        manifest = Manifest.from_dict(data, manifest_path)
        for name, expected in manifest.files.items():
            file_path = path / name
            try:
                actual = _sha256(file_path)
            except FileNotFoundError:
                raise BundleError(f"{file_path}: listed in {MANIFEST_FILE} but missing") from None
            if actual != expected:
                raise BundleError(f"{file_path}: sha256 {actual} does not match {expected} in "
                                  f"{MANIFEST_FILE}; the bundle was changed after it was built")
        return cls(path=path, manifest=manifest)

    def file(self, name: str) -> Path:
        """Path of one of the bundle's verified files."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: has no file {name!r} "
                              f"(it holds {', '.join(sorted(self.manifest.files))})")
        return self.path / name

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self.manifest.name, version=self.manifest.version,
                         trained=self.manifest.trained)


def write_bundle(out_dir: str | Path, manifest: Manifest,
                 files: Mapping[str, str | Path]) -> Bundle:
    """Create a bundle at `out_dir` from model files and their manifest.

    `files` maps each name in the bundle to the file to copy there; the checksums are
    computed here and replace `manifest.files` (a manifest being built has none yet).
    The manifest is checked as the node reads it before it is written. Everything is
    written to a temporary directory beside `out_dir` and renamed into place, so a
    crash or a failed validation never leaves half a bundle under the final name. An
    existing non-empty `out_dir` is refused: bundles are immutable, and a new build
    gets a new version.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"{out_dir}: already exists (and is not an empty directory); "
                          "a bundle is never overwritten (build a new version)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        digests = {}
        for name, source in files.items():
            if not _is_plain_name(name) or name == MANIFEST_FILE:
                raise BundleError(f"{name!r}: not a valid bundle file name")
            target = staging / name
            shutil.copyfile(source, target)
            fsync_path(target)
            digests[name] = _sha256(target)
        checked = Manifest.from_dict(replace(manifest, files=digests).to_dict(),
                                     f"{out_dir / MANIFEST_FILE} (being written)")
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json.dumps(checked.to_dict(), indent=2) + "\n",
                                 encoding="utf-8")
        fsync_path(manifest_path)
        fsync_path(staging)
        try:
            # rename(2) replaces an empty directory and fails on a non-empty one, so a
            # bundle that appeared since the check above is still never overwritten.
            staging.rename(out_dir)
        except OSError as exc:
            raise BundleError(f"{out_dir}: cannot create the bundle ({exc})") from exc
        fsync_path(out_dir.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Bundle.load(out_dir)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sigmoid(value: Any) -> Any:
    """The logistic function in its tanh form: no overflow for large |value|, unlike
    1 / (1 + exp(-value))."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(value, dtype=np.float64)))


def _signed(value: float) -> str:
    return f"{'-' if value < 0 else '+'} {abs(value):.3f}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(char in "0123456789abcdef" for char in value))


def _is_plain_name(name: Any) -> bool:
    """A file name with no directory part, so a manifest cannot point outside its bundle."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and "/" not in name and "\\" not in name)
