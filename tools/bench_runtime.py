"""The official scGPT embedding loop against `scgpt-run embed` on its defaults, side by side.

1. Builds (once, cached in --workdir) an official-layout checkpoint of --preset (whole-human:
   d 512, 12 layers, 8 heads; best_model.pt, args.json, vocab.json): the model is briefly
   fine-tuned on Kang PBMC labels so that its embeddings tell cells apart (int8 is validated on
   something like trained weights), then saved without its head, as the official release is.
2. As a user would: `scgpt-train import-scgpt CKPT --out RUN` and `scgpt-train export RUN --out
   BUNDLE`, both on their defaults (no cells known: fp32, fp16, int8 at lengths halving from
   1,200, each kept where it passes validation on synthetic cells), and the old default export
   beside it (one fp32 graph at 1,200 tokens).
3. On the first --cells cells of each --files file (.h5ad copies, read by both), each engine in
   a fresh process, wall-clock seconds of the whole process and peak RSS:
   - the official loop (scgpt.tasks.cell_emb.get_batch_cell_embeddings, written again here):
     the matrix densified, batches of 64 cells in file order padded to their longest cell (at
     most 1,200 tokens, 1,199 genes sampled at random beyond), random tie-breaking bins,
     PyTorch eager fp32 under no_grad, <cls> output L2-normalised;
   - `scgpt-run embed FILE --model BUNDLE --out X` with no other option (int8 on a CPU where
     the bundle has it, else fp32), and
     with `--precision fp32`, and on the old one-graph bundle.
4. Cosine agreement of the default embedding with the fp32 one, and of the official
   loop's with fp32 (its random ties and sampling are the difference).
5. With --grid: `scgpt-run embed` on the first file at each --batch-sizes x --thread-counts,
   each precision of the bundle: what the defaults were chosen from.

Usage: python tools/bench_runtime.py [--preset whole-human] [--cells 128] [--files C144,Kang]
       [--grid] [--workdir /tmp/bench_runtime] [--json OUT]
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
LIAO = {p.name.split("_")[3]: p for p in sorted((SHARED / "unlabelled").glob("liao2020_*.h5"))}
N_HEAD_CELLS = 1000  # Kang cells the model is fine-tuned on; later ones are held out
OFFICIAL_BATCH, OFFICIAL_MAX_LEN = 64, 1200  # get_batch_cell_embeddings defaults


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="whole-human")
    p.add_argument("--cells", type=int, default=128, help="first cells of each file")
    p.add_argument("--files", default="C144,Kang", help="of C144, C146, C149, Kang (held out)")
    p.add_argument("--train-steps", type=int, default=60, help="fine-tuning steps (cached)")
    p.add_argument("--grid", action="store_true", help="batch sizes x threads on the first file")
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--thread-counts", default="1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_runtime"))
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # CKPT FILE OUT.npy
    args = p.parse_args()
    if args.worker:
        return official_loop(*map(Path, args.worker))
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = official_checkpoint(args.workdir / f"official-{args.preset}", args.preset, args)
    bundle = import_and_export(ckpt, args.workdir)
    old = one_graph_bundle(bundle, args.workdir)
    rows, agreement = [], []
    files = [input_file(name, args.cells, args.workdir) for name in args.files.split(",")]
    for name, path in files:
        off_npy = args.workdir / f"{name}.official.npy"
        off = measure(
            name, "official loop, PyTorch fp32", official_cmd(ckpt, path, off_npy), args.workdir
        )
        rows.append(off)
        engines = [
            ("scgpt-run embed, defaults", bundle, []),
            ("scgpt-run embed --precision fp32", bundle, ["--precision", "fp32"]),
            ("scgpt-run embed, old default bundle", old, []),
        ]
        embeddings = {}
        for label, b, extra in engines:
            out = args.workdir / f"{name}.{len(embeddings)}.npy"
            out.unlink(missing_ok=True)  # the command as a user types it: no --overwrite
            row = measure(name, label, embed_cmd(path, b, out, extra), args.workdir)
            row["vs_official"] = round(off["seconds"] / row["seconds"], 2)
            rows.append(row)
            embeddings[label] = np.load(out)
        fp32 = embeddings["scgpt-run embed --precision fp32"]
        agreement.append(
            {"file": name}
            | cosines("default vs fp32", embeddings["scgpt-run embed, defaults"], fp32)
            | cosines("official loop vs fp32", np.load(off_npy), fp32)
        )
    report = {
        "preset": args.preset,
        "cells_per_file": args.cells,
        "bundle": describe_bundle(bundle),
        "rows": rows,
        "agreement": agreement,
        "load_average": os.getloadavg()[0],
    }
    print(table(rows))
    print(table(agreement))
    if args.json:  # written before the grid, which takes long, and again with it
        args.json.write_text(json.dumps(report, indent=1))
    if args.grid:
        report["grid"] = run_grid(args, bundle, files[0])
        print(table(report["grid"]))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))


# The checkpoint, its import and export


def official_checkpoint(folder: Path, preset: str, args) -> Path:
    """An official model folder of `preset`, its encoder fine-tuned on Kang labels; cached."""
    if (folder / "best_model.pt").is_file():
        return folder
    import torch

    from scgpt_runtime.genes import match_genes
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.tokens import TokenConfig, tokenize
    from scgpt_train.data import build_vocab
    from scgpt_train.model import ModelConfig, ScGPT

    vocab = build_vocab([KANG, *LIAO.values()])
    with open_counts(KANG) as counts:
        match = match_genes(counts.var, vocab)
        block = next(counts.iter_blocks(N_HEAD_CELLS, 0, N_HEAD_CELLS))
        labels = counts.read_obs("cell_type")[:N_HEAD_CELLS]
    names = sorted(set(labels))
    cfg = ModelConfig.from_name(
        preset, vocab_size=len(vocab), pad_id=vocab.pad_id, n_cls=len(names), dropout=0.0
    )
    torch.manual_seed(0)
    model = ScGPT(cfg).train()
    # Encoder and head on the cell-type loss, each cell's 63 most expressed genes (fast; the
    # model has no positions): weights whose embeddings separate cell types, unlike random ones.
    cells = tokenize(
        block, match.column_ids, TokenConfig(max_seq_len=64), vocab.cls_id, vocab.pad_id
    )
    inputs = [torch.from_numpy(a) for a in (cells.gene_ids, cells.values, cells.padding_mask)]
    y = torch.tensor([names.index(x) for x in labels])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    g = torch.Generator().manual_seed(0)
    for step in range(args.train_steps):
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
    # Our parameter names are the official ones (model.py); the release has no cell-type head.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("cls_decoder.")}
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / "best_model.pt")
    official_args = {
        "embsize": cfg.d_model,
        "nheads": cfg.n_head,
        "d_hid": cfg.d_hid,
        "nlayers": cfg.n_layer,
        "n_layers_cls": 3,
        "dropout": 0.2,
        "pad_token": "<pad>",
        "pad_value": -2,
        "mask_value": -1,
        "n_bins": 51,
        "max_seq_len": OFFICIAL_MAX_LEN,
        "input_emb_style": "continuous",
        "input_style": "binned",
    }
    (tmp / "args.json").write_text(json.dumps(official_args))
    vocab.to_json(tmp / "vocab.json")
    tmp.rename(folder)
    return folder


def cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def import_and_export(ckpt: Path, workdir: Path) -> Path:
    """`import-scgpt` then `export`, each on its defaults; cached."""
    run, bundle = workdir / "imported", workdir / "bundle"
    if not bundle.is_dir():
        shutil.rmtree(run, ignore_errors=True)
        subprocess.run(
            [cli("scgpt-train"), "import-scgpt", str(ckpt), "--out", str(run)], check=True
        )
        t0 = time.perf_counter()
        subprocess.run([cli("scgpt-train"), "export", str(run), "--out", str(bundle)], check=True)
        (workdir / "export_seconds.txt").write_text(f"{time.perf_counter() - t0:.0f}")
    return bundle


def one_graph_bundle(bundle: Path, workdir: Path) -> Path:
    """The old default export: the fp32 graph at the full length alone."""
    from scgpt_runtime.bundle import load_bundle, write_bundle

    out = workdir / "bundle-fp32-1200-only"
    if out.is_dir():
        return out
    b = load_bundle(bundle)
    v = max((v for v in b.variants if v.precision == "fp32"), key=lambda v: v.max_seq_len)
    copy = workdir / v.path.name
    shutil.copy(v.path, copy)
    variant = type(v)(v.precision, v.max_seq_len, copy, v.errors, v.tolerance)
    return write_bundle(
        out, model=b.config["model"], tokens=b.tokens, vocab=b.vocab, variants=[variant]
    )


def describe_bundle(bundle: Path) -> dict:
    from scgpt_runtime.bundle import load_bundle

    b = load_bundle(bundle, verify=False)
    seconds = (bundle.parent / "export_seconds.txt").read_text()
    lengths = sorted({v.max_seq_len for v in b.variants})
    return {"precisions": b.precisions, "lengths": lengths, "export_seconds": int(seconds)}


def input_file(name: str, n: int, workdir: Path) -> tuple[str, Path]:
    """The first `n` cells of a Liao file, or `n` held-out Kang cells, as an .h5ad."""
    import anndata as ad

    dst = workdir / f"{name}.{n}.h5ad"
    if dst.exists():
        return name, dst
    if name == "Kang":
        ad.read_h5ad(KANG)[N_HEAD_CELLS : N_HEAD_CELLS + n].copy().write_h5ad(dst)
        return name, dst
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.io.write import write_new_h5ad

    with open_counts(subset_10x(LIAO[name], workdir / f"{name}.{n}.h5", n)) as counts:
        write_new_h5ad(dst, counts)  # var as scanpy reads a 10x file: symbols, gene_ids
    return name, dst


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
    return [cli("scgpt-run")]


def subset_10x(src: Path, dst: Path, n: int) -> Path:
    """The first n cells of a 10x v3 file (made once)."""
    from fuzz_corpus import first_cells_10x  # tools/ is on sys.path when run as a script

    return dst if dst.exists() else first_cells_10x(src, dst, n)


def measure(name: str, label: str, cmd: list[str], workdir: Path) -> dict:
    """Wall-clock seconds (start-up and model loading included) and peak RSS of `cmd`."""
    t0 = time.perf_counter()
    _, rss = run_child(cmd, workdir)
    seconds = time.perf_counter() - t0
    print(f"{name}: {label}: {seconds:.1f} s", file=sys.stderr)
    return {"file": name, "engine": label, "seconds": round(seconds, 1), "peak_rss_mb": round(rss)}


def embed_cmd(path: Path, bundle: Path, out: Path, extra: list[str]) -> list[str]:
    return [
        *scgpt_run(),
        "-q",
        "embed",
        str(path),
        "--model",
        str(bundle),
        *extra,
        "--out",
        str(out),
    ]


def official_cmd(ckpt: Path, path: Path, out: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", str(ckpt), str(path), str(out)]


def official_loop(ckpt: Path, path: Path, out: Path) -> None:
    """get_batch_cell_embeddings of the official code, on the CPU, written with our model."""
    import anndata as ad
    import torch

    from scgpt_train.official import load_official_folder

    official = load_official_folder(ckpt)
    model, vocab = official.model, official.vocab
    adata = ad.read_h5ad(path)
    keep = np.array([g in vocab for g in adata.var_names])
    adata = adata[:, keep]
    gene_ids = np.array([vocab[g] for g in adata.var_names])
    count_matrix = adata.X.toarray()  # the official loop densifies (`.A`)
    rng = np.random.default_rng()  # official ties and sampling come from a global RNG
    embeddings = []
    with torch.no_grad():
        for lo in range(0, len(count_matrix), OFFICIAL_BATCH):
            ids, values = collate(count_matrix[lo : lo + OFFICIAL_BATCH], gene_ids, vocab, rng)
            pad = torch.from_numpy(ids == vocab.pad_id)
            emb = model.encode(torch.from_numpy(ids), torch.from_numpy(values), pad)[:, 0]
            embeddings.append(emb.numpy())
    emb = np.concatenate(embeddings)
    np.save(out, emb / np.linalg.norm(emb, axis=1, keepdims=True))


def collate(rows: np.ndarray, gene_ids: np.ndarray, vocab, rng) -> tuple[np.ndarray, np.ndarray]:
    """The official DataCollator: bin each cell's non-zero values (random ties), <cls> first
    with value -2, 1,199 genes sampled where there are more, pad to the batch's longest."""
    from scgpt_runtime.binning import bin_values
    from scgpt_runtime.csr import CsrBlock

    cells = []
    for row in rows:
        nz = np.flatnonzero(row)
        block = CsrBlock(
            row[nz].astype(np.float32), np.arange(len(nz)), np.array([0, len(nz)]), len(nz)
        )
        bins = bin_values(block, mode="official", seed=int(rng.integers(2**31))).data
        genes = gene_ids[nz]
        if len(nz) > OFFICIAL_MAX_LEN - 1:
            pick = np.sort(rng.choice(len(nz), OFFICIAL_MAX_LEN - 1, replace=False))
            genes, bins = genes[pick], bins[pick]
        cells.append((np.r_[vocab.cls_id, genes], np.r_[-2.0, bins]))
    width = max(len(g) for g, _ in cells)
    ids = np.full((len(cells), width), vocab.pad_id, dtype=np.int64)
    values = np.full((len(cells), width), -2.0, dtype=np.float32)
    for i, (g, v) in enumerate(cells):
        ids[i, : len(g)], values[i, : len(v)] = g, v
    return ids, values


