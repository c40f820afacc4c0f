"""The report's figures, drawn from the metric dicts this package produces.

Figures are built with matplotlib's object API (`Figure`, saved through the Agg
canvas), never pyplot: no global backend is switched, no figure registry fills up
over a long evaluation, and nothing needs a display on a headless training box.
Each function writes one small PNG and returns its path.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

from fractured.training.evaluation.calibration import (
    expected_calibration_error,
    reliability_curve,
)

SIZE = (6.0, 4.5)
DPI = 100


def plot_roc(path: Path, metrics: Mapping[str, Any],
             operating: Mapping[str, Any] | None = None) -> Path:
    """ROC curve from `classification_metrics`, AUC and its CI in the legend, the
    operating points of `choose_operating_points`' description marked when given."""
    figure, axes = _figure()
    curve = metrics.get("roc_curve")
    if curve is None:
        _no_data(axes, metrics.get("note"))
    else:
        label = f"AUC {metrics['roc_auc']:.3f}"
        if metrics.get("roc_auc_ci95"):
            low, high = metrics["roc_auc_ci95"]
            label += f" (95 % CI {low:.3f}-{high:.3f})"
        axes.plot(curve["fpr"], curve["tpr"], label=label)
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
        for name, marker in (("high_sensitivity", "o"), ("high_specificity", "s")):
            point = (operating or {}).get(name)
            if point:
                axes.plot(1 - point["specificity"], point["sensitivity"], marker=marker,
                          linestyle="none",
                          label=f"{name.replace('_', ' ')} @ {point['threshold']:.3f}")
        axes.legend(loc="lower right")
    axes.set(xlabel="1 - specificity (false positive rate)",
             ylabel="sensitivity (true positive rate)", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    return _save(figure, path)


def plot_pr(path: Path, metrics: Mapping[str, Any]) -> Path:
    """Precision-recall curve from `classification_metrics`, AP in the legend, and the
    prevalence line (a random model's precision)."""
    figure, axes = _figure()
    curve = metrics.get("pr_curve")
    if curve is None:
        _no_data(axes, metrics.get("note"))
    else:
        axes.step(curve["recall"], curve["precision"], where="post",
                  label=f"AP {metrics['average_precision']:.3f}")
        prevalence = metrics["positives"] / metrics["n"]
        axes.axhline(prevalence, linestyle=":", color="grey",
                     label=f"prevalence {prevalence:.3f}")
        axes.legend(loc="lower left")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall",
             xlim=(0, 1), ylim=(0, 1.02))
    return _save(figure, path)


def plot_confusion(path: Path, metrics: Mapping[str, Any]) -> Path:
    """The confusion matrix at `classification_metrics`' threshold, counts and row
    percentages (the sensitivity and specificity a reader sees) in each cell."""
    figure, axes = _figure()
    confusion = metrics["confusion"]
    cells = np.array([[confusion["tp"], confusion["fn"]], [confusion["fp"], confusion["tn"]]])
    rows = cells.sum(axis=1, keepdims=True)
    shares = np.divide(cells, rows, out=np.zeros(cells.shape), where=rows > 0)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(cells):
        axes.text(column, row, f"{count}\n{shares[row, column]:.1%}", ha="center",
                  va="center", color="white" if shares[row, column] > 0.5 else "black")
    axes.set_xticks([0, 1], ["fracture", "no fracture"])
    axes.set_yticks([0, 1], ["fracture", "no fracture"])
    axes.set(xlabel="predicted", ylabel="true",
             title=f"Confusion matrix at threshold {metrics['threshold']:.3f}")
    return _save(figure, path)


