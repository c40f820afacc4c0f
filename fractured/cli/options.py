"""What several commands share: the configuration they load, and their common options."""

from __future__ import annotations

import os
from pathlib import Path

import click

from fractured import config

# Mirror fractured.engine.models' DETECTOR_BACKBONES and CLASSIFIER_VARIANTS without
# importing torch for --help.
DETECTOR_BACKBONES = ("mobilenet_v3_large_fpn", "resnet50_fpn_v2", "resnet18_fpn", "resnet34_fpn",
                      "lite0_fpn", "lite1_fpn", "lite2_fpn")
CLASSIFIER_VARIANTS = ("b0", "b1", "b2", "b3", "b4", "lite0", "lite1", "lite2", "resnet18",
                       "resnet34", "resnet50")

CONFIG_ENV = "FRACTURED_CONFIG"


def load_settings(path: Path | None) -> config.Settings:
    """Load the config named by --config, $FRACTURED_CONFIG, or the shipped default."""
    chosen = path or Path(os.environ.get(CONFIG_ENV) or config.DEFAULT_CONFIG)
    try:
        return config.load(chosen)
    except config.ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


subset_option = click.option(
    "--subset", "subsets", multiple=True, metavar="COLUMN=VALUE",
    help="Also report on images whose attribute matches, e.g. hardware=0.")

def derived_bundle_options(parts: str):  # -> a decorator
    """The options of a command that makes a new bundle from BUNDLE and scores it on the
    split of BUNDLE's classifier (`fuse`, `quantize`); `parts` says what each part is for."""
    options = [
        click.option("--split", "split_dir", required=True,
                     type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help=f"The split the classifier was trained with (split.csv and "
                          f"split.json: a run's split/ folder): {parts}."),
        click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
                     required=True, help="Bundle directory to create (must not exist)."),
        click.option("--version", "bundle_version", required=True,
                     help="The new bundle's version."),
        click.option("--name", help="The new bundle's name [default: BUNDLE's]."),
        click.option("--report", "report_dir", required=True,
                     type=click.Path(path_type=Path, file_okay=False),
                     help="Where metrics.json, report.md, plots and the per-image "
                          "predictions.csv / validation.csv go."),
        click.option("--dataset", type=click.Path(exists=True, path_type=Path),
                     help="The data set [default: the one BUNDLE's classifier was trained "
                          "on]."),
        subset_option,
        click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True,
                     help="Bootstrap resamples for the AUC intervals (0 = none)."),
        click.option("--dicom-check", "dicom_check",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="A `fractured check-dicom` dicom-check.json of BUNDLE (or of the "
                          "bundle BUNDLE was made from) for the model card."),
        click.option("--test-looks", type=click.IntRange(0),
                     help="How many scorings the split's test part had before this one "
                          "(the test ledger's count), for the model card."),
    ]

    def apply(command):  # click passes the command function through each option
        for option in reversed(options):
            command = option(command)
        return command

    return apply


config_option = click.option(
    "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
    help=f"config.toml to use (default: ${CONFIG_ENV}, else the shipped config.toml).")




def refuse_existing(out_dir: Path) -> None:
    """A bundle is never overwritten: said before minutes of inference, not after."""
    if out_dir.exists():
        raise click.ClickException(f"{out_dir}: already exists; a bundle is never "
                                   "overwritten (build a new version)")


def build_errors() -> tuple[type[Exception], ...]:
    """What a command that builds a bundle reports as the user's error (the message names
    the file or key), not as a traceback; imported when a command runs, not for --help."""
    from fractured.engine.bundle import BundleError
    from fractured.training.datasets import DatasetError
    from fractured.training.export import BuildError

    return (BundleError, BuildError, DatasetError, config.ConfigError)


def database_error(exc: Exception) -> click.ClickException | None:
    """A database that cannot be opened or used, as the operator's error naming the
    setting and why (None for anything else): the server down, a wrong host, role or
    password, or a schema a newer fractured made."""
    from sqlalchemy.exc import OperationalError

    from fractured.daemon.migrations import SchemaError

    if isinstance(exc, OperationalError):
        return click.ClickException(f"cannot open the database ([database].url): "
                                    f"{str(exc.orig).strip()}")
    if isinstance(exc, SchemaError):
        return click.ClickException(f"cannot use the database ([database].url): {exc}")
    return None


def open_queue(settings: config.Settings):  # -> fractured.daemon.queue.Queue
    """The node's queue, for a command; its schema brought up to date (daemon.migrations),
    and the database's errors reported as database_error does."""
    from fractured.daemon.connection import make_engine
    from fractured.daemon.queue import Queue

    try:
        return Queue(make_engine(settings.database.url))
    except Exception as exc:
        if (error := database_error(exc)) is None:
            raise
        raise error from None
