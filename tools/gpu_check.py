"""The GPU check: what a lent NVIDIA machine measures, in one call (`tools/gpu_check.sh`).

    tools/gpu_check.sh [--dry-run] [--out results.json] [--wheels DIR]

1. The machine: python, torch and CUDA, the GPU, onnxruntime and its execution providers.
2. Serving: a whole-human-shaped model (d_model 512, 12 layers, 60,697 tokens, random
   weights) exported fp16 at 1,200 tokens and validated on the CUDA provider, loaded by the
   runtime on `--device cuda` (which refuses a silent CPU fallback), then full-length cells
   embedded in batches of 64: cells/s and TFLOP/s against the GPU's dense fp16 peak. Where
   onnxruntime has no CUDA provider (a CPU-only build, as this workplace's GPU image has; the
   onnxruntime-gpu wheel, 255 MB, is too large to carry) this part says so and is skipped,
   and the same model is timed in PyTorch fp16 instead (labelled as such: not the runtime).
3. Training: bf16 generative pretraining steps of the whole-human preset at batch 32 on
   synthetic cells of 1,200 tokens: steps/s, tokens/s, TFLOP/s and MFU against the bf16 peak.

--dry-run runs the same code on the CPU with the small preset, 64 tokens and small batches,
so that the script is known to work before a GPU is lent. All figures go to one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

PEAK_TFLOPS = {"fp16": 989.0, "bf16": 989.0}  # H100/H200 SXM dense, the vendor's datasheet
FULL = {
    "preset": "whole-human",
    "length": 1200,
    "serve_batch": 64,
    "train_batch": 32,
    "serve_calls": 20,
    "train_steps": 20,
    "n_genes": 60_694,
}
DRY = {
    "preset": "small",
    "length": 64,
    "serve_batch": 4,
    "train_batch": 4,
    "serve_calls": 2,
    "train_steps": 2,
    "n_genes": 2000,
}


def machine() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def make_run(work: Path, sizes: dict[str, Any]) -> Path:
    """A run of the preset with random weights and a synthetic vocabulary."""
    import torch

    from scgpt_runtime.tokens import TokenConfig
    from scgpt_runtime.vocab import Vocab
    from scgpt_train.checkpoint import RunInfo, save_run
    from scgpt_train.model import ModelConfig, ScGPT

    vocab = Vocab.from_genes(f"G{i}" for i in range(sizes["n_genes"]))
    cfg = ModelConfig.from_name(
        sizes["preset"], vocab_size=len(vocab), pad_id=vocab.pad_id, max_seq_len=sizes["length"]
    )
    torch.manual_seed(0)
    info = RunInfo(cfg, TokenConfig(max_seq_len=sizes["length"]), vocab)
    return save_run(work / "run", ScGPT(cfg).eval(), info)


def full_length_cells(vocab_size: int, n: int, length: int, cls_id: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(vocab_size - 3, size=(n, length - 1)), axis=1)
    return {
        "gene_ids": np.concatenate([np.full((n, 1), cls_id), ids], 1).astype(np.int64),
        "values": np.concatenate(
            [np.zeros((n, 1)), rng.integers(1, 51, (n, length - 1))], 1
        ).astype(np.float32),
        "padding_mask": np.zeros((n, length), dtype=bool),
    }


def serving(run: Path, work: Path, sizes: dict[str, Any], device: str) -> dict[str, Any]:
    """Export fp16, serve it on `device` through the runtime, full-length throughput."""
    from scgpt_export import export_run
    from scgpt_export.ladder import layer_cost
    from scgpt_runtime.served import ServedModel

    t0 = time.perf_counter()
    export_run(
        run,
        work / "bundle",
        max_lens=[sizes["length"]],
        precisions=("fp16",),
        validation_cells=4,
        device=device,
    )
    export_s = time.perf_counter() - t0
    model = ServedModel.load(
        work / "bundle", device=device, precision="fp16", batch_size=sizes["serve_batch"]
    )
    cfg = model.bundle.config["model"]
    cells = full_length_cells(
        cfg["vocab_size"], sizes["serve_batch"], sizes["length"], model.bundle.vocab.cls_id
    )
    model.infer(cells)  # warm-up: kernels chosen, buffers bound
    t0 = time.perf_counter()
    for _ in range(sizes["serve_calls"]):
        model.infer(cells)
    seconds = time.perf_counter() - t0
    n = sizes["serve_calls"] * sizes["serve_batch"]
    flop = 2 * cfg["n_layer"] * float(layer_cost(sizes["length"], cfg["d_model"], cfg["d_hid"]))
    tflops = n * flop / seconds / 1e12
    return {
        "execution_provider": model.provider,
        "export_seconds": round(export_s, 1),
        "length": sizes["length"],
        "batch": sizes["serve_batch"],
        "cells_per_s": round(n / seconds, 1),
        "tflops": round(tflops, 2),
        "pct_of_fp16_peak": round(100 * tflops / PEAK_TFLOPS["fp16"], 2),
    }


def pytorch_serving(sizes: dict[str, Any], device: str) -> dict[str, Any]:
    """The same shape in PyTorch, fp16 weights, eval mode: cells/s at full length."""
    import torch

    from scgpt_export.ladder import layer_cost
    from scgpt_runtime.vocab import Vocab
    from scgpt_train.model import ModelConfig, ScGPT

    vocab = Vocab.from_genes(f"G{i}" for i in range(sizes["n_genes"]))
    cfg = ModelConfig.from_name(sizes["preset"], vocab_size=len(vocab), pad_id=vocab.pad_id)
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = ScGPT(cfg).to(device, dtype).eval()
    cells = full_length_cells(len(vocab), sizes["serve_batch"], sizes["length"], vocab.cls_id)
    ids, values, pad = (torch.from_numpy(a).to(device) for a in cells.values())
    values = values.to(dtype)
    with torch.no_grad():
        model.cell_embedding(ids, values, pad)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(sizes["serve_calls"]):
            model.cell_embedding(ids, values, pad)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n = sizes["serve_calls"] * sizes["serve_batch"]
    flop = 2 * cfg.n_layer * float(layer_cost(sizes["length"], cfg.d_model, cfg.d_hid))
    tflops = n * flop / seconds / 1e12
    return {
        "engine": f"PyTorch eager, {str(dtype).split('.')[-1]}",
        "length": sizes["length"],
        "batch": sizes["serve_batch"],
        "cells_per_s": round(n / seconds, 1),
        "tflops": round(tflops, 2),
        "pct_of_fp16_peak": round(100 * tflops / PEAK_TFLOPS["fp16"], 2),
    }


def training(sizes: dict[str, Any], device: str) -> dict[str, Any]:
    """bf16 generative pretraining steps on synthetic full-length cells."""
    import torch

    from scgpt_runtime.tokens import TokenBlock, TokenConfig
    from scgpt_runtime.vocab import Vocab
    from scgpt_train.distributed import Dist
    from scgpt_train.model import ModelConfig, ScGPT
    from scgpt_train.pretrain import PretrainConfig, _Generative, _micro_step

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import flops_per_token

    vocab = Vocab.from_genes(f"G{i}" for i in range(sizes["n_genes"]))
    cfg = ModelConfig.from_name(
        sizes["preset"], vocab_size=len(vocab), pad_id=vocab.pad_id, max_seq_len=sizes["length"]
    )
    tok = TokenConfig(max_seq_len=sizes["length"])
    b, length = sizes["train_batch"], sizes["length"]
    inputs = full_length_cells(len(vocab), b, length, vocab.cls_id)
    cells = TokenBlock(inputs, np.full(b, length - 1), 0)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = ScGPT(cfg).to(dev).train()
    net, optimizer = _Generative(model), torch.optim.Adam(model.parameters(), lr=1e-4)
    train = PretrainConfig(data=["-"], out="-", batch_size=b, seed=0)
    steps, tokens, elapsed = sizes["train_steps"], 0, 0.0
    for step in range(steps + 2):  # two warm-up steps
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, n = _micro_step(net, cells, train, tok, vocab, Dist(device=dev), step, 0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            elapsed, tokens = elapsed + time.perf_counter() - t0, tokens + n
    tflops = tokens * flops_per_token(cfg, length) / elapsed / 1e12
    return {
        "preset": sizes["preset"],
        "batch": b,
        "length": length,
        "autocast": dev.type == "cuda",
        "steps_per_s": round(steps / elapsed, 3),
        "tokens_per_s": round(tokens / elapsed),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / PEAK_TFLOPS["bf16"], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, small sizes: test the script")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check.json")
    args = p.parse_args()
    sizes = DRY if args.dry_run else FULL
    report: dict[str, Any] = {"dry_run": args.dry_run, "machine": machine()}
    print(json.dumps(report["machine"]), flush=True)
    cuda_ep = "CUDAExecutionProvider" in report["machine"]["providers"]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), sizes)
        if args.dry_run or cuda_ep:
            report["serving"] = serving(run, Path(tmp), sizes, "cpu" if args.dry_run else "cuda")
        else:
            report["serving"] = {
                "skipped": "this onnxruntime has no CUDA execution provider "
                f"(it has {report['machine']['providers']}): carry onnxruntime-gpu"
            }
        print(json.dumps(report["serving"]), flush=True)
    report["serving_pytorch"] = pytorch_serving(sizes, "cpu" if args.dry_run else "cuda")
    print(json.dumps(report["serving_pytorch"]), flush=True)
    report["training"] = training(sizes, "cpu" if args.dry_run else "cuda")
    print(json.dumps(report["training"]), flush=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
