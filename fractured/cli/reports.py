"""Text the commands print: reports laid out for a terminal, apart from the commands."""

from __future__ import annotations

import click


def week_text(week: dict) -> str:
    """The last 7 days in lines: per region, the share flagged at each point beside the
    model's expected share; the images not analysed, by reason."""
    regions, outside, expected = week["regions"], week["not_analysed"], week["expected"]
    analysed = sum(entry["images"] for entry in regions.values())
    lines = [f"last 7 days: {analysed} images analysed, {sum(outside.values())} not analysed"
             + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(outside.items())) + ")"
                if outside else "")]
    for region, entry in sorted(regions.items()):
        flagged = {"high_sensitivity": entry["possible"] + entry["likely"],
                   "high_specificity": entry["likely"]}
        cells = []
        for point, words in (("high_sensitivity", "possible or likely"),
                             ("high_specificity", "likely")):
            share = flagged[point] / entry["images"]
            rate = (expected or {}).get(region, {}).get(point)
            cells.append(f"{words} {100 * share:.1f} %"
                         + (f" (expected {100 * rate:.1f} %)" if rate is not None else ""))
        lines.append(f"  {region}: {entry['images']} images, " + ", ".join(cells))
    return "\n".join(lines)




def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"




def print_auc_comparison(comparison: dict, before: str, after: str) -> None:
    """One line per part: the AUC before and after, and the paired interval."""
    for part, auc in comparison.items():
        ci = auc["difference_ci95"]
        if auc["before"] is None:
            click.echo(f"{part}: {auc['note']}")
            continue
        click.echo(f"{part}: AUC {auc['before']:.4f} {before}, {auc['after']:.4f} {after}"
                   + (f" (difference {ci[0]:+.4f} to {ci[1]:+.4f})" if ci else ""))


