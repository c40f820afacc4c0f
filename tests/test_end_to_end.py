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
from tests.peers import NodeProcess, Orthanc, dciodvfy, free_port, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def pacs_and_node(tmp_path: Path, untrained_bundle: Path):
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc",
                      modalities={"fractured": {"AET": "FRACTURED", "Host": "127.0.0.1",
                                                "Port": node_port}},
                      lua=(REPO / "deploy" / "orthanc" / "autoroute.lua").read_text())
    orthanc.start()
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": orthanc.ae_title,
                         "port": orthanc.dicom_port}], port=node_port)
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
        assert evaluation.value in (codes.PRESENT, codes.ABSENT)
    assert referenced == source_uids, "one finding per source image, naming it exactly"
    (processed,) = node.events("study.processed")
    present = [g for g in groups for e in g.get_qualitative_evaluations()
               if e.name == codes.FRACTURE and e.value == codes.PRESENT]
    assert len(present) == processed["fractures"], "the SR says what the engine found"
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
