"""`ServedModel`: a bundle's graphs loaded on one device, run on tokenized cells.

How cells are batched, so that results never depend on the batch size, the block size, the
thread count or the shard split (tests/runtime/test_model.py asserts it bit for bit):
- Each cell runs on the graph of the shortest length that holds its tokens, chosen from the
  cell alone (never from the other cells of a batch).
- fp32 and fp16 graphs compute every cell independently of the others in a batch: on the CPU
  onnxruntime's kernels give bitwise-identical rows whatever the batch size and thread count
  (the tests assert it). On CUDA every call gets the same batch shape (short batches are padded
  with <cls>-only cells), so that cuBLAS picks the same kernels for every batch.
- int8 graphs quantize activations with one scale per tensor, which spans the whole batch: a
  cell's result would depend on the cells beside it. int8 therefore runs one cell per call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .bundle import (
    CELL_EMB,
    CELL_EMB_NORMALIZED,
    CONFIG_FILE,
    Bundle,
    load_bundle,
    load_gene_embeddings,
)
from .errors import BundleError, GeneMatchError
from .session import DEVICES, Runner, resolve_device
from .tokens import PAD_MASK, TokenBlock, empty_block

log = logging.getLogger(__name__)

PRECISION_ORDER = {"cuda": ("fp16", "fp32", "int8"), "cpu": ("int8", "fp32", "fp16")}
BATCH_SIZE = {"cuda": 64, "cpu": 16}  # cells per graph call
# A CPU call holds (batch, n_head, L, L) float32 attention scores: the batch is capped to keep
# them below this many bytes per worker (8 heads: 1 cell of 1200 tokens, 8 of 512, 16 of 256).
# Long cells one at a time are also the fastest on the CPU (measured: docs/benchmarks.md).
CPU_ATTENTION_BYTES = 64 << 20


def default_bundle() -> Path | None:
    """The bundle used when none is given: the default model shipped inside this package
    (docs/default-model.md); None where the package was installed without it."""
    path = Path(__file__).parent / "default_model"
    return path if (path / CONFIG_FILE).is_file() else None


def bundle_or_default(bundle: str | Path | None) -> str | Path:
    """`bundle`, or the default model when None; BundleError where there is none."""
    if bundle is None:
        bundle = default_bundle()
        if bundle is None:
            raise BundleError(
                "no model bundle given and no default model installed: pass --model BUNDLE"
            )
    return bundle


def gene_embeddings(
    bundle: Bundle, genes: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """The gene embeddings stored in `bundle` (see `ServedModel.gene_embeddings`)."""
    table = load_gene_embeddings(bundle)
    vocab = bundle.vocab
    if genes is None:
        # A gene's name looked up among the genes finds its own id; the special tokens and the
        # tokens of other namespaces (a protein CD4 beside the gene CD4) do not.
        ids = np.flatnonzero(vocab.lookup(vocab.names) == np.arange(len(vocab)))
    else:
        genes = [str(g) for g in genes]
        ids = vocab.lookup(genes)
        if unknown := [g for g, i in zip(genes, ids.tolist(), strict=True) if i < 0]:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise GeneMatchError(
                f"{bundle.path}: {len(unknown)} of {len(genes)} genes are not in the model "
                f"vocabulary: {', '.join(unknown[:5])}{more} (names are exact and case-sensitive)"
            )
    return [vocab.names[i] for i in ids], table[ids]


def default_threads() -> int:
    """OMP_NUM_THREADS where it is set to a positive integer (what HPC schedulers and users set
    to share a node), else every CPU this process may use."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_precision(bundle: Bundle, device: str, precision: str = "auto") -> str:
    """`precision`, checked against the bundle; "auto": the first the bundle has of fp16,
    fp32, int8 on CUDA and of int8, fp32, fp16 on the CPU."""
    if precision == "auto":
        return next(p for p in PRECISION_ORDER[device] if p in bundle.precisions)
    bundle.variant(precision)  # BundleError naming the precisions the bundle has
    return precision


