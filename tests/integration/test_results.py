"""The result objects, checked the way a PACS would meet them.

Each SR and Secondary Capture is written to a file, validated by dicom3tools' `dciodvfy`
(zero errors; warnings are printed) and read back with pydicom and highdicom, then
checked against the Findings it was made from. Sources are a synthetic DX study made
here and real vendor files from ../shared/data/dicom (MONOCHROME1 among them),
skipped with the reason when absent.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.tag import Tag

import fractured
from fractured.engine.findings import (
    Box,
    DecisionLevel,
    Finding,
    ImageRef,
    ModelInfo,
    OperatingPoints,
    study_level,
    study_verdict,
)
from fractured.engine.preprocess import display_pixels
from fractured.engine.regions import POOLED, PointsRegion, Region
from fractured.results import codes
from fractured.results.header import header_repairs
from fractured.results.overlay import (
    BOX_LEGEND,
    HEATMAP_LEGEND,
    _verdict_text,
    banner_lines,
    make_overlay,
    render_overlay,
)
from fractured.results.sr import make_sr, summary_text
from tests.factory import SHARED_DICOM, dx_study, real_file
from tests.paths import REPO
from tests.peers import dciodvfy

MONOCHROME1_FILES = ["highdicom/dx_image.dcm", "derived_transcoded/RG3_RLE_derived.dcm"]
TRAINED = ModelInfo("resnet18-fracture", "2.1.0", trained=True)
UNTRAINED = ModelInfo("resnet18-fracture", "0.0.1", trained=False)
# One threshold for both operating points: the SR says present/absent at it. Around the
# threshold on purpose: 0.5 itself is a fracture (probability >= threshold).
ONE_THRESHOLD = OperatingPoints(0.5, 0.5)
PROBABILITIES = [0.91234567, 0.1, 0.5, 0.49999]


# -- sources ---------------------------------------------------------------------------


def finding_for(
    source: Dataset, probability: float, model: ModelInfo, heatmap: np.ndarray | None = None,
    *, points: OperatingPoints = ONE_THRESHOLD, boxes: tuple[Box, ...] = (),
    spread: float | None = None, region: PointsRegion | None = None,
) -> Finding:
    """A Finding as the engine makes one: the left half of the image hot, the right cold
    unless `heatmap` says otherwise; `region` is whose operating points decided."""
    if heatmap is None:
        heatmap = np.zeros((source.Rows, source.Columns), np.float32)
        heatmap[:, : source.Columns // 2] = 1.0
    image = ImageRef(
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=str(source.SeriesInstanceUID),
        sop_instance_uid=str(source.SOPInstanceUID),
        sop_class_uid=str(source.SOPClassUID),
    )
    return Finding(image, np.float32(probability), points, heatmap, model, boxes, spread,
                   operating_region=region)


# -- tools -----------------------------------------------------------------------------


def validate(dataset: Dataset, path: Path) -> Dataset:
    """Write `dataset`, assert dciodvfy finds no error, print its warnings, read it back."""
    dataset.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    for line in warnings:
        print(f"dciodvfy {path.name}: {line}")
    assert not errors, f"dciodvfy errors in {path.name}:\n" + "\n".join(errors)
    return pydicom.dcmread(path)


def text_items(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [
        item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and item.name == codes.COMMENT
    ]


def image_groups(report: hd.sr.MeasurementReport,
                 uid: str) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The groups with an image's classification (its probability)."""
    return [g for g in report.get_image_measurement_groups(referenced_sop_instance_uid=uid)
            if g.get_measurements(name=codes.FRACTURE_PROBABILITY)]


def box_groups(report: hd.sr.MeasurementReport,
               uid: str) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The groups with one of an image's boxes (its score)."""
    return [g for g in report.get_image_measurement_groups(referenced_sop_instance_uid=uid)
            if g.get_measurements(name=codes.BOX_SCORE)]


def check_rectangle(measurement: hd.sr.Measurement, uid: str,
                    corners: tuple[float, float, float, float]) -> None:
    """`measurement` is INFERRED FROM the closed rectangle x0, y0, x1, y1 on image `uid`."""
    x0, y0, x1, y1 = corners
    (region,) = measurement.referenced_coordinates
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(region.value, [[x0, y0], [x1, y0], [x1, y1], [x0, y1],
                                              [x0, y0]], rtol=0, atol=1e-4)
    (image,) = region.ContentSequence  # SELECTED FROM the exact image
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == uid


