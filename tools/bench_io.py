"""Benchmark the data layer: read -> match genes -> bin -> tokenize.

1. Throughput (cells/s, one process, numpy single-threaded) on the Liao 10x files, with the
   readers' threaded inflate (the default) and, alternating with it, HDF5's serial read.
2. Peak RSS of the same pipeline on generated h5ad files of N cells with about 1,000 non-zeros
   per cell, stored csr and csc, each run in a fresh process (target: < 1 GB, flat in N).

Usage: python tools/bench_io.py [--sizes 50000 200000] [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import h5py
import numpy as np

from scgpt_runtime.genes import match_genes
from scgpt_runtime.io import chunks, open_counts
from scgpt_runtime.tokens import TokenConfig, tokenize
from scgpt_runtime.vocab import Vocab

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIAO = sorted((SHARED / "unlabelled").glob("liao2020_*.h5"))
N_GENES = 20_000
NNZ_PER_CELL = 1_000
BLOCK = 2048


def pipeline(path: Path) -> tuple[int, float, float]:
    """Stream one file through the whole data layer: (cells, seconds in all, seconds streaming).

    Streaming is read + bin + tokenize of every block; the rest is opening the file and
    matching its genes, once per file."""
    t0 = time.perf_counter()
    cfg = TokenConfig()
    with open_counts(path) as counts:
        # a vocabulary holding every gene of the file (all of them match), as a model's would
        vocab = Vocab.from_genes(counts.var["name" if "name" in counts.var else "index"])
        match = match_genes(counts.var, vocab)
        t1 = time.perf_counter()
        n = 0
        for block in counts.iter_blocks(BLOCK):
            tokens = tokenize(block, match.column_ids, cfg, vocab.cls_id, vocab.pad_id)
            n += tokens.n_cells
    t2 = time.perf_counter()
    return n, t2 - t0, t2 - t1


def _mean_nnz(path: Path) -> float:
    with open_counts(path) as counts:
        return sum(b.nnz for b in counts.iter_blocks(BLOCK)) / counts.n_cells


def write_generated(path: Path, n_cells: int, layout: str, seed: int = 0) -> None:
    """An h5ad (csr or csc X) with ~NNZ_PER_CELL Poisson-ish counts per cell, in bounded memory."""
    rng = np.random.default_rng(seed)
    n_major, n_minor = (n_cells, N_GENES) if layout == "csr" else (N_GENES, n_cells)
    per_major = NNZ_PER_CELL * n_cells // n_major
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        x = f.create_group("X")
        x.attrs.update(
            {
                "encoding-type": f"{layout}_matrix",
                "encoding-version": "0.1.0",
                "shape": (n_cells, N_GENES),
            }
        )
        data = x.create_dataset("data", (0,), "f4", maxshape=(None,), chunks=(1 << 20,))
        indices = x.create_dataset("indices", (0,), "i4", maxshape=(None,), chunks=(1 << 20,))
        indptr = np.arange(n_major + 1, dtype=np.int64) * per_major
        step = max(1, (1 << 22) // per_major)
        for lo in range(0, n_major, step):
            hi = min(lo + step, n_major)
            k = (hi - lo) * per_major
            # one random index in each of per_major equal strata: distinct and sorted, no loop
            width = n_minor // per_major
            idx = np.arange(per_major) * width + rng.integers(0, width, size=(hi - lo, per_major))
            data.resize((data.shape[0] + k,))
            indices.resize((indices.shape[0] + k,))
            data[-k:] = rng.geometric(0.5, size=k).astype(np.float32)
            indices[-k:] = idx.ravel()
        x["indptr"] = indptr
        for name, n in (("obs", n_cells), ("var", N_GENES)):
            g = f.create_group(name)
            g.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0"})
            g.attrs.update({"_index": "_index", "column-order": np.array([], dtype="S")})
            prefix = "c" if name == "obs" else "G"
            g.create_dataset(
                "_index",
                data=np.array([f"{prefix}{i}" for i in range(n)], dtype=object),
                dtype=h5py.string_dtype(),
            )
            g["_index"].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})


def measure_child(path: str) -> None:
    """Run in a fresh process: pipeline over one file, print cells, seconds and peak RSS."""
    n, seconds, _ = pipeline(Path(path))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cells": n, "seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        measure_child(args.child)
        return
    results: dict = {"liao": [], "generated": []}
    threaded_min = chunks.MIN_CHUNKS
    for path in LIAO:
        pipeline(path)  # warm the page cache, as a repeated run would see it
        runs: dict[str, list] = {"threaded": [], "serial": []}
        for _ in range(3):  # alternating, so that both see the same machine
            for mode in runs:
                chunks.MIN_CHUNKS = threaded_min if mode == "threaded" else sys.maxsize
                runs[mode].append(pipeline(path))
        chunks.MIN_CHUNKS = threaded_min
        (n, whole, stream), (_, s_whole, s_stream) = (
            min(runs[m], key=lambda r: r[1]) for m in ("threaded", "serial")
        )
        nnz = _mean_nnz(path)
        results["liao"].append(
            {
                "file": path.name,
                "cells": n,
                "nnz_per_cell": nnz,
                "cells_per_s": n / whole,
                "streaming_cells_per_s": n / stream,
                "serial_inflate_cells_per_s": n / s_whole,
                "serial_inflate_streaming_cells_per_s": n / s_stream,
            }
        )
        print(
            f"{path.name}: {n} cells, {nnz:.0f} nnz/cell: {n / whole:,.0f} cells/s "
            f"({n / stream:,.0f} cells/s streaming, without open + gene matching); "
            f"serial inflate {n / s_whole:,.0f} ({n / s_stream:,.0f} streaming)",
            flush=True,
        )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n_cells in args.sizes:
            for layout in ("csr", "csc"):
                path = Path(tmp) / f"gen_{n_cells}_{layout}.h5ad"
                write_generated(path, n_cells, layout)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(path)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout) | {"n_cells": n_cells, "layout": layout}
                results["generated"].append(r)
                print(
                    f"{n_cells} cells {layout}: {r['cells'] / r['seconds']:,.0f} cells/s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                path.unlink()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
