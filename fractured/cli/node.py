"""The operators' commands: run the node, look at its queue, retry, purge, roll models
out and back."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fractured import config, log
from fractured.cli.options import config_option, database_error, load_settings, open_queue
from fractured.cli.reports import megabytes, week_text

#: Studies `fractured status` lists by default: the latest, not the whole database (a
#: node keeps [retention]'s 7 days of studies: hundreds to thousands).
STUDIES_LISTED = 20


@click.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the node: receive studies, analyse them, send results back to the PACS."""
    settings = load_settings(config_path)
    log.configure(settings.log.level, settings.log.format)
    from fractured.daemon.service import Node  # heavy imports only for the node
    from fractured.engine.bundle import BundleError

    try:
        node = Node(settings)
    except (BundleError, FileNotFoundError) as exc:
        raise click.ClickException(f"cannot load engine bundle: {exc}") from None
    except config.ConfigError as exc:  # what only loading can tell, e.g. a TLS key
        raise click.ClickException(f"{settings.source}: {exc}") from None
    except Exception as exc:  # the database: down, unreachable, or a newer schema
        if (error := database_error(exc)) is None:
            raise
        raise error from None
    node.run_until_signalled()


@click.command()
@config_option
@click.option("--study", "study_uid", metavar="STUDY_UID", help="Only this study's.")
@click.option("--destination", help="Only those for this destination (its name).")
def retry(config_path: Path | None, study_uid: str | None, destination: str | None) -> None:
    """Send dead letters (deliveries that gave up) again: all, or by study or destination.
    A running node picks them up within a second."""
    settings = load_settings(config_path)
    names = [d.name for d in settings.destinations]
    if destination is not None and destination not in names:
        raise click.UsageError(f"--destination {destination!r} is not configured "
                               f"(destinations: {', '.join(names) or 'none'})")
    count = open_queue(settings).requeue_dead_letters(
        study_instance_uid=study_uid, destination=destination)
    click.echo(f"requeued {count} dead letter{'s' if count != 1 else ''}")




def _engine_status(location: Path) -> dict[str, str | None]:
    """Which bundle the node runs (and shadows), from the pointers alone: cheap, and
    `fractured engines list` verifies the bundles."""
    from fractured.engine.registry import Registry, RegistryError, is_bundle

    if is_bundle(location):
        return {"location": str(location), "active": location.name, "shadow": None}
    try:
        registry = Registry(location)
        return {"location": str(location), "active": registry.active(),
                "shadow": registry.shadow()}
    except (RegistryError, OSError):
        return {"location": str(location), "active": None, "shadow": None}


def _expected_rates(location: Path) -> dict[str, dict[str, float]] | None:
    """The active bundle's expected flag rates per region (None: none recorded, or no
    bundle to read)."""
    from fractured.engine.bundle import BundleError
    from fractured.engine.registry import resolve_bundle

    try:
        rates = resolve_bundle(location).manifest.classifier.expected_flag_rates
    except (BundleError, OSError):
        return None
    return None if rates is None else {
        region: {"high_sensitivity": rate.high_sensitivity,
                 "high_specificity": rate.high_specificity} for region, rate in rates.items()}




@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--limit", type=click.IntRange(0), default=STUDIES_LISTED, show_default=True,
              help="List the studies recorded last, this many.")
