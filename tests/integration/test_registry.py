"""Roll-out and rollback: an engines folder with one active bundle, the CLI that moves it,
and a running node that follows it between studies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner

from fractured.cli import main
from fractured.daemon.active_model import ActiveModel
from fractured.daemon.connection import make_engine
from fractured.daemon.queue import Queue
from fractured.daemon.schema import ShadowFinding, utcnow
from fractured.daemon.shadow import compare
from fractured.engine.bundle import BundleError
from fractured.engine.pipeline import Pipeline
from fractured.engine.registry import ACTIVE_FILE, Registry, RegistryError, resolve_bundle
from fractured.training.build import build_untrained_bundle
from tests import factory
from tests.peers import NodeProcess, Storescp, storescu, wait_for


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained bundle of another version, to roll out."""
    return build_untrained_bundle(tmp_path_factory.mktemp("engines") / "b", version="0.0.2",
                                  input_size=96)


@pytest.fixture
def engines(tmp_path: Path, untrained_bundle: Path, second_bundle: Path) -> Path:
    root = tmp_path / "engines"
    root.mkdir()
    shutil.copytree(untrained_bundle, root / "a")
    shutil.copytree(second_bundle, root / "b")
    return root


def test_activate_and_rollback_follow_a_stack(engines: Path) -> None:
    registry = Registry(engines)
    assert registry.active() is None
    with pytest.raises(BundleError, match="no active bundle"):
        resolve_bundle(engines)
    registry.activate("a")
    registry.activate("b")
    assert registry.active() == "b" and resolve_bundle(engines).manifest.version == "0.0.2"
    registry.activate("a")
    registry.rollback()
    assert registry.active() == "b"
    registry.rollback()
    assert registry.active() == "a"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    assert [(e.name, e.active) for e in registry.entries()] == [("a", True), ("b", False)]


def test_a_broken_or_unknown_bundle_is_never_made_active(engines: Path) -> None:
    registry = Registry(engines)
    registry.activate("a")
    weights = next(p for p in (engines / "b").iterdir() if p.suffix == ".onnx")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match"):
        registry.activate("b")
    for name in ("c", "../a", ".hidden"):
        with pytest.raises(RegistryError, match=r"no bundle .* \(bundles: a, b\)"):
            registry.activate(name)
    assert registry.active() == "a" and registry.stack() == ["a"]
    broken = {e.name: e.error for e in registry.entries()}
    assert broken["a"] is None and broken["b"]


def test_active_model_switches_between_studies_and_survives_a_bad_roll_out(
        engines: Path) -> None:
    registry = Registry(engines)
    registry.activate("a")
    built: list[str] = []

    def build(bundle):
        built.append(bundle.manifest.version)
        return Pipeline(bundle, backend="onnxruntime")

    model = ActiveModel(engines, build)
    study_one = model.current()
    assert model.current() is study_one and built == ["0.0.0"]  # no reload without a change
    registry.activate("b")
    study_two = model.current()
    assert study_two.model.version == "0.0.2" and study_one.model.version == "0.0.0"
    (engines / ACTIVE_FILE).write_text("missing\n")  # a hand-edited pointer
    assert model.current() is study_two  # keeps serving the last good model
    assert model.current() is study_two and built == ["0.0.0", "0.0.2"]  # tried once


def test_engines_cli(engines: Path, untrained_bundle: Path) -> None:
    runner = CliRunner()
    activated = runner.invoke(main, ["engines", "activate", "b", "--engines", str(engines)])
    assert activated.exit_code == 0, activated.output
    assert "active: b (fractured-untrained 0.0.2 (UNTRAINED MODEL))" in activated.output
    listed = runner.invoke(main, ["engines", "list", "--engines", str(engines)])
    lines = listed.output.splitlines()
    assert lines[0].startswith("  a ") and "0.0.0" in lines[0] and "UNTRAINED" in lines[0]
    assert lines[1].startswith("* b ")
    unknown = runner.invoke(main, ["engines", "activate", "zz", "--engines", str(engines)])
    assert unknown.exit_code == 1 and "no bundle 'zz' (bundles: a, b)" in unknown.output
    nothing = runner.invoke(main, ["engines", "rollback", "--engines", str(engines)])
    assert nothing.exit_code == 1 and "nothing to roll back to" in nothing.output
    single = runner.invoke(main, ["engines", "list", "--engines", str(untrained_bundle)])
    assert single.exit_code == 2 and "is a single bundle, not an engines folder" in single.output


