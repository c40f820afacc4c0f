"""End to end with Orthanc as the PACS: Orthanc routes a study to the node (with the
Lua script shipped in deploy/orthanc), the node sends back an SR and one overlay per
image, and Orthanc holds them in the same study, on the same patient."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from fractured.results import codes
from tests import factory
from tests.peers import NodeProcess, Orthanc, dciodvfy, routing_pacs_and_node, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.slow]



@pytest.fixture
def pacs_and_node(tmp_path: Path, untrained_bundle: Path):
    orthanc, node = routing_pacs_and_node(tmp_path, untrained_bundle)
    orthanc.start()
    try:
        node.start()
        yield orthanc, node
    finally:
        node.stop()
        orthanc.stop()


def test_orthanc_routes_a_study_and_gets_sr_and_overlays_back(
        pacs_and_node: tuple[Orthanc, NodeProcess], tmp_path: Path) -> None:
    orthanc, node = pacs_and_node
    files = factory.write_study(tmp_path / "study", 2, patient_id="E2E-42")
    for path in files:
        orthanc.post("/instances", path.read_bytes())
    (study_id,) = orthanc.get("/studies")

    def result_series() -> list[dict] | None:
        """The study's series once the SR and both overlays are stored, else None."""
        series = orthanc.get(f"/studies/{study_id}/series")
        counts = sorted((s["MainDicomTags"].get("Modality"), len(s["Instances"]))
                        for s in series)
        return series if counts == [("DX", 2), ("OT", 2), ("SR", 1)] else None

    series = wait_for("the SR and overlay series in Orthanc", result_series, 90, 0.5)
    assert len(orthanc.get("/patients")) == 1, "results must land on the same patient"
    assert len(orthanc.get("/studies")) == 1, "results must land in the same study"
    by_desc = {s["MainDicomTags"].get("SeriesDescription", ""): s for s in series}
    sr_series = next(s for s in series if s["MainDicomTags"]["Modality"] == "SR")
    overlay_series = next(s for d, s in by_desc.items() if "overlay" in d.lower())
    assert len(sr_series["Instances"]) == 1
    assert len(overlay_series["Instances"]) == 2

    source_uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}
    (sr_id,) = sr_series["Instances"]
    sr_bytes = orthanc.get(f"/instances/{sr_id}/file")
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes)))
    assert sr.PatientID == "E2E-42"
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    referenced = set()
    for group in groups:
        (image,) = group.source_images
        referenced.add(image.referenced_sop_instance_uid)
        (evaluation,) = [e for e in group.get_qualitative_evaluations()
                         if e.name == codes.FRACTURE]
        assert evaluation.value in (codes.PRESENT, codes.UNDETERMINED, codes.ABSENT)
    assert referenced == source_uids, "one finding per source image, naming it exactly"
    (processed,) = node.events("study.processed")
    flagged = [g for g in groups for e in g.get_qualitative_evaluations()
               if e.name == codes.FRACTURE and e.value in (codes.PRESENT, codes.UNDETERMINED)]
    assert len(flagged) == processed["fractures"], "the SR says what the engine found"
    assert "UNTRAINED" in sr_series["MainDicomTags"]["SeriesDescription"]
    for item in orthanc.get(f"/series/{overlay_series['ID']}/instances"):
        assert orthanc.get(f"/instances/{item['ID']}/preview")[:8] == b"\x89PNG\r\n\x1a\n"
    # Every object the PACS received is valid DICOM.
    for instance in [sr_id, *overlay_series["Instances"]]:
        path = tmp_path / f"{instance}.dcm"
        path.write_bytes(orthanc.get(f"/instances/{instance}/file"))
        errors, warnings = dciodvfy(path)
        print(f"dciodvfy {instance}: {len(warnings)} warnings", *warnings, sep="\n  ")
        assert errors == []


def test_orthanc_preview_shows_the_heatmap_and_boxes_where_the_findings_put_them(
        tmp_path: Path) -> None:
    """The radiologist sees the overlay through the PACS's own renderer: Orthanc's preview
    PNG has the box outline on the box's edges and the heat on the hot half."""
    import cv2
    import numpy as np

    from fractured.engine.findings import (
        Box,
        DecisionLevel,
        Finding,
        ImageRef,
        ModelInfo,
        OperatingPoints,
    )
    from fractured.results.overlay import make_overlay

    source = factory.xray(hd.UID(), rows=300, cols=240)
    heatmap = np.zeros((300, 240), np.float32)
    heatmap[:, :120] = 1.0  # the left half hot
    box = Box(150.0, 100.0, 220.0, 200.0, 0.9, DecisionLevel.LIKELY)
    finding = Finding(
        ImageRef(str(source.StudyInstanceUID), str(source.SeriesInstanceUID),
                 str(source.SOPInstanceUID), str(source.SOPClassUID)),
        np.float32(0.9), OperatingPoints(0.3, 0.6), heatmap,
        ModelInfo("fractured-test", "1.0.0", trained=True), (box,))
    overlay = make_overlay(finding, source, series_instance_uid=hd.UID(), series_number=9902,
                           instance_number=1, display=None)
    path = tmp_path / "overlay.dcm"
    overlay.save_as(path, enforce_file_format=True)
    orthanc = Orthanc(tmp_path / "orthanc", modalities={}).start()
    try:
        stored = orthanc.post("/instances", path.read_bytes())
        png = orthanc.get(f"/instances/{stored['ID']}/preview")
    finally:
        orthanc.stop()
    picture = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert picture.shape == (overlay.Rows, overlay.Columns, 3)
    xray = picture[overlay.Rows - 300:].astype(int)  # below the banner, at source scale

    def box_colour_near(x: int, y: int) -> bool:
        """The outline's colour within a pixel of (x, y): edges at x1, y1 end on the
        last pixel inside the box."""
        patch = xray[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
        return bool(((patch[:, 0] > 180) & (patch[:, 1] < 80) & (patch[:, 2] > 180)).any())

    for x, y in ((150, 100), (220, 100), (150, 200), (220, 200), (185, 100), (150, 150)):
        assert box_colour_near(x, y), f"no box outline at ({x}, {y})"
    assert not box_colour_near(185, 150)  # inside the box: the X-ray, not the outline
    assert not box_colour_near(100, 150)  # nowhere else
    hot, cold = xray[250, 60], xray[250, 200]
    assert hot.max() - hot.min() > 60, f"no heat colour on the hot half: {hot}"
    assert cold.max() - cold.min() < 10, f"colour on the cold half: {cold}"
