"""The results in the viewers radiologists read them in, in a real browser.

A real CR study goes into Orthanc, Orthanc routes it to the node (deploy/orthanc's
script), the node sends back its SR and overlay, and then: OHIF, served beside Orthanc's
DICOMweb plugin, opens the study in headless Chromium, loads the SR and takes its boxes
as measurements; what the test checks is read from OHIF's own state (its services), not
from pixels: every box on the right image at the right place, the verdict and the
probability as labels, the overlay in a viewport. Orthanc's Web Viewer plugin shows the
overlay; DCMTK's dsr2html renders the SR as text with the summary first. Screenshots go
to var/test-artefacts/viewers/ (docs/pacs-setup.md shows them).

The node runs the random-weight bundle with a detector and `boxes = "always"`: it finds
boxes on any image, which is what a display test needs; everything it sends says
UNTRAINED, and the test checks OHIF shows that too.
"""

from __future__ import annotations

import io
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from fractured.results import codes
from tests.factory import SHARED_DICOM
from tests.paths import REPO
from tests.peers import NodeProcess, Orthanc, free_port, need, wait_for
from tests.viewer import ViewerServer, chromium, ohif_dist, page_state, versions

pytestmark = [pytest.mark.peers, pytest.mark.slow]

#: A real CR of a hip (Fuji, JPEG lossless, 2140 x 1760), from pylibjpeg-data.
REAL_STUDY = SHARED_DICOM / "pylibjpeg-data" / "RG2_JPLL.dcm"
ARTEFACTS = REPO / "var" / "test-artefacts" / "viewers"


@dataclass
class Rectangle:
    """One measurement group of the SR with its rectangle: what a viewer must show."""

    sop_instance_uid: str
    corners: np.ndarray  # (5, 2): the closed polyline, columns and rows
    label: str  # the group's Comment


@dataclass
class Results:
    orthanc: Orthanc
    study_uid: str
    series: dict[str, dict[str, Any]]  # Orthanc's series by modality: CR, SR, OT
    sr: pydicom.Dataset
    rectangles: list[Rectangle]
    summary: str


def _rectangles(sr: pydicom.Dataset) -> list[Rectangle]:
    report = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(
        sr).content)
    found = []
    for group in report.get_image_measurement_groups():
        (measurement,) = [m for m in group.get_measurements()
                          if m.name in (codes.FRACTURE_PROBABILITY, codes.BOX_SCORE)]
        (region,) = measurement.referenced_coordinates
        (image,) = region.ContentSequence
        (label,) = [item.TextValue for item in group[0].ContentSequence
                    if item.ValueType == "TEXT" and item.name == codes.COMMENT]
        found.append(Rectangle(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                               np.asarray(region.value), label))
    return found


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory,
            untrained_bundle_with_detector: Path) -> Any:
    if not REAL_STUDY.exists():
        print(f"skipping: {REAL_STUDY} is absent (../shared sits beside the checkout)")
        pytest.skip(f"{REAL_STUDY} is absent")
    tmp = tmp_path_factory.mktemp("viewers")
    node_port = free_port()
    orthanc = Orthanc(tmp / "orthanc",
                      modalities={"fractured": {"AET": "FRACTURED", "Host": "127.0.0.1",
                                                "Port": node_port}},
                      lua=(REPO / "deploy" / "orthanc" / "autoroute.lua").read_text(),
                      plugins=("OrthancDicomWeb", "OrthancWebViewer"))
    orthanc.start()
    node = NodeProcess(tmp / "node", untrained_bundle_with_detector,
                       [{"name": "pacs", "ae_title": orthanc.ae_title,
                         "port": orthanc.dicom_port}], port=node_port,
                       engine='boxes = "always"')
    try:
        node.start()
        orthanc.post("/instances", REAL_STUDY.read_bytes())

        def by_modality() -> dict[str, dict[str, Any]] | None:
            series = {s["MainDicomTags"].get("Modality"): s
                      for s in orthanc.get("/series?expand")}
            return series if {"CR", "SR", "OT"} <= series.keys() else None

        series = wait_for("the SR and the overlay in Orthanc", by_modality, 180, 0.5)
        node.stop()
        (sr_id,) = series["SR"]["Instances"]
        sr = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{sr_id}/file")))
        (summary,) = [item.TextValue for item in sr.ContentSequence
                      if item.ValueType == "TEXT"
                      and item.ConceptNameCodeSequence[0].CodeValue == codes.SUMMARY.value]
        rectangles = _rectangles(sr)
        assert len(rectangles) > 1, "the random-weight detector found no box to show"
        yield Results(orthanc, str(sr.StudyInstanceUID), series, sr, rectangles, summary)
    finally:
        node.stop()
        orthanc.stop()


