"""`Model`: an exported scGPT bundle served by onnxruntime, for Python callers and the CLI.

    from scgpt_runtime import Model
    model = Model.load("bundles/pbmc")                 # device="auto": CUDA if it starts
    emb = model.embed("pbmc.h5ad")                     # (cells, d) L2-normalised
    ann = model.annotate(x, genes=gene_names)          # a dense array or CSR parts in memory
    raw = model.embed_tokens(gene_ids, values, padding_mask)

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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS, CONFIG_FILE, Bundle, load_bundle
from .csr import CsrBlock
from .errors import BundleError, InputError
from .io.base import CountMatrix
from .session import DEVICES, Runner, resolve_device

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


def choose_precision(bundle: Bundle, device: str, precision: str = "auto") -> str:
    """`precision`, checked against the bundle; "auto": the first the bundle has of fp16,
    fp32, int8 on CUDA and of int8, fp32, fp16 on the CPU."""
    if precision == "auto":
        return next(p for p in PRECISION_ORDER[device] if p in bundle.precisions)
    bundle.variant(precision)  # BundleError naming the precisions the bundle has
    return precision


@dataclass
class Annotation:
    """Cell-type predictions for cells in file order."""

    obs_names: np.ndarray  # (n,) str
    labels: list[str]  # class names, in the order of class_probs' columns
    class_probs: np.ndarray  # (n, n_cls) float32
    embedding: np.ndarray  # (n, d) float32, L2-normalised
    n_genes: np.ndarray  # (n,) int64; 0: no gene of the cell is in the vocabulary

    @property
    def predicted_labels(self) -> np.ndarray:
        """(n,) str: the most probable class (the first of equals)."""
        return np.asarray(self.labels, dtype=object)[self.class_probs.argmax(1)].astype(str)

    @property
    def conf_score(self) -> np.ndarray:
        """(n,) float32: the probability of the predicted class."""
        return self.class_probs.max(1)

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels (n, k) str, probabilities (n, k)) of the k most probable classes."""
        order = np.argsort(-self.class_probs, axis=1, kind="stable")[:, :k]
        names = np.asarray(self.labels, dtype=object)[order].astype(str)
        return names, np.take_along_axis(self.class_probs, order, axis=1)


