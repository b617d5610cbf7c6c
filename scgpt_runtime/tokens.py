"""Cells to model inputs: gene tokens with binned values, <cls> first, padded to max_seq_len.

Per cell (see docs/inputs.md): keep the non-zero values of genes in the vocabulary; optionally
normalise to `target_sum` and log1p; bin over all of them (binning before selection, as the
official collator does); where more genes than fit, keep the highest values ("top") or a seeded
random subset ("sample"); order the kept genes by vocabulary id; <cls> first; pad. Everything is
vectorised over the block, and a cell's tokens depend only on the cell, its global index and the
config, never on the block size or order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from .binning import (
    MODES,
    STREAM_SAMPLING,
    bin_rows,
    cell_keys,
    gene_hash,
    ordered_bits,
    row_chunks,
)
from .csr import CsrBlock
from .preprocess import scale_rows

SELECTIONS = ("top", "sample")


@dataclass(frozen=True)
class TokenConfig:
    """How cells become tokens. Saved with every checkpoint: it defines the model inputs."""

    max_seq_len: int = 1200  # tokens per cell, <cls> included
    n_bins: int = 51  # bins 1..n_bins-1 for non-zero values
    binning: str = "deterministic"  # or "official": seeded random bin within tied edges
    target_sum: float | None = None  # normalize_total before binning; None = raw counts
    log1p: bool = False
    cls_value: float = 0.0  # value on <cls>; the official zero-shot pipeline uses -2 (= pad_value)
    pad_value: float = -2.0
    selection: str = "top"  # genes kept when a cell has more than fit: "top" or "sample"
    seed: int = 0  # of the official binning draw and of "sample"

    def __post_init__(self):
        for name in ("max_seq_len", "n_bins", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, not {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("cls_value", "pad_value") + (
            () if self.target_sum is None else ("target_sum",)
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if not np.isfinite(value):
                raise ValueError(f"{name} must be finite, not {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.log1p, (bool, np.bool_)):
            raise ValueError(f"log1p must be true or false, not {self.log1p!r}")
        object.__setattr__(self, "log1p", bool(self.log1p))
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (<cls> and a gene), not {self.max_seq_len}")
        if not 3 <= self.n_bins <= 65536:
            raise ValueError(f"n_bins must be in 3..65536, not {self.n_bins}")
        if self.binning not in MODES:
            raise ValueError(f"binning must be one of {MODES}, not {self.binning!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, not {self.selection!r}")
        if self.target_sum is not None and self.target_sum <= 0:
            raise ValueError(f"target_sum must be > 0 or None, not {self.target_sum}")

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TokenConfig:
        """The config saved by `to_dict`; unknown keys raise ValueError, missing ones default."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown token config keys: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class InputSpec:
    """One model input: each is (cells, L), with the value it holds on padding and on <cls>."""

    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "bool"
    pad: int | float | bool
    cls: int | float | bool

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "pad": self.pad, "cls": self.cls}


# The model inputs by name; PAD_MASK marks padding, and so decides a cell's length.
GENE_IDS, VALUES, PAD_MASK = "gene_ids", "values", "padding_mask"
INPUT_NAMES = (GENE_IDS, VALUES, PAD_MASK)  # the graph's input order
MODALITY = "modality_ids"  # multi-omics: the modality of every token (after the three above)


def input_specs(
    cfg: TokenConfig, cls_id: int, pad_id: int, modality: bool = False
) -> tuple[InputSpec, ...]:
    """The model inputs `tokenize` makes, in graph order: what export traces, the bundle
    declares and the engine feeds; with `modality`, also the modality id of every token
    (<cls> and padding count as modality 0)."""
    specs = (
        InputSpec(GENE_IDS, "int64", pad_id, cls_id),  # <cls>, genes by ascending id, <pad>
        InputSpec(VALUES, "float32", cfg.pad_value, cfg.cls_value),  # cls_value, bins, pads
        InputSpec(PAD_MASK, "bool", True, False),  # True = padding, never attended
    )
    return (*specs, InputSpec(MODALITY, "int64", 0, 0)) if modality else specs


