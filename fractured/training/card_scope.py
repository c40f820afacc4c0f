"""The model card's scope: where a bundle may be used, on whom, and where it fails.

A hospital's AI governance committee approves a model for some images and not others.
The card says which: the body regions and views its data had, with how many fractures
each region's figures rest on (a region with a handful cannot show that the model
works there, whatever its point estimate), the population the data came from, the
images it never saw (children, other projections) and the failure modes known from
its data. The counts come from the bundle's own held-out assessment
(`node_assessment`), so they are those of the figures beside them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fractured.engine.regions import BODY_PART_REGIONS, Region

#: Below this many fractures among the validation and test images, a region's figures
#: are called too few to show anything (the calibration's default for points of its own).
FEW_FRACTURES = 20

#: The anatomy a format's data lacks (the card says what the node does with it).
UNSEEN_ANATOMY: Mapping[str, str] = {
    "fracatlas": "skull, spine, chest, ribs and abdomen were not trained on",
}

#: What is known of a data set format's source population, from its publication.
SOURCE_POPULATIONS: Mapping[str, str] = {
    "fracatlas": (
        "FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023): 4,083 musculoskeletal "
        "radiographs from three hospitals in Bangladesh, labelled and boxed by two "
        "radiologists and an orthopaedist; 3,268 of them are the project's development "
        "part, exported as JPEG with the long side at most 1,024 px. The publication gives "
        "no ages, sexes, equipment or acquisition settings, and no patient identifiers."),
}

#: Failure modes known from a format's data, each a (title, what happens) pair.
FAILURE_MODES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "fracatlas": (
        ("Hands and wrists", "small bones, many joints and subtle fractures: the weakest "
         "region on every model the project has trained (see the region table)."),
        ("Orthopaedic hardware", "plates, screws and nails appear almost only on fractured "
         "images, so the model can score metal rather than a fracture; an operated "
         "limb's probability says little about a new fracture."),
        ("Casts and splints", "not labelled in the data; plaster changes the contrast "
         "over the bone and may hide or mimic a fracture line."),
        ("Growth plates", "the data's ages are unknown and the intended use is adults: an "
         "open physis can look like a fracture line to the model."),
        ("Acquisition the data lacks", "trained on 8-bit JPEG exports; the node reads "
         "12-16-bit DICOM with its own windowing, collimation and shutters. The DICOM "
         "check (where this card has one) measures how far that moves the probability."),
    ),
}


def scope(manifest: Mapping[str, Any]) -> list[str]:
    """The card's "Where it may be used", "Source population" and "Known failure modes"
    sections for a trained bundle."""
    training = manifest.get("training") or {}
    data = (training.get("classifier") or {}).get("data") or {}
    fmt = data.get("format")
    held_out = training.get("held_out") or {}
    node = held_out.get("node") or {}
    regions = (node.get("validation_and_test") or node.get("test") or {}).get("regions") or {}
    lines = ["## Where it may be used", "", *_declared(manifest.get("intended_use")),
             "- **Adults only.** Not validated on children: growth plates and paediatric "
             "fracture patterns were not measured.",
             "- **Radiographs (CR, DX) of the regions below**, in the views the training "
             "data had (frontal, lateral and oblique). The node takes the region from the "
             "image's Body Part Examined, else from the region check where the bundle has "
             "one; " + ("an image it cannot place gets no verdict." if _checked(manifest)
                        else "an image it cannot place is scored with the pooled "
                        "operating points, and its result is outside the intended use.")]
    lines += ["", "| Region | Body Part Examined terms | Fractures / normals behind the "
              "figures | What the figures can show |", "| --- | --- | --- | --- |"]
    intended = set((manifest.get("intended_use") or {}).get("body_parts") or ())
    for region in Region:
        region_terms = [t for t, r in BODY_PART_REGIONS.items() if r is region]
        terms = ", ".join(region_terms)
        row = regions.get(region.value)
        if intended and not intended & set(region_terms):
            counts = f"{row['fractures']} / {row['normals']}" if row else "none measured"
            lines.append(f"| {region.value} | {terms} | {counts} | not analysed: outside "
                         "the intended use |")
            continue
        if row is None:
            lines.append(f"| {region.value} | {terms} | none measured | nothing: no "
                         "held-out images of this region |")
            continue
        lines.append(f"| {region.value} | {terms} | {row['fractures']} / {row['normals']} "
                     f"| {_strength(row)} |")
    if regions:
        lines += ["", "Counts are the validation and test images of the held-out "
                  "assessment below. A region with fewer than "
                  f"{FEW_FRACTURES} fractures gets the pooled operating points, and its "
                  "sensitivity interval is too wide to say the model finds fractures "
                  "there: a flag is weak evidence and no flag is no evidence of no "
                  "fracture."]
    lines.append("")
    if fmt in SOURCE_POPULATIONS:
        lines += ["## Source population", "", SOURCE_POPULATIONS[fmt], ""]
    lines += ["## Known failure modes", ""]
    lines += [f"- **{title}**: {text}" for title, text in FAILURE_MODES.get(fmt, ())]
    if fmt in UNSEEN_ANATOMY:
        lines.append(f"- **Projections and anatomy not in the data**: {UNSEEN_ANATOMY[fmt]}; "
                     f"{_unseen_anatomy_outcome(manifest)}")
    if fmt not in FAILURE_MODES:
        lines.append(f"- None recorded for `{fmt}` data: measure the model on local images "
                     "(`fractured evaluate RUN --dataset LOCAL_DATA`) before relying on it.")
    return [*lines, ""]


def _checked(manifest: Mapping[str, Any]) -> bool:
    """Whether the bundle declares an intended use with a region check."""
    return bool((manifest.get("intended_use") or {}).get("region_check"))


def _unseen_anatomy_outcome(manifest: Mapping[str, Any]) -> str:
    """What the node does with an image of anatomy its data lacked: what the bundle's
    intended use (and region check, if any) makes of it."""
    if not manifest.get("intended_use"):
        return ("this bundle declares no intended use, so the node still scores them, "
                "with the pooled points, and the number means nothing there.")
    if not _checked(manifest):
        return ("an image whose Body Part Examined names one gets no verdict, but one "
                "without a usable body part is scored, with the pooled points, and the "
                "number means nothing there.")
    return ("an image whose Body Part Examined names one gets no verdict, and one without "
            "a usable body part gets none where the region check finds it unlike the "
            "training images or nearest a region outside the intended use; one the check "
            "mistakes for an intended region is scored, and that number means nothing.")


def _declared(use: Mapping[str, Any] | None) -> list[str]:
    """What the node enforces (the manifest's intended_use), or that it enforces nothing."""
    if not use:
        return ["- **This bundle declares no intended use**: the node analyses every image "
                "it is sent, whatever its body part or the patient's age."]
    check = use.get("region_check")
    silent = ("an image without a usable body part is decided from its pixels by the "
              "region check below; one without an age is analysed." if check else
              "an image without a usable body part or age is analysed.")
    lines = [f"- **The node analyses only** images whose Body Part Examined is one of "
             f"{', '.join(use['body_parts'])}, of patients at least {use['min_age_years']} "
             "years old (Patient's Age, or the birth date against the study date). Other "
             f"known body parts and younger patients get no verdict, with the reason "
             f"logged and counted; {silent} An operator can widen the list "
             "([engine].extra_body_parts), logged at every start."]
    return lines + (_region_check(check) if check else [])


def _region_check(check: Mapping[str, Any]) -> list[str]:
    """The region check's sentence: what it measures and how it did on validation."""
    val = check["validation"]
    accuracy = val.get("region_accuracy")
    per_class = ", ".join(f"{group} {entry['correct']}/{entry['images']}"
                          for group, entry in (val.get("per_class") or {}).items())
    said = (f"its region was the labelled one on {accuracy:.1%} of {val['region_images']} "
            f"images ({per_class})" if accuracy is not None
            else "no validation image had a region label")
    if "accepted_by_fold" in val:  # chosen by cross-validation (training.region_check)
        folds = val["accepted_by_fold"]
        within = (f"a distance that {val['accepted']:.1%} of the {val['images']} train and "
                  f"val images are within, each measured by a fit without its fold, "
                  f"{len(folds)} folds from {min(folds):.1%} to {max(folds):.1%}: the "
                  f"threshold is where the exact 95 % interval of that share stays at or "
                  f"above {val['accepted_floor']:.0%}")
        where = "Out of fold"
    else:
        within = f"which {val['accepted']:.1%} of the {val['images']} validation images are within"
        where = "On validation"
    return [f"- **Region check** (where the header cannot say what an image shows: no, "
            f"a generic or a made-up Body Part Examined, or a PNG/JPEG): the image's "
            f"distance to each body-region class of the training images "
            f"({', '.join(check['classes'])}), "
            f"on the pooled features of {check['backbone']}. Farther than "
            f"{check['threshold']:.0f} from every class ({within}), it is unlike the "
            f"training images (a chest film, an abdomen) and gets no verdict; nearest a "
            f"region outside the intended use (or \"other\", several regions in one "
            f"image), no verdict either; else it is analysed with that region's operating "
            f"points. {where} {said}.{_accepted_by_class(val)}"]


def _accepted_by_class(val: Mapping[str, Any]) -> str:
    """" Accepted, by labelled region: ..." where the check recorded it (since
    2026-12-07): the intended regions' shares are what the node's users meet, as the
    others get no verdict either way."""
    shares = [f"{group} {entry['accepted']}/{entry['images']}"
              for group, entry in (val.get("per_class") or {}).items() if "accepted" in entry]
    return f" Accepted, by labelled region: {', '.join(shares)}." if shares else ""


def _strength(row: Mapping[str, Any]) -> str:
    """What a region's numbers can support, from its fracture count and sensitivity."""
    sensitivity = row["high_sensitivity"]["sensitivity"]
    if row["fractures"] < FEW_FRACTURES:
        interval = sensitivity.get("interval")
        spans = (f"; sensitivity could be anywhere in {interval[0]:.2f}-{interval[1]:.2f}"
                 if interval else "")
        return f"little: too few fractures{spans}"
    low, high = sensitivity["interval"]
    return f"sensitivity {sensitivity['rate']:.2f} ({low:.2f}-{high:.2f}) at *possible*"