def _screenshot(driver: Any, name: str) -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _open_series(driver: Any, description: str, shown: str, what: str) -> None:
    """What a radiologist does: double-click the series in OHIF's study browser until
    the page's state says it is shown (`shown`, a JavaScript expression). The browser
    redraws itself while the study loads: a click on a replaced entry is tried again,
    and so is one that landed on an entry about to be replaced and did nothing (seen
    once in the full suite on a loaded machine: the SR never opened)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    def double_click() -> bool:
        entries = driver.find_elements(
            By.XPATH, f"//*[@data-cy='series-description-label']"
                      f"[starts-with(normalize-space(.), '{description}')]")
        if len(entries) != 1:
            return False
        try:
            ActionChains(driver).double_click(entries[0]).perform()
        except StaleElementReferenceException:
            return False
        return True

    def opened() -> bool:
        wait_for(f"the series '{description}' in the study browser", double_click, 60, 0.5)
        try:
            page_state(driver, shown, what, timeout=30)
        except pytest.fail.Exception:
            return False
        return True

    wait_for(what, opened, 120, 0)


def _click_button(driver: Any, text: str, what: str) -> None:
    """Click the one button labelled `text` once it is there; a button React replaced
    while it was being read or clicked is looked for again (the full suite on a loaded
    machine once read a stale one)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    def click() -> bool:
        try:
            buttons = [b for b in driver.find_elements(By.TAG_NAME, "button")
                       if b.text.strip() == text]
            if len(buttons) != 1:
                return False
            buttons[0].click()
        except StaleElementReferenceException:
            return False
        return True

    wait_for(what, click, 60, 0.5)


#: Each measurement OHIF holds: its label, image and corners in image coordinates
#: (columns, rows; cornerstone's image coordinates put 0, 0 at the top left corner of
#: the top left pixel, as SR does).
_MEASUREMENTS = """window.services.measurementService.getMeasurements().map(m => ({
  label: m.label, sop: m.SOPInstanceUID, tool: m.toolName,
  corners: m.points.map(p => Array.from(
    window.cornerstone.utilities.worldToImageCoords(m.referencedImageId, p)))}))"""


def test_ohif_shows_every_box_and_verdict_of_the_sr_on_its_image(results: Results) -> None:
    dist = ohif_dist()
    with ViewerServer(dist, results.orthanc.http_port) as server, chromium() as driver:
        print("viewer:", versions(driver))
        driver.get(server.url(f"/viewer?StudyInstanceUIDs={results.study_uid}"))
        page_state(driver, "window.services.displaySetService.getActiveDisplaySets()"
                           ".length === 3", "OHIF to list the study's three series")
        descriptions = driver.execute_script(
            "return window.services.displaySetService.getActiveDisplaySets()"
            ".map(s => [s.Modality, s.SeriesDescription || ''])")
        sr_description = results.series["SR"]["MainDicomTags"]["SeriesDescription"]
        assert ["SR", sr_description] in descriptions
        assert "UNTRAINED" in sr_description

        _open_series(driver, "AI fracture SR",
                     "(() => { const sr = window.services.displaySetService"
                     ".getActiveDisplaySets().find(s => s.Modality === 'SR');"
                     " return sr.isLoaded && [...window.services.viewportGridService"
                     ".getState().viewports.values()].some(v => v.displaySetInstanceUIDs"
                     ".includes(sr.displaySetInstanceUID)); })()",
                     "the SR loaded in OHIF's SR viewport")
        # OHIF asks before it takes an SR's measurements for tracking: say yes.
        from selenium.webdriver.common.by import By

        _click_button(driver, "Yes", "OHIF's offer to track the SR's measurements")
        shown = page_state(
            driver, f"(() => {{ const m = {_MEASUREMENTS}; "
                    f"return m.length >= {len(results.rectangles)} ? m : null; }})()",
            "OHIF to hold the SR's groups as measurements")
        print(f"OHIF holds {len(shown)} measurements for the SR's "
              f"{len(results.rectangles)} rectangles (1 image, "
              f"{len(results.rectangles) - 1} boxes)")
        assert len(shown) == len(results.rectangles)
        assert all(codes.UNTRAINED_WARNING in m["label"] for m in shown)
        unmatched = list(shown)
        for rectangle in results.rectangles:
            corners = rectangle.corners[:4]  # the closed polyline's distinct corners
            match = [m for m in unmatched if m["sop"] == rectangle.sop_instance_uid
                     and _same_corners(m["corners"], corners, tolerance=1.0)]
            assert match, f"no measurement at {corners.tolist()} on the source image"
            assert match[0]["tool"] == "RectangleROI"
            assert match[0]["label"] == rectangle.label
            unmatched.remove(match[0])
        print("every rectangle of the SR is a measurement on its image within 1 px, "
              "labelled with its verdict")

        # The measurement panel lists them by label: the verdict and the probability.
        driver.find_element(By.CSS_SELECTOR, "[data-cy='trackedMeasurements-btn']").click()
        image_label = next(r.label for r in results.rectangles if "probability" in r.label)
        assert re.search(r"\(probability \d\.\d\d\)", image_label)
        wait_for("the verdict in OHIF's measurement panel",
                 lambda: image_label in driver.find_element(By.TAG_NAME, "body").text, 30)
        # A possible fracture reads as such: OHIF shows no coded value, so no "Present".
        assert "Present" not in driver.find_element(By.TAG_NAME, "body").text
        assert page_state(driver, "window.services.displaySetService.getActiveDisplaySets()"
                                  ".find(s => s.Modality === 'SR').isHydrated",
                          "OHIF to mark the SR hydrated")
        time.sleep(1)  # let the annotations' text boxes settle for the picture
        _screenshot(driver, "ohif-sr.png")

        # The overlay: double-click its series; the viewport shows its one image.
        overlay_uid = results.orthanc.get(
            f"/instances/{results.series['OT']['Instances'][0]}")["MainDicomTags"][
            "SOPInstanceUID"]
        _open_series(driver, "AI fracture overlay",
                     "window.cornerstone.getEnabledElements().some(e => "
                     f"(e.viewport.getCurrentImageId() || '').includes('{overlay_uid}')"
                     " && e.viewport.getImageData())",
                     "the overlay in an OHIF viewport")
        time.sleep(1)
        _screenshot(driver, "ohif-overlay.png")
        print("OHIF shows the overlay series")


