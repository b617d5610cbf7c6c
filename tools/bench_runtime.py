"""Benchmark `scgpt-run embed` against the same weights in PyTorch eager, side by side.

1. Builds (once, cached in --workdir) a model of --preset with a 7-class cell-type head,
   fine-tuned a few steps on Kang PBMC labels so that class probabilities have the margins of
   a trained model, and exports it with scgpt_export (fp32 and int8, graphs of --lengths).
2. On the first --cells cells of each Liao 10x file and --cells held-out Kang cells, each in
   a fresh process (peak RSS from wait4): `scgpt-run embed` at fp32 and int8 (and fp32 with
   the full-length graph alone, to show what length buckets give), and PyTorch eager: batches
   of --batch-size cells in file order, each padded to its longest cell, inference mode, the
   same tokens.
3. Top-1 agreement of the int8 and fp32 graphs with PyTorch (`scgpt-run annotate`), and how
   many classes PyTorch predicts (a PBMC head calls the lung lavage cells of Liao mostly one
   class: agreement means more on the held-out PBMC cells).
4. Achieved FLOP/s (matrix products and attention of the graph lengths actually run);
   with --device cuda the fp16 graph on the CUDA provider against --peak-tflops.

Usage: python tools/bench_runtime.py [--preset whole-human] [--cells 100] [--threads 2]
       [--workdir /tmp/bench_runtime] [--device cpu|cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KANG = SHARED / "labelled" / "kang2018_pbmc_counts.h5ad"
LIAO = sorted((SHARED / "unlabelled").glob("liao2020_*.h5"))
N_HEAD_CELLS = 1000  # Kang cells the model is fine-tuned on; the rest are held out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="whole-human")
    p.add_argument("--lengths", default="64,128,256,512,1200", help="graph lengths to export")
    p.add_argument("--cells", type=int, default=100, help="first cells of each Liao file")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=150, help="fine-tuning steps (cached)")
    p.add_argument("--lr", type=float, default=3e-4, help="fine-tuning learning rate")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU fp16 dense peak")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_runtime"))
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return torch_worker(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    precisions = ("fp16",) if args.device == "cuda" else ("fp32", "int8")
    bundle = build(args.workdir, args.preset, lengths, precisions, args.train_steps, args.lr)
    full_only = full_length_bundle(bundle, args.workdir, precisions[0])
    rows = []
    held_out = args.workdir / f"kang.{N_HEAD_CELLS}+{args.cells}.h5ad"
    if not held_out.exists():  # PBMC cells the model never saw: 7 classes to agree on
        import anndata as ad

        ad.read_h5ad(KANG)[N_HEAD_CELLS : N_HEAD_CELLS + args.cells].copy().write_h5ad(held_out)
    inputs = [
        (
            p.name.split("_")[2],
            subset_10x(p, args.workdir / f"{p.stem}.{args.cells}.h5", args.cells),
        )
        for p in LIAO
    ]
    for name, subset in [*inputs, ("Kang held-out", held_out)]:
        torch_row = measure_torch(args, subset, name)
        torch_probs = torch_row.pop("class_probs")
        # Agreement means something only where the model tells cells apart.
        torch_row["classes_predicted"] = len(set(np.asarray(torch_probs).argmax(1).tolist()))
        rows.append(torch_row)
        for precision, b, label in [(p, bundle, p) for p in precisions] + [
            (precisions[0], full_only, f"{precisions[0]}, {lengths[-1]} only")
        ]:
            row = measure_run(args, subset, b, precision, name, label)
            if b is bundle:
                row["top1_agreement"] = agreement(args, subset, b, precision, torch_probs)
            row["speedup"] = round(row["cells_per_s"] / torch_row["cells_per_s"], 2)
            rows.append(row)
    report = {
        "preset": args.preset,
        "lengths": lengths,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "cells_per_file": args.cells,
        "rows": rows,
        "load_average": os.getloadavg()[0],
    }
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


# The model and its bundle


def build(
    workdir: Path,
    preset: str,
    lengths: list[int],
    precisions: tuple[str, ...],
    train_steps: int,
    lr: float,
) -> Path:
    """Run and bundle of `preset` fine-tuned on Kang labels; cached in `workdir`."""
    bundle = workdir / f"bundle-{preset}-{'-'.join(map(str, lengths))}-{'-'.join(precisions)}"
    if bundle.is_dir():
        return bundle
    import torch
    from scgpt_export import export_run

    from scgpt_runtime.genes import match_genes
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.tokens import TokenConfig, tokenize
    from scgpt_train.checkpoint import RunInfo, save_run
    from scgpt_train.data import build_vocab
    from scgpt_train.model import ModelConfig, ScGPT

    vocab = build_vocab([KANG, *LIAO])
    tokens = TokenConfig(max_seq_len=lengths[-1])
    with open_counts(KANG) as counts:
        match = match_genes(counts.var, vocab)
        block = next(counts.iter_blocks(N_HEAD_CELLS, 0, N_HEAD_CELLS))
        labels = counts.read_obs("cell_type")[:N_HEAD_CELLS]
    names = sorted(set(labels))
    cfg = ModelConfig.from_name(
        preset,
        vocab_size=len(vocab),
        pad_id=vocab.pad_id,
        n_cls=len(names),
        max_seq_len=lengths[-1],
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = ScGPT(cfg).train()
    # Fine-tune encoder and head on the cell-type loss, on each cell's 63 most expressed genes
    # (fast; the model has no positions): embeddings that tell cell types apart, so that class
    # margins are those of a trained model, not of random weights.
    cells = tokenize(
        block, match.column_ids, TokenConfig(max_seq_len=64), vocab.cls_id, vocab.pad_id
    )
    inputs = [torch.from_numpy(a) for a in (cells.gene_ids, cells.values, cells.padding_mask)]
    y = torch.tensor([names.index(x) for x in labels])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    g = torch.Generator().manual_seed(0)
    for step in range(train_steps):
        rows = torch.randint(0, N_HEAD_CELLS, (32,), generator=g)
        emb = model.cell_embedding(*(a[rows] for a in inputs))
        loss = torch.nn.functional.cross_entropy(model.cls_decoder(emb), y[rows])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        if step % 10 == 0:
            print(f"fine-tuning step {step}: loss {loss.item():.3f}", file=sys.stderr)
    data = [{"file": str(KANG), "bytes": KANG.stat().st_size}]
    info = RunInfo(cfg, tokens, vocab, labels=names, provenance={"data": data})
    run = save_run(workdir / f"run-{preset}", model.eval(), info)
    export_run(
        run,
        bundle,
        max_lens=lengths,
        precisions=precisions,
        validation_cells=16,
        device="cuda" if "fp16" in precisions else "cpu",
    )
    return bundle


def full_length_bundle(bundle: Path, workdir: Path, precision: str) -> Path:
    """The same graph of the full length alone: every cell padded to max_seq_len."""
    from scgpt_runtime.bundle import load_bundle, write_bundle

    out = workdir / f"{bundle.name}-full-only"
    if out.is_dir():
        return out
    b = load_bundle(bundle)
    v = b.variant(precision)
    copy = workdir / v.path.name
    shutil.copy(v.path, copy)
    variant = type(v)(v.precision, v.max_seq_len, copy, v.errors, v.tolerance)
    return write_bundle(
        out,
        model=b.config["model"],
        tokens=b.tokens,
        vocab=b.vocab,
        variants=[variant],
        labels=b.labels,
    )


def subset_10x(src: Path, dst: Path, n: int) -> Path:
    """The first n cells of a 10x v3 file, as a 10x v3 file."""
    import h5py

    if dst.exists():
        return dst
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        m = f["matrix"]
        end = int(m["indptr"][n])
        out = g.create_group("matrix")
        f.copy(m["features"], out, "features")
        out["barcodes"] = m["barcodes"][:n]
        out["data"], out["indices"] = m["data"][:end], m["indices"][:end]
        out["indptr"] = m["indptr"][: n + 1]
        out["shape"] = np.array([m["shape"][0], n], dtype=m["shape"].dtype)
    return dst


# Measurements, each in a fresh process


# A fork carries the parent's resident memory into the child's peak RSS (this process has
# torch loaded), so a small launcher starts each measured process and reports its peak.
LAUNCHER = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def run_child(cmd: list[str], workdir: Path) -> tuple[str, float]:
    """stdout and peak RSS (MB) of a fresh process running `cmd`."""
    report = workdir / "rss.txt"
    launch = [sys.executable, "-c", LAUNCHER, str(report), *cmd]
    out = subprocess.run(launch, stdout=subprocess.PIPE, text=True, check=True).stdout
    code, rss = report.read_text().split()
    if code != "0":
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return out, int(rss) / 1024


def scgpt_run() -> list[str]:
    return [str(Path(sys.executable).with_name("scgpt-run"))]


def measure_run(args, subset: Path, bundle: Path, precision: str, name: str, label: str) -> dict:
    out = args.workdir / f"{name.replace(' ', '')}.{label.replace(' ', '').replace(',', '-')}.npy"
    cmd = [
        *scgpt_run(),
        "-q",
        "embed",
        str(subset),
        "--model",
        str(bundle),
        "--out",
        str(out),
        "--overwrite",
        "--json",
        "--precision",
        precision,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--min-gene-fraction",
        "0",
    ]
    stdout, rss = run_child(cmd, args.workdir)
    summary = json.loads(stdout)
    graphs = {int(k): v for k, v in summary["graphs"].items()}
    row = {
        "file": name,
        "engine": f"onnxruntime {label}",
        "cells": summary["n_cells"],
        "cells_per_s": summary["cells_per_s"],
        "peak_rss_mb": round(rss),
        "gflop_per_s": round(flops(bundle, graphs) / summary["run_seconds"] / 1e9, 1),
    }
    if args.device == "cuda":  # against the arithmetic limit of the GPU
        row["pct_of_peak"] = round(100 * row["gflop_per_s"] / (args.peak_tflops * 1e3), 1)
    return row


def agreement(args, subset: Path, bundle: Path, precision: str, torch_probs) -> float:
    out = args.workdir / f"agree.{precision}.csv"
    cmd = [
        *scgpt_run(),
        "-q",
        "annotate",
        str(subset),
        "--model",
        str(bundle),
        "--out",
        str(out),
        "--overwrite",
        "--precision",
        precision,
        "--device",
        args.device,
        "--min-gene-fraction",
        "0",
    ]
    run_child(cmd, args.workdir)
    import csv

    from scgpt_runtime.bundle import load_bundle

    labels = load_bundle(bundle).labels
    with out.open() as f:
        got = [r["predicted_labels"] for r in csv.DictReader(f)]
    expected = [labels[i] for i in np.asarray(torch_probs).argmax(1)]
    return round(float(np.mean([a == b for a, b in zip(got, expected, strict=True)])), 4)


def measure_torch(args, subset: Path, name: str) -> dict:
    out = args.workdir / f"{name.replace(' ', '')}.torch.json"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        str(subset),
        "--preset",
        args.preset,
        "--workdir",
        str(args.workdir),
        "--threads",
        str(args.threads),
        "--batch-size",
        str(args.batch_size),
        "--json",
        str(out),
    ]
    _, rss = run_child(cmd, args.workdir)
    result = json.loads(out.read_text())
    return {
        "file": name,
        "engine": "PyTorch eager fp32",
        "cells": result["cells"],
        "cells_per_s": result["cells_per_s"],
        "peak_rss_mb": round(rss),
        "gflop_per_s": result["gflop_per_s"],
        "class_probs": result["class_probs"],
    }


def torch_worker(args) -> None:
    """Read, tokenize and embed `--worker FILE` with PyTorch, as the runtime would."""
    import torch

    from scgpt_runtime.genes import match_genes
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.tokens import tokenize
    from scgpt_train.checkpoint import load_run

    torch.set_num_threads(args.threads)
    model, info = load_run(args.workdir / f"run-{args.preset}")
    n_head = model.cfg.n_head
    t0 = time.perf_counter()
    probs, total_flops, n = [], 0.0, 0
    with open_counts(args.worker) as counts, torch.inference_mode():
        match = match_genes(counts.var, info.vocab, min_fraction=0)
        for block in counts.iter_blocks(2048):
            cells = tokenize(
                block, match.column_ids, info.tokens, info.vocab.cls_id, info.vocab.pad_id
            )
            for i in range(0, cells.n_cells, args.batch_size):
                rows = slice(i, i + args.batch_size)
                width = 1 + int(cells.n_genes[rows].max())
                ids, values, pad = (
                    torch.from_numpy(a[rows, :width])
                    for a in (cells.gene_ids, cells.values, cells.padding_mask)
                )
                emb = model.cell_embedding(ids, values, pad)
                torch.nn.functional.normalize(emb, dim=-1)
                probs.append(torch.softmax(model.cls_decoder(emb), dim=-1).numpy())
                total_flops += len(ids) * cell_flops(model.cfg.to_dict(), width, n_head)
                n += len(ids)
    seconds = time.perf_counter() - t0
    Path(args.json).write_text(
        json.dumps(
            {
                "cells": n,
                "cells_per_s": round(n / seconds, 1),
                "gflop_per_s": round(total_flops / seconds / 1e9, 1),
                "class_probs": np.concatenate(probs).tolist(),
            }
        )
    )


def cell_flops(m: dict, length: int, n_head: int | None = None) -> float:
    """Multiply-adds x 2 of one cell at `length` tokens: the projections and feed-forward of
    every layer, and attention scores and weighted sums."""
    d, d_hid = m["d_model"], m["d_hid"]
    per_token = 2 * (4 * d * d + 2 * d * d_hid)
    return m["n_layer"] * (length * per_token + 4 * length * length * d)


def flops(bundle: Path, graphs: dict[int, int]) -> float:
    from scgpt_runtime.bundle import load_bundle

    m = load_bundle(bundle, verify=False).config["model"]
    return sum(k * cell_flops(m, length) for length, k in graphs.items())


def table(rows: list[dict]) -> str:
    head = [
        "file",
        "engine",
        "cells",
        "cells_per_s",
        "speedup",
        "peak_rss_mb",
        "gflop_per_s",
        "pct_of_peak",
        "top1_agreement",
        "classes_predicted",
    ]
    head = [h for h in head if any(h in r for r in rows)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in head) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
