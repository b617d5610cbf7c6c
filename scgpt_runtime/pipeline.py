"""The streaming engine: read -> match genes -> bin -> tokenize -> run -> collect, block by block.

A file is read in row blocks; while the model runs on one block, a reader thread reads and
tokenizes the next (h5py, numpy and onnxruntime all release the GIL for their heavy parts), so
memory holds two blocks of tokens and the results. A cell's result depends only on the cell,
its global index (for the seeded binning modes) and the bundle: never on the block size, the
batch size, the thread count or the shard split (see `Model.infer`).

`--shard I/N` takes the I-th of N contiguous, nearly equal ranges of cells, so the shards of
a file concatenated in order are the file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort

from . import outputs
from .bundle import Bundle, load_bundle
from .errors import BundleError, GeneMatchError, OutputError
from .genes import GeneMatch, match_genes
from .io import open_counts
from .io.base import CountMatrix
from .model import Model, bundle_or_default
from .outputs import Result
from .tokens import TokenBlock, tokenize

log = logging.getLogger(__name__)

BLOCK_SIZE = 2048  # cells read and tokenized at a time: 2048 x 1200 tokens is about 32 MB
SPILL_BYTES = 256 << 20  # embeddings larger than this go to a memory-mapped scratch file
Progress = Callable[..., None]  # (n_cells, total, status="")


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1..count) of `count`: a contiguous, deterministic range of cells."""

    index: int
    count: int

    def __post_init__(self):
        if not 1 <= self.index <= self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need 1 <= I <= N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Shard(I, N) of the text "I/N"; ValueError for anything else."""
        try:
            index, count = (int(x) for x in text.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like I/N (for example 2/8), not {text!r}") from None
        return cls(index, count)

    def range(self, n_cells: int) -> tuple[int, int]:
        """[start, stop) of this shard among `n_cells` cells; sizes differ by at most one."""
        return (self.index - 1) * n_cells // self.count, self.index * n_cells // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def match_bundle_genes(
    counts: CountMatrix,
    bundle: Bundle,
    *,
    gene_column: str | None = None,
    min_fraction: float = 0.5,
) -> GeneMatch:
    """The vocabulary id of every gene of `counts` for `bundle` (-1: not used).

    Genes outside the bundle's gene panel, where it has one, are not used. Raises
    GeneMatchError where fewer than `min_fraction` of the genes are in the vocabulary or none
    is in the panel.
    """
    match = match_genes(
        counts.var,
        bundle.vocab,
        gene_column=gene_column,
        min_fraction=min_fraction,
        source=str(counts.path),
    )
    if bundle.gene_panel is None:
        return match
    ids = match.column_ids.copy()
    panel = bundle.vocab.lookup(bundle.gene_panel)
    ids[~np.isin(ids, panel)] = -1
    if not (ids >= 0).any():
        raise GeneMatchError(
            f"{counts.path}: none of its genes (column {match.column}) is in the model's gene "
            f"panel of {len(panel)} genes; pass --gene-column (available: {', '.join(counts.var)})"
        )
    return GeneMatch(
        match.column, ids, match.n_total, len(panel), match.n_duplicates, match.unmatched_examples
    )


def run(
    model: Model,
    counts: CountMatrix,
    column_ids: np.ndarray,
    *,
    start: int = 0,
    stop: int | None = None,
    block_size: int = BLOCK_SIZE,
    normalized: bool = True,
    class_probs: bool = False,
    embedding: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Result:
    """Run the model on cells [start, stop) of `counts`.

    Args:
        column_ids: vocabulary id per column of `counts` (match_bundle_genes).
        normalized: the L2-normalised embedding (else the raw <cls> output).
        class_probs: also the class probabilities (the bundle needs a classifier).
        embedding: an (n, d) float32 array to fill (a memory map for large outputs).
        progress: called as progress(n, total, status) after every block.
    """
    stop = counts.n_cells if stop is None else min(stop, counts.n_cells)
    n = max(stop - start, 0)
    names = ["cell_emb_normalized" if normalized else "cell_emb"]
    if class_probs:
        names.append("class_probs")
    result = Result(
        obs_names=np.asarray(counts.obs_names[start:stop]).astype(str),
        n_genes=np.zeros(n, dtype=np.int64),
        embedding=np.empty((n, model.d_model), np.float32) if embedding is None else embedding,
        class_probs=np.empty((n, len(model.labels or [])), np.float32) if class_probs else None,
        variants={},
    )
    t0, done = time.perf_counter(), 0
    for tokens in _tokenized(model, counts, column_ids, start, stop, block_size):
        outputs = model.infer(tokens.gene_ids, tokens.values, tokens.padding_mask, names)
        rows = slice(tokens.start - start, tokens.start - start + tokens.n_cells)
        result.n_genes[rows] = tokens.n_genes
        result.embedding[rows] = outputs[names[0]]
        if class_probs:
            result.class_probs[rows] = outputs["class_probs"]
        for length, k in model.lengths_for(1 + tokens.n_genes).items():
            result.variants[length] = result.variants.get(length, 0) + k
        done += tokens.n_cells
        if progress:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(tokens.n_cells, n, f"{rate:,.0f} cells/s")
    return result


def _tokenized(
    model: Model,
    counts: CountMatrix,
    column_ids: np.ndarray,
    start: int,
    stop: int,
    block_size: int,
) -> Iterator[TokenBlock]:
    """Tokenized blocks of [start, stop), read and tokenized one block ahead in a thread."""
    bundle = model.bundle
    blocks = counts.iter_blocks(block_size, start, stop)

    def produce() -> TokenBlock | None:
        block = next(blocks, None)
        if block is None:
            return None
        return tokenize(block, column_ids, bundle.tokens, bundle.vocab.cls_id, bundle.vocab.pad_id)

    yield from _prefetch(produce)


def _prefetch(produce: Callable[[], TokenBlock | None]) -> Iterator[TokenBlock]:
    """Items of `produce()` until None, each made in a thread while the previous is used.

    One item ahead at most; an exception of `produce` is raised here; stopping early (an
    error or Ctrl-C in the consumer) lets the thread finish its item and exit."""
    box: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        try:
            while not stop.is_set():
                item = produce()
                box.put(("item", item))
                if item is None:
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            box.put(("error", e))

    thread = threading.Thread(target=work, name="scgpt-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = box.get()
            if kind == "error":
                raise item
            if item is None:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() waiting on the full queue
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.05)
        thread.join()


# The commands: annotate and embed a file, end to end


def annotate(
    file: str | Path,
    *,
    model: str | Path | None = None,
    out: str | Path | None = None,
    inplace: bool = False,
    prefix: str = "scgpt_",
    top_k: int = 0,
    **options,
) -> dict[str, Any]:
    """`scgpt-run annotate`: predicted cell types of FILE written to `out` (.csv, .tsv,
    .h5ad), into FILE (`inplace`), to a shard part, or to `stream` (CSV) without `out`.
    Options as for `serve`. Returns the summary printed by --json."""
    options.update(model=model, out=out, inplace=inplace, prefix=prefix, top_k=top_k)
    return serve("annotate", file, **options)


def embed(
    file: str | Path,
    *,
    model: str | Path | None = None,
    out: str | Path | None = None,
    inplace: bool = False,
    raw: bool = False,
    **options,
) -> dict[str, Any]:
    """`scgpt-run embed`: cell embeddings of FILE (L2-normalised; `raw`: the raw <cls>
    output) written to `out` (.npy, .h5ad, .csv, .tsv) or into FILE. Returns the summary."""
    options.update(model=model, out=out, inplace=inplace, raw=raw)
    return serve("embed", file, **options)


def serve(
    command: str,
    file: str | Path,
    *,
    model: str | Path | None = None,
    out: str | Path | None = None,
    inplace: bool = False,
    prefix: str = "scgpt_",
    top_k: int = 0,
    raw: bool = False,
    shard: str | Shard | None = None,
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    gene_column: str | None = None,
    min_gene_fraction: float = 0.5,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
    block_size: int = BLOCK_SIZE,
    overwrite: bool = False,
    stream: IO[str] | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `command` ("annotate" or "embed") on FILE with the bundle `model`.

    Cheap checks come first (output, input file, bundle, gene match), then the cells stream
    through the model. ValueError: options that do not fit together (a usage error);
    OutputError, InputError, BundleError, GeneMatchError, DeviceError: see their docstrings.
    """
    t0 = time.perf_counter()
    file, out = Path(file), None if out is None else Path(out)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard
    kind = outputs.output_kind(command, out, inplace=inplace, shard=shard is not None)
    if kind == "inplace":
        outputs.check_output(file, overwrite=True)
    elif out is not None:
        outputs.check_output(out, overwrite=overwrite, source=file)
    with open_counts(file, layer=layer, use_raw=use_raw, genome=genome) as counts:
        if kind == "inplace" and counts.format != "h5ad":
            raise OutputError(f"{file}: is a {counts.format} file; --inplace needs an .h5ad file")
        bundle = load_bundle(bundle_or_default(model))
        if command == "annotate" and not bundle.labels:
            raise BundleError(f"{bundle.path}: the model has no cell-type head; use embed")
        match = match_bundle_genes(
            counts, bundle, gene_column=gene_column, min_fraction=min_gene_fraction
        )
        load = {"device": device, "precision": precision, "threads": threads}
        with Model.load(bundle, **load, batch_size=batch_size, verbose=verbose) as served:
            start, stop = shard.range(counts.n_cells) if shard else (0, counts.n_cells)
            options = {
                "layer": layer,
                "use_raw": use_raw,
                "genome": genome,
                "min_gene_fraction": min_gene_fraction,
            }
            options.update(
                {"prefix": prefix, "top_k": top_k} if command == "annotate" else {"raw": raw}
            )
            settings = _settings(command, file, counts, served, match, options)
            folder = out.parent if out is not None else file.parent if inplace else None
            with _embedding_buffer(stop - start, served.d_model, folder) as buffer:
                t_run = time.perf_counter()
                result = run(
                    served,
                    counts,
                    match.column_ids,
                    start=start,
                    stop=stop,
                    block_size=block_size,
                    normalized=not raw,
                    class_probs=command == "annotate",
                    embedding=buffer,
                    progress=progress,
                )
                run_seconds = time.perf_counter() - t_run
                if kind == "part":
                    written = outputs.write_part(
                        out,
                        result,
                        settings,
                        shard=str(shard),
                        start=start,
                        stop=stop,
                        labels=served.labels,
                    )
                else:
                    written = outputs.write(
                        kind,
                        result,
                        settings,
                        out=out,
                        labels=served.labels,
                        top_k=top_k,
                        prefix=prefix,
                        stream=stream,
                    )
            summary = _summary(
                command, file, written, shard, result, match, served, t0, run_seconds
            )
    if summary["n_empty"]:
        log.warning(
            "%s: %d of %d cells have no gene in the model vocabulary: their results come from "
            "<cls> alone (n_genes 0)",
            file,
            summary["n_empty"],
            summary["n_cells"],
        )
    return summary


