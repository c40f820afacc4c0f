"""Where a bundle's model may speak: the body parts and ages it was validated on.

A fracture model trained on adults' hands, legs, hips and shoulders has never been
measured on a chest, a skull or a child's wrist; a number it gives there is noise that
looks like an answer. A bundle therefore declares its intended use (manifest
`intended_use`, written by `fractured build-engine` from the body parts its training
data had) and the node checks each image against it before any verdict:

- Body Part Examined (0018,0015), or where it is empty the Anatomic Region Sequence's
  SNOMED CT code, among the intended terms: analysed;
- a known term outside them (CHEST, SKULL, ELBOW, ...): not analysed;
- no term, an empty one, a generic one (EXTREMITY) or free text no list defines: the
  header cannot say (`UNKNOWN_BODY_PART`). Where the bundle has a region check
  (engine.region_check) the image decides (`decide_from_image`): analysed if it looks
  like the training images and shows an intended region, not analysed otherwise. A
  bundle without one analyses such an image, and the node's logs and metrics count how
  often that happens;
- a patient younger than `min_age_years`, from Patient's Age (0010,1010), else Patient's
  Birth Date against the Study (or Acquisition, Content) Date: not analysed.

Known terms are the Body Part Examined defined terms of PS3.16 Annex L (CID 4031) that
projection radiography uses, and the terms engine.regions maps.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset

from fractured.engine.region_check import RegionCheck, RegionSeen
from fractured.engine.regions import BODY_PART_CODES, BODY_PART_REGIONS, Region, region_of

#: Adults: the age from which an image is analysed, unless the bundle says otherwise.
ADULT_AGE_YEARS = 18

#: Body Part Examined terms that name a part of the body (PS3.16 Annex L, CID 4031, as
#: projection radiography uses them), beside those engine.regions maps.
KNOWN_BODY_PARTS = frozenset({
    *BODY_PART_REGIONS,
    "ABDOMEN", "ABDOMENPELVIS", "ACJOINT", "ARM", "BREAST", "CERVIX", "CHEST",
    "CHESTABDOMEN", "CHESTABDPELVIS", "COCCYX", "CSPINE", "CTSPINE", "ELBOW", "FACE",
    "FOREARM", "HEAD", "HEADNECK", "HEART", "IAC", "JAW", "LSPINE", "LSSPINE", "MANDIBLE",
    "MAXILLA", "NECK", "NECKCHEST", "NOSE", "ORBIT", "RADIUS", "RIB", "SACRUM", "SELLA",
    "SINUS", "SJOINT", "SKULL", "SPINE", "SSPINE", "STERNUM", "TLSPINE", "TMJ", "TSPINE",
    "ULNA", "WHOLEBODY", "ZYGOMA",
    "THORAX",  # not a defined term, but what some modalities write for a chest film
})
#: Terms that name a part without saying which: the header cannot decide.
GENERIC_BODY_PARTS = frozenset({"EXTREMITY"})

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


class ScopeReason(enum.StrEnum):
    """Why an image was or was not analysed (a closed set: log field, metric label)."""

    IN_SCOPE = "in_scope"  # its body part is intended
    NOT_DECLARED = "not_declared"  # analysed: the bundle declares no intended use
    UNKNOWN_BODY_PART = "unknown_body_part"  # analysed: the header cannot say
    REGION_FROM_IMAGE = "region_from_image"  # analysed: the image shows an intended region
    REGION_OUTSIDE = "region_outside"  # the image shows a region the model was not made for
    UNFAMILIAR_IMAGE = "unfamiliar_image"  # the image is unlike every training image
    BODY_PART_OUTSIDE = "body_part_outside"  # a known part the model was not made for
    UNDER_AGE = "under_age"  # younger than the intended age


@dataclass(frozen=True)
class ScopeCheck:
    """The check of one image: whether to analyse it, why, and the reason in words
    (never a patient's data: the body part, but not the age); `region`, where the
    region check decided, the body region it saw."""

    analyse: bool
    reason: ScopeReason
    detail: str
    region: Region | None = None


@dataclass(frozen=True)
class IntendedUse:
    """The Body Part Examined terms a bundle's model may analyse, and the youngest age."""

    body_parts: tuple[str, ...]
    min_age_years: int = ADULT_AGE_YEARS
    #: decides images whose header cannot (absent in bundles built before it)
    region_check: RegionCheck | None = field(default=None, metadata={"omit_if_none": True})

    def __post_init__(self) -> None:
        if not self.body_parts:
            raise ValueError("an intended use needs at least one body part")
        if self.min_age_years < 0:
            raise ValueError(f"min_age_years must be at least 0, got {self.min_age_years}")

    @classmethod
    def for_regions(cls, regions: Iterable[Region],
                    min_age_years: int = ADULT_AGE_YEARS) -> IntendedUse:
        """Every term engine.regions maps to one of `regions`, in its table's order."""
        chosen = set(regions)
        return cls(tuple(term for term, region in BODY_PART_REGIONS.items()
                         if region in chosen), min_age_years)

    def widened(self, body_parts: Iterable[str]) -> IntendedUse:
        """This intended use with more terms (an operator's explicit, logged choice)."""
        extra = [term for term in (_term(t) for t in body_parts)
                 if term and term not in self.body_parts]
        return IntendedUse((*self.body_parts, *extra), self.min_age_years, self.region_check)

    @property
    def regions(self) -> frozenset[Region]:
        """The body regions its terms map to (engine.regions)."""
        return frozenset(region for term in self.body_parts
                         if (region := region_of(term)) is not None)

    def decide_from_image(self, seen: RegionSeen) -> ScopeCheck:
        """The check of an image whose header could not decide (`check` said
        UNKNOWN_BODY_PART), from what the region check saw in its pixels."""
        if not seen.familiar:
            assert self.region_check is not None  # seen came from it
            return ScopeCheck(False, ScopeReason.UNFAMILIAR_IMAGE,
                              "the image is unlike the model's training images "
                              f"(distance {seen.distance:.0f}, limit "
                              f"{self.region_check.threshold:.0f})")
        if seen.region in self.regions:
            return ScopeCheck(True, ScopeReason.REGION_FROM_IMAGE,
                              f"body region {seen.group}, decided from the image",
                              seen.region)
        shown = ("several regions" if seen.region is None else f"body region {seen.group}")
        return ScopeCheck(False, ScopeReason.REGION_OUTSIDE,
                          f"{shown}, decided from the image, is outside the intended use",
                          seen.region)

    def check(self, dataset: Dataset | None) -> ScopeCheck:
        """Whether the image whose DICOM header is `dataset` (None: a PNG or JPEG
        without one) is inside this intended use."""
        if dataset is None:
            return ScopeCheck(True, ScopeReason.UNKNOWN_BODY_PART,
                              "no DICOM header: body part and age unknown")
        age = age_in_years(dataset)
        if age is not None and age < self.min_age_years:
            return ScopeCheck(False, ScopeReason.UNDER_AGE,
                              f"patient younger than {self.min_age_years} years")
        term = (_term(str(dataset.get("BodyPartExamined", "") or ""))
                or _anatomic_region_term(dataset))
        if term in self.body_parts:
            return ScopeCheck(True, ScopeReason.IN_SCOPE, f"body part {term}")
        if term in KNOWN_BODY_PARTS:
            return ScopeCheck(False, ScopeReason.BODY_PART_OUTSIDE,
                              f"body part {term} is outside the intended use")
        said = ("no body part" if not term
                else f"body part {term} is too general to decide" if term in GENERIC_BODY_PARTS
                else f"body part {term!r} is no defined term")
        return ScopeCheck(True, ScopeReason.UNKNOWN_BODY_PART, f"{said}: analysed")


#: The check of a bundle that declares no intended use (built before them): analysed.
NOT_DECLARED_CHECK = ScopeCheck(True, ScopeReason.NOT_DECLARED,
                                "the bundle declares no intended use: analysed")


def age_in_years(dataset: Dataset) -> float | None:
    """The patient's age at the study, from Patient's Age, else from the birth date and
    the study date; None where neither is given or readable."""
    match = _AGE.match(str(dataset.get("PatientAge", "") or "").strip().upper())
    if match:
        return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25
    born = _date(dataset.get("PatientBirthDate"))
    seen = next((d for d in (_date(dataset.get(k)) for k in (
        "StudyDate", "AcquisitionDate", "ContentDate")) if d is not None), None)
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


#: SNOMED CT codes of the anatomic regions engine.regions names, to their terms.
_TERM_OF_CODE = {code.value: term for term, code in BODY_PART_CODES.items()
                 if code.scheme_designator == "SCT"}


def _anatomic_region_term(dataset: Dataset) -> str:
    """The Body Part Examined term of the image's Anatomic Region Sequence (0008,2218),
    for a header that codes the region there instead; "" where it names none we know."""
    regions = dataset.get("AnatomicRegionSequence") or []
    if not regions:
        return ""
    item = regions[0]
    if str(item.get("CodingSchemeDesignator", "")) != "SCT":
        return ""
    return _TERM_OF_CODE.get(str(item.get("CodeValue", "")), "")


def _term(value: str) -> str:
    """A Body Part Examined value as its defined term: upper case, no spaces."""
    return re.sub(r"\s+", "", value).upper()


def _date(value: object) -> date | None:
    text = str(value or "").strip()
    if not re.fullmatch(r"\d{8}", text):
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
