"""Secondary Capture overlay: the X-ray with the class activation map, boxes and a banner.

The SR is for machines; this image is for the radiologist in a viewer that shows no SR.
It is the X-ray as the viewer shows it (windowed, bone bright), with the heatmap tinted
over it only where the model looked (cold areas stay plain grey), the detector's boxes
drawn as fracture products draw them (solid: likely, dashed: possible), under a black
banner that says what this is: decision support, which model, what it concluded, that
the colour shows where the model looked and not a fracture's outline, and, loudly, when
the model was never trained. The banner sits above the image rather than on
it, so no anatomy is hidden; the X-ray keeps the source's orientation (no flips).

`render_overlay` makes the picture alone (also written as PNG by `fractured predict`);
`make_overlay` wraps it into a DICOM Secondary Capture in the source's study.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from fractured.engine.findings import Box, DecisionLevel, Finding, ModelInfo
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
# Magenta is in neither the grey scale nor the JET map (blue-cyan-green-yellow-red), and
# a black halo under it keeps it apart from bright bone and from the map's hot reds.
BOX_COLOUR = (255, 0, 255)
BOX_LEGEND = "solid: likely fracture, dashed: possible fracture"
#: What the colour means, on every overlay: the class activation map shows where the
#: classifier looked, and its peak lies on a true fracture box on few fractured images
#: (the pointing game in each bundle's card), so it must not read as an outline.
HEATMAP_LEGEND = "colour: where the model looked, not an outline of a fracture"
#: Heatmap colour maps ([results].colormap); jet is what fracture products and papers
#: show, turbo its smoother successor, the others perceptually uniform.
COLORMAPS: dict[str, int] = {"jet": cv2.COLORMAP_JET, "turbo": cv2.COLORMAP_TURBO,
                             "inferno": cv2.COLORMAP_INFERNO, "magma": cv2.COLORMAP_MAGMA,
                             "viridis": cv2.COLORMAP_VIRIDIS, "hot": cv2.COLORMAP_HOT}


def render_overlay(finding: Finding, display: np.ndarray, *, max_size: int = 1024,
                   colormap: str = "jet", study: str | None = None) -> np.ndarray:
    """The overlay picture: banner above the X-ray with heatmap and boxes, RGB uint8.

    `display` is the source's display image (`display_pixels` or `load_image`: float in
    [0, 1], bone bright, on the source's pixel grid). It is downscaled (never enlarged)
    so its long side is at most `max_size`; the heatmap and the boxes, which are on the
    source's grid, are scaled the same way; `colormap` is one of COLORMAPS; `study`,
    the study's verdict (`study_verdict`), is a banner line of the study's first
    overlay. Raises ValueError when the heatmap does not match the display's rows x
    columns.
    """
    if finding.heatmap.shape != display.shape:
        raise ValueError(
            f"heatmap shape {finding.heatmap.shape} is not the source's {display.shape}"
        )
    _, size = _scaled_size(display.shape, max_size)
    # INTER_AREA averages the pixels a downscale drops, so thin fracture lines and hot
    # spots fade rather than alias away.
    grey = cv2.resize(display, size, interpolation=cv2.INTER_AREA)
    heat = cv2.resize(finding.heatmap.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    xray = _blend(grey, heat, COLORMAPS[colormap])
    shown = _shown_boxes(finding)
    _draw_boxes(xray, shown, (size[0] / display.shape[1], size[1] / display.shape[0]))
    lines = banner_lines(finding, legend=bool(shown), study=study)
    return np.vstack([text_banner(lines, size[0]), xray])


def make_overlay(
    finding: Finding,
    source: Dataset,
    *,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    max_size: int = 1024,
    colormap: str = "jet",
    display: np.ndarray | None = None,
    study: str | None = None,
) -> hd.sc.SCImage:
    """Build the RGB Secondary Capture for one finding, in the source's study and patient.

    The picture is `render_overlay`'s. `display` is the source's `display_pixels`, when
    the caller already has it (decoding a large compressed radiograph twice costs more
    than the whole overlay). `study` (the study's verdict) goes on the banner and into
    Image Comments: the worker gives it to the study's first overlay.

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
    image = render_overlay(finding, grey, max_size=max_size, colormap=colormap, study=study)
    scale, _ = _scaled_size(grey.shape, max_size)
    model = finding.model
    header = study_header(source)
    overlay = rgb_capture(image, header, model, series_instance_uid=series_instance_uid,
                          series_number=series_number, instance_number=instance_number)
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
    overlay.SourceImageSequence = [source_reference(source)]
    overlay.DerivationDescription = (
        f"{codes.DISCLAIMER}. Windowed source resampled by {scale:.3f}, fracture class "
        f"activation map of {model.name} {model.version} blended in colour ({colormap}), "
        + ("detected fracture boxes drawn, " if _shown_boxes(finding) else "")
        + "text banner added."
    )
    if study is not None:
        overlay.ImageComments = study
    # The banner names the model and its verdict, never the patient or the date.
    overlay.BurnedInAnnotation = "NO"
    return overlay


def rgb_capture(image: np.ndarray, header: Dataset, model: ModelInfo, *,
                series_instance_uid: str, series_number: int,
                instance_number: int) -> hd.sc.SCImage:
    """An RGB Secondary Capture of `image` in `header`'s patient and study (both modules
    copied whole), naming the model; the caller sets orientation, laterality and the
    source references."""
    capture = hd.sc.SCImage.from_ref_dataset(
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
        # A stand-in, replaced by the caller: highdicom accepts only single-letter
        # directions, not oblique ones ("FL") nor none at all.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[codes.model_equipment(model)],
        series_description=codes.series_description("AI fracture overlay", model),
        manufacturer_model_name=codes.MANUFACTURER_MODEL_NAME,
        software_versions=codes.SOFTWARE_VERSION,
        specific_character_set=None,  # see carry_character_set
    )
    carry_character_set(capture, header)
    # from_ref_dataset copies nine patient/study attributes; the whole Patient and Study
    # modules (Issuer of Patient ID, Other Patient IDs, Study Description...) are what the
    # PACS and its viewer use to file and show the image with its study.
    capture.copy_patient_and_study_information(header)
    return capture


def _blend(grey: np.ndarray, heat: np.ndarray, colormap: int) -> np.ndarray:
    """Grey X-ray with the colour map mixed in at an opacity proportional to heat."""
    heat = np.clip(heat, 0.0, 1.0)
    grey_rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    colour_bgr = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), colormap)
    colour = colour_bgr[..., ::-1].astype(np.float32)
    alpha = (MAX_HEAT_ALPHA * heat)[..., None]
    return np.round(grey_rgb * (1.0 - alpha) + colour * alpha).astype(np.uint8)


