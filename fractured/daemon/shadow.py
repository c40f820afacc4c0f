"""Shadow mode: a candidate model runs on live studies beside the active one, unseen.

Before a roll-out, ML staff want to know how a new model behaves on their own
traffic, not only on a test set. With a shadow bundle set (`fractured engines shadow
NAME`), the worker runs it on each study after the real results are queued for the
PACS, and stores one row per image with both models' probabilities and decisions.
Nothing the shadow makes is written as DICOM or sent anywhere; a shadow failure is
logged and changes nothing for the study. `fractured engines compare` reports how
often the two agree, per image and per study, at both operating points.

Rows hold UIDs and numbers only (no patient data), like the rest of the database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fractured.daemon.queue import Queue
from fractured.daemon.schema import ShadowFinding, utcnow
from fractured.engine.findings import DecisionLevel, Finding

#: The two operating points a decision is compared at, and which levels pass each.
POINTS: dict[str, frozenset[str]] = {
    "high_sensitivity": frozenset({DecisionLevel.POSSIBLE.value, DecisionLevel.LIKELY.value}),
    "high_specificity": frozenset({DecisionLevel.LIKELY.value}),
}


def record(queue: Queue, run: int, active: Sequence[Finding],
           shadow: Sequence[Finding]) -> int:
    """Store both models' findings on one study's images (same order); rows written."""
    now = utcnow()
    rows = [ShadowFinding(
        study_instance_uid=a.image.study_instance_uid, sop_instance_uid=a.image.sop_instance_uid,
        run=run, recorded_at=now,
        active_model=a.model.label, active_probability=float(a.probability),
        active_level=a.level.value, active_boxes=len(a.boxes),
        shadow_model=s.model.label, shadow_probability=float(s.probability),
        shadow_level=s.level.value, shadow_boxes=len(s.boxes))
        for a, s in zip(active, shadow, strict=True)]
    queue.record_shadow(rows)
    return len(rows)


@dataclass(frozen=True)
class Agreement:
    """How one shadow model compared with one active model."""

    active_model: str
    shadow_model: str
    images: int
    studies: int
    #: per point: images (or studies) decided alike, and the two kinds of disagreement
    image_agreement: dict[str, dict[str, int]]
    study_agreement: dict[str, dict[str, int]]
    mean_abs_difference: float  # in calibrated probability
    max_abs_difference: float


def compare(queue: Queue) -> list[Agreement]:
    """Agreement per (active, shadow) pair, on each study's latest shadowed run."""
    rows = queue.shadow_findings()
    latest: dict[tuple[str, str, str], int] = {}
    for row in rows:
        key = (row.active_model, row.shadow_model, row.study_instance_uid)
        latest[key] = max(latest.get(key, row.run), row.run)
    pairs: dict[tuple[str, str], list[ShadowFinding]] = {}
    for row in rows:
        if latest[(row.active_model, row.shadow_model, row.study_instance_uid)] == row.run:
            pairs.setdefault((row.active_model, row.shadow_model), []).append(row)
    return [_agreement(active, shadow, found) for (active, shadow), found in pairs.items()]


def _agreement(active: str, shadow: str, rows: list[ShadowFinding]) -> Agreement:
    studies: dict[str, list[ShadowFinding]] = {}
    for row in rows:
        studies.setdefault(row.study_instance_uid, []).append(row)
    image_agreement, study_agreement = {}, {}
    for point, passing in POINTS.items():
        image_agreement[point] = _tally(
            [(row.active_level in passing, row.shadow_level in passing) for row in rows])
        # A study is positive at a point when any of its images is.
        study_agreement[point] = _tally(
            [(any(r.active_level in passing for r in group),
              any(r.shadow_level in passing for r in group)) for group in studies.values()])
    differences = [abs(row.active_probability - row.shadow_probability) for row in rows]
    return Agreement(active, shadow, len(rows), len(studies), image_agreement,
                     study_agreement, sum(differences) / len(differences), max(differences))


def _tally(calls: list[tuple[bool, bool]]) -> dict[str, int]:
    return {"agree": sum(a == s for a, s in calls),
            "active_only": sum(a and not s for a, s in calls),
            "shadow_only": sum(s and not a for a, s in calls)}
