"""The serving engine: read -> match genes -> bin -> tokenize -> run -> collect, block by block.

`Model` is the public API: a served bundle (served.py) that also reads data, from a file path
or an in-memory matrix, and streams it through `run`. The commands (pipeline.py) use `run` too.

A file is read in row blocks; while the model runs on one block, a reader thread reads and
tokenizes the next (h5py, numpy and onnxruntime all release the GIL for their heavy parts), so
memory holds two blocks of tokens and the results. A cell's result depends only on the cell,
its global index (for the seeded binning modes) and the bundle: never on the block size, the
batch size, the thread count or the shard split (see `ServedModel.infer`).

    from scgpt_runtime import Model
    model = Model.load("bundles/pbmc")                 # device="auto": CUDA if it starts
    emb = model.embed("pbmc.h5ad")                     # (cells, d) L2-normalised
    result = model.annotate(x, genes=gene_names)       # a dense array or CSR parts in memory
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import reference as reference_files
from .bundle import CELL_EMB, CELL_EMB_NORMALIZED, CLASS_PROBS, Bundle
from .errors import BundleError, GeneMatchError
from .genes import MIN_GENE_FRACTION, GeneMatch, match_genes
from .io import open_counts
from .io.arrays import ArrayCounts
from .io.base import CountMatrix
from .io.multimodal import MultiModalMatrix
from .modalities import Modality, ModalityMatch, match_modalities
from .obs import obs_strings
from .reference import Reference
from .results import Result, temperature_scaled
from .served import ServedModel
from .tokens import ModalityColumns, TokenBlock, tokenize
from .vocab import GENE

BLOCK_SIZE = 2048  # cells read and tokenized at a time: 2048 x 1200 tokens is about 32 MB
Progress = Callable[..., None]  # (n_cells, total, status="")


class Model(ServedModel):
    """A served bundle that embeds and annotates files and in-memory matrices."""

    def embed(self, data, genes=None, *, normalize: bool = True, **options) -> np.ndarray:
        """(cells, d_model) float32 embeddings of every cell, in order.

        `data` is a path to a .h5ad, .h5mu or 10x .h5 file (a .h5mu file by every modality the
        bundle reads), or an in-memory cells x genes matrix: a numpy array, or CSR parts
        (data, indices, indptr) (a scipy CSR matrix works too, scipy is not needed) with
        `genes`, the gene names of its columns. normalize=False gives the
        raw <cls> output. Options: cells (names for an in-memory matrix), gene_column,
        min_gene_fraction (0.5), layer, use_raw, genome, start, stop, block_size, progress.
        """
        return self._serve(
            data, genes, normalized=normalize, class_probs=False, **options
        ).embedding

    def annotate(
        self,
        data,
        genes=None,
        *,
        reference: Reference | str | Path | None = None,
        label_key: str | None = None,
        k: int = reference_files.K,
        vote: str = "majority",
        unknown_below: float | None = None,
        distance_quantile: float = reference_files.DISTANCE_QUANTILE,
        **options,
    ) -> Result:
        """Cell types of every cell: class probabilities, labels, confidence and the
        L2-normalised embedding. Data arguments and options as for `embed`.

        Without `reference`, the bundle's cell-type head. With `reference` (a Reference, or a
        .scref file built with this bundle), the votes of each cell's `k` nearest reference
        cells ("majority", or "distance": weighed by 1 / distance) for `label_key` (default:
        the reference's first): class_probs are the vote shares, knn_distance the distance to
        the nearest reference cell, and a cell farther from the reference than the
        `distance_quantile` of the reference cells' own nearest-neighbour distances is
        Unknown. `unknown_below`: probability (head) or vote share (reference) below which a
        cell is Unknown [default: head 0, off; reference 0.5].
        """
        ref = None if reference is None else self.open_reference(reference)
        if ref is None and not self.labels:
            raise BundleError(
                f"{self.bundle.path}: the model has no cell-type head; annotate with a "
                "reference (scgpt-run reference build) instead"
            )
        result = self._serve(data, genes, normalized=True, class_probs=ref is None, **options)
        return label_cells(result, ref, label_key, k, vote, unknown_below, distance_quantile)

    def reference(
        self,
        data,
        labels: list[str] | dict[str, Sequence],
        genes=None,
        *,
        seed: int = 0,
        **options,
    ) -> Reference:
        """A Reference of the cells of `data` (as for `embed`) embedded by this model, with
        their labels: obs columns of a file (names), or key -> one value per cell (None:
        missing) for any data. Save it with `scgpt_runtime.reference.save`."""
        result = self._serve(data, genes, normalized=True, class_probs=False, **options)
        if not isinstance(labels, dict):
            if not isinstance(data, str | Path):
                raise ValueError("an in-memory matrix needs its labels as {key: values}")
            with open_counts(
                data,
                layer=options.get("layer"),
                use_raw=options.get("use_raw", True),
                genome=options.get("genome"),
            ) as counts:
                labels = {key: obs_strings(counts.read_obs(key)) for key in labels}
        start = options.get("start", 0)
        values = {k: list(v)[start : start + result.n_cells] for k, v in labels.items()}
        return reference_files.build(
            result.embedding, result.obs_names, values, self.bundle_sha256, str(data), seed
        )

    def open_reference(self, reference: Reference | str | Path) -> Reference:
        """`reference`, loaded if it is a path; BundleError unless this bundle built it."""
        ref = reference if isinstance(reference, Reference) else reference_files.load(reference)
        ref.check_bundle(
            self.bundle_sha256,
            reference if not isinstance(reference, Reference) else "the reference",
        )
        return ref

    def _serve(
        self,
        data,
        genes,
        *,
        normalized,
        class_probs,
        cells=None,
        gene_column=None,
        min_gene_fraction=MIN_GENE_FRACTION,
        layer=None,
        use_raw=True,
        genome=None,
        start=0,
        stop=None,
        block_size=BLOCK_SIZE,
        progress=None,
    ) -> Result:
        if isinstance(data, str | Path):
            counts = open_counts(data, layer=layer, use_raw=use_raw, genome=genome)
        else:
            if genes is None:
                raise ValueError("an in-memory matrix needs `genes`, the names of its columns")
            counts = ArrayCounts(data, genes, cells)
        with counts:
            match = match_bundle_genes(counts, self.bundle, gene_column, min_gene_fraction)
            return run(
                self,
                counts,
                match.column_ids,
                start=start,
                stop=stop,
                block_size=block_size,
                normalized=normalized,
                class_probs=class_probs,
                progress=progress,
                modalities=token_modalities(self.bundle, match),
            )


def label_cells(
    result: Result,
    reference: Reference | None,
    label_key: str | None = None,
    k: int = reference_files.K,
    vote: str = "majority",
    unknown_below: float | None = None,
    distance_quantile: float = reference_files.DISTANCE_QUANTILE,
) -> Result:
    """The predicted labels of `result`: of its class probabilities (the head), Unknown below
    `unknown_below` (default 0, off); or, with a reference, of the reference cells' votes
    (`reference.label`; unknown_below default UNKNOWN_BELOW)."""
    if reference is None:
        result.decide(unknown_below or 0.0)
        return result
    below = reference_files.UNKNOWN_BELOW if unknown_below is None else unknown_below
    return reference_files.label(result, reference, label_key, k, vote, below, distance_quantile)


def match_bundle_genes(
    counts: CountMatrix,
    bundle: Bundle,
    gene_column: str | None = None,
    min_fraction: float = MIN_GENE_FRACTION,
) -> GeneMatch | ModalityMatch:
    """The vocabulary id of every gene of `counts` for `bundle` (-1: not used): genes outside
    the bundle's gene panel, where it has one, are not used. GeneMatchError below
    `min_fraction`. A file of several modalities is matched modality by modality to the
    bundle's (a bundle of genes only reads the file's gene modality)."""
    if isinstance(counts, MultiModalMatrix):
        genes_only = [Modality("rna", GENE, bundle.tokens.max_seq_len - 1)]
        return match_modalities(
            counts,
            bundle.vocab,
            bundle.modalities or genes_only,
            gene_column=gene_column,
            min_fraction=min_fraction,
            panel=bundle.gene_panel,
        )
    return match_genes(
        counts.var,
        bundle.vocab,
        gene_column=gene_column,
        min_fraction=min_fraction,
        source=str(counts.path),
        panel=bundle.gene_panel,
    )


def token_modalities(bundle: Bundle, match: GeneMatch | ModalityMatch) -> ModalityColumns | None:
    """What `tokenize` needs to know of the columns' modalities: for a multi-omics bundle."""
    return match.columns if bundle.modalities and isinstance(match, ModalityMatch) else None