@dataclass(frozen=True)
class ModalityColumns:
    """Which modality each column of a matrix holds, and the tokens each may have per cell."""

    column: np.ndarray  # (n_cols,) int64 modality index per column, -1 = not used
    max_tokens: tuple[int, ...]  # per modality: its most expressed features beyond that drop


@dataclass(frozen=True)
class TokenBlock:
    """Model inputs for rows [start, start + n_cells) of a matrix, by input name."""

    inputs: dict[str, np.ndarray]  # name -> (B, L) array, in `input_specs` order
    n_genes: np.ndarray  # (B,) int64 genes in the sequence; 0 = no matched non-zero gene
    start: int  # global index of the first cell; -1 for picked rows

    @property
    def gene_ids(self) -> np.ndarray:
        return self.inputs[GENE_IDS]

    @property
    def values(self) -> np.ndarray:
        return self.inputs[VALUES]

    @property
    def padding_mask(self) -> np.ndarray:
        return self.inputs[PAD_MASK]

    @property
    def n_cells(self) -> int:
        return len(self.n_genes)

    @property
    def empty(self) -> np.ndarray:
        """(B,) bool: cells without any gene token (only <cls>), to flag in outputs."""
        return self.n_genes == 0

    def trim(self) -> TokenBlock:
        """The same tokens without the columns that are padding in every cell."""
        width = 1 + int(self.n_genes.max(initial=0))
        return TokenBlock(
            {k: a[:, :width] for k, a in self.inputs.items()}, self.n_genes, self.start
        )

    def take(self, rows: np.ndarray, trim: bool = False) -> TokenBlock:
        """The given rows (start -1: picked rows have no common start); with `trim`, without
        the columns that are padding in all of them."""
        width = 1 + int(self.n_genes[rows].max(initial=0)) if trim else None
        inputs = {k: a[rows, :width] for k, a in self.inputs.items()}
        return TokenBlock(inputs, self.n_genes[rows], -1)

    @staticmethod
    def concat(blocks: list[TokenBlock]) -> TokenBlock:
        """The blocks one after the other (all of one width); start of the first."""
        inputs = {k: np.concatenate([b.inputs[k] for b in blocks]) for k in blocks[0].inputs}
        return TokenBlock(inputs, np.concatenate([b.n_genes for b in blocks]), blocks[0].start)


def tokenize(
    block: CsrBlock,
    column_ids: np.ndarray,
    cfg: TokenConfig,
    cls_id: int,
    pad_id: int,
    modalities: ModalityColumns | None = None,
) -> TokenBlock:
    """Token ids, values and padding mask of every cell of `block`.

    Args:
        block: raw counts (or whatever the model was trained on) of some cells.
        column_ids: (n_cols,) int64 vocabulary id of each column; -1 = not used. The used ids
            must be distinct (the gene matcher gives a duplicate gene -1).
        cfg: the token config of the model.
        cls_id, pad_id: vocabulary ids of <cls> and <pad>.
        modalities: for cells measured in several modalities (features side by side), the
            modality of every column: each modality is normalised, binned and selected on
            its own per cell, as if it were a cell of its own, and the cell's sequence is
            <cls>, the tokens of modality 0, of modality 1, ..., with a MODALITY input.

    Returns:
        A TokenBlock of shape (n_rows, cfg.max_seq_len). A cell with no matched non-zero gene
        gives <cls> alone and n_genes 0.
    """
    if modalities is not None:
        return _tokenize_modalities(block, column_ids, cfg, cls_id, pad_id, modalities)
    column_ids = np.asarray(column_ids, dtype=np.int64)
    if column_ids.shape != (block.n_cols,):
        raise ValueError(f"column_ids has shape {column_ids.shape}, expected ({block.n_cols},)")
    used = column_ids[column_ids >= 0]
    if used.size and (
        np.bincount(used).max() > 1 or (used == cls_id).any() or (used == pad_id).any()
    ):
        raise ValueError("column_ids must map columns to distinct gene ids, never <cls> or <pad>")
    out = empty_block(input_specs(cfg, cls_id, pad_id), block.n_rows, cfg.max_seq_len, block.start)
    top_gene = int(used.max(initial=0))
    # Row chunks keep the working arrays in the CPU cache; cells are independent, so chunking
    # changes nothing in the result.
    for r0, r1 in row_chunks(block.indptr):
        a, b = block.indptr[r0], block.indptr[r1]
        _tokenize_rows(
            np.asarray(block.data[a:b], dtype=np.float32),
            column_ids[block.indices[a:b]],
            block.indptr[r0 : r1 + 1] - a,
            block.start + r0,
            cfg,
            top_gene,
            out.gene_ids[r0:r1],
            out.values[r0:r1],
            out.padding_mask[r0:r1],
            out.n_genes[r0:r1],
        )
    return out