def check_sr(
    path: Path, findings: Sequence[Finding], sources: Sequence[Dataset], device_uid: str
) -> None:
    """Read the SR file back and check it says exactly what the findings say."""
    first = sources[0]
    raw = pydicom.dcmread(path)
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert raw.StudyInstanceUID == first.StudyInstanceUID
    assert raw.PatientID == first.PatientID
    assert raw.PatientName == first.PatientName
    assert raw.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    assert raw.Manufacturer == codes.MANUFACTURER
    assert raw.SoftwareVersions == fractured.__version__
    model = findings[0].model
    assert f"{model.name} {model.version}" in raw.SeriesDescription
    assert ("UNTRAINED MODEL" in raw.SeriesDescription) is (not model.trained)
    assert {item.CodingSchemeDesignator for item in raw.CodingSchemeIdentificationSequence} == {
        codes.PRIVATE_SCHEME
    }
    equipment = [
        item
        for item in raw.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and item.Manufacturer == codes.MANUFACTURER
    ]
    assert [(e.ManufacturerModelName, e.SoftwareVersions) for e in equipment] == [
        (model.name, model.version)
    ]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in raw.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in sources}

    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    (observer,) = report.get_observer_contexts(observer_type=dicom_codes.DCM.Device)
    assert observer.observer_identifying_attributes.uid == device_uid
    assert observer.observer_identifying_attributes.manufacturer_name == codes.MANUFACTURER

    groups = report.get_image_measurement_groups()
    assert len(groups) == len(findings) + sum(len(f.boxes) for f in findings)
    for finding in findings:
        uid = finding.image.sop_instance_uid
        (group,) = image_groups(report, uid)
        assert [img.referenced_sop_instance_uid for img in group.source_images] == [uid]
        assert group.finding_type == codes.FRACTURE
        (evaluation,) = group.get_qualitative_evaluations(name=codes.FRACTURE)
        # the standard item in plain terms: Present only where a fracture is likely
        expected = {DecisionLevel.LIKELY: codes.PRESENT,
                    DecisionLevel.POSSIBLE: codes.UNDETERMINED,
                    DecisionLevel.NEGATIVE: codes.ABSENT}[finding.level]
        assert evaluation.value == expected
        (measurement,) = group.get_measurements(name=codes.FRACTURE_PROBABILITY)
        assert measurement.value == pytest.approx(float(finding.probability), abs=1e-9)
        assert measurement.unit == codes.NO_UNITS
        # INFERRED FROM the rectangle analysed: the whole image, here (no crop)
        source = next(ds for ds in sources if ds.SOPInstanceUID == uid)
        check_rectangle(measurement, uid, (0, 0, source.Columns, source.Rows))
        assert group.tracking_identifier.startswith(codes.RECTANGLE_TRACKING_PREFIX)
        algorithm = [
            (item.name.meaning, item.value)
            for item in group[0].ContentSequence
            if item.name.meaning in ("Algorithm Name", "Algorithm Version")
        ]
        assert sorted(algorithm) == [
            ("Algorithm Name", model.name),
            ("Algorithm Version", model.version),
        ]
        (comment,) = text_items(group)  # the label a viewer lists: verdict first
        verdict = {DecisionLevel.LIKELY: "Likely fracture",
                   DecisionLevel.POSSIBLE: "Possible fracture",
                   DecisionLevel.NEGATIVE: "No fracture found"}[finding.level]
        assert comment.startswith(f"{verdict} (probability {finding.probability:.2f})")
        assert codes.DISCLAIMER in comment
        assert (codes.UNTRAINED_WARNING in comment) is (not model.trained)
        level = finding.level
        evaluations = {item.name: item.value for item in group.get_qualitative_evaluations()}
        assert evaluations[codes.FRACTURE_AT_HIGH_SENSITIVITY] == (
            codes.PRESENT if level is not DecisionLevel.NEGATIVE else codes.ABSENT)
        assert evaluations[codes.FRACTURE_AT_HIGH_SPECIFICITY] == (
            codes.PRESENT if level is DecisionLevel.LIKELY else codes.ABSENT)
        assert evaluations[codes.DECISION_LEVEL] == codes.LEVELS[level]
        # whose operating points decided: cited only where the bundle has regions
        assert evaluations.get(codes.OPERATING_POINTS_REGION) == (
            None if finding.operating_region is None
            else codes.OPERATING_POINTS_FROM[finding.operating_region])
        parameters = [item.value for item in group[0].ContentSequence
                      if item.name.meaning == "Algorithm Parameters"]
        assert parameters[:2] == [
            f"high-sensitivity threshold {finding.operating_points.high_sensitivity:.6g}",
            f"high-specificity threshold {finding.operating_points.high_specificity:.6g}"]
        assert parameters[2:] == ([] if finding.operating_region is None
                                  else [f"{finding.operating_region} operating points"])
        spread = group.get_measurements(name=codes.PROBABILITY_SPREAD)
        assert [m.value for m in spread] == pytest.approx(
            [] if finding.spread is None else [finding.spread])
        part = codes.BODY_PARTS.get(str(source.get("BodyPartExamined", "")).upper())
        assert [site.value for site in group.finding_sites] == ([part] if part else [])
        # Each box is a group of its own on the exact image: its score INFERRED FROM the
        # closed rectangle, its level, and a label.
        rois = box_groups(report, uid)
        assert len(rois) == len(finding.boxes)
        for roi, box in zip(sorted(rois, key=lambda r: r.tracking_identifier),
                            finding.boxes, strict=True):
            assert roi.finding_type == codes.FRACTURE
            assert roi.tracking_identifier.startswith(codes.RECTANGLE_TRACKING_PREFIX)
            assert [img.referenced_sop_instance_uid for img in roi.source_images] == [uid]
            (score,) = roi.get_measurements(name=codes.BOX_SCORE)
            assert score.value == pytest.approx(box.score)
            check_rectangle(score, uid, (box.x0, box.y0, box.x1, box.y1))
            (box_level,) = roi.get_qualitative_evaluations(name=codes.DECISION_LEVEL)
            assert box_level.value == codes.LEVELS[box.level]
            (label,) = text_items(roi)
            assert f"fracture here (box score {box.score:.2f})" in label
            assert (codes.UNTRAINED_WARNING in label) is (not model.trained)
    (summary,) = [item for item in raw.ContentSequence
                  if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue
                  == codes.SUMMARY.value]
    assert summary.TextValue.startswith(codes.DISCLAIMER)
    for number in range(1, len(findings) + 1):
        assert f"Image {number}: " in summary.TextValue
    # The marker is nowhere in the document of a trained model, not even elsewhere.
    assert (codes.UNTRAINED_MARKER in str(raw)) is (not model.trained)


# -- SR --------------------------------------------------------------------------------


def test_synthetic_dx_source_is_valid(tmp_path: Path) -> None:
    """The test's own sources must be valid DX, or the checks below prove little."""
    (source,) = dx_study(1)
    back = validate(source, tmp_path / "dx.dcm")
    assert back.pixel_array.shape == (300, 240)


