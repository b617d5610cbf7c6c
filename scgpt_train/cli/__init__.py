"""`scgpt-train`: pretrain, fine-tune and import scGPT models (export: see scgpt_export.cli)."""

from __future__ import annotations

from scgpt_runtime.cli.common import command_group

from .evaluate import evaluate
from .finetune import finetune
from .generate import generate
from .genes import genes
from .perturb import finetune_perturb_command, perturb
from .pretrain import import_scgpt, pretrain
from .report import report

cli = command_group(
    "Train scGPT models with PyTorch: pretrain, fine-tune, predict perturbations, evaluate, "
    "generate cells, report, import official checkpoints."
)
finetune.add_command(finetune_perturb_command)
for command in (pretrain, import_scgpt, finetune, perturb, genes, generate, evaluate, report):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="scgpt-train")