def _tokenize_modalities(
    block: CsrBlock,
    column_ids: np.ndarray,
    cfg: TokenConfig,
    cls_id: int,
    pad_id: int,
    modalities: ModalityColumns,
) -> TokenBlock:
    """Each modality tokenized alone (the other columns unused), then joined per cell."""
    if 1 + sum(modalities.max_tokens) > cfg.max_seq_len:
        raise ValueError(
            f"the modalities' tokens {modalities.max_tokens} and <cls> exceed max_seq_len "
            f"{cfg.max_seq_len}"
        )
    specs = input_specs(cfg, cls_id, pad_id, modality=True)
    out = empty_block(specs, block.n_rows, cfg.max_seq_len, block.start)
    filled = np.zeros(block.n_rows, dtype=np.int64)  # tokens after <cls> so far, per cell
    for k, budget in enumerate(modalities.max_tokens):
        ids = np.where(modalities.column == k, column_ids, -1)
        part = tokenize(block, ids, replace(cfg, max_seq_len=budget + 1), cls_id, pad_id)
        rows, cols = np.nonzero(np.arange(budget) < part.n_genes[:, None])
        at = 1 + filled[rows] + cols
        for name in INPUT_NAMES:
            out.inputs[name][rows, at] = part.inputs[name][rows, 1 + cols]
        out.inputs[MODALITY][rows, at] = k
        filled += part.n_genes
    out.n_genes[:] = filled
    return out


def bin_dense(
    block: CsrBlock, columns: np.ndarray, gene_ids: np.ndarray, cfg: TokenConfig
) -> np.ndarray:
    """(n_rows, len(columns)) float32 bins of the given columns, zeros included (bin 0): the
    input of a model that sees every gene of a panel (perturbation). Normalisation, log1p and
    bin edges are those of `tokenize` over the same genes; `gene_ids` (the columns' vocabulary
    ids) seed the official binning draw."""
    lookup = np.full(block.n_cols, -1, dtype=np.int64)
    lookup[columns] = np.arange(len(columns))
    position = lookup[block.indices]
    values = np.asarray(block.data, dtype=np.float32)
    keep = (position >= 0) & (values != 0)
    indptr = np.concatenate([[0], np.cumsum(keep)])[block.indptr]
    values, position = values[keep], position[keep]
    if cfg.target_sum is not None:
        values = scale_rows(values, indptr, cfg.target_sum)
    if cfg.log1p:
        values = np.log1p(values)
    genes = np.asarray(gene_ids, dtype=np.int64)[position]
    bins = bin_rows(values, indptr, cfg.n_bins, cfg.binning, cfg.seed, block.start, genes)
    out = np.zeros((block.n_rows, len(columns)), dtype=np.float32)
    out[np.repeat(np.arange(block.n_rows), np.diff(indptr)), position] = bins
    return out


def empty_block(
    specs: tuple[InputSpec, ...], n_cells: int, width: int, start: int = 0
) -> TokenBlock:
    """`n_cells` cells of <cls> alone (n_genes 0), padded to `width`."""
    inputs = {}
    for spec in specs:
        a = np.full((n_cells, width), spec.pad, dtype=spec.dtype)
        a[:, 0] = spec.cls
        inputs[spec.name] = a
    return TokenBlock(inputs, np.zeros(n_cells, dtype=np.int64), start)


