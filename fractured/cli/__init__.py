"""The `fractured` command, for two audiences: the hospital's operators (cli.node) and
its ML staff (cli.models), each in a section of `fractured --help`."""

from __future__ import annotations

import click

from fractured import __version__
from fractured.cli import models, node

#: `fractured --help`'s sections: a title and its commands, in the order shown.
SECTIONS: tuple[tuple[str, tuple[click.Command, ...]], ...] = (
    ("Run the node (operators)", (node.serve, node.status, node.retry, node.purge,
                                  node.engines)),
    ("Train and build models (ML staff)", (models.data, models.train, models.evaluate,
                                           models.cv, models.ensemble, models.build_engine,
                                           models.check_dicom, models.fuse, models.quantize,
                                           models.region_check,
                                           models.predict)),
)


class SectionedGroup(click.Group):
    """A group whose help lists its commands by SECTIONS rather than alphabetically."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        longest = max(len(command.name or "") for _, commands in SECTIONS
                      for command in commands)
        limit = formatter.width - 6 - longest  # as click.Group lays its list out
        for title, commands in SECTIONS:
            rows = [(command.name or "", command.get_short_help_str(limit))
                    for command in commands if not command.hidden]
            with formatter.section(title):
                formatter.write_dl(rows)


@click.group(cls=SectionedGroup)
@click.version_option(__version__, prog_name="fractured")
def main() -> None:
    """Fracture-detection node for a hospital PACS (AI decision support, not a diagnosis)."""


for _, _commands in SECTIONS:
    for _command in _commands:
        main.add_command(_command)

__all__ = ["main"]