class Model:
    """A loaded bundle with onnxruntime sessions on one device; see the module docstring."""

    def __init__(
        self,
        bundle: Bundle,
        device: str,
        precision: str,
        threads: int,
        batch_size: int,
    ):
        self.bundle = bundle
        self.device = device  # "cuda" or "cpu": what runs, checked
        self.precision = precision
        self.threads = threads
        self.batch_size = batch_size
        self._lengths = sorted(v.max_seq_len for v in bundle.variants if v.precision == precision)
        self._runners: dict[int, Runner] = {}
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
    ) -> Model:
        """Load and check a bundle directory and choose where and how it runs.

        Args:
            bundle: the directory `scgpt-train export` wrote (or a loaded Bundle); None:
                `default_bundle()`.
            device: "auto" (CUDA when its provider starts, else CPU), "cuda" or "cpu".
            precision: "auto" (fp16 on CUDA; int8 on CPU when the bundle has it, else fp32),
                or "fp32", "fp16", "int8".
            threads: CPU worker threads [default: the CPUs this process may use].
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
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
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
        return int(self.bundle.config["model"]["d_model"])

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider that runs the graphs."""
        return self._runner(self._lengths[0]).provider

    @property
    def bundle_sha256(self) -> str:
        """sha256 of the bundle's config.json, which holds the sha256 of every other file."""
        return self.bundle.config_sha256

    def lengths_for(self, n_tokens: np.ndarray) -> dict[int, int]:
        """Graph length -> number of cells of `n_tokens` (<cls> included) it serves."""
        idx = np.searchsorted(self._lengths, n_tokens)
        return {self._lengths[i]: int(k) for i, k in enumerate(np.bincount(idx)) if k}

    # Running

    def embed(self, data, genes=None, *, normalize: bool = True, **options) -> np.ndarray:
        """(cells, d_model) float32 embeddings of every cell, in order.

        `data` is a path to a .h5ad or 10x .h5 file, or an in-memory cells x genes matrix: a
        numpy array, or CSR parts (data, indices, indptr) (a scipy CSR matrix works too, scipy
        is not needed) with `genes`, the gene names of its columns. normalize=False gives the
        raw <cls> output. Options: cells (names for an in-memory matrix), gene_column,
        min_gene_fraction (0.5), layer, use_raw, genome, start, stop, block_size, progress.
        """
        return self._run(data, genes, normalized=normalize, class_probs=False, **options).embedding

    def annotate(self, data, genes=None, **options) -> Annotation:
        """Cell types of every cell: class probabilities, labels, confidence and the
        L2-normalised embedding. Arguments as for `embed`."""
        if not self.labels:
            raise BundleError(f"{self.bundle.path}: the model has no cell-type head to annotate")
        result = self._run(data, genes, normalized=True, class_probs=True, **options)
        return Annotation(
            result.obs_names, self.labels, result.class_probs, result.embedding, result.n_genes
        )

    def _run(
        self,
        data,
        genes,
        *,
        normalized,
        class_probs,
        cells=None,
        gene_column=None,
        min_gene_fraction=0.5,
        layer=None,
        use_raw=True,
        genome=None,
        start=0,
        stop=None,
        block_size=None,
        progress=None,
    ):
        from . import pipeline  # here: pipeline imports this module for its commands
        from .io import open_counts

        if isinstance(data, str | Path):
            counts = open_counts(data, layer=layer, use_raw=use_raw, genome=genome)
        else:
            if genes is None:
                raise ValueError("an in-memory matrix needs `genes`, the names of its columns")
            counts = ArrayCounts(data, genes, cells)
        with counts:
            match = pipeline.match_bundle_genes(
                counts, self.bundle, gene_column=gene_column, min_fraction=min_gene_fraction
            )
            result = pipeline.run(
                self,
                counts,
                match.column_ids,
                start=start,
                stop=stop,
                block_size=block_size or pipeline.BLOCK_SIZE,
                normalized=normalized,
                class_probs=class_probs,
                progress=progress,
            )
        return result

    def embed_tokens(
        self, gene_ids: np.ndarray, values: np.ndarray, padding_mask: np.ndarray
    ) -> np.ndarray:
        """Raw (un-normalised) <cls> embeddings (B, d_model) of tokenized cells.

        Inputs are (B, L) as `scgpt_runtime.tokenize` makes them for the bundle's TokenConfig
        (`model.bundle.tokens`, L = its max_seq_len): <cls> first, padding last, True in
        `padding_mask` on padding. Any L up to max_seq_len is accepted."""
        gene_ids = np.asarray(gene_ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        padding_mask = np.asarray(padding_mask, dtype=bool)
        if (
            gene_ids.ndim != 2
            or values.shape != gene_ids.shape
            or padding_mask.shape != gene_ids.shape
        ):
            raise ValueError("gene_ids, values and padding_mask must be (B, L) arrays of one shape")
        if gene_ids.shape[1] > self._lengths[-1]:
            raise ValueError(
                f"L is {gene_ids.shape[1]}; the bundle takes at most {self._lengths[-1]}"
            )
        if padding_mask[:, 0].any() or (np.diff(padding_mask.astype(np.int8), axis=1) < 0).any():
            raise ValueError(
                "every row needs <cls> first (not padding) and padding only at its end"
            )
        return self.infer(gene_ids, values, padding_mask, [CELL_EMB])[CELL_EMB]

    def infer(
        self,
        gene_ids: np.ndarray,
        values: np.ndarray,
        padding_mask: np.ndarray,
        outputs: Sequence[str] = (CELL_EMB_NORMALIZED,),
    ) -> dict[str, np.ndarray]:
        """Graph outputs for tokenized cells (B, W), W <= max_seq_len, padding last.

        Each cell goes to the shortest graph that holds its tokens; cells of one graph are run
        in batches (one cell per call for int8), on several CPU threads at once."""
        n_tokens = (~padding_mask).sum(axis=1)
        which = np.searchsorted(self._lengths, n_tokens)
        width = {
            CELL_EMB: self.d_model,
            CELL_EMB_NORMALIZED: self.d_model,
            CLASS_PROBS: len(self.labels or []),
        }
        if CLASS_PROBS in outputs and not self.labels:
            raise BundleError(f"{self.bundle.path}: the model has no cell-type head")
        result = {name: np.empty((len(n_tokens), width[name]), np.float32) for name in outputs}
        tasks = []
        for i in np.unique(which):
            rows = np.flatnonzero(which == i)
            length = self._lengths[i]
            step = self._batch_for(length)
            tasks += [(length, rows[lo : lo + step]) for lo in range(0, len(rows), step)]

        def call(task: tuple[int, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
            length, rows = task
            feed = {
                "gene_ids": _fit(gene_ids[rows], length, self.bundle.vocab.pad_id),
                "values": _fit(values[rows], length, self.bundle.tokens.pad_value),
                "padding_mask": _fit(padding_mask[rows], length, True),
            }
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
        n = len(feed["gene_ids"])
        if n == size:
            return feed
        filler = {
            "gene_ids": self.bundle.vocab.pad_id,
            "values": self.bundle.tokens.pad_value,
            "padding_mask": True,
        }
        out = {}
        for name, a in feed.items():
            full = np.full((size, a.shape[1]), filler[name], dtype=a.dtype)
            full[:n] = a
            out[name] = full
        out["gene_ids"][n:, 0] = self.bundle.vocab.cls_id
        out["values"][n:, 0] = self.bundle.tokens.cls_value
        out["padding_mask"][n:, 0] = False
        return out

    def _runner(self, length: int) -> Runner:
        with self._lock:
            if length not in self._runners:
                variant = self.bundle.variant(self.precision, length)
                self._runners[length] = Runner(variant.path, self.device)
            return self._runners[length]

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

    def __enter__(self) -> Model:
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


class ArrayCounts(CountMatrix):
    """An in-memory cells x genes matrix (dense numpy array or CSR parts) read like a file."""

    format = "array"

    def __init__(
        self,
        x: np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray],
        genes: list[str] | np.ndarray,
        cells: list[str] | np.ndarray | None = None,
    ):
        super().__init__(Path("<array>"), None)
        genes = np.asarray(genes).astype(str)
        if genes.ndim != 1:
            raise InputError("<array>: genes must be a 1-D list of gene names")
        self.n_genes = len(genes)
        self.var = {"index": genes}
        if isinstance(x, tuple) or hasattr(x, "indptr"):
            data, indices, indptr = (x.data, x.indices, x.indptr) if hasattr(x, "indptr") else x
            self.matrix = "csr"
            self._csr = _check_csr(
                np.asarray(data), np.asarray(indices), np.asarray(indptr), self.n_genes
            )
            self._dense = None
            self.n_cells = len(self._csr[2]) - 1
        else:
            x = np.asarray(x)
            if x.ndim != 2 or x.shape[1] != self.n_genes:
                raise InputError(
                    f"<array>: the matrix has shape {x.shape}; expected (cells, {self.n_genes}) "
                    "for the genes given"
                )
            if x.dtype.kind not in "biuf":
                raise InputError(f"<array>: the matrix holds {x.dtype}, not numbers")
            self.matrix, self._dense, self.n_cells = "dense", x, x.shape[0]
        self.obs_names = (
            np.arange(self.n_cells).astype(str) if cells is None else np.asarray(cells).astype(str)
        )
        if self.obs_names.shape != (self.n_cells,):
            raise InputError(f"<array>: {len(self.obs_names)} cell names for {self.n_cells} cells")

    def _blocks(self, block_size: int, start: int, stop: int) -> Iterator[CsrBlock]:
        for lo in range(start, stop, block_size):
            hi = min(lo + block_size, stop)
            if self._dense is not None:
                yield CsrBlock.from_dense(self._dense[lo:hi], start=lo)
                continue
            data, indices, indptr = self._csr
            a, b = indptr[lo], indptr[hi]
            yield CsrBlock(data[a:b], indices[a:b], indptr[lo : hi + 1] - a, self.n_genes, lo)

    def close(self) -> None:
        pass


def _check_csr(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts as float32 / int64, checked, with the columns of every row sorted."""
    if data.ndim != 1 or indices.shape != data.shape or indptr.ndim != 1 or len(indptr) < 1:
        raise InputError("<array>: CSR parts must be 1-D data, indices (same length) and indptr")
    indptr = indptr.astype(np.int64)
    if indptr[0] != 0 or indptr[-1] != len(data) or (np.diff(indptr) < 0).any():
        raise InputError("<array>: indptr must rise from 0 to the number of stored values")
    indices = indices.astype(np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise InputError(f"<array>: column indices must be in 0..{n_cols - 1} (one per gene)")
    data = data.astype(np.float32)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.lexsort((indices, rows))
    if (np.diff(order) != 1).any():  # unsorted rows, as scipy allows
        data, indices = data[order], indices[order]
    if ((np.diff(indices) == 0) & (np.diff(rows) == 0)).any():
        raise InputError("<array>: a cell has two values for one gene (sum duplicates first)")
    return data, indices, indptr
