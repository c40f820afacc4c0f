"""The drift alert rules of docs/monitoring: valid for Prometheus, firing on a rate far
from the model's expected one and not on one near it, over the metrics the node really
exposes (promtool from Debian's prometheus package)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fractured.daemon.active_model import ActiveModel
from fractured.daemon.metrics import NodeMetrics
from fractured.engine.bundle import MANIFEST_FILE
from fractured.engine.pipeline import Pipeline
from tests.paths import REPO

RULES = REPO / "docs" / "monitoring" / "fractured-rules.yml"
DESCRIPTION = ("Over 7 days the {point} point flagged a share of these images more than "
               "0.15 away from the share it flagged on the model's validation images. "
               "Check the modality, protocol and patient mix; see docs/monitoring.md.")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is absent (Debian package prometheus; tools/setup.sh "
                    "installs it)")
    return found


def test_the_rules_are_valid_prometheus_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drift_alert_fires_far_from_the_expected_share_only(tmp_path: Path) -> None:
    """A week of hand images, 10 likely and 10 negative an hour (flagged share 0.5 at
    both points): against an expected 0.2 / 0.1 it fires for both points; against an
    expected 0.45 / 0.55 for neither."""
    def case(expected: tuple[float, float], alerts: list[str]) -> dict:
        series = [
            {"series": 'fractured_findings_total{region="hand",level="likely"}',
             "values": "0+10x200"},
            {"series": 'fractured_findings_total{region="hand",level="possible"}',
             "values": "0+0x200"},
            {"series": 'fractured_findings_total{region="hand",level="negative"}',
             "values": "0+10x200"},
            *({"series": f'fractured_expected_flagged_share{{region="hand",point="{point}"}}',
               "values": f"{share}x200"}
              for point, share in zip(("high_sensitivity", "high_specificity"), expected,
                                      strict=True))]
        return {"interval": "1h", "input_series": series, "alert_rule_test": [{
            "eval_time": "190h", "alertname": "FracturedFlagRateDrift",
            "exp_alerts": [{
                "exp_labels": {"severity": "warning", "region": "hand", "point": point},
                "exp_annotations": {
                    "summary": "fractured flags hand images at a rate far from its "
                               "validation",
                    "description": DESCRIPTION.format(point=point)}}
                for point in alerts]}]}
    tests = tmp_path / "tests.yml"
    tests.write_text(json.dumps({  # JSON is YAML
        "rule_files": [str(RULES)], "evaluation_interval": "1h",
        "tests": [case((0.2, 0.1), ["high_sensitivity", "high_specificity"]),
                  case((0.45, 0.55), [])]}))
    result = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_rules_read_is_one_the_node_exposes(untrained_bundle: Path,
                                                             tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(untrained_bundle, tmp_path / "bundle"))
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["classifier"]["expected_flag_rates"] = {
        "hand": {"images": 154, "high_sensitivity": 0.61, "high_specificity": 0.2}}
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    metrics = NodeMetrics()
    from fractured.daemon.metrics import _ModelCollector

    metrics.registry.register(_ModelCollector(ActiveModel(bundle, Pipeline)))
    exposed = generate_latest(metrics.registry).decode()
    assert ('fractured_expected_flagged_share{point="high_sensitivity",region="hand"} 0.61'
            in exposed)
    names = {line.split("{")[0].split(" ")[0] for line in exposed.splitlines()
             if line and not line.startswith("#")}
    used = set(re.findall(r"\bfractured_[a-z_]+", RULES.read_text()))
    assert used and used <= names, sorted(used - names)
