"""deploy/orthanc: the shipped Lua script routes a stable study's CR and DX series, and
only those, to the node; each once, and again when it gains images; an X-ray series
added later on its own. A DCMTK storescp stands in for the node."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests import factory
from tests.paths import REPO
from tests.peers import Orthanc, Storescp, wait_for

pytestmark = [pytest.mark.peers, pytest.mark.slow]

DEPLOY = REPO / "deploy" / "orthanc"


def write(folder: Path, datasets: list[pydicom.Dataset]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_shipped_configuration_declares_what_the_script_uses() -> None:
    shipped = json.loads((DEPLOY / "orthanc.json").read_text())
    lua = (DEPLOY / "autoroute.lua").read_text()
    (node,) = shipped["DicomModalities"]
    assert f"local NODE = '{node}'" in lua
    (metadata,) = shipped["UserMetadata"]
    assert f"local SENT = '{metadata}'" in lua
    assert [Path(p).name for p in shipped["LuaScripts"]] == ["fractured-autoroute.lua"]


def test_script_routes_xray_series_only_each_once(tmp_path: Path) -> None:
    node = Storescp(tmp_path / "node", ae_title="FRACTURED").start()
    orthanc = Orthanc(tmp_path / "orthanc", modalities={
        "fractured": {"AET": "FRACTURED", "Host": "127.0.0.1", "Port": node.port}},
        lua=(DEPLOY / "autoroute.lua").read_text())
    orthanc.start()
    try:
        study = generate_uid()
        dx_series, cr_series = generate_uid(), generate_uid()
        dx = [factory.xray(study, series_uid=dx_series, instance_number=i, seed=i)
              for i in (1, 2)]
        cr = [factory.xray(study, modality="CR", series_uid=cr_series)]
        other = factory.xray(study, modality="CR")
        other.Modality = "OT"  # another series of the study that is not an X-ray
        for path in write(tmp_path / "first", [*dx, *cr, other]):
            orthanc.post("/instances", path.read_bytes())

        def sent() -> set[str]:
            return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                    for p in node.files()}

        def instances_sent_by_jobs(expected: int) -> bool:
            jobs = orthanc.get("/jobs?expand")
            return (sum(j["Content"].get("InstancesCount", 0) for j in jobs) >= expected
                    and all(j["State"] == "Success" for j in jobs))

        xray_uids = {str(ds.SOPInstanceUID) for ds in [*dx, *cr]}
        wait_for("the X-ray series at the node", lambda: sent() == xray_uids, 60)
        wait_for("Orthanc's store job", lambda: instances_sent_by_jobs(3), 60)

        # The node's results come back into the study, then a late X-ray series.
        results = factory.xray(study, modality="CR")
        results.Modality = "SR"
        late = factory.xray(study)
        for path in write(tmp_path / "later", [results, late]):
            orthanc.post("/instances", path.read_bytes())
        xray_uids.add(str(late.SOPInstanceUID))
        wait_for("the late series at the node", lambda: sent() == xray_uids, 60)
        wait_for("the second store job", lambda: instances_sent_by_jobs(4), 60)

        # An image added to a series already sent: the series goes again, whole.
        extra = factory.xray(study, series_uid=dx_series, instance_number=3, seed=3)
        for path in write(tmp_path / "extra", [extra]):
            orthanc.post("/instances", path.read_bytes())
        xray_uids.add(str(extra.SOPInstanceUID))
        wait_for("the grown series at the node", lambda: sent() == xray_uids, 60)
        wait_for("the third store job", lambda: instances_sent_by_jobs(7), 60)
        jobs = orthanc.get("/jobs?expand")
        assert sorted(j["Content"]["InstancesCount"] for j in jobs) == [1, 3, 3], \
            "each series once, and the grown one again"
        assert sent() == xray_uids, "neither the OT series nor the SR went to the node"
    finally:
        orthanc.stop()
        node.stop()
