"""Secondary Capture overlay: the X-ray with the class activation map and a banner.

The SR is for machines; this image is for the radiologist in a viewer that shows no SR.
It is the X-ray as the viewer shows it (windowed, bone bright), with the heatmap tinted
over it only where the model looked (cold areas stay plain grey), under a black banner
that says what this is: decision support, which model, what it concluded, and, loudly,
when the model was never trained. The banner sits above the image rather than on it, so
no anatomy is hidden; the X-ray keeps the source's orientation (no flips).
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from fractured.engine.findings import Finding
from fractured.engine.preprocess import display_pixels
from fractured.results import codes
from fractured.results.header import carry_character_set, study_header

MAX_HEAT_ALPHA = 0.6
"""Opacity of the colour map where heat is 1; opacity is proportional to heat."""

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_YELLOW = (255, 255, 0)
_RED = (200, 0, 0)


def make_overlay(
    finding: Finding,
    source: Dataset,
    *,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    max_size: int = 1024,
    display: np.ndarray | None = None,
) -> hd.sc.SCImage:
    """Build the RGB Secondary Capture for one finding, in the source's study and patient.

    The X-ray is downscaled (never enlarged) so its long side is at most `max_size`; the
    heatmap, which is on the source's pixel grid, is resampled to the same size.
    `display` is the source's `display_pixels`, when the caller already has it (decoding
    a large compressed radiograph twice costs more than the whole overlay).

    Raises ValueError when the finding is about another image or its heatmap does not
    match the source's rows x columns; DecodeError (from `display_pixels`) when the
    source's pixels cannot be shown.
    """
    if finding.image.sop_instance_uid != str(source.SOPInstanceUID):
        raise ValueError(
            f"finding is about {finding.image.sop_instance_uid}, "
            f"source is {source.SOPInstanceUID}"
        )
    grey = display_pixels(source) if display is None else display
    if finding.heatmap.shape != grey.shape:
        raise ValueError(
            f"heatmap shape {finding.heatmap.shape} is not the source's {grey.shape}"
        )
    scale = min(1.0, max_size / max(grey.shape))
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    # INTER_AREA averages the pixels a downscale drops, so thin fracture lines and hot
    # spots fade rather than alias away.
    grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    heat = cv2.resize(finding.heatmap.astype(np.float32), size, interpolation=cv2.INTER_AREA)

    image = np.vstack([_banner(finding, size[0]), _blend(grey, heat)])
    model = finding.model
    header = study_header(source)
    overlay = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=image,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=codes.MANUFACTURER,
        # A stand-in, replaced below by the source's own value: highdicom accepts only
        # single-letter directions, not oblique ones ("FL") nor none at all.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[codes.model_equipment(model)],
        series_description=codes.series_description("AI fracture overlay", model),
        manufacturer_model_name=codes.MANUFACTURER_MODEL_NAME,
        software_versions=codes.SOFTWARE_VERSION,
        specific_character_set=None,  # see carry_character_set
    )
    carry_character_set(overlay, header)
    # from_ref_dataset copies nine patient/study attributes; the whole Patient and Study
    # modules (Issuer of Patient ID, Other Patient IDs, Study Description...) are what the
    # PACS and its viewer use to file and show the overlay with its study.
    overlay.copy_patient_and_study_information(header)
    # The overlay has the source's row and column directions, so its orientation is the
    # source's, verbatim (empty where the source has none or an invalid one: Type 2
    # allows it). Taken from the header, like everything else copied from the source.
    overlay.PatientOrientation = header.get("PatientOrientation") or ""
    if header.get("AnatomicalOrientationType"):
        overlay.AnatomicalOrientationType = header.AnatomicalOrientationType
    # Which side, as the source says it: General Series Laterality is Type 2C (empty
    # when unknown) and must be absent when the image carries Image Laterality.
    if header.get("ImageLaterality"):
        overlay.ImageLaterality = header.ImageLaterality
    else:
        overlay.Laterality = header.get("Laterality") or ""
    overlay.SourceImageSequence = [_source_reference(source)]
    overlay.DerivationDescription = (
        f"{codes.DISCLAIMER}. Windowed source resampled by {scale:.3f}, fracture class "
        f"activation map of {model.name} {model.version} blended in colour, text banner added."
    )
    # The banner names the model and its verdict, never the patient or the date.
    overlay.BurnedInAnnotation = "NO"
    return overlay


def _blend(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Grey X-ray with the JET colour map mixed in at an opacity proportional to heat."""
    heat = np.clip(heat, 0.0, 1.0)
    grey_rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    colour_bgr = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = colour_bgr[..., ::-1].astype(np.float32)
    alpha = (MAX_HEAT_ALPHA * heat)[..., None]
    return np.round(grey_rgb * (1.0 - alpha) + colour * alpha).astype(np.uint8)


def _banner(finding: Finding, width: int) -> np.ndarray:
    """Black strip with white text (and a red/yellow line when untrained), `width` wide.

    The text size follows the image width, so it reads the same in a viewer that fits
    the image to the screen; lines that do not fit are wrapped at spaces.
    """
    verdict = "FRACTURE" if finding.fracture else "no fracture"
    lines = [(codes.DISCLAIMER, _WHITE, _BLACK)]
    if not finding.model.trained:
        lines.append((codes.UNTRAINED_WARNING, _YELLOW, _RED))
    lines += [
        (f"Model: {finding.model.name} {finding.model.version}", _WHITE, _BLACK),
        (f"{_probability_text(finding)}: {verdict}", _WHITE, _BLACK),
    ]
    font_scale = float(np.clip(width / 1100, 0.4, 1.0))
    thickness = max(1, round(font_scale * 2))
    margin = max(4, round(10 * font_scale))
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, font_scale, thickness)
    line_height = text_height + baseline + margin

    rows = [
        (part, colour, band)
        for text, colour, band in lines
        for part in _wrap(text, width - 2 * margin, font_scale, thickness)
    ]
    banner = np.zeros((margin + line_height * len(rows), width, 3), np.uint8)
    for index, (text, colour, band) in enumerate(rows):
        top = margin // 2 + index * line_height
        banner[top : top + line_height] = band
        cv2.putText(
            banner, text, (margin, top + margin // 2 + text_height), _FONT, font_scale,
            colour, thickness, cv2.LINE_AA,
        )
    return banner


def _probability_text(finding: Finding) -> str:
    """Probability and threshold to two decimals, or more where two would show a value
    just below the threshold as equal to it, next to a "no fracture" verdict."""
    probability, threshold = float(finding.probability), float(finding.threshold)
    for decimals in range(2, 7):
        shown, limit = f"{probability:.{decimals}f}", f"{threshold:.{decimals}f}"
        if shown != limit or probability == threshold:
            break
    return f"Fracture probability {shown} (threshold {limit})"


def _wrap(text: str, room: int, font_scale: float, thickness: int) -> list[str]:
    """Split `text` at spaces into lines no wider than `room` pixels (a long word stays)."""
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(candidate, _FONT, font_scale, thickness)[0][0] <= room:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def _source_reference(source: Dataset) -> Dataset:
    """A Source Image Sequence item: the exact X-ray this overlay was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.SOURCE_IMAGE_FOR_PROCESSING)
    ]
    return item