@pytest.mark.peers
@pytest.mark.slow
def test_a_running_node_rolls_out_and_back_without_a_restart(engines: Path,
                                                            tmp_path: Path) -> None:
    Registry(engines).activate("a")
    destination = Storescp(tmp_path / "received").start()
    node = NodeProcess(tmp_path / "node", engines, [{"name": "dest",
                                                     "ae_title": destination.ae_title,
                                                     "port": destination.port}]).start()
    runner = CliRunner()
    try:
        versions = []
        for step in ("start", "activate", "rollback"):
            if step == "activate":
                result = runner.invoke(main, ["engines", "activate", "b", "--engines",
                                              str(engines)])
                assert result.exit_code == 0, result.output
            if step == "rollback":
                result = runner.invoke(main, ["engines", "rollback", "--engines",
                                              str(engines)])
                assert result.exit_code == 0, result.output
            files = factory.write_study(tmp_path / step, 1)
            study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
            assert storescu(node.port, files).returncode == 0
            wait_for(f"study of step {step}", lambda study=study: any(
                e["study_instance_uid"] == study for e in node.events("study.processed")), 60)
            event = next(e for e in node.events("study.processed")
                         if e["study_instance_uid"] == study)
            versions.append(event["model"])
        assert versions == ["fractured-untrained 0.0.0 (UNTRAINED MODEL)",
                            "fractured-untrained 0.0.2 (UNTRAINED MODEL)",
                            "fractured-untrained 0.0.0 (UNTRAINED MODEL)"]
        switched = node.events("engine.switched")
        assert [(e["previous"], e["model"]) for e in switched] == [
            ("fractured-untrained 0.0.0 (UNTRAINED MODEL)",
             "fractured-untrained 0.0.2 (UNTRAINED MODEL)"),
            ("fractured-untrained 0.0.2 (UNTRAINED MODEL)",
             "fractured-untrained 0.0.0 (UNTRAINED MODEL)")]
        # The SR of the middle study names the version that made it.
        srs = [pydicom.dcmread(p) for p in destination.files()]
        named = [json.dumps(str(ds.ContentSequence)) for ds in srs
                 if ds.SOPClassUID.name == "Comprehensive 3D SR Storage"]
        assert sum("0.0.2" in text for text in named) == 1
    finally:
        node.stop()
        destination.stop()


def shadow_row(study: str, image: str, run: int, active: tuple[float, str],
               shadow: tuple[float, str]) -> ShadowFinding:
    return ShadowFinding(study_instance_uid=study, sop_instance_uid=image, run=run,
                         recorded_at=utcnow(), active_model="A 1", active_probability=active[0],
                         active_level=active[1], active_boxes=0, shadow_model="B 2",
                         shadow_probability=shadow[0], shadow_level=shadow[1], shadow_boxes=0)


def test_compare_counts_agreement_per_image_and_study_at_both_points(tmp_path: Path) -> None:
    queue = Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}"))
    queue.record_shadow([
        shadow_row("s1", "i0", 1, (0.9, "likely"), (0.1, "negative")),  # superseded run
        shadow_row("s1", "i1", 2, (0.9, "likely"), (0.6, "possible")),
        shadow_row("s1", "i2", 2, (0.1, "negative"), (0.1, "negative")),
        shadow_row("s2", "i3", 1, (0.2, "negative"), (0.5, "possible")),
    ])
    (result,) = compare(queue)
    assert (result.active_model, result.shadow_model) == ("A 1", "B 2")
    assert result.images == 3 and result.studies == 2  # s1's first run is left out
    assert result.image_agreement == {
        "high_sensitivity": {"agree": 2, "active_only": 0, "shadow_only": 1},
        "high_specificity": {"agree": 2, "active_only": 1, "shadow_only": 0}}
    assert result.study_agreement == {
        "high_sensitivity": {"agree": 1, "active_only": 0, "shadow_only": 1},
        "high_specificity": {"agree": 1, "active_only": 1, "shadow_only": 0}}
    assert result.mean_abs_difference == pytest.approx((0.3 + 0.0 + 0.3) / 3)
    assert result.max_abs_difference == pytest.approx(0.3)


def test_active_model_follows_the_shadow_pointer(engines: Path) -> None:
    registry = Registry(engines)
    registry.activate("a")
    model = ActiveModel(engines, lambda bundle: Pipeline(bundle, backend="onnxruntime"))
    assert model.shadow() is None
    registry.set_shadow("b")
    shadow = model.shadow()
    assert shadow is not None and shadow.model.version == "0.0.2"
    assert model.shadow() is shadow and model.current().model.version == "0.0.0"
    registry.set_shadow(None)
    assert model.shadow() is None


@pytest.mark.peers
@pytest.mark.slow
def test_a_shadow_model_runs_on_live_studies_and_sends_nothing(engines: Path,
                                                              tmp_path: Path) -> None:
    registry = Registry(engines)
    registry.activate("a")
    runner = CliRunner()
    shadowed = runner.invoke(main, ["engines", "shadow", "b", "--engines", str(engines)])
    assert shadowed.exit_code == 0, shadowed.output
    destination = Storescp(tmp_path / "received").start()
    node = NodeProcess(tmp_path / "node", engines, [{"name": "dest",
                                                     "ae_title": destination.ae_title,
                                                     "port": destination.port}]).start()
    try:
        files = factory.write_study(tmp_path / "study", 2)
        assert storescu(node.port, files).returncode == 0
        wait_for("the shadow run", lambda: node.events("shadow.processed"), 60)
        wait_for("delivery", lambda: len(destination.files()) == 3, 60)
        assert node.events("shadow.processed")[0]["images"] == 2
        assert node.status()["engine"] == {"location": str(engines), "active": "a",
                                           "shadow": "b"}
        for path in destination.files():  # only the active model's objects reach the PACS
            text = str(pydicom.dcmread(path))
            assert "0.0.0" in text and "0.0.2" not in text
        compared = runner.invoke(main, ["engines", "compare", "--config", str(node.config),
                                        "--json"])
        assert compared.exit_code == 0, compared.output
        (result,) = [json.loads(line) for line in compared.output.splitlines()]
        assert result["images"] == 2 and result["studies"] == 1
        assert result["shadow_model"] == "fractured-untrained 0.0.2 (UNTRAINED MODEL)"
    finally:
        node.stop()
        destination.stop()
