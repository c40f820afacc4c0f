"""Body regions: the training data's body-part labels and the DICOM terms that map to them.

One pooled pair of operating points means different things in different anatomy: the
shipped model scores normal hands higher than normal legs, so its high-sensitivity
threshold called "possible fracture" on 92 % of normal validation hands. A bundle may
therefore carry a pair per region (`classifier.operating_points_by_region`), fitted on
that region's validation images, and the node picks the pair from each image's Body
Part Examined (0018,0015).

The regions are FracAtlas's labels (hand, leg, hip, shoulder; its "mixed" images span
several regions and have no DICOM term, so they count for the pooled points only). A
DICOM defined term (PS3.3 C.7.3.1.1, PS3.16 Annex L) maps to the region whose images
it appears in. The same table reads the training labels, since FracAtlas's labels are
themselves defined terms lower-cased, as are MURA's ("wrist", "humerus") and those the
DICOM + CSV reader takes from the files' headers. Terms on the border between regions
(ELBOW, FOREARM, RADIUS, ULNA, and ARM, which some sites use for the whole upper limb)
map to none: FracAtlas's regions do not say where they belong, so the pooled points,
fitted on every image, are the honest choice there.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from typing import Final, Literal

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code


class Region(enum.StrEnum):
    """A body region with operating points of its own (a manifest key)."""

    HAND = "hand"
    LEG = "leg"
    HIP = "hip"
    SHOULDER = "shoulder"


#: What a finding records when the bundle's pooled points applied although it has
#: points per region (no body part, one that maps to no region, or a region that had
#: too few validation cases and so carries the pooled points).
POOLED: Final = "pooled"
PointsRegion = Region | Literal["pooled"]

#: Body Part Examined defined terms to the region whose operating points they use.
BODY_PART_REGIONS: Mapping[str, Region] = types.MappingProxyType({
    **dict.fromkeys(("HAND", "WRIST", "FINGER", "THUMB"), Region.HAND),
    **dict.fromkeys(("FOOT", "ANKLE", "TOE", "CALCANEUS", "KNEE", "PATELLA", "LEG",
                     "TIBIA", "FIBULA", "THIGH", "FEMUR"), Region.LEG),
    **dict.fromkeys(("HIP", "PELVIS"), Region.HIP),
    **dict.fromkeys(("SHOULDER", "CLAVICLE", "SCAPULA", "HUMERUS"), Region.SHOULDER),
})


#: BodyPartExamined defined terms (PS3.3 C.7.3.1.1) of the skeleton X-ray studies the
#: node reads, to their anatomic concepts (PS3.16 Annex L).
BODY_PART_CODES: Mapping[str, Code] = types.MappingProxyType({
    "HAND": codes.SCT.Hand, "FINGER": codes.SCT.Finger,
    "WRIST": codes.SCT.WristJoint, "FOREARM": codes.SCT.Forearm,
    "RADIUS": codes.SCT.Radius, "ULNA": codes.SCT.Ulna,
    "ELBOW": codes.SCT.ElbowJoint, "ARM": codes.SCT.UpperArm,
    "HUMERUS": codes.SCT.Humerus, "SHOULDER": codes.SCT.Shoulder,
    "CLAVICLE": codes.SCT.Clavicle, "SCAPULA": codes.SCT.Scapula,
    "HIP": codes.SCT.Hip, "PELVIS": codes.SCT.Pelvis,
    "THIGH": codes.SCT.Thigh, "FEMUR": codes.SCT.Femur,
    "KNEE": codes.SCT.Knee, "PATELLA": codes.SCT.Patella,
    "LEG": codes.SCT.LowerLeg, "TIBIA": codes.SCT.Tibia,
    "FIBULA": codes.SCT.Fibula, "ANKLE": codes.SCT.AnkleJoint,
    "FOOT": codes.SCT.Foot, "CALCANEUS": codes.SCT.Calcaneus,
    "TOE": codes.SCT.Toe, "EXTREMITY": codes.SCT.Extremity,
    "RIB": codes.SCT.Rib, "STERNUM": codes.SCT.Sternum,
    "SKULL": codes.SCT.Skull, "CHEST": codes.SCT.Chest,
    "SPINE": codes.SCT.Spine, "CSPINE": codes.SCT.CervicalSpine,
    "TSPINE": codes.SCT.ThoracicSpine, "LSPINE": codes.SCT.LumbarSpine,
    "SACRUM": codes.SCT.Sacrum, "COCCYX": codes.SCT.Coccyx,
})


#: The group of an image of no region (FracAtlas's "mixed" images, a body part of no
#: region, none at all) wherever images are counted per region: the metrics, the
#: expected flag rates, status and the card.
OTHER: Final = "other"
#: Every per-region group: the regions, then OTHER.
REGION_GROUPS: tuple[str, ...] = (*(region.value for region in Region), OTHER)


def region_group(region: Region | None) -> str:
    """The per-region group an image of `region` (None: no region) is counted in."""
    return region.value if region is not None else OTHER


def region_of(body_part: str) -> Region | None:
    """The region of a Body Part Examined term or a training label (case and spaces
    ignored); None where it maps to no region."""
    return BODY_PART_REGIONS.get(body_part.strip().upper())


def dataset_region(dataset: Dataset | None) -> Region | None:
    """The region of a DICOM image's Body Part Examined; None without one (a PNG or
    JPEG input, an empty or absent attribute, a term of no region)."""
    if dataset is None:
        return None
    return region_of(str(dataset.get("BodyPartExamined", "") or ""))