def _scaled_size(shape: tuple[int, ...], max_size: int) -> tuple[float, tuple[int, int]]:
    """The downscale factor (at most 1) and the (width, height) it gives `shape`."""
    scale = min(1.0, max_size / max(shape))
    return scale, (max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale)))


def _shown_boxes(finding: Finding) -> list[Box]:
    """The boxes worth drawing: a box below the high-sensitivity point (which the engine
    does not report) would be drawn as no fracture product draws one, so it is left out."""
    return [box for box in finding.boxes if box.level is not DecisionLevel.NEGATIVE]


def _draw_boxes(xray: np.ndarray, boxes: list[Box], scale: tuple[float, float]) -> None:
    """Draw `boxes` (source pixels) on the downscaled `xray` in place, `scale` = (x, y).

    Each outline is magenta over a wider black halo, solid for a likely fracture and
    dashed for a possible one, with the box's score in a small label above it (inside
    its top edge when the box touches the top of the image).
    """
    height, width = xray.shape[:2]
    thickness = max(2, round(max(height, width) / 400))
    font_scale = float(np.clip(max(height, width) / 2000, 0.35, 0.8))
    for box in boxes:
        # Box edges are pixel boundaries (x1 is the right side of the last column), so
        # the outline runs along the first and last scaled pixel rows and columns inside.
        x0 = int(np.clip(round(box.x0 * scale[0]), 0, width - 1))
        y0 = int(np.clip(round(box.y0 * scale[1]), 0, height - 1))
        x1 = int(np.clip(round(box.x1 * scale[0]) - 1, x0, width - 1))
        y1 = int(np.clip(round(box.y1 * scale[1]) - 1, y0, height - 1))
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        edges = list(zip(corners, corners[1:] + corners[:1], strict=True))
        if box.level is DecisionLevel.POSSIBLE:
            edges = [dash for start, end in edges for dash in _dashes(start, end, 4 * thickness)]
        for colour, width_px in ((_BLACK, thickness + 2), (BOX_COLOUR, thickness)):
            for start, end in edges:
                cv2.line(xray, start, end, colour, width_px, cv2.LINE_8)
        _label(xray, f"{box.score:.2f}", x0, y0, thickness + 2, font_scale)


