"""Reference mapping search speed: query cells per second against references of 10k, 100k and
1M cells, the exact numpy search and faiss candidates (the same neighbours), peak RSS.

    python tools/bench_reference.py [--d 512] [--queries 1000] [--sizes 10000,100000,1000000]
        [--workdir /tmp/bench_reference] [--json OUT]

Synthetic L2-normalised embeddings (seeded Gaussian; the search cost does not depend on what
the cells are), written once as .npy files and memory-mapped, as a reference file is; each
measurement runs in a fresh process (k = 10) and reports its peak RSS, which includes the
pages of the reference it touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from bench_runtime import run_child

CHILD = """
import json, sys, time
import numpy as np
from scgpt_runtime.knn import search
reference = np.load(sys.argv[1], mmap_mode="r")
query = np.load(sys.argv[2])
t = time.perf_counter()
idx, dist = search(query, reference, 10, backend=sys.argv[3])
seconds = time.perf_counter() - t
np.save(sys.argv[4], idx)
rate = round(len(query) / seconds, 1)
print(json.dumps({"seconds": round(seconds, 2), "query_cells_per_s": rate}))
"""


def embeddings(path: Path, n: int, d: int, seed: int) -> Path:
    if not path.exists():
        rng = np.random.default_rng(seed)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        for lo in range(0, n, 100_000):
            x = rng.normal(size=(min(100_000, n - lo), d))
            out[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_reference"))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    query = embeddings(work / f"query-{args.queries}-{args.d}.npy", args.queries, args.d, 1)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        ref = embeddings(work / f"reference-{n}-{args.d}.npy", n, args.d, 0)
        results = {}
        for backend in ("numpy", "faiss"):
            out = work / f"idx-{n}-{backend}.npy"
            cmd = [sys.executable, "-c", CHILD, str(ref), str(query), backend, str(out)]
            stdout, rss = run_child(cmd, work)
            results[backend] = np.load(out)
            rows.append(
                {
                    "reference_cells": n,
                    "backend": backend,
                    **json.loads(stdout),
                    "peak_rss_mb": round(rss),
                }
            )
        rows[-1]["same_neighbours"] = bool(np.array_equal(results["numpy"], results["faiss"]))
    print(
        f"| reference cells | search | query cells/s | seconds, {args.queries} queries | peak RSS |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['reference_cells']:,} | {r['backend']} | {r['query_cells_per_s']:,} | "
            f"{r['seconds']} | {r['peak_rss_mb']:,} MB |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
