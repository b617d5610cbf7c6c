"""Bundle format 2 against format 1: size on disk and peak memory of `scgpt-run embed` with a
whole-human-shaped model (d_model 512, 12 layers, 60,697 tokens; random weights: memory and
size do not depend on them) exported fp32 with one length and with five.

    python tools/bench_bundle_memory.py [--workdir /tmp/bench_memory] [--cells 100] [--json OUT]

Exports, from one run (made by the previous release, tools/build_test_bundles.RELEASE, in a
child process): format 1 by that release at 64, 128, 256, 512 and 1200 tokens; format 2 (this
checkout) at 1200 tokens and at the same five lengths. Each bundle then embeds the first
--cells cells of Liao C144 in a fresh process (fp32, CPU, 2 threads): disk size, peak RSS,
cells/s, and whether the embeddings equal those of the format 1 bundle bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from bench_runtime import run_child, scgpt_run, subset_10x
from build_test_bundles import ROOT, release_code

LIAO = (
    ROOT.parent
    / "shared/data/unlabelled/liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5"
)
LENGTHS = [64, 128, 256, 512, 1200]
N_TOKENS = 60_697  # the released whole-human vocabulary size
EXPORT = {"precisions": ("fp32",), "validation_cells": 4}


def make_run(run: Path) -> None:
    """A whole-human-shaped run with random weights and a vocabulary of the Liao genes."""
    import torch

    from scgpt_runtime.io import open_counts
    from scgpt_runtime.tokens import TokenConfig
    from scgpt_runtime.vocab import Vocab
    from scgpt_train.checkpoint import RunInfo, save_run
    from scgpt_train.model import ModelConfig, ScGPT

    with open_counts(LIAO) as counts:
        genes = list(dict.fromkeys(counts.var["name"].tolist()))
    vocab = Vocab.from_genes([*genes, *(f"GENE{i}" for i in range(N_TOKENS - 3 - len(genes)))])
    cfg = ModelConfig.from_name("whole-human", vocab_size=len(vocab), pad_id=vocab.pad_id)
    torch.manual_seed(0)
    data = [{"file": str(LIAO), "bytes": LIAO.stat().st_size}]
    info = RunInfo(cfg, TokenConfig(max_seq_len=1200), vocab, provenance={"data": data})
    save_run(run, ScGPT(cfg).eval(), info)


def previous_release(run: Path, out: Path, work: Path) -> None:
    """The run made and exported (format 1) by the previous release, in a child process: the
    release reads only its own run format."""
    env = {**os.environ, "PYTHONPATH": str(release_code(work))}
    stage = [sys.executable, str(Path(__file__).resolve()), "--stage-release", str(run), str(out)]
    subprocess.run(stage, check=True, env=env, cwd=work)


def release_stage(run: Path, out: Path) -> None:
    """Runs with the release's code first on sys.path (its exporter is the package `export`)."""
    from export import export_run

    make_run(run)
    export_run(run, out, max_lens=LENGTHS, **EXPORT)


def measure(bundle: Path, cells: Path, work: Path) -> dict:
    out = work / f"{bundle.name}.npy"
    cmd = [
        *scgpt_run(),
        "-q",
        "embed",
        str(cells),
        "--model",
        str(bundle),
        "--out",
        str(out),
        "--overwrite",
        "--json",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--min-gene-fraction",
        "0",
    ]
    stdout, rss = run_child(cmd, work)
    summary = json.loads(stdout)
    files = [p for p in bundle.iterdir() if p.is_file()]
    return {
        "bundle": bundle.name,
        "files": len(files),
        "disk_mb": round(sum(p.stat().st_size for p in files) / 1e6, 1),
        "peak_rss_mb": round(rss),
        "cells_per_s": summary["cells_per_s"],
        "graphs": summary["graphs"],
        "embedding": str(out),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_memory"))
    p.add_argument("--cells", type=int, default=100)
    p.add_argument("--json", type=Path)
    p.add_argument("--stage-release", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage_release:
        release_stage(*args.stage_release)
        return
    from scgpt_export import export_run

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    run = work / "run"
    paths = {"format 1, 5 lengths": work / "v1-5"}
    if not paths["format 1, 5 lengths"].is_dir():
        previous_release(run, paths["format 1, 5 lengths"], work)
    for name, out, lengths in (
        ("format 2, 1 length", work / "v2-1", [1200]),
        ("format 2, 5 lengths", work / "v2-5", LENGTHS),
    ):
        paths[name] = out
        if not out.is_dir():
            export_run(run, out, max_lens=lengths, **EXPORT)
    cells = subset_10x(LIAO, work / f"c144-{args.cells}.h5", args.cells)
    rows = {name: measure(out, cells, work) for name, out in paths.items()}
    reference = np.load(rows["format 1, 5 lengths"]["embedding"])
    for row in rows.values():
        row["equal_to_format_1"] = bool(np.array_equal(np.load(row.pop("embedding")), reference))
    print("| bundle | files | on disk | peak RSS | cells/s | embeddings = format 1 |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['files']} | {r['disk_mb']} MB | {r['peak_rss_mb']} MB | "
            f"{r['cells_per_s']} | {r['equal_to_format_1']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
