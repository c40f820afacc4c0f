"""The result objects, checked the way a PACS would meet them.

Each SR and Secondary Capture is written to a file, validated by dicom3tools' `dciodvfy`
(zero errors; warnings are printed) and read back with pydicom and highdicom, then
checked against the Findings it was made from. Sources are a synthetic DX study made
here and real vendor files from ../shared/data/dicom (MONOCHROME1 among them),
skipped with the reason when absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes

import fractured
from fractured.engine.findings import Finding, ImageRef, ModelInfo
from fractured.engine.preprocess import display_pixels
from fractured.results import codes
from fractured.results.overlay import _probability_text, make_overlay
from fractured.results.sr import make_sr
from tests.factory import dx_study, real_file
from tests.peers import dciodvfy

MONOCHROME1_FILES = ["highdicom/dx_image.dcm", "derived_transcoded/RG3_RLE_derived.dcm"]
TRAINED = ModelInfo("resnet18-fracture", "2.1.0", trained=True)
UNTRAINED = ModelInfo("resnet18-fracture", "0.0.1", trained=False)
THRESHOLD = 0.5
# Around the threshold on purpose: 0.5 itself is a fracture (probability >= threshold).
PROBABILITIES = [0.91234567, 0.1, 0.5, 0.49999]


# -- sources ---------------------------------------------------------------------------


def finding_for(
    source: Dataset, probability: float, model: ModelInfo, heatmap: np.ndarray | None = None
) -> Finding:
    """A Finding as the engine makes one: the left half of the image hot, the right cold."""
    if heatmap is None:
        heatmap = np.zeros((source.Rows, source.Columns), np.float32)
        heatmap[:, : source.Columns // 2] = 1.0
    image = ImageRef(
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=str(source.SeriesInstanceUID),
        sop_instance_uid=str(source.SOPInstanceUID),
        sop_class_uid=str(source.SOPClassUID),
    )
    return Finding(image, np.float32(probability), THRESHOLD, heatmap, model)


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
    assert len(groups) == len(findings)
    for finding in findings:
        uid = finding.image.sop_instance_uid
        (group,) = report.get_image_measurement_groups(referenced_sop_instance_uid=uid)
        assert [img.referenced_sop_instance_uid for img in group.source_images] == [uid]
        assert group.finding_type == codes.FRACTURE
        (evaluation,) = group.get_qualitative_evaluations(name=codes.FRACTURE)
        expected = codes.PRESENT if finding.fracture else codes.ABSENT
        assert evaluation.value == expected
        (measurement,) = group.get_measurements(name=codes.FRACTURE_PROBABILITY)
        assert measurement.value == pytest.approx(float(finding.probability), abs=1e-9)
        assert measurement.unit == codes.NO_UNITS
        algorithm = [
            (item.name.meaning, item.value)
            for item in group[0].ContentSequence
            if item.name.meaning in ("Algorithm Name", "Algorithm Version")
        ]
        assert sorted(algorithm) == [
            ("Algorithm Name", model.name),
            ("Algorithm Version", model.version),
        ]
        comments = text_items(group)
        assert comments == ([] if model.trained else [codes.UNTRAINED_WARNING])
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
    sources = dx_study(n)
    findings = [finding_for(ds, p, model) for ds, p in zip(sources, PROBABILITIES, strict=False)]
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


def test_banner_never_shows_a_miss_as_equal_to_the_threshold() -> None:
    (source,) = dx_study(1)
    below = _probability_text(finding_for(source, 0.49999, TRAINED))
    assert below == "Fracture probability 0.49999 (threshold 0.50000)"
    at = _probability_text(finding_for(source, 0.5, TRAINED))
    assert at == "Fracture probability 0.50 (threshold 0.50)"
    above = _probability_text(finding_for(source, 0.91234567, TRAINED))
    assert above == "Fracture probability 0.91 (threshold 0.50)"


def test_overlay_refuses_a_mismatched_finding() -> None:
    first, second = dx_study(2)
    kwargs = {"series_instance_uid": hd.UID(), "series_number": 902, "instance_number": 1}
    with pytest.raises(ValueError, match="finding is about"):
        make_overlay(finding_for(first, 0.8, TRAINED), second, **kwargs)
    wrong_grid = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="heatmap shape"):
        make_overlay(finding_for(first, 0.8, TRAINED, heatmap=wrong_grid), first, **kwargs)