def plot_reliability(path: Path, y_true: ArrayLike, before: ArrayLike, after: ArrayLike, *,
                     temperature: float | None = None, bins: int = 15,
                     shift: float | None = None) -> Path:
    """Reliability diagram of the probabilities before and after temperature scaling,
    each with its ECE in the legend; the diagonal is perfect calibration."""
    figure, axes = _figure()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    fitted = ([f"shift {shift:+.2f}"] if shift else []) + (
        [f"T = {temperature:.3f}"] if temperature is not None else [])
    suffix = f" ({', '.join(fitted)})" if fitted else ""
    for name, prob, marker in (("before", before, "o"), (f"after{suffix}", after, "s")):
        curve = reliability_curve(y_true, prob, bins)
        filled = [index for index, count in enumerate(curve["counts"]) if count]
        ece = expected_calibration_error(y_true, prob, bins)
        axes.plot([curve["confidence"][index] for index in filled],
                  [curve["frequency"][index] for index in filled], marker=marker,
                  label=f"{name}: ECE {ece:.3f}")
    axes.legend(loc="upper left")
    axes.set(xlabel="mean predicted probability", ylabel="observed fracture rate",
             title="Reliability", xlim=(0, 1), ylim=(0, 1))
    return _save(figure, path)


def plot_froc(path: Path, metrics: Mapping[str, Any]) -> Path:
    """FROC curve from `detection_metrics` on a log2 false-positives axis, the reported
    levels marked.

    The axis starts at half the lowest level; fewer false positives are drawn there. A
    curve that stops early (the detector made no more false positives) is extended flat
    to the last level, as recall cannot fall when more boxes are allowed.
    """
    figure, axes = _figure()
    curve = metrics.get("froc_curve")
    levels = [level["fppi"] for level in metrics.get("froc") or ()]
    if curve is None:
        _no_data(axes, metrics.get("note"))
    else:
        start = levels[0] / 2
        fppi = np.clip(curve["fppi"], start, None)
        end = max(fppi[-1], levels[-1])
        axes.step([*fppi, end], [*curve["recall"], curve["recall"][-1]], where="post",
                  label=f"FROC score {metrics['froc_score']:.3f}")
        axes.plot(levels, [level["recall"] for level in metrics["froc"]], marker="o",
                  linestyle="none", label="reported levels")
        axes.set_xscale("log", base=2)
        axes.set_xticks(levels, [f"{level:g}" for level in levels])
        axes.set_xlim(start, end)
        axes.legend(loc="lower right")
    axes.set(xlabel="mean false positives per image", ylabel="lesion recall (IoU >= 0.5)",
             title="FROC", ylim=(0, 1.02))
    return _save(figure, path)


def plot_training(path: Path, rows: Sequence[Mapping[str, float | None]]) -> Path:
    """Per-epoch training history: losses in one panel, every other column (AUC,
    accuracy, ...) but `epoch`, `lr` and `seconds` (not on a metric's scale; they stay in
    history.csv) in the other. A missing or None value (a
    metric measured only some epochs) leaves a gap, not a zero."""
    if not rows:
        raise ValueError("no training history to plot")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    epochs = [row.get("epoch", index + 1) for index, row in enumerate(rows)]
    figure = Figure(figsize=(SIZE[0], SIZE[1] * 1.4), dpi=DPI, layout="constrained")
    losses, others = figure.subplots(2, 1, sharex=True)
    for column in columns:
        if column in ("epoch", "lr", "seconds"):
            continue
        values = [np.nan if row.get(column) is None else row[column] for row in rows]
        (losses if "loss" in column else others).plot(epochs, values, marker=".", label=column)
    for axes, title in ((losses, "Losses"), (others, "Metrics")):
        axes.set_title(title)
        if axes.lines:
            axes.legend()
    others.set_xlabel("epoch")
    others.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(figure, path)


def _figure() -> tuple[Figure, Axes]:
    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    return figure, figure.subplots()


def _no_data(axes: Axes, note: str | None) -> None:
    """A visible empty plot rather than none: the report still shows what was tried."""
    text = "\n".join(textwrap.wrap(f"not available: {note or 'no data'}", 60))
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes)


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
