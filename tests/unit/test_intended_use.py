"""The model speaks only where it was validated: a bundle's intended use (body parts,
adults), derived at build from its training data and checked against each image's
header before any verdict (tests/integration/test_intended_use.py: the bundle, predict
and the node)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fractured.daemon.metrics import NodeMetrics
from fractured.engine.findings import DecisionLevel
from fractured.engine.intended_use import IntendedUse, ScopeReason, age_in_years
from fractured.engine.regions import Region
from fractured.training.datasets.base import Sample
from fractured.training.intended_use import (
    MIN_TRAINING_FRACTURES,
    body_part_counts,
    intended_use,
)
from tests import factory

LIMBS = IntendedUse.for_regions([Region.HAND, Region.LEG])


def header(body_part: str | None = "LEG", **attributes: str) -> Dataset:
    """A DX header whose body part is `body_part` alone (the factory's Anatomic Region
    Sequence, which would also say "leg", removed)."""
    ds = factory.xray(generate_uid())
    del ds.AnatomicRegionSequence
    if body_part is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = body_part
    for keyword, given in attributes.items():
        setattr(ds, keyword, given)
    return ds


@pytest.mark.parametrize(("body_part", "analyse", "reason"), [
    ("LEG", True, ScopeReason.IN_SCOPE),
    ("wrist", True, ScopeReason.IN_SCOPE),  # case is folded
    ("CHEST", False, ScopeReason.BODY_PART_OUTSIDE),
    ("ELBOW", False, ScopeReason.BODY_PART_OUTSIDE),  # a known part of no region
    ("SHOULDER", False, ScopeReason.BODY_PART_OUTSIDE),  # a region not intended
    ("EXTREMITY", True, ScopeReason.UNKNOWN_BODY_PART),  # too general to decide
    ("BEIN LINKS", True, ScopeReason.UNKNOWN_BODY_PART),  # free text
    ("", True, ScopeReason.UNKNOWN_BODY_PART),
    (None, True, ScopeReason.UNKNOWN_BODY_PART),
])
def test_the_body_part_decides_where_the_header_can(body_part: str | None, analyse: bool,
                                                    reason: ScopeReason) -> None:
    check = LIMBS.check(header(body_part))
    assert (check.analyse, check.reason) == (analyse, reason)
    if reason is ScopeReason.BODY_PART_OUTSIDE:
        assert check.detail == f"body part {body_part} is outside the intended use"


def test_a_child_is_not_analysed_and_the_age_is_not_said() -> None:
    for attributes in ({"PatientAge": "012Y"}, {"PatientAge": "006M"},
                       {"PatientAge": "", "PatientBirthDate": "20150301",
                        "StudyDate": "20261124"}):
        check = LIMBS.check(header(**attributes))
        assert (check.analyse, check.reason) == (False, ScopeReason.UNDER_AGE)
        assert check.detail == "patient younger than 18 years"  # never the age itself
    assert LIMBS.check(header(PatientAge="018Y")).analyse
    assert age_in_years(header(PatientAge="010W")) == pytest.approx(70 / 365.25)
    # unreadable or missing ages decide nothing: the body part does
    for attributes in ({"PatientAge": "12 years", "PatientBirthDate": ""},
                       {"PatientBirthDate": "2015-03-01"},
                       {"PatientBirthDate": "20300101"}):  # born after the study
        assert age_in_years(header(**attributes)) is None


def test_an_operator_widens_the_use_explicitly() -> None:
    wider = LIMBS.widened(["elbow", "fore arm", "LEG"])
    assert wider.body_parts[-2:] == ("ELBOW", "FOREARM")
    assert wider.check(header("ELBOW")).analyse
    assert wider.body_parts.count("LEG") == 1


def test_build_takes_the_regions_with_enough_training_fractures() -> None:
    samples = ([Sample(Path(f"h{i}.png"), int(i < 30), body_part="hand") for i in range(80)]
               + [Sample(Path(f"s{i}.png"), int(i < 6), body_part="shoulder")
                  for i in range(50)]
               + [Sample(Path(f"m{i}.png"), 1, body_part="mixed") for i in range(40)])
    counts = body_part_counts(samples)
    assert counts["hand"] == {"images": 80, "fractures": 30}
    use = intended_use({"body_parts": counts})
    assert use == IntendedUse.for_regions([Region.HAND])  # 6 shoulder fractures < 20
    assert "WRIST" in use.body_parts and "SHOULDER" not in use.body_parts
    few = {"hand": {"images": 40, "fractures": MIN_TRAINING_FRACTURES - 1}}
    assert intended_use({"body_parts": few}) is None
    # a checkpoint without the record, whose data cannot be read again: none, logged
    assert intended_use({"dataset": "/nowhere", "split": "/nowhere"}) is None


def test_the_scope_metric_starts_every_reason_at_zero() -> None:
    metrics = NodeMetrics()
    metrics.scope_checked(ScopeReason.BODY_PART_OUTSIDE)
    value = metrics.registry.get_sample_value
    assert value("fractured_images_scope_checked_total", {"reason": "body_part_outside"}) == 1
    assert value("fractured_images_scope_checked_total", {"reason": "under_age"}) == 0


def test_findings_are_counted_per_region_and_level_for_drift() -> None:
    metrics = NodeMetrics()
    metrics.finding(Region.HAND, DecisionLevel.POSSIBLE, 0.42)
    metrics.finding(None, DecisionLevel.NEGATIVE, 0.03)
    value = metrics.registry.get_sample_value
    assert value("fractured_findings_total", {"region": "hand", "level": "possible"}) == 1
    assert value("fractured_findings_total", {"region": "other", "level": "negative"}) == 1
    assert value("fractured_findings_total", {"region": "leg", "level": "likely"}) == 0
    assert value("fractured_finding_probability_bucket", {"region": "hand", "le": "0.5"}) == 1
    assert value("fractured_finding_probability_bucket", {"region": "hand", "le": "0.4"}) == 0


def test_an_anatomic_region_code_decides_where_body_part_examined_is_empty() -> None:
    from pydicom.dataset import Dataset as Item

    def coded(value: str, scheme: str = "SCT") -> Dataset:
        ds = header("")
        item = Item()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, "x"
        ds.AnatomicRegionSequence = [item]
        return ds

    assert LIMBS.check(coded("85562004")).reason is ScopeReason.IN_SCOPE  # hand
    chest = LIMBS.check(coded("816094009"))  # chest
    assert (chest.analyse, chest.detail) == (False, "body part CHEST is outside the "
                                                    "intended use")
    assert LIMBS.check(coded("T-D8700", "SRT")).reason is ScopeReason.UNKNOWN_BODY_PART
    assert LIMBS.check(coded("12345")).reason is ScopeReason.UNKNOWN_BODY_PART
