"""`scgpt-run`: annotate and embed cells with an exported scGPT model bundle."""

from __future__ import annotations

from .common import command_group
from .describe import info, inspect
from .genes import genes
from .reference import reference
from .serve import annotate, embed, merge

cli = command_group("Annotate and embed single cells with scGPT, on GPU when there is one.")
for command in (annotate, embed, info, merge, inspect, reference, genes):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="scgpt-run")