@pytest.mark.parametrize("model", [UNTRAINED, TRAINED], ids=["untrained", "trained"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sr_for_synthetic_study(tmp_path: Path, n: int, model: ModelInfo) -> None:
    """Image k of the study has k - 1 boxes (the first has none), with both levels."""
    sources = dx_study(n)
    findings = [finding_for(ds, p, model, boxes=tuple(
        Box(10.0 + 20 * b, 20.0, 40.5 + 20 * b, 70.25, 0.9 - 0.2 * b,
            DecisionLevel.LIKELY if b % 2 == 0 else DecisionLevel.POSSIBLE)
        for b in range(k)), spread=0.05 if k % 2 else None)
        for k, (ds, p) in enumerate(zip(sources, PROBABILITIES, strict=False))]
    assert {f.fracture for f in findings} == ({True} if n == 1 else {True, False})
    device_uid = hd.UID()
    sr = make_sr(findings, sources, series_instance_uid=hd.UID(), series_number=901,
                 device_uid=device_uid)
    validate(sr, tmp_path / "sr.dcm")
    check_sr(tmp_path / "sr.dcm", findings, sources, device_uid)


@pytest.mark.parametrize("name", MONOCHROME1_FILES)
@pytest.mark.parametrize("model", [UNTRAINED, TRAINED], ids=["untrained", "trained"])
def test_sr_for_real_file(tmp_path: Path, name: str, model: ModelInfo) -> None:
    source = real_file(name)
    findings = [finding_for(source, 0.2, model)]
    device_uid = hd.UID()
    sr = make_sr(findings, [source], series_instance_uid=hd.UID(), series_number=901,
                 device_uid=device_uid)
    validate(sr, tmp_path / "sr.dcm")
    check_sr(tmp_path / "sr.dcm", findings, [source], device_uid)


def test_sr_names_the_images_outside_the_intended_use_and_is_partial(tmp_path: Path) -> None:
    sources = dx_study(1)
    findings = [finding_for(sources[0], 0.7, TRAINED)]
    outside = ["body part CHEST is outside the intended use"] * 2
    sr = make_sr(findings, sources, series_instance_uid=hd.UID(), series_number=901,
                 device_uid=hd.UID(), not_analysed=outside)
    back = validate(sr, tmp_path / "sr.dcm")
    assert back.CompletionFlag == "PARTIAL"
    summary = next(item.TextValue for item in back.ContentSequence
                   if item.ValueType == "TEXT"
                   and item.ConceptNameCodeSequence[0].CodeMeaning == "Summary")
    assert summary.endswith("Not analysed: 2 image(s) "
                            "(body part CHEST is outside the intended use).")
    whole = make_sr(findings, sources, series_instance_uid=hd.UID(), series_number=901,
                    device_uid=hd.UID())
    assert whole.CompletionFlag == "COMPLETE" and "Not analysed" not in summary_text(findings)


@pytest.mark.parametrize(("probability", "shown", "hidden"), [
    (0.85, "Present", ("Undetermined", "Absent")),
    (0.45, "Undetermined", ("Present", "Absent")),
    (0.10, "Absent", ("Present", "Undetermined")),
])
def test_dcmtk_shows_present_only_for_a_likely_fracture(
        tmp_path: Path, probability: float, shown: str, hidden: tuple[str, ...]) -> None:
    """What a reader of standard codes sees, rendered by DCMTK's dsrdump and dsr2html
    (points 0.3 / 0.7): 'Fracture of bone' is Present only where a fracture is likely."""
    sources = dx_study(1)
    finding = finding_for(sources[0], probability, TRAINED, points=OperatingPoints(0.3, 0.7))
    path = tmp_path / "sr.dcm"
    validate(make_sr([finding], sources, series_instance_uid=hd.UID(), series_number=901,
                     device_uid=hd.UID()), path)
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True,
                          check=True).stdout
    line = next(text for text in dump.splitlines()
                if 'CODE:(,,"Fracture of bone")=' in text)
    assert f'"{shown}"' in line, line
    html = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True,
                          check=True).stdout
    plain = re.sub(r"<[^>]+>", " ", html)
    assert "Fracture of bone" in plain and shown in plain
    for text in hidden:
        assert text not in line


def test_sr_says_which_rectangle_the_probability_came_from(tmp_path: Path) -> None:
    """A cropping bundle analysed the exposed field only: the probability is INFERRED
    FROM that rectangle (columns left..right, rows top..bottom), not the whole image."""
    from dataclasses import replace

    from fractured.engine.exposed_field import Field

    (source,) = dx_study(1)
    field = Field(top=12, bottom=280, left=30, right=200, source="collimator")
    finding = replace(finding_for(source, 0.8, TRAINED), analysed_field=field)
    sr = validate(make_sr([finding], [source], series_instance_uid=hd.UID(),
                          series_number=901, device_uid=hd.UID()), tmp_path / "sr.dcm")
    report = hd.sr.MeasurementReport.from_sequence(
        hd.sr.Comprehensive3DSR.from_dataset(sr).content)
    (group,) = image_groups(report, str(source.SOPInstanceUID))
    (probability,) = group.get_measurements(name=codes.FRACTURE_PROBABILITY)
    check_rectangle(probability, str(source.SOPInstanceUID), (30, 12, 200, 280))


def test_sr_refuses_what_it_cannot_report() -> None:
    sources = dx_study(2)
    other_study = dx_study(1)
    kwargs = {"series_instance_uid": hd.UID(), "series_number": 901, "device_uid": hd.UID()}
    with pytest.raises(ValueError, match="at least one"):
        make_sr([], sources, **kwargs)
    with pytest.raises(ValueError, match="not among the sources"):
        make_sr([finding_for(other_study[0], 0.7, TRAINED)], sources, **kwargs)
    with pytest.raises(ValueError, match="one study"):
        make_sr([finding_for(sources[0], 0.7, TRAINED)], sources + other_study, **kwargs)
    mixed = [finding_for(sources[0], 0.7, TRAINED), finding_for(sources[1], 0.7, UNTRAINED)]
    with pytest.raises(ValueError, match="several models"):
        make_sr(mixed, sources, **kwargs)


def test_results_for_source_with_missing_and_unparsable_patient_data(tmp_path: Path) -> None:
    """Real exports lack Type 2 attributes or hold hashes in dates (see shared/data/dicom):
    highdicom would raise on both; the results are made with those left empty."""
    (source,) = dx_study(1)
    del source.PatientBirthDate
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):
        source.StudyDate = "d14a028c2a3a2bc9"  # a de-identification hash, as in 966_fixed
    finding = finding_for(source, 0.7, TRAINED)
    sr = make_sr([finding], [source], series_instance_uid=hd.UID(), series_number=901,
                 device_uid=hd.UID())
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                           instance_number=1)
    for name, result in (("sr.dcm", sr), ("sc.dcm", overlay)):
        back = validate(result, tmp_path / name)
        assert back.PatientBirthDate == "" and back.StudyDate == ""
        assert back.PatientID == source.PatientID and back.StudyTime == source.StudyTime
    # The absent Type 2 attribute is added empty (it changes no value): not a repair.
    assert header_repairs(source) == [("StudyDate", "emptied: invalid for VR DA")]
    assert "PatientBirthDate" not in source and source.StudyDate == "d14a028c2a3a2bc9"
    assert "PixelData" in source


def test_series_description_fits_and_keeps_the_marker() -> None:
    long_model = ModelInfo("x" * 80, "1.0", trained=False)
    text = codes.series_description("AI fracture overlay", long_model)
    assert len(text) <= 64
    assert text.endswith(" - UNTRAINED MODEL")
    assert text.startswith("AI fracture overlay xxx")


# -- overlay ---------------------------------------------------------------------------


def split_overlay(pixels: np.ndarray, source: Dataset, max_size: int) -> tuple[np.ndarray, ...]:
    """Banner and X-ray parts of the overlay: the X-ray is the downscaled source at the
    bottom, whatever the banner's height."""
    scale = min(1.0, max_size / max(source.Rows, source.Columns))
    rows, columns = round(source.Rows * scale), round(source.Columns * scale)
    assert pixels.shape[1] == columns
    assert pixels.shape[0] > rows
    return pixels[:-rows], pixels[-rows:]


