"""`scgpt-train`: pretrain, fine-tune, import and export scGPT models."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="scgpt-deploy")
def cli() -> None:
    """Train scGPT models with PyTorch (commands arrive with the model: see README.md)."""


def main() -> None:
    cli(prog_name="scgpt-train")
