"""Every command has help with examples and a README section; the README's first block is sane."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from scgpt_runtime.cli import cli as run_cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _train_cli() -> click.Group:
    try:  # the installed scgpt-train entry point: training commands plus export
        from scgpt_export.cli import cli
    except ImportError:
        from scgpt_train.cli import cli
    return cli


def commands(group: click.Group, prefix: str) -> list[tuple[list[str], str]]:
    out = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out += [([name, *p], t) for p, t in commands(cmd, f"{prefix} {name}")]
        else:
            out.append(([name], f"{prefix} {name}"))
    return out


ALL = [(run_cli, path, title) for path, title in commands(run_cli, "scgpt-run")] + [
    (_train_cli(), path, title) for path, title in commands(_train_cli(), "scgpt-train")
]


@pytest.mark.parametrize(("group", "path", "title"), ALL, ids=[t for _, _, t in ALL])
def test_command_has_help_with_examples_and_a_readme_section(group, path, title):
    result = CliRunner().invoke(group, [*path, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output
    assert f"### `{title}`" in README, f"README.md lacks a section '### `{title}`'"


def test_readme_starts_with_the_two_newcomer_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith("pip install")
    # the main job on what ships: the default model, a sample the command fetches itself
    assert "scgpt-run annotate" in block[0]
    assert "--model" not in block[0]
    assert "../shared" not in block[0]
    assert "pytest" in block[1]


def test_the_cpu_only_requirements_are_the_runtime_dependencies_with_plain_onnxruntime():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    base = [d for d in deps if not d.startswith("onnxruntime")]
    plain = [d.split(";")[0].strip() for d in deps if d.startswith("onnxruntime>")]
    lines = (root / "requirements" / "runtime-cpu.txt").read_text().splitlines()
    assert [x for x in lines if x and not x.startswith("#")] == base + plain
    assert "pip install -r requirements/runtime-cpu.txt && pip install --no-deps ." in README
