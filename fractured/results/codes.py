"""Every coded concept and identity string the result objects carry, in one place.

A PACS, a viewer or a registry reads our SR by its codes, not by its words, so a code
written twice with a different meaning or scheme would be two different concepts. The
constants are pydicom `Code`s (plain values, safe to share); highdicom turns each into a
fresh `CodedConcept` item wherever it is used.

Choices, and why:
- Finding: SNOMED CT 125605004 "Fracture of bone" (a disorder). 72704001 "Fracture" is
  the *morphologic abnormality*: in SNOMED CT it is the value of the "associated
  morphology" attribute of 125605004, not a concept meant to record that a patient has
  a fracture. The classifier answers "is there a fracture of bone in this image", which
  is 125605004.
- Present/Undetermined/Absent: SNOMED CT 52101004 "Present", 373068000 "Undetermined"
  and 272519000 "Absent", the members of DICOM CID 240 "Present-Absent". "Fracture of
  bone" is Present only for a likely fracture (the high-specificity point); a possible
  one is Undetermined, which no reader of standard codes can take for Present (at the
  high-sensitivity point the model flags many normal images). The older 2667000
  "Absent" is an inactive SNOMED concept that DICOM replaced by 272519000.
- Probability: no standard code names "probability of fracture" (DCM 111047 is
  "Probability of cancer", a mammography CAD concept). As DICOM and IHE AIR allow, the
  algorithm's own concept lives in our private coding scheme "99FRACTURED" (a "99"
  prefix marks a private scheme), declared in each SR's Coding Scheme Identification
  Sequence. Its unit is UCUM "1" ("no units"), the dimensionless unit listed in DICOM
  CID 7181, rather than the annotation "{probability}", which UCUM reads as the same
  unit but which viewers do not know.
- Free text in a measurement group (the UNTRAINED warning): DCM 121106 "Comment";
  TID 1501 row 12 allows coded-name/text-value pairs in a group.
- Contributing Equipment purpose: DCM 109102 "Processing Equipment" (CID 7005). The
  model processes the X-ray into results; 109103 is "Modifying Equipment", for
  equipment that altered the instance itself.
- Source image of the overlay: DCM 121322 "Source image for image processing
  operation" (CID 7202).
- Decisions at each operating point, the decision level, the probability's spread under
  test-time augmentation and a box's score are the algorithm's own concepts, in the
  private scheme like the probability; the standard "Fracture of bone" stays as the
  primary evaluation, in plain terms, for readers that know only it.
- Finding site: BodyPartExamined mapped to its SNOMED CT anatomic concept as PS3.16
  Annex L pairs them (the codes come from pydicom's DICOM code dictionary, not typed
  here); an unknown or missing body part gives no finding site rather than a guess.
- Study summary text: DCM 121111 "Summary", the one TEXT item a text-only viewer shows.
- Whose operating points decided, where a bundle has a pair per body region: a private
  concept valued by a private code per region (or "pooled"), beside the decision level
  it qualifies. No standard concept names a threshold's scope, and the regions are the
  training data's groups of anatomy, not anatomic sites (which the finding site codes).
"""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

import fractured
from fractured.engine.findings import DecisionLevel, ModelInfo
from fractured.engine.regions import BODY_PART_CODES, POOLED, Region

PRIVATE_SCHEME = "99FRACTURED"

# -- the finding and its evaluation ----------------------------------------------------
FRACTURE = Code("125605004", "SCT", "Fracture of bone")
PRESENT = Code("52101004", "SCT", "Present")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")
ABSENT = Code("272519000", "SCT", "Absent")
FRACTURE_PROBABILITY = Code("FRACTURE-PROB", PRIVATE_SCHEME, "Fracture probability")
NO_UNITS = Code("1", "UCUM", "no units")
COMMENT = Code("121106", "DCM", "Comment")
FRACTURE_AT_HIGH_SENSITIVITY = Code("FRACTURE-HIGH-SENS", PRIVATE_SCHEME,
                                    "Fracture at high-sensitivity operating point")
FRACTURE_AT_HIGH_SPECIFICITY = Code("FRACTURE-HIGH-SPEC", PRIVATE_SCHEME,
                                    "Fracture at high-specificity operating point")