def check_overlay_file(path: Path, source: Dataset, finding: Finding) -> Dataset:
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.PatientName == source.PatientName
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.Manufacturer == codes.MANUFACTURER
    assert back.PatientOrientation == source.PatientOrientation
    assert back.SeriesDescription.startswith("AI fracture overlay")
    assert ("UNTRAINED MODEL" in back.SeriesDescription) is (not finding.model.trained)
    (reference,) = back.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert back.PhotometricInterpretation == "RGB"
    assert back.SamplesPerPixel == 3
    assert back.BitsAllocated == 8
    return back


def check_banner(banner: np.ndarray, trained: bool) -> None:
    dark = (banner.max(axis=2) < 60).mean()
    white = (banner.min(axis=2) > 200).mean()
    red = ((banner[..., 0] > 150) & (banner[..., 1] < 60) & (banner[..., 2] < 60)).mean()
    yellow = ((banner[..., 0] > 200) & (banner[..., 1] > 200) & (banner[..., 2] < 80)).mean()
    assert dark > 0.5, f"banner is not mostly black ({dark:.2f} dark)"
    assert white > 0.01, f"no white text in the banner ({white:.4f})"
    if trained:
        assert red < 0.001 and yellow < 0.001
    else:
        assert red > 0.1, "no red UNTRAINED band"
        assert yellow > 0.005, "no yellow UNTRAINED text"


@pytest.mark.parametrize("model", [UNTRAINED, TRAINED], ids=["untrained", "trained"])
def test_overlay_of_synthetic_image(tmp_path: Path, model: ModelInfo) -> None:
    (source,) = dx_study(1)
    finding = finding_for(source, 0.8, model)
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                           instance_number=1)
    back = validate(overlay, tmp_path / "sc.dcm")
    check_overlay_file(tmp_path / "sc.dcm", source, finding)
    pixels = back.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
    banner, xray = split_overlay(pixels, source, 1024)
    check_banner(banner, model.trained)

    # Heat shows as colour where the map is hot (left half), plain grey where it is cold.
    columns = xray.shape[1]
    hot, cold = xray[:, 4 : columns // 2 - 4], xray[:, columns // 2 + 4 :]
    spread = hot.max(axis=2).astype(int) - hot.min(axis=2)
    assert (spread > 40).mean() > 0.95
    assert np.array_equal(cold[..., 0], cold[..., 1]) and np.array_equal(cold[..., 1], cold[..., 2])
    # Same grey levels and orientation as the source as displayed: the bone band and the
    # top-left marker sit where they do in the source (no flip, no inversion).
    expected = display_pixels(source)[:, source.Columns // 2 + 4 :] * 255
    assert np.abs(cold[..., 0].astype(float) - expected).max() <= 1.0


@pytest.mark.parametrize("name", MONOCHROME1_FILES)
def test_overlay_of_monochrome1_file_shows_bone_bright(tmp_path: Path, name: str) -> None:
    source = real_file(name)
    cold = np.zeros((source.Rows, source.Columns), np.float32)
    finding = finding_for(source, 0.3, TRAINED, heatmap=cold)
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                           instance_number=3)
    back = validate(overlay, tmp_path / "sc.dcm")
    check_overlay_file(tmp_path / "sc.dcm", source, finding)
    assert back.InstanceNumber == 3
    banner, xray = split_overlay(back.pixel_array, source, 1024)
    check_banner(banner, trained=True)
    assert np.array_equal(xray[..., 0], xray[..., 1]) and np.array_equal(xray[..., 1], xray[..., 2])
    raw = cv2.resize(source.pixel_array.astype(np.float32), xray.shape[1::-1],
                     interpolation=cv2.INTER_AREA)
    correlation = np.corrcoef(raw.ravel(), xray[..., 0].astype(np.float32).ravel())[0, 1]
    print(f"{name}: correlation of overlay grey with raw MONOCHROME1 pixels {correlation:.3f}")
    assert correlation < -0.9, "overlay grey is not the inverted raw (bone must be bright)"


def test_overlay_downscales_only(tmp_path: Path) -> None:
    (source,) = dx_study(1, rows=600, cols=400)
    finding = finding_for(source, 0.8, TRAINED)
    small = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                         instance_number=1, max_size=300)
    assert small.Columns == 200  # 600 x 400 -> 300 x 200, aspect kept
    _, xray = split_overlay(small.pixel_array, source, 300)
    assert xray.shape[:2] == (300, 200)
    large = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                         instance_number=1, max_size=5000)
    assert large.Columns == 400  # never enlarged
    validate(small, tmp_path / "small.dcm")


def test_overlay_keeps_an_oblique_orientation(tmp_path: Path) -> None:
    """highdicom's enums know only single letters; the source's value is kept verbatim."""
    (source,) = dx_study(1)
    source.PatientOrientation = ["PL", "F"]
    overlay = make_overlay(finding_for(source, 0.8, TRAINED), source,
                           series_instance_uid=hd.UID(), series_number=902, instance_number=1)
    assert validate(overlay, tmp_path / "sc.dcm").PatientOrientation == ["PL", "F"]


TWO_POINTS = OperatingPoints(0.3, 0.7)


@pytest.mark.parametrize(("probability", "spread", "expected"), [
    (0.1, None, "No fracture found: probability 0.10 (possible from 0.30, likely from 0.70)"),
    (0.3, None, "Possible fracture: probability 0.30 (possible from 0.30, likely from 0.70)"),
    (0.5, 0.0412, "Possible fracture: probability 0.50 \u00b1 0.04 "
                  "(possible from 0.30, likely from 0.70)"),
    (0.91234567, None, "Likely fracture: probability 0.91 (possible from 0.30, likely from 0.70)"),
    # Never a miss shown equal to the point it missed, whichever point that is.
    (0.29999, None, "No fracture found: probability 0.29999 "
                    "(possible from 0.30000, likely from 0.70000)"),
    (0.69999, 0.01, "Possible fracture: probability 0.69999 \u00b1 0.01000 "
                    "(possible from 0.30000, likely from 0.70000)"),
])
def test_verdict_states_the_level_probability_and_both_points(
        probability: float, spread: float | None, expected: str) -> None:
    (source,) = dx_study(1)
    finding = finding_for(source, probability, TRAINED, points=TWO_POINTS, spread=spread)
    assert _verdict_text(finding) == expected