@click.option("--all", "list_all", is_flag=True, help="List every study the database holds.")
def status(config_path: Path | None, as_json: bool, limit: int, list_all: bool) -> None:
    """The engine in use, studies and deliveries by state (UIDs only: no patient data),
    the studies recorded last, and the last 7 days' images: the share flagged per body
    region against the model's expected share, and the images not analysed by reason."""
    settings = load_settings(config_path)
    from datetime import timedelta

    from fractured.daemon import reports
    from fractured.daemon.schema import utcnow

    database = open_queue(settings).engine
    report = {"engine": _engine_status(settings.engine.bundle), **reports.counts(database),
              "study_list": reports.studies(database, None if list_all else limit),
              "dead_letters": reports.dead_letters(database),
              "last_7_days": {**reports.outcomes_since(database, utcnow() - timedelta(days=7)),
                              "expected": _expected_rates(settings.engine.bundle)}}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    engine = report["engine"]
    click.echo(f"engine: {engine['location']}: active {engine['active'] or 'none'}"
               + (f", shadow {engine['shadow']}" if engine["shadow"] else ""))
    for kind in ("studies", "deliveries"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(report[kind].items())) or "none"
        click.echo(f"{kind}: {counts}")
    held = sum(report["studies"].values())
    if len(report["study_list"]) < held:
        click.echo(f"the {len(report['study_list'])} studies recorded last of {held} "
                   "(--limit N or --all for more):")
    for row in report["study_list"]:
        click.echo(f"  {row['study_instance_uid']:<64} {row['state']:<10} "
                   f"images {row['instances']:<4} runs {row['runs']:<3} "
                   f"delivered {row['delivered']}" + (f"  ({row['reason']})"
                                                      if row["reason"] else ""))
    click.echo(week_text(report["last_7_days"]))
    if report["dead_letters"]:
        click.echo(f"dead letters ({len(report['dead_letters'])}; `fractured retry` sends "
                   "them again):")
    for letter in report["dead_letters"]:
        click.echo(f"  {letter['study_instance_uid']:<64} to {letter['destination']}: "
                   f"{letter['attempts']} attempts, {letter['last_error']}")


@click.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def purge(config_path: Path | None, dry_run: bool, as_json: bool) -> None:
    """Remove what [retention] says finished studies have been kept long enough: received
    images, delivered results, database rows. Shows what goes (UIDs only), and with
    --dry-run removes nothing. A running node does the same every [retention].interval_s."""
    settings = load_settings(config_path)
    log.configure(settings.log.level, settings.log.format)  # retention.purged, on stderr
    from fractured.daemon import retention
    from fractured.daemon.schema import utcnow

    queue = open_queue(settings)
    plan = retention.plan(queue, settings, utcnow())
    result = None if dry_run else retention.apply(queue, plan)
    report = retention.report(plan, result)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, **report}, indent=2))
        return
    keep = settings.retention
    click.echo(f"retention: images {keep.images_days:g} days, results {keep.results_days:g} "
               f"days, records {keep.records_days:g} days (0: kept forever)")
    click.echo(f"{'would remove' if dry_run else 'removing'}: {len(plan.studies)} studies, "
               f"{plan.files} files ({megabytes(plan.bytes)}), {plan.rows} rows")
    for study in plan.studies:
        click.echo(f"  {study.study_instance_uid:<64} {study.study.state:<8} "
                   f"files {study.files:<5} {megabytes(study.bytes):>9}  rows {study.rows:<5}"
                   + "; ".join(f"{kind}: {why}" for kind, why in study.reasons.items()))
    if result is not None:
        click.echo(f"removed: {result.studies} studies, {result.files} files "
                   f"({megabytes(result.bytes)}), {result.rows} rows; {result.changed} "
                   f"changed since planned (left alone), {result.failed} failed")




@click.group()
def engines() -> None:
    """Roll models out and back: the bundles of an engines folder, one active.

    The running node switches to a newly activated bundle at its next study, without a
    restart. The folder is [engine].bundle of the config, or --engines."""


engines_option = click.option(
    "--engines", "engines_dir", type=click.Path(path_type=Path, file_okay=False),
    help="Engines folder [default: [engine].bundle of the config].")


def _registry(config_path: Path | None, engines_dir: Path | None):  # -> Registry
    from fractured.engine.registry import Registry, RegistryError, is_bundle

    folder = engines_dir or load_settings(config_path).engine.bundle
    if is_bundle(folder):
        raise click.UsageError(f"{folder} is a single bundle, not an engines folder: set "
                               "[engine].bundle to the folder holding the bundles, or pass "
                               "--engines")
    try:
        return Registry(folder)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from None