def _same_corners(shown: list[list[float]], corners: np.ndarray, tolerance: float) -> bool:
    """The same rectangle, whatever order a viewer lists its corners in."""
    got = sorted((round(x, 3), round(y, 3)) for x, y in shown)
    want = sorted((round(x, 3), round(y, 3)) for x, y in corners.tolist())
    return len(got) == len(want) and bool(np.all(
        np.abs(np.asarray(got) - np.asarray(want)) <= tolerance))


def test_orthanc_web_viewer_shows_the_overlay(results: Results) -> None:
    """Orthanc's own Web Viewer plugin (orthanc-webviewer) draws the overlay series."""
    overlay = results.series["OT"]["ID"]
    with chromium() as driver:
        driver.get(results.orthanc.url(f"/web-viewer/app/viewer.html?series={overlay}"))
        # Drawn: the viewer's canvas holds the overlay's pixels, not a blank field.
        spread = page_state(driver, """(() => {
            const c = [...document.querySelectorAll('canvas')].find(
                c => c.width > 100 && c.height > 100);
            if (!c) return null;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let lo = 255, hi = 0;
            for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]);
                                                   hi = Math.max(hi, d[i]); }
            return hi - lo > 100 ? hi - lo : null; })()""",
                            "the overlay drawn in the Orthanc Web Viewer", 60)
        print(f"Orthanc Web Viewer canvas: red channel spans {spread} levels")
        _screenshot(driver, "orthanc-webviewer-overlay.png")


def test_dsr2html_renders_the_summary_first_and_every_verdict(
        results: Results, tmp_path: Path) -> None:
    """A PACS that shows SRs as text: DCMTK's dsr2html puts the summary before the
    measurements and each image's and box's verdict in words."""
    path = tmp_path / "sr.dcm"
    results.sr.save_as(path, enforce_file_format=True)
    html = subprocess.run([need("dsr2html"), str(path)], capture_output=True, text=True,
                          check=True).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
    summary = re.sub(r"\s+", " ", results.summary)
    assert summary in text
    assert text.index(summary) < text.index("Imaging Measurements")
    assert re.search(r"Image 1: \w+ fracture|Image 1: no fracture found", summary)
    for rectangle in results.rectangles:
        assert rectangle.label in text
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page = ARTEFACTS / "dsr2html.html"
    page.write_text(html)
    print(f"dsr2html: summary first, {len(results.rectangles)} verdicts in words")
    with chromium(1000, 900) as driver:  # what a text-only SR display looks like
        driver.get(page.as_uri())
        _screenshot(driver, "dsr2html.png")
