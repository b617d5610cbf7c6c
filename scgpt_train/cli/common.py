"""What the scgpt-train commands share: data file lists, --config files, options whose defaults
are the config dataclasses' own, and the options of every fine-tuning command."""

from __future__ import annotations

import glob
import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import click

from scgpt_runtime.cli.common import check_where, option
from scgpt_runtime.errors import InputError

from ..config import LR_HELP
from ..model import PRESETS

DATA_SUFFIXES = (".h5ad", ".h5", ".h5mu")
MTX_FILES = ("matrix.mtx.gz", "matrix.mtx")  # a folder holding one is a 10x mtx data set


def expand_data(values: tuple[str, ...]) -> list[str]:
    """Files, folders (their .h5ad, .h5 and .h5mu files; a 10x mtx folder is one data set)
    and quoted glob patterns, in order."""
    files: list[str] = []
    for value in values:
        path = Path(value)
        if path.is_dir() and any((path / m).is_file() for m in MTX_FILES):
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        elif any(c in value for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(value))  # noqa: PTH207 (absolute patterns)
        else:
            found = [path]
        if not found:
            raise InputError(f"{value}: no .h5ad, .h5 or .h5mu file there")
        files += [str(p) for p in found]
    return files


def load_config_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(config, dict):
        raise InputError(f"{path}: a config file holds one JSON object")
    return config


def merged_config(cls: type, ctx: click.Context, file_config: dict[str, Any], **values: Any):
    """A config dataclass from defaults < config file < options given on the command line."""
    known = {f.name for f in fields(cls)}
    unknown = set(file_config) - known
    if unknown:
        raise click.UsageError(f"unknown fields in --config: {', '.join(sorted(unknown))}")
    given = {
        k: v
        for k, v in values.items()
        if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT or k not in file_config
    }
    try:
        return cls(**{**file_config, **given})
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from e


def start_options(cls: type) -> Callable:
    """Options every fine-tuning command shares (where it starts, data, output, run settings),
    with the defaults of its config dataclass `cls`."""
    decorators = [
        click.option(
            "--from",
            "from_run",
            type=click.Path(exists=True, file_okay=False),
            help="Run directory to start from (pretrained, imported or fine-tuned).",
        ),
        click.option(
            "--from-scratch",
            is_flag=True,
            help="Start from random weights of --preset instead of a run.",
        ),
        option(
            cls,
            "preset",
            type=click.Choice(sorted(PRESETS)),
            help="Model size with --from-scratch.",
        ),
        click.option(
            "--data",
            multiple=True,
            required=True,
            help="A .h5ad, .h5mu or 10x .h5 file, a 10x mtx folder, a folder of files, or a quoted "
            "glob; repeatable.",
        ),
        click.option(
            "--out",
            required=True,
            type=click.Path(file_okay=False),
            help="Run directory to write.",
        ),
        click.option(
            "--where",
            multiple=True,
            callback=check_where,
            help="COL=VALUE: use only cells whose obs COL equals VALUE; repeatable.",
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            help="JSON with any of these settings (and 'model'/'tokens' overrides); "
            "options given here win.",
        ),
        click.option("--gene-column", help="var column with gene names [default: best match]"),
        option(
            cls,
            "epochs",
            type=int,
            help="Passes over the training cells.",
        ),
        option(cls, "batch_size", type=int),
        option(cls, "lr", type=float, help=LR_HELP if _default(cls, "lr") is None else None),
        option(
            cls,
            "lr_decay",
            type=float,
            help="Learning-rate factor per epoch (official schedule).",
        ),
        option(cls, "seed", type=int),
        option(cls, "device", help="auto, cpu, cuda or cuda:N"),
        click.option("--overwrite", is_flag=True, help="Replace an existing run at --out."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]

    def apply(f: Callable) -> Callable:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def finetune_config(
    cls: type, ctx: click.Context, data: tuple[str, ...], config_file: str | None, **options: Any
) -> Any:
    return merged_config(cls, ctx, load_config_file(config_file), data=expand_data(data), **options)


def echo_summary(summary: dict[str, Any], as_json: bool, line: str) -> None:
    click.echo(json.dumps(summary) if as_json else line)