class ServedModel:
    """A loaded bundle with onnxruntime sessions on one device; see the module docstring."""

    def __init__(self, bundle: Bundle, device: str, precision: str, threads: int, batch_size: int):
        self.bundle = bundle
        self.device = device  # "cuda" or "cpu": what runs, checked
        self.precision = precision
        self.threads = threads
        self.batch_size = batch_size
        self._lengths = sorted(v.max_seq_len for v in bundle.variants if v.precision == precision)
        self._runners: dict[Path, Runner] = {}  # one session per graph file
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def load(
        cls,
        bundle: str | Path | Bundle | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        batch_size: int | None = None,
        verify: bool = True,
        verbose: bool = False,
    ):
        """Load and check a bundle directory and choose where and how it runs.

        Args:
            bundle: the directory `scgpt-train export` wrote (or a loaded Bundle); None:
                `default_bundle()`.
            device: "auto" (CUDA when its provider starts, else CPU), "cuda" or "cpu".
            precision: "auto" (fp16 on CUDA; int8 on CPU when the bundle has it, else fp32),
                or "fp32", "fp16", "int8".
            threads: CPU worker threads [default: OMP_NUM_THREADS, else the CPUs this process
                may use].
            batch_size: cells per graph call [default: 64 on CUDA, 16 on CPU].
            verify: check the sha256 of every bundle file (a few seconds for large bundles).
        Raises BundleError (missing, damaged, wrong version, no such precision) and
        DeviceError (device "cuda" where the CUDA provider does not start).
        """
        bundle = bundle_or_default(bundle)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle, verify=verify)
        probe = min(b.variants, key=lambda v: v.path.stat().st_size).path
        resolved = resolve_device(device, probe, verbose=verbose)
        precision = choose_precision(b, resolved, precision)
        threads = default_threads() if threads is None else threads
        batch_size = batch_size or BATCH_SIZE[resolved]
        if threads < 1 or batch_size < 1:
            raise ValueError("threads and batch_size must be at least 1")
        model = cls(b, resolved, precision, threads, batch_size)
        for length in model._lengths:  # every session now: a graph that cannot load fails here
            model._runner(length)
        log.info("model %s: %s graphs on %s", b.path, precision, model.provider)
        return model

    # What the bundle is

    @property
    def labels(self) -> list[str] | None:
        """Class names of the cell-type head (None without one)."""
        return self.bundle.labels

    @property
    def d_model(self) -> int:
        return self.bundle.graphs["embed"].outputs[CELL_EMB]

    def gene_embeddings(self, genes: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Gene names and their (n, d_model) float32 embeddings, the gene encoder output stored
        at export: of `genes` in the order given, or of every gene of the vocabulary in id
        order (None). No graph runs. Raises GeneMatchError naming genes not in the vocabulary,
        BundleError for a bundle exported without gene embeddings."""
        return gene_embeddings(self.bundle, genes)

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider that runs the graphs."""
        return self._runner(self._lengths[0]).provider

    @property
    def bundle_sha256(self) -> str:
        """The bundle's identity: sha256 of its config.json (see Bundle.sha256)."""
        return self.bundle.sha256

    def lengths_for(self, n_tokens: np.ndarray) -> dict[int, int]:
        """Graph length -> number of cells of `n_tokens` (<cls> included) it serves."""
        idx = np.searchsorted(self._lengths, n_tokens)
        return {self._lengths[i]: int(k) for i, k in enumerate(np.bincount(idx)) if k}

    # Running

    def embed_tokens(self, tokens: TokenBlock | Mapping[str, np.ndarray]) -> np.ndarray:
        """Raw (un-normalised) <cls> embeddings (B, d_model) of tokenized cells.

        `tokens` is what `scgpt_runtime.tokenize` makes for the bundle's TokenConfig
        (`model.bundle.tokens`), or its `inputs`: arrays (B, L) by input name, L at most the
        bundle's max_seq_len, <cls> first and padding last in every row."""
        inputs = dict(tokens.inputs if isinstance(tokens, TokenBlock) else tokens)
        names = [s.name for s in self.bundle.inputs]
        if not set(names) <= set(inputs):  # a modality input the graph does not take is unused
            raise ValueError(f"tokens must hold the inputs {', '.join(names)}")
        inputs = {s.name: np.asarray(inputs[s.name], dtype=s.dtype) for s in self.bundle.inputs}
        shapes = {a.shape for a in inputs.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"the inputs {', '.join(names)} must be (B, L) arrays of one shape")
        width = next(iter(shapes))[1]
        if width > self._lengths[-1]:
            raise ValueError(f"L is {width}; the bundle takes at most {self._lengths[-1]}")
        pad = inputs[PAD_MASK]
        if pad[:, 0].any() or (np.diff(pad.astype(np.int8), axis=1) < 0).any():
            raise ValueError(
                "every row needs <cls> first (not padding) and padding only at its end"
            )
        return self.infer(inputs, [CELL_EMB])[CELL_EMB]

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] = (CELL_EMB_NORMALIZED,)
    ) -> dict[str, np.ndarray]:
        """Graph outputs for tokenized cells: `inputs` (B, W) by name, W <= max_seq_len,
        padding last.

        Each cell goes to the shortest graph that holds its tokens; cells of one graph are run
        in batches (one cell per call for int8), on several CPU threads at once."""
        n_tokens = (~inputs[PAD_MASK]).sum(axis=1)
        which = np.searchsorted(self._lengths, n_tokens)
        width = dict(self.bundle.graphs["embed"].outputs)
        missing = [name for name in outputs if name not in width]
        if missing:
            raise BundleError(f"{self.bundle.path}: the model has no output {', '.join(missing)}")
        result = {name: np.empty((len(n_tokens), width[name]), np.float32) for name in outputs}
        tasks = []
        for i in np.unique(which):
            rows = np.flatnonzero(which == i)
            length = self._lengths[i]
            step = self._batch_for(length)
            tasks += [(length, rows[lo : lo + step]) for lo in range(0, len(rows), step)]

        def call(task: tuple[int, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
            length, rows = task
            feed = {s.name: _fit(inputs[s.name][rows], length, s.pad) for s in self.bundle.inputs}
            if self.device == "cuda":
                feed = self._pad_batch(feed, self._batch_for(length))
            return rows, self._runner(length).run(feed, outputs)

        if self.device == "cpu" and self.threads > 1 and len(tasks) > 1:
            done = self._executor().map(call, tasks)
        else:
            done = map(call, tasks)
        for rows, got in done:
            for name, value in zip(outputs, got, strict=True):
                result[name][rows] = value[: len(rows)]
        return result

    def _batch_for(self, length: int) -> int:
        if self.precision == "int8":
            return 1
        if self.device == "cpu":
            n_head = int(self.bundle.config["model"]["n_head"])
            return max(1, min(self.batch_size, CPU_ATTENTION_BYTES // (4 * n_head * length**2)))
        return self.batch_size

    def _pad_batch(self, feed: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
        """`feed` padded to `size` rows with <cls>-only cells: one input shape per graph."""
        n = len(next(iter(feed.values())))
        if n == size:
            return feed
        width = next(iter(feed.values())).shape[1]
        filler = empty_block(self.bundle.inputs, size - n, width).inputs
        return {name: np.concatenate([a, filler[name]]) for name, a in feed.items()}

    def _runner(self, length: int) -> Runner:
        """The session of the graph that serves `length` (format 2: one graph serves every
        length of its precision, so its weights are in memory once)."""
        path = self.bundle.variant(self.precision, length).path
        with self._lock:
            if path not in self._runners:
                self._runners[path] = Runner(path, self.device, self.bundle.inputs)
            return self._runners[path]

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="scgpt-run")
            return self._pool

    def close(self) -> None:
        """Stop the worker threads and drop the sessions."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._runners.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fit(a: np.ndarray, length: int, fill) -> np.ndarray:
    """`a` (B, W) cut or padded with `fill` to (B, length); the cut columns are padding."""
    if a.shape[1] >= length:
        return np.ascontiguousarray(a[:, :length])
    out = np.full((a.shape[0], length), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out