def _dashes(start: tuple[int, int], end: tuple[int, int],
            length: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Dashes `length` long with equal gaps from `start` to `end` (an axis-aligned edge).

    Every edge starts with a dash and ends with one, so each corner is marked and a
    short box still shows its extent.
    """
    span = max(abs(end[0] - start[0]), abs(end[1] - start[1]))
    count = max(1, round((span + length) / (2 * length)))  # dashes, each with a gap after
    step = span / max(1, 2 * count - 1)
    points = [
        (round(start[0] + (end[0] - start[0]) * k * step / max(span, 1)),
         round(start[1] + (end[1] - start[1]) * k * step / max(span, 1)))
        for k in range(2 * count)
    ]
    return [(points[2 * k], points[2 * k + 1]) for k in range(count)]


def _label(xray: np.ndarray, text: str, left: int, top_row: int, clearance: int,
           font_scale: float) -> None:
    """White `text` on a black patch above a box whose top outline runs along `top_row`,
    or just inside it where there is no room above; `clearance` keeps it off the line."""
    (text_width, text_height), baseline = cv2.getTextSize(text, _FONT, font_scale, 1)
    pad = 2
    width, height = text_width + 2 * pad, text_height + baseline + 2 * pad
    left = min(left, max(0, xray.shape[1] - 1 - width))
    above = top_row - clearance - height
    top = above if above >= 0 else top_row + clearance
    cv2.rectangle(xray, (left, top), (left + width, top + height), _BLACK, cv2.FILLED)
    cv2.putText(xray, text, (left + pad, top + pad + text_height), _FONT, font_scale,
                _WHITE, 1, cv2.LINE_AA)


def banner_lines(finding: Finding, *, legend: bool, study: str | None = None) -> list[Line]:
    """An overlay banner's lines: what this is and which model, the study's verdict
    where given, the image's, what the colour means, and the box legend when `legend`."""
    lines = header_lines(finding.model)
    if study is not None:
        lines.append((study, _WHITE, _BLACK))
    lines.append((_verdict_text(finding), _WHITE, _BLACK))
    lines.append((HEATMAP_LEGEND, _WHITE, _BLACK))
    if legend:
        lines.append((BOX_LEGEND, BOX_COLOUR, _BLACK))
    return lines


Line = tuple[str, tuple[int, int, int], tuple[int, int, int]]


def header_lines(model: ModelInfo) -> list[Line]:
    """The lines every banner starts with: what this is, (untrained,) which model."""
    lines: list[Line] = [(codes.DISCLAIMER, _WHITE, _BLACK)]
    if not model.trained:
        lines.append((codes.UNTRAINED_WARNING, _YELLOW, _RED))
    lines.append((f"Model: {model.name} {model.version}", _WHITE, _BLACK))
    return lines


def text_banner(lines: list[Line], width: int) -> np.ndarray:
    """(text, colour, band colour) lines on a strip `width` wide, wrapped to fit.

    The text size follows the width, so it reads the same in a viewer that fits the
    image to the screen; lines that do not fit are wrapped at spaces.
    """
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


def probability_text(finding: Finding) -> tuple[str, int]:
    """The probability (with its TTA spread) as shown to people, and its decimals:
    two, or more where two would show it equal to a threshold it is below."""
    points = finding.operating_points
    probability = float(finding.probability)
    decimals = distinct_decimals(probability, (points.high_sensitivity,
                                               points.high_specificity))
    shown = f"{probability:.{decimals}f}"
    if finding.spread is not None:
        shown += f" \u00b1 {float(finding.spread):.{decimals}f}"
    return shown, decimals


def _verdict_text(finding: Finding) -> str:
    """The banner's verdict line: level, probability (with its TTA spread) and both
    operating points, e.g. "Possible fracture: probability 0.53 ± 0.04 (possible from
    0.30, likely from 0.70)"; where the bundle has points per body region, whose they
    are: "(hand operating points: possible from ...)", or "pooled operating points".

    Numbers have two decimals, or more where two would show the probability equal to
    a threshold it is below (`distinct_decimals`).
    """
    points = finding.operating_points
    shown, decimals = probability_text(finding)
    whose = (f"{finding.operating_region} operating points: "
             if finding.operating_region is not None else "")
    return (f"{finding.level.verdict.capitalize()}: probability {shown} ({whose}possible from "
            f"{points.high_sensitivity:.{decimals}f}, likely from "
            f"{points.high_specificity:.{decimals}f})")


def distinct_decimals(value: float, limits: tuple[float, ...], least: int = 2) -> int:
    """Decimals (from `least`, at most 6) to show `value` so that it never looks equal to
    a limit it is below: rounding 0.49999 to "0.50" next to a 0.50 threshold would make a
    miss look like a hit. A value at or above a limit may round to it (float32's 0.3 is
    0.30000001: "0.30" is what the reader expects)."""
    for decimals in range(least, 6):
        if all(value >= limit or f"{value:.{decimals}f}" != f"{limit:.{decimals}f}"
               for limit in limits):
            return decimals
    return 6


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


def source_reference(source: Dataset) -> Dataset:
    """A Source Image Sequence item: the exact X-ray this overlay was made from."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.SOURCE_IMAGE_FOR_PROCESSING)
    ]
    return item
