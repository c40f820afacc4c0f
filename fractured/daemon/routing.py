"""Which images of a study are analysed: the [[routing.rules]] of the config, tried in
order for each image, the first rule that covers an image deciding; without rules, the
images whose Modality is in [study].modalities.

Decided when the study is processed, from what the queue holds (modality, SOP class,
calling AE) and, when a rule asks for them, the image's Body Part Examined and View
Position (its header only: pixels are decoded only for images that are analysed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from fractured.config import RoutingRule, Settings
from fractured.daemon.queue import ClaimedInstance
from fractured.dicom_files import read_header

#: The rule name a decision carries when no [[routing.rules]] are configured.
MODALITIES_RULE = "[study].modalities"


@dataclass(frozen=True)
class Decision:
    analyse: bool
    rule: str | None  # the deciding rule's name; None when no rule covered the image

    @property
    def outcome(self) -> str:
        """For logs and a skipped study's reason: what happened to the image and why."""
        if self.rule is None:
            return "matched no routing rule"
        if self.rule == MODALITIES_RULE:
            return "analysed" if self.analyse else "not of an analysed modality"
        return f"{'analysed' if self.analyse else 'skipped'} by rule {self.rule!r}"


class Router:
    def __init__(self, settings: Settings) -> None:
        modalities = list(settings.study.modalities)
        self.rules: list[RoutingRule] = settings.routing.rules or [
            RoutingRule(name=MODALITIES_RULE, action="analyse", modality=modalities)]
        self.default_skip = not settings.routing.rules  # the modalities rule skips the rest
        self.reads_header = any(r.body_part or r.view for r in self.rules)

    def decide(self, instance: ClaimedInstance) -> Decision:
        header = _header(instance) if self.reads_header else {}
        for rule in self.rules:
            if _covers(rule, instance, header):
                return Decision(rule.action == "analyse", rule.name)
        if self.default_skip:
            return Decision(False, MODALITIES_RULE)
        return Decision(False, None)


def skipped_reason(outcomes: Iterable[str]) -> str:
    """A study's reason when none of its images was analysed, e.g. 'no image to analyse:
    2 skipped by rule 'chest', 1 undecodable'."""
    counts = Counter(outcomes)
    return "no image to analyse: " + ", ".join(f"{n} {what}" for what, n in counts.items())


def _header(instance: ClaimedInstance) -> dict[str, str]:
    """Body part and view of an image, '' where absent or unreadable."""
    try:
        ds = read_header(instance.path)  # a deflated file inflated no further
        return {"body_part": str(ds.get("BodyPartExamined", "")).strip(),
                "view": str(ds.get("ViewPosition", "")).strip()}
    except Exception:  # an unreadable file is reported when (if) it is analysed
        return {"body_part": "", "view": ""}


def _covers(rule: RoutingRule, instance: ClaimedInstance, header: dict[str, str]) -> bool:
    def among(values: list[str], value: str, fold: bool = False) -> bool:
        if not values:
            return True
        if fold:
            return value.upper() in {v.upper() for v in values}
        return value in values

    return (among(rule.modality, instance.modality)
            and among(rule.sop_class, instance.sop_class_uid)
            and among(rule.calling_ae, instance.calling_ae.strip())
            and among(rule.body_part, header.get("body_part", ""), fold=True)
            and among(rule.view, header.get("view", ""), fold=True))