@engines.command("list")
@config_option
@engines_option
def engines_list(config_path: Path | None, engines_dir: Path | None) -> None:
    """Each bundle: name, version, trained or not, created; * marks the active one, s the
    shadow."""
    registry = _registry(config_path, engines_dir)
    entries = registry.entries()
    if not entries:
        click.echo(f"{registry.root}: no bundles")
    for entry in entries:
        mark = "*" if entry.active else "s" if entry.shadow else " "
        if entry.manifest is None:
            click.echo(f"{mark} {entry.name:<32} BROKEN: {entry.error}")
            continue
        m = entry.manifest
        click.echo(f"{mark} {entry.name:<32} {m.name} {m.version:<10} "
                   f"{'trained' if m.trained else 'UNTRAINED'}  {m.created}")


@engines.command("activate")
@click.argument("name")
@config_option
@engines_option
def engines_activate(name: str, config_path: Path | None, engines_dir: Path | None) -> None:
    """Make bundle NAME (its folder name) the active one, after verifying it."""
    from fractured.engine.bundle import BundleError
    from fractured.engine.registry import RegistryError

    registry = _registry(config_path, engines_dir)
    try:
        bundle = registry.activate(name)
    except (BundleError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"active: {name} ({bundle.model_info.label}); a running node switches at "
               "its next study")


@engines.command("rollback")
@config_option
@engines_option
def engines_rollback(config_path: Path | None, engines_dir: Path | None) -> None:
    """Make the previously active bundle active again."""
    from fractured.engine.bundle import BundleError
    from fractured.engine.registry import RegistryError

    registry = _registry(config_path, engines_dir)
    try:
        registry.rollback()
    except (BundleError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"active: {registry.active()}; a running node switches at its next study")


@engines.command("shadow")
@click.argument("name", required=False)
@click.option("--off", is_flag=True, help="Stop shadowing.")
@config_option
@engines_option
def engines_shadow(name: str | None, off: bool, config_path: Path | None,
                   engines_dir: Path | None) -> None:
    """Run bundle NAME beside the active one on live studies; its findings are stored for
    `fractured engines compare` and never sent to the PACS."""
    from fractured.engine.bundle import BundleError
    from fractured.engine.registry import RegistryError

    if off == (name is not None):
        raise click.UsageError("give a bundle NAME to shadow, or --off")
    registry = _registry(config_path, engines_dir)
    try:
        bundle = registry.set_shadow(name)
    except (BundleError, RegistryError) as exc:
        raise click.ClickException(str(exc)) from None
    if bundle is None:
        click.echo("shadow: off")
    else:
        click.echo(f"shadow: {name} ({bundle.model_info.label}); a running node starts at "
                   "its next study")


@engines.command("compare")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model pair.")
def engines_compare(config_path: Path | None, as_json: bool) -> None:
    """How the shadow model's decisions agreed with the active model's on live studies,
    per image and per study, at both operating points."""
    import dataclasses
    import json

    from fractured.daemon.shadow import compare

    settings = load_settings(config_path)
    results = compare(open_queue(settings))
    if not results:
        click.echo("no shadow findings recorded (fractured engines shadow NAME starts one)")
    for result in results:
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(result)))
            continue
        click.echo(f"active {result.active_model}  vs  shadow {result.shadow_model}: "
                   f"{result.images} images in {result.studies} studies; probability "
                   f"difference mean {result.mean_abs_difference:.3f}, "
                   f"max {result.max_abs_difference:.3f}")
        for level, table in (("images", result.image_agreement),
                             ("studies", result.study_agreement)):
            total = result.images if level == "images" else result.studies
            for point, tally in table.items():
                click.echo(f"  {level:<8} {point:<17} agree {tally['agree']}/{total} "
                           f"({100 * tally['agree'] / total:.1f} %), fracture only by active "
                           f"{tally['active_only']}, only by shadow {tally['shadow_only']}")