def cosines(what: str, a: np.ndarray, b: np.ndarray) -> dict:
    """Per-cell cosine of two L2-normalised embeddings: mean and least."""
    c = np.sum(a * b, axis=1)
    return {f"{what}: mean": round(float(c.mean()), 4), f"{what}: least": round(float(c.min()), 4)}


def run_grid(args, bundle: Path, first: tuple[str, Path]) -> list[dict]:
    """`scgpt-run embed` at each batch size x thread count, each precision of the bundle."""
    name, path = first
    rows = []
    served = describe_bundle(bundle)["precisions"]
    for precision in [p for p in ("int8", "fp32") if p in served]:
        for threads in map(int, args.thread_counts.split(",")):
            for batch in map(int, args.batch_sizes.split(",")):
                extra = ["--precision", precision, "--threads", str(threads)]
                extra += ["--batch-size", str(batch), "--json", "--overwrite"]
                out = args.workdir / "grid.npy"
                stdout, _ = run_child(embed_cmd(path, bundle, out, extra), args.workdir)
                summary = json.loads(stdout)
                rows.append(
                    {
                        "file": name,
                        "precision": precision,
                        "threads": threads,
                        "batch_size": batch,
                        "cells_per_s": summary["cells_per_s"],
                    }
                )
                print(rows[-1], file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in head) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
