"""Benchmark generative pretraining steps: cells/s, tokens/s and (on GPU) model FLOPs utilisation.

Runs real training steps (split into observed/generated tokens, forward, backward, Adam) on
real tokenized cells, for the given presets, after a few warm-up steps.

Usage: python tools/bench_train.py [--presets small whole-human] [--batch-size 32] [--steps 5]
       [--device auto] [--peak-tflops 989]   (H100/H200 dense bf16 peak, for MFU on GPU)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from scgpt_runtime.tokens import TokenConfig
from scgpt_train.data import build_vocab, open_sources, read_tokens
from scgpt_train.distributed import Dist, resolve_device
from scgpt_train.model import ModelConfig, ScGPT
from scgpt_train.pretrain import PretrainConfig, _Generative, _micro_step

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILE = DATA / "unlabelled" / "liao2020_balf_GSM4475052_C149_filtered_feature_bc_matrix.h5"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6 x matmul parameters + attention scores (x3)."""
    d, h = cfg.d_model, cfg.d_hid
    per_layer = 4 * d * d + 2 * d * h  # Wqkv, out_proj, linear1, linear2
    decoders = 3 * d * d + 2 * d * d  # expression MLP, MVC gene2query + W
    attention = 2 * 2 * seq_len * d  # QK^T and AV, per token per layer (forward)
    return 6 * (cfg.n_layer * per_layer + decoders) + 3 * cfg.n_layer * attention


def bench(preset: str, batch_size: int, steps: int, device: torch.device) -> dict:
    vocab = build_vocab([FILE])
    cfg = ModelConfig.from_name(preset, vocab_size=len(vocab), pad_id=vocab.pad_id)
    tok_cfg = TokenConfig(max_seq_len=cfg.max_seq_len, n_bins=cfg.n_bins, selection="sample")
    source = open_sources([FILE], vocab)[0]
    cells = read_tokens(source, 0, source.n_cells, vocab, tok_cfg)
    rows = np.arange(cells.n_cells)
    train = PretrainConfig(data=[str(FILE)], out="-", batch_size=batch_size, seed=0)
    torch.manual_seed(0)
    model = ScGPT(cfg).to(device).train()
    net = _Generative(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    d = Dist(device=device)
    n_tokens, n_cells, elapsed = 0, 0, 0.0
    for step in range(steps + 2):  # 2 warm-up steps
        batch = cells.take(
            rows[(step * batch_size + np.arange(batch_size)) % cells.n_cells], trim=True
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, tokens = _micro_step(net, batch, train, tok_cfg, vocab, d, step, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            elapsed += time.perf_counter() - t0
            n_tokens += tokens
            n_cells += batch_size
    seq_len = n_tokens / n_cells
    result = {
        "preset": preset,
        "device": str(device),
        "batch_size": batch_size,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_cell": round(seq_len, 1),
        "cells_per_s": round(n_cells / elapsed, 2),
        "tokens_per_s": round(n_tokens / elapsed, 1),
        "achieved_tflops": round(n_tokens * flops_per_token(cfg, int(seq_len)) / elapsed / 1e12, 4),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "whole-human"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    device = resolve_device(args.device)
    for preset in args.presets:
        r = bench(preset, args.batch_size, args.steps, device)
        if device.type == "cuda":
            r["mfu"] = round(r["achieved_tflops"] / args.peak_tflops, 4)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
