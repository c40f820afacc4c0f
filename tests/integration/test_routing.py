"""Routing rules: which images of a study are analysed, and the outcome when none is."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from fractured import config
from fractured.daemon.queue import ClaimedInstance
from fractured.daemon.routing import Router, skipped_reason
from tests import factory
from tests.peers import NodeProcess

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"

RULES = """
[[routing.rules]]
name = "no-chest"
action = "skip"
body_part = ["chest"]

[[routing.rules]]
name = "er-lateral"
action = "skip"
calling_ae = ["ER_DR"]
view = ["LL", "RL"]

[[routing.rules]]
name = "radiographs"
action = "analyse"
modality = ["CR", "DX"]
sop_class = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"]
"""


def router(text: str) -> Router:
    return Router(config.from_dict(tomllib.loads(text), base=Path(".")))


def image(folder: Path, *, body_part: str = "LEG", view: str = "AP", modality: str = "DX",
          calling_ae: str = "PACS") -> ClaimedInstance:
    ds = factory.xray(generate_uid(), modality=modality)
    ds.BodyPartExamined, ds.ViewPosition = body_part, view
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ClaimedInstance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), modality, calling_ae,
                           path)


def test_first_covering_rule_decides(tmp_path: Path) -> None:
    rules = router(RULES)
    leg = rules.decide(image(tmp_path))
    assert (leg.analyse, leg.rule, leg.outcome) == (True, "radiographs",
                                                    "analysed by rule 'radiographs'")
    chest = rules.decide(image(tmp_path, body_part="CHEST"))  # case does not matter
    assert (chest.analyse, chest.outcome) == (False, "skipped by rule 'no-chest'")
    lateral = rules.decide(image(tmp_path, view="LL", calling_ae="ER_DR"))
    assert (lateral.analyse, lateral.rule) == (False, "er-lateral")
    # the same view from another sender is not covered by "er-lateral"
    assert rules.decide(image(tmp_path, view="LL")).rule == "radiographs"
    ct_like = rules.decide(image(tmp_path, modality="MG"))
    assert (ct_like.analyse, ct_like.rule, ct_like.outcome) == (
        False, None, "matched no routing rule")


def test_without_rules_the_analysed_modalities_decide(tmp_path: Path) -> None:
    rules = router('[study]\nmodalities = ["CR"]')
    assert rules.decide(image(tmp_path, modality="CR")).analyse
    dx = rules.decide(image(tmp_path, modality="DX"))
    assert (dx.analyse, dx.outcome) == (False, "not of an analysed modality")
    assert not rules.reads_header  # no header is read for modality-only decisions


def test_skipped_reason_counts_each_outcome() -> None:
    assert skipped_reason(["skipped by rule 'x'", "undecodable", "skipped by rule 'x'"]) == (
        "no image to analyse: 2 skipped by rule 'x', 1 undecodable")


@pytest.mark.parametrize(("text", "message"), [
    ('[[routing.rules]]\nname = "a"\naction = "ignore"',
     r"\[routing\].rules\[0\].action: expected one of 'analyse', 'skip'"),
    ('[[routing.rules]]\nname = "a"\naction = "skip"\n[[routing.rules]]\nname = "a"\n'
     'action = "analyse"', r"\[\[routing.rules\]\]\[1\].name: a rule needs a name of its own"),
    ('[[routing.rules]]\naction = "skip"', r"\[routing\].rules\[0\].name: required key"),
])
def test_rule_mistakes_name_the_key(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(tomllib.loads(text), base=Path("."))


@pytest.mark.peers
def test_node_analyses_what_the_rules_select_and_skips_the_rest(
        tmp_path: Path, untrained_bundle: Path) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], sections=RULES).start()
    try:
        leg, chest = factory.dx_study(2)
        chest.BodyPartExamined = "CHEST"
        only_chest = factory.xray(generate_uid())
        only_chest.BodyPartExamined = "CHEST"
        rows = node.store_and_settle(tmp_path, [("leg", leg), ("chest", chest),
                                                ("only-chest", only_chest)], studies=2)
        mixed, skipped = rows[str(leg.StudyInstanceUID)], rows[str(only_chest.StudyInstanceUID)]
        assert mixed["state"] == "done"
        assert skipped["state"] == "skipped"
        assert skipped["reason"] == "no image to analyse: 1 skipped by rule 'no-chest'"
        routed = {e["sop_instance_uid"]: e["outcome"] for e in node.events("image.skipped")}
        assert routed == {str(chest.SOPInstanceUID): "skipped by rule 'no-chest'",
                          str(only_chest.SOPInstanceUID): "skipped by rule 'no-chest'"}
        results = sorted((node.folder / "spool").rglob("*.dcm"))
        overlays = [p for p in results if pydicom.dcmread(p, stop_before_pixels=True)
                    .get("SeriesDescription", "").startswith("AI fracture overlay")]
        assert len(overlays) == 1  # the leg only
    finally:
        node.stop()
