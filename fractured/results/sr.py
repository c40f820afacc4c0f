"""One Comprehensive 3D SR per study (TID 1500 Measurement Report) from the Findings.

The SR is the machine-readable result: a PACS, a worklist or a registry can read, per
source image, the decision (Fracture of bone = Present for a likely fracture,
Undetermined for a possible one, Absent otherwise; then Present/Absent at each
operating point and the decision level; whose operating points decided, where the
bundle has a pair per body region), the calibrated probability (and its spread under
test-time augmentation) inferred from the rectangle the model analysed, the finding
site from BodyPartExamined, and per detected fracture its score inferred from the box,
a closed polyline in the source image's pixels (SR has no rectangle type), and its
level. Each image and each box gets its own TID 1501 group that references the exact
SOP instance, so a result can never be attached to the wrong image of the study, and a
Comment that says its verdict in words. A Summary text item says it all for viewers
that show only text.

Boxes are TID 1501 groups with the score INFERRED FROM the box rather than TID 1410
planar ROIs, and every group's Tracking Identifier starts with OHIF's name for its
rectangles: both standard, and what OHIF needs to show them (docs/pacs-setup.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code

from fractured.engine.findings import Box, DecisionLevel, Finding, study_verdict
from fractured.results import codes
from fractured.results.header import carry_character_set, study_header


def make_sr(
    findings: Sequence[Finding],
    sources: Sequence[Dataset],
    *,
    series_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    device_uid: str,
    predecessors: Sequence[Dataset] = (),
    not_analysed: Sequence[str] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the study's SR: one measurement group per finding, in the sources' study.

    `sources` are the study's images (patient and study modules are copied from the
    first; all are recorded as evidence); every finding must name one of them. All
    findings must come from one model: the series description names it. `device_uid`
    identifies this node as the observer device (it should stay the same across runs).
    `predecessors` are this study's earlier SRs that this one supersedes (a study analysed
    again after a late image): they go into the Predecessor Documents Sequence, so a
    viewer can tell the current report from the replaced one. `not_analysed` says why
    each image of the study left out was (e.g. "body part CHEST is outside the intended
    use", "the image could not be decoded"): the summary names them and the report is
    then marked partial, since it does not cover every image.

    Raises ValueError when there are no findings, the sources span several studies, a
    finding's image is not among the sources, or the findings come from several models.
    """
    if not findings:
        raise ValueError("no findings: a TID 1500 report needs at least one measurement group")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources must be one study, got {len(studies)}: {sorted(studies)}")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [f.image.sop_instance_uid for f in findings if f.image.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"findings about images that are not among the sources: {missing}")
    models = {f.model for f in findings}
    if len(models) != 1:
        labels = sorted(m.label for m in models)
        raise ValueError(f"findings from several models in one SR: {labels}")
    model = findings[0].model

    observer = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            manufacturer_name=codes.MANUFACTURER,
            model_name=codes.MANUFACTURER_MODEL_NAME,
        ),
    )
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for number, finding in enumerate(findings, start=1):
        source = by_uid[finding.image.sop_instance_uid]
        groups.append(_measurement_group(finding, source, number, len(findings)))
        groups += [_box_group(finding, box, source, number, index)
                   for index, box in enumerate(finding.boxes, start=1)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
    # The Summary before the measurements: a text-only display renders the tree in
    # order, and the reader should meet the verdict first (DCMTK's dsr2html does).
    content = report[0].ContentSequence
    first_container = next(i for i, item in enumerate(content) if item.ValueType == "CONTAINER")
    content.insert(first_container, hd.sr.TextContentItem(
        name=codes.SUMMARY, value=summary_text(findings, not_analysed),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    header = study_header(sources[0])
    sr = hd.sr.Comprehensive3DSR(
        # highdicom copies patient and study from the first piece of evidence.
        evidence=[header, *sources[1:]],
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=codes.MANUFACTURER_MODEL_NAME,
        software_versions=codes.SOFTWARE_VERSION,
        series_description=codes.series_description("AI fracture SR", model),
        # Complete where every image was assessed (partial when some were outside the
        # intended use); never final: the output of an algorithm nobody has verified.
        is_complete=not not_analysed,
        coding_schemes=[codes.coding_scheme()],
        previous_versions=list(predecessors) or None,
        contributing_equipment=[codes.model_equipment(model)],
        specific_character_set=None,  # see carry_character_set
    )
    carry_character_set(sr, header)
    return sr


def _measurement_group(
    finding: Finding, source: Dataset, number: int, total: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: decisions, probability, algorithm and the exact image."""
    measurements = [
        hd.sr.Measurement(
            name=codes.FRACTURE_PROBABILITY,
            # Not rounded: a rounded value next to the threshold could contradict the
            # Present/Absent decision. float(): highdicom takes only Python numbers.
            value=float(finding.probability),
            unit=codes.NO_UNITS,
            referenced_coordinates=[_analysed_region(finding, source)],
        )
    ]
    if finding.spread is not None:
        measurements.append(hd.sr.Measurement(name=codes.PROBABILITY_SPREAD,
                                              value=float(finding.spread), unit=codes.NO_UNITS))
    level = finding.level
    evaluations = [
        hd.sr.QualitativeEvaluation(name=codes.FRACTURE, value=codes.FRACTURE_VALUES[level]),
        _present(codes.FRACTURE_AT_HIGH_SENSITIVITY, level is not DecisionLevel.NEGATIVE),
        _present(codes.FRACTURE_AT_HIGH_SPECIFICITY, level is DecisionLevel.LIKELY),
        hd.sr.QualitativeEvaluation(name=codes.DECISION_LEVEL, value=codes.LEVELS[level]),
    ]
    if finding.operating_region is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=codes.OPERATING_POINTS_REGION,
            value=codes.OPERATING_POINTS_FROM[finding.operating_region]))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{codes.RECTANGLE_TRACKING_PREFIX}Fracture "
                                     f"classification, image {number} of {total}"),
        finding_type=codes.FRACTURE,
        algorithm_id=_algorithm(finding),
        finding_sites=_sites(source),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    _label(group, f"{level.verdict} (probability {finding.probability:.2f})",
           finding)
    return group


def _analysed_region(finding: Finding, source: Dataset) -> hd.sr.CoordinatesForMeasurement:
    """TID 300's INFERRED FROM: the rectangle of the image the probability came from.

    The standard lets an image-level measurement go without one, but OHIF (3.13) reads
    every measurement group of a TID 1500 report as having a spatial coordinate and
    stops the whole viewer on one that has none (docs/pacs-setup.md); this one is true
    and tells a reader which part of the image was analysed.
    """
    field = finding.analysed_field
    top, bottom, left, right = ((0, int(source.Rows), 0, int(source.Columns)) if field is None
                                else (field.top, field.bottom, field.left, field.right))
    return hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_rectangle(left, top, right, bottom),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source))


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A closed polyline round a rectangle (SR has no rectangle type), in image
    coordinates: columns, rows; 0, 0 the top left corner of the top left pixel."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


def _box_group(finding: Finding, box: Box, source: Dataset, number: int,
               index: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one detected fracture: its score INFERRED FROM the box on the exact
    image, and its level."""
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=_rectangle(box.x0, box.y0, box.x1, box.y1),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(),
            identifier=f"{codes.RECTANGLE_TRACKING_PREFIX}Fracture box {index} "
                       f"on image {number}"),
        finding_type=codes.FRACTURE,
        algorithm_id=_algorithm(finding),
        finding_sites=_sites(source),
        measurements=[hd.sr.Measurement(name=codes.BOX_SCORE, value=float(box.score),
                                        unit=codes.NO_UNITS, referenced_coordinates=[region])],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=codes.DECISION_LEVEL, value=codes.LEVELS[box.level])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    _label(group, f"{box.level.verdict} here (box score {box.score:.2f})", finding)
    return group


def summary_text(findings: Sequence[Finding], not_analysed: Sequence[str] = ()) -> str:
    """The report in one paragraph, for viewers that show only text; images left out
    are counted by reason, after the verdicts."""
    model = findings[0].model
    lines = [f"{codes.DISCLAIMER}. Model {model.name} {model.version}."]
    if not model.trained:
        lines.append(f"{codes.UNTRAINED_WARNING}.")
    lines.append(f"{study_verdict(findings)}.")
    for number, finding in enumerate(findings, start=1):
        verdict = finding.level.verdict
        boxes = f", {len(finding.boxes)} box(es)" if finding.boxes else ""
        whose = (f", {finding.operating_region} operating points"
                 if finding.operating_region is not None else "")
        lines.append(f"Image {number}: {verdict} (probability {finding.probability:.2f}"
                     f"{boxes}{whose}).")
    for reason, count in Counter(not_analysed).items():
        lines.append(f"Not analysed: {count} image(s) ({reason}).")
    return " ".join(lines)


def _present(name: Code, present: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=name,
                                       value=codes.PRESENT if present else codes.ABSENT)


def _sites(source: Dataset) -> list[hd.sr.FindingSite] | None:
    """The finding site from BodyPartExamined, when it is a term we can code."""
    part = str(source.get("BodyPartExamined", "") or "").strip().upper()
    return [hd.sr.FindingSite(codes.BODY_PARTS[part])] if part in codes.BODY_PARTS else None


def _label(group: hd.sr.MeasurementsAndQualitativeEvaluations, verdict: str,
           finding: Finding) -> None:
    """A Comment (TID 1501's TEXT row) that says the group's verdict in words, first:
    viewers that list measurements show it as the measurement's label, cut to the
    panel's width (OHIF does). An untrained model's warning is part of it."""
    text = f"{verdict[0].upper()}{verdict[1:]} - {codes.DISCLAIMER}"
    if not finding.model.trained:
        text += f". {codes.UNTRAINED_WARNING}"
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _algorithm(finding: Finding) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the operating points as parameters: the decisions depend on them;
    and whose they are, where the bundle has points per body region."""
    model, points = finding.model, finding.operating_points
    whose = ([f"{finding.operating_region} operating points"]
             if finding.operating_region is not None else [])
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=codes.MANUFACTURER,
        parameters=[f"high-sensitivity threshold {points.high_sensitivity:.6g}",
                    f"high-specificity threshold {points.high_specificity:.6g}", *whose],
    )
