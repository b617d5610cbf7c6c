"""Benchmark the annotate report (--report): time and peak memory by number of cells.

Each size runs in a fresh process: a Result of N cells with clustered embeddings (d 512, the
whole-human width, memory-mapped read-only from a scratch file written by another process, as
annotate spills large outputs) and 20 labels, then `serving_report(...)` and its write: the
code `scgpt-run annotate --report` runs after the model. Reported: seconds of the report
alone, RSS before it (the inputs, as annotate would hold them), peak RSS, the file-backed
part of RSS after it (pages of the memory-mapped embeddings that reading the map's rows
mapped: page cache, reclaimable; on this machine one 2 KB row maps about 350 KB), file size.
The map draws MAP_CELLS cells whatever N, so time and anonymous memory stay nearly flat in N.

Usage: python tools/bench_report.py [--sizes 10000 100000 1000000] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np

D, LABELS = 512, 20


def make(n: int, workdir: Path) -> None:
    """The embeddings of N cells in 20 clusters, L2-normalised, as a .npy scratch file."""
    rng = np.random.default_rng(0)
    emb = np.lib.format.open_memmap(workdir / f"emb{n}.npy", "w+", np.float32, (n, D))
    centres = rng.normal(size=(LABELS, D)).astype(np.float32)
    codes = rng.integers(0, LABELS, n)
    for s in range(0, n, 65536):  # in blocks: memory stays that of one block
        block = centres[codes[s : s + 65536]] + rng.normal(size=(len(codes[s : s + 65536]), D))
        emb[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    emb.flush()


def one(n: int, workdir: Path) -> dict:
    """One size, in this process."""
    from scgpt_runtime.report.serving import serving_report
    from scgpt_runtime.results import Result

    rng = np.random.default_rng(0)
    codes = rng.integers(0, LABELS, n)
    emb = np.load(workdir / f"emb{n}.npy", mmap_mode="r")  # written by make(): pages not resident
    probs = rng.dirichlet(np.ones(LABELS) * 0.3, n).astype(np.float32)
    probs[np.arange(n), codes] += 1.0
    probs /= probs.sum(1, keepdims=True)
    labels = [f"type {i}" for i in range(LABELS)]
    result = Result(np.array([f"c{i}" for i in range(n)]), rng.integers(50, 1200, n), emb,
                    labels, probs)  # fmt: skip
    result.decide(0.3)
    result.add_graphs({288: n // 2, 1200: n - n // 2})
    summary = {
        "command": "annotate", "input": "bench.h5ad", "output": "bench.csv", "shard": None,
        "n_cells": n, "n_empty": 0, "bundle": "bench", "precision": "int8", "device": "cpu",
        "execution_provider": "CPUExecutionProvider", "seconds": 0.0, "cells_per_s": 0.0,
        "graphs": {str(k): v for k, v in result.graphs.items()},
        "gene_match": {"gene_column": "index", "n_genes": 20000, "n_matched": 18000,
                       "fraction_matched": 0.9, "n_duplicates": 0, "unmatched_examples": []},
        "label_counts": result.label_counts(), "n_unknown": int((result.codes < 0).sum()),
    }  # fmt: skip
    settings = {"input": "bench.h5ad", "input_format": "h5ad", "matrix": "X", "bundle": "bench",
                "bundle_sha256": "0" * 64, "versions": {},
                "options": {"unknown_below": 0.3}}  # fmt: skip
    colours = {"batch": np.array([f"b{i % 4}" for i in range(n)])}
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = serving_report(summary, settings, result, colours).write(workdir / f"r{n}.html")
    seconds = time.perf_counter() - t0
    return {
        "n_cells": n,
        "report_seconds": round(seconds, 1),
        "rss_before_mb": before,
        "peak_rss_mb": _status("VmHWM"),
        "rss_file_mb": _status("RssFile"),  # page cache of the embeddings, mapped, reclaimable
        "html_mb": round(out.stat().st_size / 2**20, 2),
    }


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024)
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size
    ap.add_argument("--make", type=int, help=argparse.SUPPRESS)  # a child: its embeddings
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp())
    workdir.mkdir(parents=True, exist_ok=True)
    if args.make:
        make(args.make, workdir)
        return
    if args.one:
        print(json.dumps(one(args.one, workdir)))
        return
    rows = []
    for n in args.sizes:
        child = [sys.executable, __file__, "--workdir", str(workdir)]
        subprocess.run([*child, "--make", str(n)], check=True)
        done = subprocess.run([*child, "--one", str(n)], check=True, capture_output=True)
        rows.append(json.loads(done.stdout))
        (workdir / f"emb{n}.npy").unlink()
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
