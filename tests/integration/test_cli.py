"""The `fractured` command line: errors name the problem, builds say they are untrained."""

from __future__ import annotations

import json
import re
import shutil
import typing
from pathlib import Path

from click.testing import CliRunner

from fractured.cli import main
from fractured.engine.bundle import Bundle
from tests.peers import free_port


def config_with_bundle(tmp_path: Path, bundle: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[node]\nport = 11199\nspool_dir = "spool"\n'
                    f'[database]\nurl = "sqlite:///q.db"\n[engine]\nbundle = "{bundle}"\n'
                    '[access]\nallow_any = true\n')
    return path


def test_build_engine_untrained_writes_a_bundle_marked_untrained(tmp_path: Path) -> None:
    out = tmp_path / "engines" / "x"
    result = CliRunner().invoke(main, ["build-engine", "--untrained", "--out", str(out),
                                       "--input-size", "96", "--version", "0.0.1"])
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" in result.output
    bundle = Bundle.load(out)
    assert bundle.manifest.trained is False
    assert bundle.manifest.classifier.input_size == 96 and bundle.manifest.detector is None
    assert "UNTRAINED MODEL" in (out / "MODEL_CARD.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["version"] == "0.0.1"

    again = CliRunner().invoke(main, ["build-engine", "--untrained", "--out", str(out)])
    assert again.exit_code == 1 and str(out) in again.output  # a bundle is immutable


def test_build_engine_needs_checkpoints_or_untrained_not_both(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["build-engine", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "either CHECKPOINTS (trained models) or --untrained" \
        in result.output
    both = CliRunner().invoke(main, ["build-engine", str(tmp_path), "--untrained", "--out",
                                     str(tmp_path / "x")])
    assert both.exit_code == 2 and "either CHECKPOINTS" in both.output
    empty = CliRunner().invoke(main, ["build-engine", str(tmp_path), "--out",
                                      str(tmp_path / "x")])
    assert empty.exit_code == 1 and "no classifier/best.pt" in empty.output


def test_serve_refuses_a_missing_bundle_naming_it(tmp_path: Path) -> None:
    config = config_with_bundle(tmp_path, tmp_path / "no-such-bundle")
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 1
    assert "cannot load engine bundle" in result.output
    assert "no-such-bundle" in result.output


def test_serve_refuses_a_tampered_bundle(tmp_path: Path, untrained_bundle: Path) -> None:
    bundle = Path(shutil.copytree(untrained_bundle, tmp_path / "bundle"))
    with open(bundle / "classifier.onnx", "ab") as fh:
        fh.write(b"\0")
    result = CliRunner().invoke(main, ["serve", "--config",
                                       str(config_with_bundle(tmp_path, bundle))])
    assert result.exit_code == 1
    assert "classifier.onnx" in result.output and "sha256" in result.output


def test_status_on_an_empty_node(tmp_path: Path, untrained_bundle: Path) -> None:
    config = config_with_bundle(tmp_path, untrained_bundle)
    result = CliRunner().invoke(main, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["engine"]["active"] == Path(report["engine"]["location"]).name
    week = report.pop("last_7_days")
    assert {k: v for k, v in report.items() if k != "engine"} == {
        "studies": {}, "deliveries": {}, "study_list": [], "dead_letters": []}
    assert (week["regions"], week["not_analysed"], week["expected"]) == ({}, {}, None)


def test_cli_lists_the_backbones_the_models_have() -> None:
    from fractured.cli import options as cli
    from fractured.engine.models import CLASSIFIER_VARIANTS, DETECTOR_BACKBONES
    from fractured.training.config import ClassifierSettings

    assert cli.DETECTOR_BACKBONES == DETECTOR_BACKBONES
    assert cli.CLASSIFIER_VARIANTS == CLASSIFIER_VARIANTS
    hints = typing.get_type_hints(ClassifierSettings)
    assert typing.get_args(hints["variant"]) == CLASSIFIER_VARIANTS


def test_build_engine_untrained_resnet_variant_exports_with_parity(tmp_path: Path) -> None:
    out = tmp_path / "resnet"
    result = CliRunner().invoke(main, ["build-engine", "--untrained", "--out", str(out),
                                       "--variant", "resnet18", "--input-size", "96"])
    assert result.exit_code == 0, result.output
    spec = Bundle.load(out).manifest.classifier
    assert (spec.variant, spec.architecture) == ("resnet18", "resnet18+attention")


def test_serve_refuses_an_unreachable_database_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[node]\nport = 11199\nspool_dir = "spool"\n[database]\n'
                      f'url = "postgresql://node:secret@127.0.0.1:{free_port()}/q"\n'
                      '[access]\nallow_any = true\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 1, result.output
    assert "cannot open the database ([database].url)" in result.output
    assert "Connection refused" in result.output and "secret" not in result.output


def test_help_lists_the_commands_by_audience() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    operators, staff = result.output.split("Run the node (operators):")[1].split(
        "Train and build models (ML staff):")
    names = {section: re.findall(r"^  ([a-z-]+) ", text, re.M)
             for section, text in (("operators", operators), ("staff", staff))}
    assert names["operators"] == ["serve", "status", "retry", "purge", "engines"]
    assert set(names["staff"]) == {"data", "train", "evaluate", "cv", "ensemble",
                                   "build-engine", "check-dicom", "fuse", "quantize",
                                   "region-check", "predict"}
    assert set(main.commands) == set(names["operators"]) | set(names["staff"])
