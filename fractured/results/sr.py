"""One Comprehensive 3D SR per study (TID 1500 Measurement Report) from the Findings.

The SR is the machine-readable result: a PACS, a worklist or a registry can read, per
source image, the decision (Fracture of bone = Present/Absent at the high-sensitivity
operating point; per-point evaluations and boxes are to come) and the calibrated
probability, with the model that said so. Each image gets
its own measurement group that references the exact SOP instance, so a result can never
be attached to the wrong image of the study.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes

from fractured.engine.findings import Finding, ModelInfo, OperatingPoints
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
) -> hd.sr.Comprehensive3DSR:
    """Build the study's SR: one measurement group per finding, in the sources' study.

    `sources` are the study's images (patient and study modules are copied from the
    first; all are recorded as evidence); every finding must name one of them. All
    findings must come from one model: the series description names it. `device_uid`
    identifies this node as the observer device (it should stay the same across runs).

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
    groups = [
        _measurement_group(finding, by_uid[finding.image.sop_instance_uid], number, len(findings))
        for number, finding in enumerate(findings, start=1)
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=codes.REPORT_TITLE,
    )
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
        # Every image of the study was assessed: the report is complete, but it is the
        # output of an algorithm that nobody has verified, hence not final.
        is_complete=True,
        coding_schemes=[codes.coding_scheme()],
        contributing_equipment=[codes.model_equipment(model)],
        specific_character_set=None,  # see carry_character_set
    )
    carry_character_set(sr, header)
    return sr


def _measurement_group(
    finding: Finding, source: Dataset, number: int, total: int
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 for one image: decision, probability, algorithm and the exact image."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"Fracture classification, image {number} of {total}"
        ),
        finding_type=codes.FRACTURE,
        algorithm_id=_algorithm(finding.model, finding.operating_points),
        measurements=[
            hd.sr.Measurement(
                name=codes.FRACTURE_PROBABILITY,
                # Not rounded: a rounded value next to the threshold could contradict the
                # Present/Absent decision. float(): highdicom takes only Python numbers.
                value=float(finding.probability),
                unit=codes.NO_UNITS,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.FRACTURE, value=codes.PRESENT if finding.fracture else codes.ABSENT
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    if not finding.model.trained:
        # highdicom's QualitativeEvaluation takes coded values only; TID 1501 row 12 also
        # allows a TEXT value, which a reader of the SR cannot miss.
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=codes.UNTRAINED_WARNING,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _algorithm(model: ModelInfo, points: OperatingPoints) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the operating points as parameters: the decisions depend on them."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=codes.MANUFACTURER,
        parameters=[f"high-sensitivity threshold {points.high_sensitivity:.6g}",
                    f"high-specificity threshold {points.high_specificity:.6g}"],
    )
