"""Build the model bundles the runtime tests serve, so that those tests need no PyTorch.

    python tools/build_test_bundles.py            # rewrites tests/fixtures/bundles/

Writes, from the "small" preset (d_model 64, 2 layers) with a 7-class head, trained 150 steps
on real Kang PBMC cells, with a vocabulary of the 2,000 Kang genes found in most cells that
the Liao 10x files also have:
- small-v1/: the run exported by the previous release (RELEASE, format 1: one graph file per
  precision and length, each with its own weights), fp32 and int8 graphs of 64 and 256 tokens;
- small/: the same run exported by this checkout (format 2: one graph per precision serves
  both lengths), the same precisions and lengths;
- reference.npz: PyTorch's outputs on the first 200 cells of the Kang file and of Liao C149
  (cell_emb, cell_emb_normalized, class_probs, n_genes per file), tokenized as the bundle says.

The previous release's code comes from `git archive RELEASE` and runs in a child process with
it first on sys.path; training uses only what both releases share. Needs torch and ../shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "bundles"
WORK = Path("build/test-bundles")  # relative to ROOT (ignored by git)
RELEASE = "e63dfa7"  # the last commit that wrote bundle format 1
KANG = Path("../shared/data/labelled/kang2018_pbmc_counts.h5ad")
LIAO = Path("../shared/data/unlabelled/liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5")
N_GENES, N_TRAIN, N_CELLS = 2000, 512, 200
MAX_LEN, SHORT = 256, 64
EXPORT = {"max_lens": [SHORT, MAX_LEN], "precisions": ("fp32", "int8"), "validation_cells": 32}


def train_run(run: Path) -> None:
    """The small model with a 7-class head, 150 Adam steps on Kang cells."""
    import torch

    from scgpt_runtime.genes import match_genes
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.tokens import TokenConfig, tokenize
    from scgpt_runtime.vocab import Vocab
    from scgpt_train.checkpoint import RunInfo, save_run
    from scgpt_train.model import ModelConfig, ScGPT

    with open_counts(LIAO) as liao:
        liao_genes = set(liao.var["name"].tolist())
    with open_counts(KANG) as counts:
        names = counts.var["index"]
        detected = np.zeros(len(names))
        for block in counts.iter_blocks(4096):
            detected += np.bincount(block.indices, minlength=len(names))
        shared = [i for i in np.argsort(-detected, kind="stable") if names[i] in liao_genes]
        vocab = Vocab.from_genes(names[np.sort(shared[:N_GENES])])
        match = match_genes(counts.var, vocab)
        block = next(counts.iter_blocks(N_TRAIN, 0, N_TRAIN))
        labels = counts.read_obs("cell_type")[:N_TRAIN]
    tokens = TokenConfig(max_seq_len=MAX_LEN)
    cells = tokenize(block, match.column_ids, tokens, vocab.cls_id, vocab.pad_id).trim()
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(x) for x in labels])
    cfg = ModelConfig.from_name(
        "small",
        vocab_size=len(vocab),
        pad_id=vocab.pad_id,
        n_cls=len(classes),
        max_seq_len=MAX_LEN,
        dropout=0.0,
    )
    torch.manual_seed(0)
    model = ScGPT(cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs = [torch.from_numpy(a) for a in (cells.gene_ids, cells.values, cells.padding_mask)]
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        rows = torch.randint(0, N_TRAIN, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(
            model(*(a[rows] for a in inputs))["cls_output"], y[rows]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    data = [{"file": str(KANG), "bytes": KANG.stat().st_size}]
    info = RunInfo(cfg, tokens, vocab, labels=classes, provenance={"data": data, "command": "test"})
    save_run(run, model.eval(), info)


def release_code(work: Path) -> Path:
    """The previous release's source tree (git archive RELEASE), unpacked under `work`."""
    code = work / "release"
    code.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", RELEASE], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(code)], input=archive, check=True)
    return code


def previous_release(run: Path, out: Path, work: Path) -> None:
    """The run trained and exported (format 1) by the code of RELEASE, in a child process."""
    env = {**os.environ, "PYTHONPATH": str(release_code(work))}
    stage = [sys.executable, str(Path(__file__).resolve()), "--stage-release", str(run), str(out)]
    subprocess.run(stage, check=True, env=env, cwd=ROOT)


def release_stage(run: Path, out: Path) -> None:
    """Runs with RELEASE's code first on sys.path (its exporter is the package `export`)."""
    from export import export_run  # the previous layout: the export/ folder

    train_run(run)
    export_run(run, out, **EXPORT)


def reference(run: Path, bundle: Path) -> dict[str, np.ndarray]:
    import torch

    from scgpt_runtime.bundle import load_bundle
    from scgpt_runtime.genes import match_genes
    from scgpt_runtime.io import open_counts
    from scgpt_runtime.tokens import tokenize
    from scgpt_train.checkpoint import load_run

    model, _ = load_run(run)
    b = load_bundle(bundle)
    out = {}
    for name, path in (("kang", KANG), ("liao", LIAO)):
        with open_counts(path) as counts:
            match = match_genes(counts.var, b.vocab, min_fraction=0.1)
            block = next(counts.iter_blocks(N_CELLS, 0, N_CELLS))
        cells = tokenize(block, match.column_ids, b.tokens, b.vocab.cls_id, b.vocab.pad_id).trim()
        with torch.no_grad():
            emb = model.cell_embedding(*(torch.from_numpy(a) for a in cells.inputs.values()))
            out[f"{name}_cell_emb"] = emb.numpy()
            out[f"{name}_cell_emb_normalized"] = torch.nn.functional.normalize(emb, dim=-1).numpy()
            out[f"{name}_class_probs"] = torch.softmax(model.cls_decoder(emb), dim=-1).numpy()
        out[f"{name}_n_genes"] = cells.n_genes
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage-release", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.chdir(ROOT)  # the paths recorded in the bundles are relative to the checkout
    os.environ.setdefault("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01: reproducible records
    if args.stage_release:
        release_stage(*args.stage_release)
        return
    from scgpt_export import export_run

    work = WORK  # a fixed relative path: the bundles record it, and rebuilds must not differ
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run, v1 = work / "run", work / "small-v1"
    previous_release(run, v1, work)
    v2 = export_run(run, work / "small", **EXPORT)["bundle"]
    np.savez(work / "reference.npz", **reference(run, Path(v2)))
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for name in ("small-v1", "small", "reference.npz"):
        shutil.move(work / name, OUT / name)
    shutil.rmtree(work)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