@pytest.mark.parametrize("region", [Region.HAND, Region.SHOULDER, POOLED])
def test_sr_and_overlay_cite_whose_operating_points_decided(tmp_path: Path,
                                                            region: PointsRegion) -> None:
    """A bundle with points per region: the SR (coded evaluation, algorithm parameter,
    summary) and the overlay's verdict line say whose; both stay valid."""
    sources = dx_study(2)
    sources[0].BodyPartExamined = "HAND"
    findings = [finding_for(sources[0], 0.35, TRAINED, points=TWO_POINTS, region=region),
                finding_for(sources[1], 0.35, TRAINED, points=TWO_POINTS, region=POOLED)]
    device_uid = hd.UID()
    sr = make_sr(findings, sources, series_instance_uid=hd.UID(), series_number=901,
                 device_uid=device_uid)
    raw = validate(sr, tmp_path / "sr.dcm")
    check_sr(tmp_path / "sr.dcm", findings, sources, device_uid)
    (summary,) = [item.TextValue for item in raw.ContentSequence if item.ValueType == "TEXT"
                  and item.ConceptNameCodeSequence[0].CodeValue == codes.SUMMARY.value]
    assert f"Image 1: possible fracture (probability 0.35, {region} operating points)." \
        in summary
    assert "Image 2: possible fracture (probability 0.35, pooled operating points)." in summary

    finding = findings[0]
    assert _verdict_text(finding) == (f"Possible fracture: probability 0.35 ({region} "
                                      "operating points: possible from 0.30, likely from 0.70)")
    overlay = make_overlay(finding, sources[0], series_instance_uid=hd.UID(),
                           series_number=902, instance_number=1)
    back = validate(overlay, tmp_path / "sc.dcm")
    check_overlay_file(tmp_path / "sc.dcm", sources[0], finding)
    banner, _ = split_overlay(back.pixel_array, sources[0], 1024)
    check_banner(banner, trained=True)
    plain = finding_for(sources[0], 0.35, TRAINED, points=TWO_POINTS)
    assert not np.array_equal(render_overlay(finding, display_pixels(sources[0])),
                              render_overlay(plain, display_pixels(sources[0])))


def test_overlay_refuses_a_mismatched_finding() -> None:
    first, second = dx_study(2)
    kwargs = {"series_instance_uid": hd.UID(), "series_number": 902, "instance_number": 1}
    with pytest.raises(ValueError, match="finding is about"):
        make_overlay(finding_for(first, 0.8, TRAINED), second, **kwargs)
    wrong_grid = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="heatmap shape"):
        make_overlay(finding_for(first, 0.8, TRAINED, heatmap=wrong_grid), first, **kwargs)


def magenta(pixels: np.ndarray) -> np.ndarray:
    """Where the box colour is: strong red and blue, no green (in neither grey nor JET)."""
    return (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] > 180)