DECISION_LEVEL = Code("DECISION-LEVEL", PRIVATE_SCHEME, "AI decision level")
LEVELS: dict[DecisionLevel, Code] = {
    DecisionLevel.LIKELY: Code("LEVEL-LIKELY", PRIVATE_SCHEME, "Likely fracture"),
    DecisionLevel.POSSIBLE: Code("LEVEL-POSSIBLE", PRIVATE_SCHEME, "Possible fracture"),
    DecisionLevel.NEGATIVE: Code("LEVEL-NEGATIVE", PRIVATE_SCHEME, "No fracture found"),
}
#: "Fracture of bone" per decision level: Present only where a fracture is likely.
FRACTURE_VALUES: dict[DecisionLevel, Code] = {
    DecisionLevel.LIKELY: PRESENT,
    DecisionLevel.POSSIBLE: UNDETERMINED,
    DecisionLevel.NEGATIVE: ABSENT,
}
PROBABILITY_SPREAD = Code("FRACTURE-PROB-SD", PRIVATE_SCHEME,
                          "Fracture probability SD under test-time augmentation")
BOX_SCORE = Code("FRACTURE-BOX-SCORE", PRIVATE_SCHEME, "Fracture box score")
OPERATING_POINTS_REGION = Code("OP-REGION", PRIVATE_SCHEME, "Operating points body region")
#: Finding.operating_region (a Region, or POOLED) to its code; values fit VR SH (16).
OPERATING_POINTS_FROM: dict[str, Code] = {
    Region.HAND: Code("OPR-HAND", PRIVATE_SCHEME, "Hand region operating points"),
    Region.LEG: Code("OPR-LEG", PRIVATE_SCHEME, "Leg region operating points"),
    Region.HIP: Code("OPR-HIP", PRIVATE_SCHEME, "Hip region operating points"),
    Region.SHOULDER: Code("OPR-SHOULDER", PRIVATE_SCHEME, "Shoulder region operating points"),
    POOLED: Code("OPR-POOLED", PRIVATE_SCHEME, "Pooled operating points"),
}
SUMMARY = dicom_codes.DCM.Summary

#: BodyPartExamined defined terms to their anatomic concepts (engine.regions, which the
#: intended-use check reads too).
BODY_PARTS = BODY_PART_CODES

# -- the report as a whole (TID 1500) --------------------------------------------------
REPORT_TITLE = Code("126000", "DCM", "Imaging Measurement Report")
PROCEDURE_REPORTED = Code("43468-8", "LN", "XR unspecified body region")

# -- references between objects --------------------------------------------------------
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")

# -- who made the objects (General Equipment, device observer) -------------------------
MANUFACTURER = "fractured"
MANUFACTURER_MODEL_NAME = "fractured fracture detection"
SOFTWARE_VERSION = fractured.__version__

# -- the words every result object shows ------------------------------------------------
DISCLAIMER = "AI decision support - not a diagnosis"
UNTRAINED_MARKER = "UNTRAINED MODEL"
UNTRAINED_WARNING = f"{UNTRAINED_MARKER} - output is meaningless"

_LONG_STRING_MAX = 64  # VR LO, the VR of Series Description


def coding_scheme() -> CodingSchemeIdentificationItem:
    """Declare the private scheme, as an SR must for every scheme not in PS3.16 8-1.

    (highdicom's documentation names `highdicom.sr.CodingSchemeIdentificationItem`, but
    0.28 exports it only from `highdicom.coding_schemes`.)
    """
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="fractured algorithm concepts",
        responsible_organization=MANUFACTURER,
    )


def model_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """The engine bundle as Contributing Equipment, so a viewer can tell which model ran."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_description=(
            "Fracture classifier" if model.trained else f"Fracture classifier, {UNTRAINED_MARKER}"
        ),
    )


def series_description(what: str, model: ModelInfo) -> str:
    """`what name version`, plus the UNTRAINED marker, cut to fit VR LO (64 characters).

    The PACS study list often shows nothing but the series description, so the marker
    is kept whole and the model label is what gets shortened.
    """
    suffix = "" if model.trained else f" - {UNTRAINED_MARKER}"
    label = f"{model.name} {model.version}"
    room = _LONG_STRING_MAX - len(what) - 1 - len(suffix)
    if len(label) > room:
        label = label[: room - 3] + "..."
    return f"{what} {label}{suffix}"


#: Before each measurement group's Tracking Identifier: the name OHIF gives what its
#: rectangle tool saves, the only way OHIF takes a group as a rectangle it can show on the
#: image and list (docs/pacs-setup.md). The rest says which box of which image.
RECTANGLE_TRACKING_PREFIX = "Cornerstone3DTools@^0.1.0:RectangleROI:"
