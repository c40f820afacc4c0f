"""`fractured predict`: the engine on image files, without a PACS or a database.

ML staff check a bundle on exported files and scripts feed it folders, so the output is
either a table for people or one JSON object per input for programs, always in input
order, and a file that cannot be read is reported in its place rather than stopping
the rest. The Findings are the pipeline's own, so what this prints is what the node
would conclude about the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2

from fractured.engine.findings import DecisionLevel, Finding
from fractured.engine.intended_use import ScopeCheck
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import LoadedImage, load_image
from fractured.results.overlay import probability_text, render_overlay

TABLE_COLUMNS = ("probability", "level", "high-sens", "high-spec", "boxes", "best box")
_COLUMN_WIDTHS = (16, 9, 10, 10, 6, 8)


@dataclass(frozen=True)
class Prediction:
    """A readable input file: its display image and the engine's finding on it."""

    path: Path
    image: LoadedImage
    finding: Finding


@dataclass(frozen=True)
class Unreadable:
    """An input file that could not be read, with why (the message names the file)."""

    path: Path
    error: str


@dataclass(frozen=True)
class NotAnalysed:
    """A readable input outside the bundle's intended use: no verdict, only why."""

    path: Path
    scope: ScopeCheck


Outcome = Prediction | NotAnalysed | Unreadable


def predict(paths: Sequence[Path], pipeline: Pipeline) -> Iterator[Outcome]:
    """An Outcome per path, in input order, the readable files run through `pipeline`
    `pipeline.max_batch` at a time.

    Only one batch of decoded images is held at once (a radiograph is tens of MB as
    float pixels), so memory does not grow with the number of files. A file that cannot
    be read yields an Unreadable with the reason (naming the file) and stops nothing.
    """
    pending: list[LoadedImage | Unreadable] = []
    for path in paths:
        try:
            pending.append(load_image(path))
        except DecodeError as exc:
            pending.append(Unreadable(path, str(exc)))
        if sum(isinstance(item, LoadedImage) for item in pending) == pipeline.max_batch:
            yield from _run(pending, pipeline)
            pending = []
    yield from _run(pending, pipeline)


def _run(pending: list[LoadedImage | Unreadable], pipeline: Pipeline) -> Iterator[Outcome]:
    """`pending` in order, the readable images inside the intended use with their
    findings from one run, the others with why they were not analysed."""
    scopes = {id(item): pipeline.scope(item.dataset) for item in pending
              if isinstance(item, LoadedImage)}
    images = [item for item in pending
              if isinstance(item, LoadedImage) and scopes[id(item)].analyse]
    findings = iter(pipeline.run([(image.ref, image.pixels) for image in images],
                                 [image.dataset for image in images]))
    for item in pending:
        if isinstance(item, Unreadable):
            yield item
        elif not scopes[id(item)].analyse:
            yield NotAnalysed(item.path, scopes[id(item)])
        elif (finding := next(findings)).scope is not None and not finding.scope.analyse:
            yield NotAnalysed(item.path, finding.scope)  # the region check decided
        else:
            yield Prediction(item.path, item, finding)


def to_json(outcome: Outcome) -> dict[str, object]:
    """The JSON object of one input: the finding in plain numbers, or the error."""
    if isinstance(outcome, Unreadable):
        return {"file": str(outcome.path), "error": outcome.error}
    if isinstance(outcome, NotAnalysed):
        return {"file": str(outcome.path),
                "not_analysed": {"reason": str(outcome.scope.reason),
                                 "detail": outcome.scope.detail}}
    finding = outcome.finding
    model = finding.model
    return {
        "file": str(outcome.path),
        "probability": float(finding.probability),
        "spread": None if finding.spread is None else float(finding.spread),
        "level": finding.level.value,
        "decisions": {
            "high_sensitivity": finding.level is not DecisionLevel.NEGATIVE,
            "high_specificity": finding.level is DecisionLevel.LIKELY,
        },
        # the thresholds that decided, and whose they are: the image's body region, or
        # "pooled"; null where the bundle has only the pooled pair
        "operating_points": {
            "high_sensitivity": float(finding.operating_points.high_sensitivity),
            "high_specificity": float(finding.operating_points.high_specificity),
            "region": None if finding.operating_region is None
            else str(finding.operating_region)},
        # how the image was found inside the intended use (from its header, or from
        # the image by the region check); null from a bundle that declares none
        "scope": None if finding.scope is None else {"reason": str(finding.scope.reason),
                                                     "detail": finding.scope.detail},
        "boxes": [
            {"x0": float(box.x0), "y0": float(box.y0), "x1": float(box.x1),
             "y1": float(box.y1), "score": float(box.score), "level": box.level.value}
            for box in finding.boxes
        ],
        "model": {"name": model.name, "version": model.version, "trained": model.trained},
    }


def table_header(file_width: int) -> str:
    """The column titles of `table_row`'s rows."""
    cells = [title.ljust(width) for title, width in zip(TABLE_COLUMNS, _COLUMN_WIDTHS,
                                                        strict=True)]
    return f"{'file'.ljust(file_width)}  {' '.join(cells)}".rstrip()


def table_row(outcome: Outcome, file_width: int) -> str:
    """One line for one input: its finding's numbers, or the error.

    The probability has the decimals that keep it from looking equal to an operating
    point it is below, as on the overlay's banner.
    """
    file = str(outcome.path).ljust(file_width)
    if isinstance(outcome, Unreadable):
        return f"{file}  error: {outcome.error}"
    if isinstance(outcome, NotAnalysed):
        return f"{file}  not analysed: {outcome.scope.detail}"
    finding = outcome.finding
    shown, _ = probability_text(finding)
    best = max((box.score for box in finding.boxes), default=None)
    cells = (
        shown,
        finding.level.value,
        _yes_no(finding.level is not DecisionLevel.NEGATIVE),
        _yes_no(finding.level is DecisionLevel.LIKELY),
        str(len(finding.boxes)),
        "-" if best is None else f"{best:.2f}",
    )
    text = " ".join(cell.ljust(width) for cell, width in zip(cells, _COLUMN_WIDTHS,
                                                             strict=True))
    return f"{file}  {text}".rstrip()


def _yes_no(decision: bool) -> str:
    return "yes" if decision else "no"


def overlay_paths(paths: Sequence[Path], folder: Path) -> dict[Path, Path]:
    """`folder/<stem>.png` for each input.

    ValueError names the inputs when two would write the same file, or when an overlay
    would replace an input (`x.png --overlay .`): either would silently lose an image.
    """
    inputs = {path.resolve(): path for path in paths}
    chosen: dict[Path, Path] = {}
    owners: dict[Path, Path] = {}
    for path in paths:
        target = folder / f"{path.stem}.png"
        if target.resolve() in inputs:
            raise ValueError(f"{target} would overwrite the input "
                             f"{inputs[target.resolve()]}")
        if target in owners:
            raise ValueError(f"{owners[target]} and {path} would both write {target}")
        owners[target] = path
        chosen[path] = target
    return chosen


def write_overlay(prediction: Prediction, target: Path, max_size: int = 1024) -> None:
    """Write `render_overlay`'s picture of a prediction to `target` (PNG)."""
    rgb = render_overlay(prediction.finding, prediction.image.pixels, max_size=max_size)
    if not cv2.imwrite(str(target), rgb[..., ::-1]):  # OpenCV writes BGR
        raise OSError(f"{target}: could not write the overlay")