def rendered(source: Dataset, boxes: tuple[Box, ...], *, hot: bool = False,
             max_size: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Banner and X-ray of `render_overlay` for a trained finding with `boxes` (heatmap
    everywhere hot, or everywhere cold)."""
    heat = np.full((source.Rows, source.Columns), 1.0 if hot else 0.0, np.float32)
    finding = finding_for(source, 0.8, TRAINED, heat, points=TWO_POINTS, boxes=boxes)
    image = render_overlay(finding, display_pixels(source), max_size=max_size)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    return split_overlay(image, source, max_size)


def longest_gap(edge: np.ndarray) -> int:
    """The longest run of False in a 1-D mask."""
    runs = [len(run) for run in "".join("x" if v else "." for v in edge).split("x")]
    return max(runs)


# 600 x 400 source, max_size 300: everything on the overlay is at half scale.
SOURCE_BOX = (100.0, 200.0, 180.0, 400.0)  # x0, y0, x1, y1 in source pixels
SCALED_EDGES = (50, 100, 89, 199)  # the first and last scaled column and row inside it


@pytest.mark.parametrize("hot", [False, True], ids=["on grey", "on heatmap"])
def test_likely_box_is_a_continuous_outline_where_the_box_is(hot: bool) -> None:
    (source,) = dx_study(1, rows=600, cols=400)
    box = Box(*SOURCE_BOX, score=0.83, level=DecisionLevel.LIKELY)
    banner, xray = rendered(source, (box,), hot=hot)
    assert not magenta(rendered(source, (), hot=hot)[1]).any()  # the colour is the boxes'
    x0, y0, x1, y1 = SCALED_EDGES
    mask = magenta(xray)
    for edge in (mask[y0, x0:x1 + 1], mask[y1, x0:x1 + 1],
                 mask[y0:y1 + 1, x0], mask[y0:y1 + 1, x1]):
        assert edge.all(), "solid outline has a gap"
    # Only the outline (and none of the inside or the outside far from it) is coloured.
    assert not mask[y0 + 6 : y1 - 5, x0 + 6 : x1 - 5].any()
    outside = mask.copy()
    outside[y0 - 20 : y1 + 5, x0 - 5 : x1 + 5] = False  # the score label sits above
    assert not outside.any()
    # The score is labelled just above the box (white text on a black patch).
    label = xray[y0 - 20 : y0 - 2, x0 : x0 + 40]
    assert (label.min(axis=2) > 200).sum() > 10 and (label.max(axis=2) < 30).mean() > 0.3
    assert magenta(banner).sum() > 20, "no legend although boxes are shown"


def test_possible_box_is_a_dashed_outline() -> None:
    (source,) = dx_study(1, rows=600, cols=400)
    box = Box(*SOURCE_BOX, score=0.41, level=DecisionLevel.POSSIBLE)
    banner, xray = rendered(source, (box,))
    x0, y0, x1, y1 = SCALED_EDGES
    mask = magenta(xray)
    for edge in (mask[y0, x0:x1 + 1], mask[y1, x0:x1 + 1],
                 mask[y0:y1 + 1, x0], mask[y0:y1 + 1, x1]):
        assert edge[0] and edge[-1], "a corner is unmarked"
        assert edge.mean() > 0.3, "too little of the edge is drawn"
        assert longest_gap(edge) >= 3, "no visible gap in a dashed edge"
    long_edge = mask[y0:y1 + 1, x0]
    assert np.count_nonzero(np.diff(long_edge.astype(int)) == -1) >= 4  # several dashes
    assert magenta(banner).sum() > 20


def test_boxes_land_on_the_anatomy_after_downscaling() -> None:
    """A box around the phantom's bone band (its columns cols//8 to cols//3) sits on the
    band's edges in the downscaled image, found from the image itself."""
    rows, cols = 900, 600
    (source,) = dx_study(1, rows=rows, cols=cols)
    box = Box(cols // 8, rows // 4, cols // 3, 3 * rows // 4, score=0.9,
              level=DecisionLevel.LIKELY)
    _, plain = rendered(source, (), max_size=256)
    _, boxed = rendered(source, (box,), max_size=256)
    bright = np.flatnonzero(plain[plain.shape[0] // 2, :, 0] > 128)
    band_left, band_right = int(bright.min()), int(bright.max())
    middle = boxed.shape[0] // 2
    drawn = np.flatnonzero(magenta(boxed)[middle])
    assert len(drawn) >= 2
    assert abs(int(drawn.min()) - band_left) <= 2 and abs(int(drawn.max()) - band_right) <= 2
    # Rows: from a quarter to three quarters of the height.
    column = np.flatnonzero(magenta(boxed)[:, band_left])
    assert abs(int(column.min()) - boxed.shape[0] // 4) <= 2
    assert abs(int(column.max()) - 3 * boxed.shape[0] // 4) <= 3


def test_no_legend_and_no_box_without_a_possible_or_likely_box() -> None:
    (source,) = dx_study(1, rows=600, cols=400)
    weak = Box(*SOURCE_BOX, score=0.1, level=DecisionLevel.NEGATIVE)
    for boxes in ((), (weak,)):
        banner, xray = rendered(source, boxes)
        assert not magenta(banner).any() and not magenta(xray).any()


def test_overlay_with_boxes_is_valid(tmp_path: Path) -> None:
    (source,) = dx_study(1)
    boxes = (Box(30, 40, 80, 200, score=0.9, level=DecisionLevel.LIKELY),
             Box(0, 0, 240, 300, score=0.35, level=DecisionLevel.POSSIBLE))  # whole image
    finding = finding_for(source, 0.8, UNTRAINED, points=TWO_POINTS, boxes=boxes, spread=0.02)
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                           instance_number=1)
    back = validate(overlay, tmp_path / "sc.dcm")
    check_overlay_file(tmp_path / "sc.dcm", source, finding)
    assert "boxes drawn" in back.DerivationDescription
    banner, xray = split_overlay(back.pixel_array, source, 1024)
    check_banner(banner, trained=False)
    assert magenta(xray).any()


# -- the header we copy: real sources break their VRs, our objects must not -------------

REAL_FILES = [
    "derived_transcoded/RG2_ImplicitVRLE_derived.dcm",
    "derived_transcoded/RG3_RLE_derived.dcm",
    "highdicom/dx_image.dcm",
    "nhsx-nccid/NIH_CXR14_nih.dcm",
    "pylibjpeg-data/966_fixed.dcm",
    "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm",
    "pylibjpeg-data/RG2_JLSL.dcm",
    "pylibjpeg-data/RG2_JPLL.dcm",
]
WG04_FILES = ["RG1_UNCR.dcm", "RG3_J2KR.dcm"]  # from pydicom-data
# What the odd files must report, as (attribute, action up to its colon); others none.
EXPECTED_REPAIRS = {
    "nhsx-nccid/NIH_CXR14_nih.dcm": [("PatientAge", "removed")],  # "81"
    # A 56-character hash as Accession Number, another in the birth date.
    "pylibjpeg-data/966_fixed.dcm": [("AccessionNumber", "emptied"),
                                     ("PatientBirthDate", "emptied")],
    # Cyrillic (Windows-1251) bytes, no Specific Character Set.
    "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm": [
        ("SpecificCharacterSet", "set to ISO_IR 100")],
}
# Patient and study attributes that both results copy: byte-identical unless repaired.
COPIED = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
          "PatientSize", "PatientWeight", "StudyInstanceUID", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyDescription"]
LATIN_1_SET = "set to ISO_IR 100"


def summary(repairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Repairs with each action cut at its colon (the reason after it is for people)."""
    return [(name, action.split(":")[0]) for name, action in repairs]


def real_source(name: str) -> tuple[Dataset, Path]:
    """A real file and its path (../shared or pydicom-data), or a skip that says why."""
    if name in WG04_FILES:
        found = get_testdata_file(name, download=False)
        if found is None:
            print(f"skipping: {name} needs pydicom-data (pip install pydicom-data)")
            pytest.skip(f"{name} is absent: pydicom-data is not installed")
        return pydicom.dcmread(found), Path(found)
    return real_file(name), SHARED_DICOM / name


def raw_values(path: Path) -> dict[str, bytes]:
    """The COPIED attributes' bytes as the file holds them, without padding."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {keyword: (ds.get_item(keyword).value or b"").rstrip(b" \x00")
            for keyword in COPIED if keyword in ds}


def results_for(source: Dataset, tmp_path: Path) -> list[Dataset]:
    """SR and SC made from `source`, each validated by dciodvfy and read back."""
    finding = finding_for(source, 0.7, TRAINED)
    sr = make_sr([finding], [source], series_instance_uid=hd.UID(), series_number=901,
                 device_uid=hd.UID())
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                           instance_number=1)
    return [validate(sr, tmp_path / "sr.dcm"), validate(overlay, tmp_path / "sc.dcm")]


def put(ds: Dataset, keyword: str, value: object) -> None:
    """Give `ds` a value as a received file may hold it: pydicom's check (which warns,
    quoting the value) is skipped, as it is when pydicom reads a file."""
    tag = Tag(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)


def test_every_shared_file_is_covered() -> None:
    if not SHARED_DICOM.is_dir():
        print(f"skipping: {SHARED_DICOM} is absent (it sits beside the development checkout)")
        pytest.skip(f"{SHARED_DICOM} is absent")
    found = {path.relative_to(SHARED_DICOM).as_posix() for path in SHARED_DICOM.rglob("*.dcm")}
    assert found <= set(REAL_FILES), f"add to REAL_FILES: {sorted(found - set(REAL_FILES))}"


@pytest.mark.parametrize("name", REAL_FILES + WG04_FILES)
def test_results_for_real_files_are_valid_and_keep_valid_values(tmp_path: Path,
                                                                name: str) -> None:
    """Zero dciodvfy errors in our SR and SC for every real source; the odd sources'
    repairs are reported and every other patient/study value is copied byte for byte
    (the Cyrillic file's names included: declared Latin-1, their bytes are kept)."""
    source, path = real_source(name)
    repairs = header_repairs(source)
    print(f"{name}: {repairs}")
    assert summary(repairs) == EXPECTED_REPAIRS.get(name, [])
    repaired = {attribute for attribute, _ in repairs}
    declared = source.get("SpecificCharacterSet")
    before = raw_values(path)
    for back in results_for(source, tmp_path):
        expected_charset = "ISO_IR 100" if "SpecificCharacterSet" in repaired else declared
        assert back.get("SpecificCharacterSet") == expected_charset
        after = raw_values(Path(back.filename))
        for keyword in COPIED:
            if keyword in repaired or keyword not in before:
                assert after.get(keyword, b"") == b"", keyword
            else:
                assert after.get(keyword) == before[keyword], keyword


@pytest.mark.parametrize(("keyword", "value", "action"), [
    ("PatientAge", "81", "removed: invalid for VR AS"),
    ("AccessionNumber", "d14a028c2a3a2bc9476102bb288234c4", "emptied: invalid for VR SH"),
    ("StudyDate", "20230231", "emptied: invalid for VR DA"),  # highdicom would raise
    ("PatientSex", "U", "emptied: not M, F or O"),  # valid CS, but highdicom would raise
    ("PatientName", "A" * 65 + "^B", "emptied: invalid for VR PN"),
    ("ImageLaterality", "r", "removed: invalid for VR CS"),  # the overlay copies it
])
def test_invalid_values_are_emptied_or_removed_and_reported(
        tmp_path: Path, keyword: str, value: str, action: str) -> None:
    (source,) = dx_study(1)
    put(source, keyword, value)
    assert header_repairs(source) == [(keyword, action)]
    for back in results_for(source, tmp_path):
        assert back.get(keyword, "") == ""
        assert back.PatientID == source.PatientID
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.AccessionNumber == ("" if keyword == "AccessionNumber" else "ACC0001")
    assert source[keyword].value == value  # the source itself is left as it was


Charset = str | list[str] | None


def charset_case(file_name: str) -> tuple[Charset, bytes, list[tuple[str, str]], Charset, bytes]:
    """One of pydicom's character set files as a case: its character set and name are
    carried as they are (as pydicom keeps them: it drops a trailing empty name group and
    a trailing escape to ASCII when it reads, which changes no character)."""
    ds = pydicom.dcmread(get_charset_files(file_name)[0])
    raw = ds.get_item("PatientName").value
    declared = ds.SpecificCharacterSet
    declared = declared if isinstance(declared, str) else list(declared)
    return declared, raw, [], declared, ds.PatientName.original_string


@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR100':UserWarning")
@pytest.mark.parametrize(("declared", "name", "repairs", "written_charset", "written_name"), [
    pytest.param(None, b"M\xfcller^J\xfcrgen", [("SpecificCharacterSet", LATIN_1_SET)],
                 "ISO_IR 100", b"M\xfcller^J\xfcrgen", id="latin-1 bytes, none declared"),
    pytest.param(None, b"M\x9aller^J\xfcrgen",
                 [("PatientName", "replaced 1 byte with '?'"),
                  ("SpecificCharacterSet", LATIN_1_SET)],
                 "ISO_IR 100", b"M?ller^J\xfcrgen", id="byte 0x9A, none declared"),
    pytest.param(None, b"M\x80ller^J\x9frgen", [("PatientName", "replaced 2 bytes with '?'")],
                 None, b"M?ller^J?rgen", id="bytes 0x80-0x9F only: stays ASCII"),
    pytest.param("ISO_IR100", b"M\xfcller^J\xfcrgen",
                 [("SpecificCharacterSet", "removed"), ("SpecificCharacterSet", LATIN_1_SET)],
                 "ISO_IR 100", b"M\xfcller^J\xfcrgen", id="misspelt character set"),
    pytest.param("ISO_IR 100", b"M\x9aller^J\xfcrgen",
                 [("PatientName", "replaced 1 byte with '?'")],
                 "ISO_IR 100", b"M?ller^J\xfcrgen", id="declared Latin-1, byte 0x9A"),
    *[pytest.param(*charset_case(file_name), id=file_name)
      for file_name in ("chrH31.dcm", "chrX1.dcm", "chrKoreanMulti.dcm")],
])
def test_character_sets(tmp_path: Path, declared: Charset, name: bytes,
                        repairs: list[tuple[str, str]], written_charset: Charset,
                        written_name: bytes) -> None:
    """A declared character set is carried (highdicom's own copy raises on the Japanese
    and Korean ones); bytes with none declared are kept and declared Latin-1 where they
    are valid there, made "?" where not, and the results hold exactly those bytes."""
    (source,) = dx_study(1)
    if declared is None:
        del source.SpecificCharacterSet
    else:
        source.SpecificCharacterSet = declared
    source.PatientName = name
    source.save_as(tmp_path / "source.dcm", enforce_file_format=True)
    source = pydicom.dcmread(tmp_path / "source.dcm")  # decoded as a received file is
    assert summary(header_repairs(source)) == repairs
    for back in results_for(source, tmp_path):
        assert back.get("SpecificCharacterSet") == written_charset
        assert back.get_item("PatientName").value.rstrip(b" ") == written_name
    assert source.get("SpecificCharacterSet") == declared


# The node logs Python warnings (logging.captureWarnings). Run in a fresh interpreter as
# the node runs: pytest resets warning filters that modules set while it collects tests.
LOG_SCRIPT = """
import json, sys
import numpy as np, pydicom
from highdicom.valuerep import check_person_name
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.tag import Tag
from fractured import log
from fractured.engine.findings import Finding, ImageRef, ModelInfo, OperatingPoints
from fractured.results.overlay import make_overlay
from fractured.results.sr import make_sr
from tests.factory import dx_study

log.configure("info", "json")
(synthetic,) = dx_study(1)
for keyword, value in (("PatientName", "Zebedee0042"), ("ReferringPhysicianName", "Quentin0043"),
                       ("PatientAge", "eighty-one"), ("AccessionNumber", "ACC-0044-0044-0044")):
    tag = Tag(keyword)
    synthetic[tag] = DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)
values = []
for source in [synthetic] + [pydicom.dcmread(path) for path in sys.argv[1:]]:
    image = ImageRef(str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                     str(source.SOPInstanceUID), str(source.SOPClassUID))
    finding = Finding(image, np.float32(0.7), OperatingPoints(0.5, 0.5),
                      np.zeros((source.Rows, source.Columns), np.float32),
                      ModelInfo("m", "1", trained=True))
    make_sr([finding], [source], series_instance_uid="1.2.3", series_number=901,
            device_uid="1.2.4")
    make_overlay(finding, source, series_instance_uid="1.2.5", series_number=902,
                 instance_number=1)
    values += [str(source.get(keyword) or "") for keyword in
               ("PatientName", "PatientID", "ReferringPhysicianName", "AccessionNumber",
                "PatientAge")]
check_person_name("Controlname0045")  # a warning not from highdicom: must be logged
print(json.dumps(values))
"""


def test_no_log_line_carries_a_patient_value() -> None:
    """highdicom quotes single-component names in a warning: the node's log must not
    (synthetic values, and the odd real files' where present)."""
    paths = [str(SHARED_DICOM / name) for name in EXPECTED_REPAIRS
             if (SHARED_DICOM / name).exists()]
    if not paths:
        print(f"{SHARED_DICOM} absent: checking the synthetic source only")
    proc = subprocess.run([sys.executable, "-c", LOG_SCRIPT, *paths], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    log_text = proc.stderr
    print(log_text)
    assert proc.returncode == 0
    assert "Controlname0045" in log_text, "warnings do not reach the log: the check is void"
    parts = {part for value in json.loads(proc.stdout) for part in re.split(r"[\^=]", value)
             if len(part) >= 5}
    leaked = [part for part in parts
              if part in log_text or json.dumps(part)[1:-1] in log_text]
    assert not leaked, f"patient values in the log: {leaked}"


@pytest.mark.parametrize("colormap", ["jet", "inferno", "hot"])
def test_overlay_heatmap_uses_the_configured_colour_map(colormap: str) -> None:
    from fractured.results.overlay import COLORMAPS, MAX_HEAT_ALPHA

    display = np.full((64, 64), 0.5, np.float32)
    heatmap = np.zeros((64, 64), np.float32)
    heatmap[:, :32] = 1.0  # left half fully hot
    (source,) = dx_study(1)
    finding = finding_for(source, 0.1, TRAINED, heatmap=heatmap)
    picture = render_overlay(finding, display, colormap=colormap)
    hot = picture[-32, 8].astype(float)  # a pixel of the X-ray part, in the hot half
    top = cv2.applyColorMap(np.array([[255]], np.uint8), COLORMAPS[colormap])[0, 0, ::-1]
    expected = 127.5 * (1 - MAX_HEAT_ALPHA) + top * MAX_HEAT_ALPHA
    np.testing.assert_allclose(hot, expected, atol=1.0)
    assert picture[-32, 56].tolist() == [128, 128, 128]  # the cold half stays grey


def test_overlay_colour_maps_are_the_ones_the_config_offers() -> None:
    from fractured.config import ResultsSettings
    from fractured.results.overlay import COLORMAPS

    hints = typing.get_type_hints(ResultsSettings)
    assert set(typing.get_args(hints["colormap"])) == set(COLORMAPS)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("model", [UNTRAINED, TRAINED], ids=["untrained", "trained"])
def test_study_summary_image(tmp_path: Path, n: int, model: ModelInfo) -> None:
    from fractured.results.summary import make_summary

    sources = dx_study(n)
    findings = [finding_for(ds, p, model) for ds, p in zip(sources, PROBABILITIES, strict=False)]
    displays = [display_pixels(ds) for ds in sources]
    summary = make_summary(findings, sources, displays, series_instance_uid=hd.UID(),
                           series_number=9902, instance_number=n + 1, max_size=600)
    back = validate(summary, tmp_path / "summary.dcm")
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.PatientID == sources[0].PatientID
    assert [r.ReferencedSOPInstanceUID for r in back.SourceImageSequence] == \
        [ds.SOPInstanceUID for ds in sources]
    assert ("UNTRAINED MODEL" in back.SeriesDescription) is (not model.trained)
    columns = 1 if n == 1 else 2
    assert back.Columns == 600 // columns * columns
    pixels = back.pixel_array
    # one overlay tile per image at the left of its cell (tiles are never enlarged):
    # its X-ray (grey or heat, never black) fills a good part of the page's height
    tile_width = 600 // columns
    for index in range(n):
        column = pixels[:, (index % columns) * tile_width + 10]
        assert (column.max(axis=1) > 0).sum() > 0.3 * back.Rows / math.ceil(n / columns)
    with pytest.raises(ValueError, match="finding is about"):
        make_summary(findings, [*sources[1:], dx_study(1)[0]], displays,
                     series_instance_uid=hd.UID(), series_number=9902, instance_number=1)


def test_overlay_with_boxes_is_valid_and_says_what_it_drew(tmp_path: Path) -> None:
    (source,) = dx_study(1)
    boxes = (Box(20.0, 30.0, 90.0, 120.0, 0.91, DecisionLevel.LIKELY),
             Box(120.0, 150.0, 200.0, 260.0, 0.45, DecisionLevel.POSSIBLE))
    finding = finding_for(source, 0.8, TRAINED, points=TWO_POINTS, boxes=boxes)
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=902,
                           instance_number=1)
    back = validate(overlay, tmp_path / "sc-boxes.dcm")
    check_overlay_file(tmp_path / "sc-boxes.dcm", source, finding)
    assert "detected fracture boxes drawn" in back.DerivationDescription
    banner, xray = split_overlay(back.pixel_array, source, 1024)
    assert magenta(xray).any() and magenta(banner).any()  # the boxes and their legend


def test_every_overlay_says_its_colour_is_no_fracture_outline() -> None:
    """The heatmap's peak lies on a true fracture box on few fractured images (the
    card's pointing game): every banner says what the colour is, before any box legend."""
    (source,) = dx_study(1)
    box = Box(20.0, 30.0, 90.0, 120.0, 0.91, DecisionLevel.LIKELY)
    for boxes in ((), (box,)):
        finding = finding_for(source, 0.8, TRAINED, points=TWO_POINTS, boxes=boxes)
        texts = [text for text, _, _ in banner_lines(finding, legend=bool(boxes))]
        assert texts.index(HEATMAP_LEGEND) == texts.index(_verdict_text(finding)) + 1
        assert (BOX_LEGEND in texts) == bool(boxes)


def test_the_study_verdict_is_its_highest_image_and_says_how(tmp_path: Path) -> None:
    sources = dx_study(3)
    points = OperatingPoints(0.3, 0.7)
    findings = [finding_for(ds, p, TRAINED, points=points)
                for ds, p in zip(sources, (0.1, 0.45, 0.2), strict=True)]
    assert study_level(findings) is DecisionLevel.POSSIBLE
    verdict = ("Study: possible fracture (the highest of its 3 analysed images: likely on "
               "0, possible on 1)")
    assert study_verdict(findings) == verdict
    assert study_verdict(findings[:1]) == "Study: no fracture found (its one analysed image)"
    assert f"{verdict}. Image 1: no fracture found" in summary_text(findings)
    with pytest.raises(ValueError, match="at least one finding"):
        study_level([])
    # the study's first overlay carries it on its banner (one line more) and in its comments
    first, plain = (make_overlay(findings[0], sources[0], series_instance_uid=hd.UID(),
                                 series_number=902, instance_number=1, study=study)
                    for study in (verdict, None))
    assert first.ImageComments == verdict and "ImageComments" not in plain
    assert first.Rows > plain.Rows
    validate(first, tmp_path / "first.dcm")