def _tokenize_rows(
    values: np.ndarray,
    genes: np.ndarray,
    indptr: np.ndarray,
    start: int,
    cfg: TokenConfig,
    top_gene: int,
    gene_ids: np.ndarray,
    values_out: np.ndarray,
    padding_mask: np.ndarray,
    n_genes: np.ndarray,
) -> None:
    """Tokens of a few rows, written into the given slices of the outputs (pre-filled with
    <cls> and padding)."""
    # Matched non-zero values, in file column order within each row.
    keep = (genes >= 0) & (values != 0)
    if not keep.all():
        indptr = np.concatenate([[0], np.cumsum(keep)])[indptr]
        genes, values = genes[keep], values[keep]
    if cfg.target_sum is not None:
        values = scale_rows(values, indptr, cfg.target_sum)
    if cfg.log1p:
        values = np.log1p(values)
    bins = bin_rows(values, indptr, cfg.n_bins, cfg.binning, cfg.seed, start, genes)

    cap = cfg.max_seq_len - 1
    counts = np.diff(indptr)
    over = np.flatnonzero(counts > cap)
    if over.size:
        lengths = counts[over]
        pos = _ranges(indptr[over], indptr[over + 1])  # the values of those rows
        gene_bits = genes[pos].astype(np.uint64)
        if cfg.selection == "top":
            # The highest values, ties to the lower gene id.
            descending = (ordered_bits(values[pos]) ^ np.uint32(0xFFFFFFFF)).astype(np.uint64)
            keys = (descending << np.uint64(32)) | gene_bits
        else:
            # A uniform random subset: the smallest hashes. The gene id in the low 24 bits makes
            # the keys distinct: a tie of the upper 39 hash bits falls to the lower gene id.
            cells = np.repeat(cell_keys(cfg.seed, STREAM_SAMPLING, start + over), lengths)
            low = np.uint64(max(top_gene.bit_length(), 24))
            hashed = gene_hash(cells, genes[pos]) >> np.uint64(1)
            keys = (hashed >> low << low) | gene_bits
        keep = np.ones(len(genes), dtype=bool)
        keep[pos] = _smallest(keys, lengths, cap)
        indptr = np.concatenate([[0], np.cumsum(keep)])[indptr]
        genes, bins = genes[keep], bins[keep]
        counts = np.diff(indptr)

    # Order each cell's genes by id: pack (gene id, bin) into one integer key, scatter into a
    # (rows, W) matrix padded with the largest key, and sort its rows.
    shift = int(cfg.n_bins - 1).bit_length()
    key_type = np.int32 if (top_gene + 1) << shift < np.iinfo(np.int32).max else np.int64
    n_wide = int(counts.max(initial=0))
    packed = np.full((len(counts), n_wide), np.iinfo(key_type).max, dtype=key_type)
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    packed.reshape(-1)[rows * n_wide + _rank_in_runs(counts)] = (
        genes.astype(key_type) << shift
    ) | bins.astype(key_type)
    packed.sort(axis=1)

    real = np.arange(n_wide) < counts[:, None]
    gene_ids[:, 1 : n_wide + 1] = np.where(real, packed >> shift, gene_ids[:, 1 : n_wide + 1])
    values_out[:, 1 : n_wide + 1] = np.where(
        real, packed & ((1 << shift) - 1), values_out[:, 1 : n_wide + 1]
    )
    padding_mask[:, 1 : n_wide + 1] = ~real
    n_genes[:] = counts


def _smallest(keys: np.ndarray, lengths: np.ndarray, cap: int) -> np.ndarray:
    """Mask of the `cap` smallest of each run of `keys` (uint64, distinct within a run).

    One np.partition of a (runs, longest) table padded with the largest key: linear time."""
    run = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    table = np.full((len(lengths), int(lengths.max())), np.iinfo(np.uint64).max, dtype=np.uint64)
    table[run, _rank_in_runs(lengths)] = keys
    kth = np.partition(table, cap - 1, axis=1)[:, cap - 1]
    return keys <= kth[run]


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for each pair, vectorised."""
    lengths = ends - starts
    return np.repeat(starts, lengths) + _rank_in_runs(lengths)


def _rank_in_runs(lengths: np.ndarray) -> np.ndarray:
    """0, 1, .., n-1 for each run length n, concatenated."""
    ends = np.cumsum(lengths)
    return np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64) - np.repeat(
        ends - lengths, lengths
    )
