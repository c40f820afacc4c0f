"""The intended use where a user meets it: declared in a bundle's manifest, and obeyed
by `fractured predict` and by a running node (no verdict outside it, and why)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from fractured.cli import main
from fractured.engine.bundle import MANIFEST_FILE, Bundle, BundleError
from fractured.engine.intended_use import IntendedUse, ScopeReason
from fractured.engine.pipeline import Pipeline
from tests import factory
from tests.integration.test_metrics import get, parse, value
from tests.peers import NodeProcess, wait_for
from tests.unit.test_intended_use import LIMBS, header


def test_no_header_and_no_declaration_analyse_as_before(untrained_bundle: Path) -> None:
    assert LIMBS.check(None).reason is ScopeReason.UNKNOWN_BODY_PART
    pipeline = Pipeline(Bundle.load(untrained_bundle))
    check = pipeline.scope(header("CHEST"))
    assert (check.analyse, check.reason) == (True, ScopeReason.NOT_DECLARED)


def declared(bundle: Path, target: Path, use: object) -> Path:
    """A copy of `bundle` whose manifest declares `use` (manifest.json is not among
    the checksummed files)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["intended_use"] = use
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def test_the_manifest_declares_it_and_a_bad_one_is_refused(untrained_bundle: Path,
                                                         tmp_path: Path) -> None:
    use = {"body_parts": ["HAND", "WRIST"], "min_age_years": 18}
    bundle = Bundle.load(declared(untrained_bundle, tmp_path / "ok", use))
    assert bundle.manifest.intended_use == IntendedUse(("HAND", "WRIST"), 18)
    assert bundle.manifest.to_dict()["intended_use"] == use
    assert "intended_use" not in Bundle.load(untrained_bundle).manifest.to_dict()
    for i, (bad, message) in enumerate([
            ({"body_parts": [], "min_age_years": 18}, "intended_use.body_parts"),
            ({"body_parts": ["hand"], "min_age_years": 18}, "intended_use.body_parts"),
            ({"body_parts": ["HAND"], "min_age_years": -1}, "intended_use.min_age_years"),
            ({"body_parts": ["HAND"]}, "missing key 'intended_use.min_age_years'"),
            ({"body_parts": ["HAND"], "min_age_years": 18, "views": []},
             "unknown key(s) 'intended_use.views'")]):
        with pytest.raises(BundleError, match=re.escape(message)):
            Bundle.load(declared(untrained_bundle, tmp_path / f"bad{i}", bad))


def test_predict_gives_no_verdict_outside_and_says_why(untrained_bundle: Path,
                                                       tmp_path: Path) -> None:
    bundle = declared(untrained_bundle, tmp_path / "limbs",
                      {"body_parts": ["LEG"], "min_age_years": 18})
    files = []
    for name, ds in (("leg", header("LEG")), ("chest", header("CHEST")),
                     ("child", header("LEG", PatientAge="009Y"))):
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
        files.append(str(tmp_path / f"{name}.dcm"))
    result = CliRunner().invoke(main, ["predict", *files, "--bundle", str(bundle), "--json"])
    assert result.exit_code == 0, result.output  # not analysed is no error
    leg, chest, child = (json.loads(line) for line in result.stdout.splitlines())
    assert "probability" in leg
    assert chest == {"file": files[1], "not_analysed": {
        "reason": "body_part_outside",
        "detail": "body part CHEST is outside the intended use"}}
    assert child["not_analysed"]["reason"] == "under_age" and "probability" not in child
    table = CliRunner().invoke(main, ["predict", files[1], "--bundle", str(bundle)])
    assert "not analysed: body part CHEST is outside the intended use" in table.output


@pytest.mark.peers
def test_the_node_speaks_only_inside_the_intended_use(untrained_bundle: Path,
                                                      tmp_path: Path) -> None:
    bundle = declared(untrained_bundle, tmp_path / "limbs",
                      {"body_parts": ["LEG"], "min_age_years": 18})
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["classifier"]["expected_flag_rates"] = {
        "leg": {"images": 256, "high_sensitivity": 0.5, "high_specificity": 0.25}}
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    node = NodeProcess(tmp_path / "node", bundle, []).start()
    try:
        leg, chest = factory.dx_study(2)
        chest.BodyPartExamined = "CHEST"
        child = factory.xray(generate_uid(), patient_id="TEST-0002")
        child.PatientAge = "007Y"
        rows = node.store_and_settle(tmp_path, [("leg", leg), ("chest", chest),
                                                ("child", child)], studies=2)
        assert rows[str(leg.StudyInstanceUID)]["state"] == "done"
        skipped = rows[str(child.StudyInstanceUID)]
        assert skipped["state"] == "skipped"
        assert skipped["reason"] == ("no image to analyse: 1 outside the intended use "
                                     "(patient younger than 18 years)")
        events = {e["sop_instance_uid"]: e for e in node.events("image.skipped")}
        assert events[str(chest.SOPInstanceUID)]["scope"] == "body_part_outside"
        # the age is not said (UIDs and the timestamp are random digits, left out)
        said = {key: value for key, value in events[str(child.SOPInstanceUID)].items()
                if not key.endswith("_uid") and key != "timestamp"}
        assert not any("age" in key.split("_") for key in said) and 7 not in said.values()
        assert "007" not in json.dumps(said) and "7 years" not in json.dumps(said)
        processed = wait_for("the processed study's log line",
                             lambda: node.events("study.processed"), 30)
        assert [e["images"] for e in processed] == [1]  # the leg alone
        assert node.events("model.intended_use")[0]["body_parts"] == ["LEG"]
        # the leg's SR says the chest beside it was not analysed, and why
        reports = [pydicom.dcmread(p) for p in (node.folder / "spool").rglob("*.dcm")
                   if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
        assert len(reports) == 1 and reports[0].CompletionFlag == "PARTIAL"
        summary = next(item.TextValue for item in reports[0].ContentSequence
                       if item.ValueType == "TEXT"
                       and item.ConceptNameCodeSequence[0].CodeMeaning == "Summary")
        assert summary.endswith("Not analysed: 1 image(s) "
                                "(body part CHEST is outside the intended use).")
        # counted at /metrics: each check by its outcome, the analysed leg by its region
        status, _, text = get(node.metrics_port, "/metrics")
        samples = parse(text)
        assert status == 200
        for reason, count in (("in_scope", 1), ("body_part_outside", 1), ("under_age", 1)):
            assert value(samples, "fractured_images_scope_checked_total",
                         reason=reason) == count
        assert sum(value(samples, "fractured_findings_total", region="leg", level=level)
                   for level in ("negative", "possible", "likely")) == 1
        # fractured status: the week's images per region and per reason not analysed,
        # beside the model's expected shares (this bundle declares its own)
        week = node.status()["last_7_days"]
        assert week["not_analysed"] == {"body_part_outside": 1, "under_age": 1}
        assert sum(week["regions"]["leg"][k] for k in ("images",)) == 1
        assert week["expected"] == {"leg": {"high_sensitivity": 0.5,
                                            "high_specificity": 0.25}}
        text = subprocess.run([sys.executable, "-m", "fractured", "status", "--config",
                               str(node.config)], capture_output=True, text=True,
                              check=True).stdout
        assert "last 7 days: 1 images analysed, 2 not analysed (body_part_outside 1, " \
               "under_age 1)" in text
        assert "  leg: 1 images, possible or likely " in text and "(expected 50.0 %)" in text
    finally:
        node.stop()
