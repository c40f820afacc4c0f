"""Real vendor CR/DX files through the node: every one is received, decoded, analysed,
and its overlay shows the X-ray the right way up with bone bright (MONOCHROME1 too)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from tests.factory import SHARED_DICOM
from tests.peers import (
    NodeProcess,
    Storescp,
    c_store_statuses,
    dciodvfy,
    storescu,
    wait_for,
)

pytestmark = [pytest.mark.peers, pytest.mark.slow]

WG04 = ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm"]


def real_files() -> list[Path]:
    files = sorted(SHARED_DICOM.rglob("*.dcm")) if SHARED_DICOM.is_dir() else []
    if not files:
        print(f"no real files in {SHARED_DICOM}: that folder sits beside the checkout")
    try:
        from pydicom.data import get_testdata_file

        files += [Path(get_testdata_file(name)) for name in WG04]
    except (ImportError, ValueError) as exc:
        print(f"pydicom-data's WG04 files unavailable: {exc}")
    if not files:
        pytest.skip("no real DICOM files: ../shared/data/dicom absent, pydicom-data missing")
    return files


def test_real_files_are_received_analysed_and_shown_bone_bright(
        tmp_path: Path, untrained_bundle: Path) -> None:
    files = real_files()
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
               for p in files}
    destination = Storescp(tmp_path / "received").start()
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "dest", "ae_title": destination.ae_title,
                         "port": destination.port}])
    node.start()
    try:
        proc = storescu(node.port, files)
        output = proc.stdout + proc.stderr
        assert c_store_statuses(output) == [0] * len(files), output[-3000:]
        studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                   for p in files}

        def all_done() -> bool:
            rows = node.status()["study_list"]
            return len(rows) == len(studies) and all(r["state"] == "done" for r in rows)

        wait_for("every real study to be done", all_done, 240, 1.0)
        log = node.log_text()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for value in (str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))):
                assert len(value) < 3 or value not in log, "patient data in the node's log"
        repaired = {e["sop_instance_uid"]: e["attributes"] for e in node.events("source.repaired")}
        nih = next((p for p in files if p.name == "NIH_CXR14_nih.dcm"), None)
        if nih is not None:  # a header whose Patient's Age the node repairs
            uid = str(pydicom.dcmread(nih, stop_before_pixels=True).SOPInstanceUID)
            assert "PatientAge" in repaired[uid]
        for path in destination.files():
            errors, _ = dciodvfy(path)
            assert errors == [], f"{path.name}: {errors}"
        overlays = [pydicom.dcmread(p) for p in destination.files()
                    if pydicom.dcmread(p, stop_before_pixels=True).Modality != "SR"]
        assert len(overlays) == len(files)
        srs = len(destination.files()) - len(overlays)
        assert srs == len(studies)
    finally:
        node.stop()
        destination.stop()

    for overlay in overlays:
        (ref,) = overlay.SourceImageSequence
        source = pydicom.dcmread(sources[str(ref.ReferencedSOPInstanceUID)])
        shown = _shown_xray(overlay, source)
        raw = cv2.resize(source.pixel_array.astype(np.float32), shown.shape[::-1],
                         interpolation=cv2.INTER_AREA)
        r = float(np.corrcoef(shown.ravel(), raw.ravel())[0, 1])
        name = sources[str(ref.ReferencedSOPInstanceUID)].name
        print(f"{name}: {source.PhotometricInterpretation}, overlay vs stored r = {r:+.2f}")
        if source.PhotometricInterpretation == "MONOCHROME1":
            assert r < -0.5, f"{name}: MONOCHROME1 must be inverted (bone bright), r={r}"
        else:
            assert r > 0.5, f"{name}: MONOCHROME2 must keep its grey scale, r={r}"


def _shown_xray(overlay: pydicom.Dataset, source: pydicom.Dataset) -> np.ndarray:
    """The overlay's X-ray part (below the banner) as luminance."""
    rgb = overlay.pixel_array.astype(np.float32)
    scale = min(1.0, overlay.Columns / source.Columns)
    height = round(source.Rows * scale)
    return rgb[-height:].mean(axis=2)