def run(
    model: ServedModel,
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
    modalities: ModalityColumns | None = None,
) -> Result:
    """Run the model on cells [start, stop) of `counts`.

    Args:
        column_ids: vocabulary id per column of `counts` (match_bundle_genes).
        normalized: the L2-normalised embedding (else the raw <cls> output).
        class_probs: also the class probabilities (the bundle needs a classifier).
        embedding: an (n, d) float32 array to fill (a memory map for large outputs).
        progress: called as progress(n, total, status) after every block.
        modalities: the modality of every column, for a multi-omics bundle (token_modalities).
    """
    stop = counts.n_cells if stop is None else min(stop, counts.n_cells)
    n = max(stop - start, 0)
    names = [CELL_EMB_NORMALIZED if normalized else CELL_EMB] + [CLASS_PROBS] * class_probs
    result = Result(
        obs_names=np.asarray(counts.obs_names[start:stop]).astype(str),
        n_genes=np.zeros(n, dtype=np.int64),
        embedding=np.empty((n, model.d_model), np.float32) if embedding is None else embedding,
        labels=list(model.labels or []) if class_probs else None,
        class_probs=np.empty((n, len(model.labels or [])), np.float32) if class_probs else None,
    )
    t0, done = time.perf_counter(), 0
    chunks = _tokenized(model.bundle, counts, column_ids, start, stop, block_size, modalities)
    for tokens in chunks:
        outputs = model.infer(tokens.inputs, names)
        rows = slice(tokens.start - start, tokens.start - start + tokens.n_cells)
        result.n_genes[rows] = tokens.n_genes
        result.embedding[rows] = outputs[names[0]]
        if class_probs:
            result.class_probs[rows] = temperature_scaled(
                outputs[CLASS_PROBS], model.bundle.temperature
            )
        result.add_graphs(model.lengths_for(1 + tokens.n_genes))
        done += tokens.n_cells
        if progress:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(tokens.n_cells, n, f"{rate:,.0f} cells/s")
    if n and not result.n_genes.any():
        raise GeneMatchError(
            f"{counts.path}: none of its {n} cells has a non-zero count of a gene of the model "
            "vocabulary: there is nothing to embed or annotate"
        )
    return result


def _tokenized(
    bundle: Bundle,
    counts: CountMatrix,
    column_ids: np.ndarray,
    start: int,
    stop: int,
    block_size: int,
    modalities: ModalityColumns | None = None,
) -> Iterator[TokenBlock]:
    """Tokenized blocks of [start, stop), read and tokenized one block ahead in a thread."""
    blocks = counts.iter_blocks(block_size, start, stop)
    vocab = bundle.vocab

    def produce() -> TokenBlock | None:
        block = next(blocks, None)
        if block is None:
            return None
        return tokenize(block, column_ids, bundle.tokens, vocab.cls_id, vocab.pad_id, modalities)

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