def _settings(command, file, counts, model, match, options) -> dict[str, Any]:
    """What the results depend on: recorded in outputs, equal in every shard of a run."""
    return {
        "command": command,
        "input": str(file.resolve()),
        "input_format": counts.format,
        "matrix": counts.matrix,
        "n_cells": counts.n_cells,
        "bundle": model.bundle.path.name,
        "bundle_sha256": model.bundle_sha256,
        "precision": model.precision,
        "execution_provider": model.provider,
        "gene_column": match.column,
        "n_genes_matched": match.n_matched,
        "options": options,
        "versions": {
            "scgpt-deploy": _version("scgpt-deploy"),
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
    }


def _summary(command, file, written, shard, result, match, model, t0, run_seconds) -> dict:
    seconds = time.perf_counter() - t0
    n = len(result.n_genes)
    summary = {
        "command": command,
        "input": str(file),
        "output": None if written is None else str(written),
        "shard": None if shard is None else str(shard),
        "n_cells": n,
        "n_empty": int((result.n_genes == 0).sum()),
        "gene_match": match.to_dict(),
        "bundle": str(model.bundle.path),
        "precision": model.precision,
        "device": model.device,
        "execution_provider": model.provider,
        "graphs": {str(k): v for k, v in sorted((result.variants or {}).items())},
        "seconds": round(seconds, 3),
        "run_seconds": round(run_seconds, 3),
        "cells_per_s": round(n / max(run_seconds, 1e-9), 1),
    }
    if command == "annotate" and n:
        labels = np.asarray(model.labels)[result.class_probs.argmax(1)]
        names, counts = np.unique(labels, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        summary["label_counts"] = {str(names[i]): int(counts[i]) for i in order}
    return summary


@contextlib.contextmanager
def _embedding_buffer(n: int, d: int, folder: Path | None) -> Iterator[np.ndarray | None]:
    """None (the engine allocates in memory) for small outputs; for outputs over
    SPILL_BYTES a memory-mapped .npy in `folder`, deleted afterwards: memory stays bounded."""
    if n * d * 4 <= SPILL_BYTES:
        yield None
        return
    with tempfile.TemporaryDirectory(dir=folder, prefix=".scgpt-embedding.") as tmp:
        buffer = np.lib.format.open_memmap(
            Path(tmp) / "embedding.npy", mode="w+", dtype=np.float32, shape=(n, d)
        )
        try:
            yield buffer
        finally:
            del buffer


def gene_report(
    file: str | Path,
    model: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    gene_column: str | None = None,
    min_gene_fraction: float = 0.5,
) -> dict[str, Any]:
    """How the genes of FILE match the vocabulary (and gene panel) of the bundle `model`
    (`scgpt-run inspect --model`): GeneMatch.to_dict() plus the panel size. Raises
    GeneMatchError below `min_gene_fraction`."""
    bundle = load_bundle(model)
    with open_counts(file, layer=layer, use_raw=use_raw, genome=genome) as counts:
        match = match_bundle_genes(
            counts, bundle, gene_column=gene_column, min_fraction=min_gene_fraction
        )
    report = match.to_dict()
    report["n_used"] = int((match.column_ids >= 0).sum())
    report["vocab_size"] = len(bundle.vocab)
    report["gene_panel"] = None if bundle.gene_panel is None else len(bundle.gene_panel)
    return report


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
