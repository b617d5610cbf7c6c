"""The commands that serve a file: `scgpt-run annotate` and `embed`, end to end.

Cheap checks come first (output, input file, bundle, gene match), then the cells stream through
the engine (engine.py) and the results are written (outputs.py). `--shard I/N` takes the I-th
of N contiguous, nearly equal ranges of cells, so the shards of a file concatenated in order
are the file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort

from . import engine, outputs
from . import reference as reference_files
from .bundle import load_bundle
from .engine import BLOCK_SIZE, Model, Progress, label_cells, match_bundle_genes, run
from .errors import BundleError, OutputError
from .genes import MIN_GENE_FRACTION
from .io import open_counts
from .io.atomic import atomic_dir
from .io.probe import probe
from .modalities import ModalityMatch
from .obs import obs_strings, parse_where, selected
from .results import Result
from .served import bundle_or_default

log = logging.getLogger(__name__)

SPILL_BYTES = 256 << 20  # embeddings larger than this go to a memory-mapped scratch file


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
    reference: str | Path | None = None,
    label_key: str | None = None,
    k: int = reference_files.K,
    vote: str = "majority",
    unknown_below: float | None = None,
    distance_quantile: float = reference_files.DISTANCE_QUANTILE,
    raw: bool = False,
    shard: str | Shard | None = None,
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    gene_column: str | None = None,
    min_gene_fraction: float = MIN_GENE_FRACTION,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
    block_size: int = BLOCK_SIZE,
    overwrite: bool = False,
    report: str | Path | None = None,
    color_by: Sequence[str] = (),
    stream: IO[str] | None = None,
    progress: Progress | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run `command` ("annotate" or "embed") on FILE with the bundle `model`; annotate labels
    cells by the bundle's head, or with `reference` by their nearest reference cells
    (`engine.label_cells`). `report`: an HTML report of the run (extra [report]), its map
    coloured also by the obs columns `color_by`.

    Cheap checks come first (output, input file, bundle, reference, gene match), then the cells
    stream through the model. ValueError: options that do not fit together (a usage error);
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
    report = check_report(report, color_by, file, overwrite)
    probe(file)
    with open_counts(file, layer=layer, use_raw=use_raw, genome=genome) as counts:
        if kind == "inplace" and counts.format != "h5ad":
            raise OutputError(f"{file}: is a {counts.format} file; --inplace needs an .h5ad file")
        start, stop = shard.range(counts.n_cells) if shard else (0, counts.n_cells)
        colors = {key: counts.read_obs(key)[start:stop] for key in color_by}
        bundle = load_bundle(bundle_or_default(model))
        ref = None
        if command == "annotate" and reference is not None:
            ref = reference_files.load(reference)
            ref.check_bundle(bundle.sha256, reference)
            ref.key(label_key)  # an unknown label key fails here, before any work
        elif command == "annotate" and not bundle.labels:
            raise BundleError(
                f"{bundle.path}: the model has no cell-type head; annotate with --reference "
                "(scgpt-run reference build), or embed"
            )
        match = match_bundle_genes(counts, bundle, gene_column, min_gene_fraction)
        load = {"device": device, "precision": precision, "threads": threads}
        with Model.load(bundle, **load, batch_size=batch_size, verbose=verbose) as served:
            options = {
                "layer": layer,
                "use_raw": use_raw,
                "genome": genome,
                "min_gene_fraction": min_gene_fraction,
            }
            if command == "annotate":
                options.update(prefix=prefix, top_k=top_k, unknown_below=unknown_below)
                if ref is not None:
                    options["reference"] = {
                        "file": Path(reference).name,
                        "bundle_sha256": ref.bundle_sha256,
                        "label_key": ref.key(label_key),
                        "k": k,
                        "vote": vote,
                        "distance_quantile": distance_quantile,
                    }
            else:
                options["raw"] = raw
            settings = _settings(command, file, counts, served, match, options)
            target = out if out is not None else file if inplace else None
            with _embedding_buffer(stop - start, served.d_model, target) as buffer:
                t_run = time.perf_counter()
                result = run(
                    served,
                    counts,
                    match.column_ids,
                    start=start,
                    stop=stop,
                    block_size=block_size,
                    normalized=not raw,
                    class_probs=command == "annotate" and ref is None,
                    embedding=buffer,
                    progress=progress,
                    modalities=engine.token_modalities(bundle, match),
                )
                if command == "annotate":
                    label_cells(result, ref, label_key, k, vote, unknown_below, distance_quantile)
                run_seconds = time.perf_counter() - t_run
                if kind == "part":
                    written = outputs.write_part(
                        out, result, settings, shard=str(shard), start=start, stop=stop
                    )
                else:
                    written = outputs.write(
                        kind, result, settings, out=out, top_k=top_k, prefix=prefix, stream=stream
                    )
            summary = _summary(
                command, file, written, shard, result, match, served, t0, run_seconds
            )
            if isinstance(match, ModalityMatch):
                summary["missing_modality"] = match.missing(counts, start, stop)
            if report is not None:
                summary["report"] = str(_write_report(report, summary, settings, result, colors))
    if summary["n_empty"]:
        log.warning(
            "%s: %d of %d cells have no gene in the model vocabulary (n_genes 0): annotate calls "
            "them Unknown with conf_score 0; their embedding is that of <cls> alone",
            file,
            summary["n_empty"],
            summary["n_cells"],
        )
    return summary


def check_report(
    report: str | Path | None, color_by: Sequence[str], file: Path, overwrite: bool
) -> Path | None:
    """The report path, checked before any work (the extra installed, an .html name)."""
    if report is None:
        if color_by:
            raise ValueError("--color-by colours the map of --report: give --report too")
        return None
    from .report import report_path, require

    require()
    report = report_path(report)
    outputs.check_output(report, overwrite=overwrite, source=file)
    return report


def _write_report(report: Path, summary, settings, result: Result, colors) -> Path:
    from .report.serving import colour_values, serving_report

    log.info("writing the report %s", report)
    shown = {k: colour_values(v) for k, v in colors.items()}
    return serving_report(summary, settings, result, shown).write(report)


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


def _summary(
    command, file, written, shard, result: Result, match, model, t0, run_seconds
) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    n = result.n_cells
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
        "graphs": {str(k): v for k, v in sorted(result.graphs.items())},
        "seconds": round(seconds, 3),
        "run_seconds": round(run_seconds, 3),
        "cells_per_s": round(n / max(run_seconds, 1e-9), 1),
    }
    if command == "annotate" and n:
        summary["label_counts"] = result.label_counts()
        summary["n_unknown"] = int((result.codes < 0).sum())
    return summary


@contextlib.contextmanager
def _embedding_buffer(n: int, d: int, target: Path | None) -> Iterator[np.ndarray | None]:
    """None (the engine allocates in memory) for small outputs; for outputs over
    SPILL_BYTES a memory-mapped .npy beside the output `target` (else in TMPDIR), deleted
    afterwards (or by the next run, if this one is killed): memory stays bounded."""
    if n * d * 4 <= SPILL_BYTES:
        yield None
        return
    spill = atomic_dir(target, ".embedding") if target else tempfile.TemporaryDirectory()
    with spill as tmp:
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
    min_gene_fraction: float = MIN_GENE_FRACTION,
) -> dict[str, Any]:
    """How the genes of FILE match the vocabulary (and gene panel) of the bundle `model`
    (`scgpt-run inspect --model`): GeneMatch.to_dict() plus the panel size. Raises
    GeneMatchError below `min_gene_fraction`."""
    bundle = load_bundle(model)
    with open_counts(file, layer=layer, use_raw=use_raw, genome=genome) as counts:
        match = match_bundle_genes(counts, bundle, gene_column, min_gene_fraction)
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


def build_reference(
    file: str | Path,
    *,
    out: str | Path,
    label_keys: Sequence[str],
    model: str | Path | None = None,
    where: Sequence[str] = (),
    layer: str | None = None,
    use_raw: bool = True,
    genome: str | None = None,
    gene_column: str | None = None,
    min_gene_fraction: float = MIN_GENE_FRACTION,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
    block_size: int = BLOCK_SIZE,
    overwrite: bool = False,
    progress: Progress | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """`scgpt-run reference build`: the cells of FILE (those matching every `where` COL=VALUE)
    embedded by the bundle `model`, with their labels (obs columns `label_keys`), written to
    `out` (.scref). Cells without any of the labels are left out. Returns the summary."""
    t0 = time.perf_counter()
    file, out = Path(file), Path(out)
    if out.suffix != reference_files.SUFFIX:
        raise ValueError(f"--out {out}: a reference file ends in {reference_files.SUFFIX}")
    if not label_keys:
        raise ValueError("give at least one --label-key")
    outputs.check_output(out, overwrite=overwrite, source=file)
    probe(file)
    with open_counts(file, layer=layer, use_raw=use_raw, genome=genome) as counts:
        keep = selected(counts, parse_where(where))
        labels = {key: obs_strings(counts.read_obs(key)) for key in label_keys}
        labelled = [[x is not None for x in v] for v in labels.values()]
        keep &= np.any(labelled, axis=0)
        bundle = load_bundle(bundle_or_default(model))
        match = match_bundle_genes(counts, bundle, gene_column, min_gene_fraction)
        load = {"device": device, "precision": precision, "threads": threads}
        with Model.load(bundle, **load, batch_size=batch_size, verbose=verbose) as served:
            result = run(
                served,
                counts,
                match.column_ids,
                block_size=block_size,
                progress=progress,
                modalities=engine.token_modalities(bundle, match),
            )
            rows = np.flatnonzero(keep)
            ref = reference_files.build(
                result.embedding[rows],
                result.obs_names[rows],
                {key: v[rows] for key, v in labels.items()},
                served.bundle_sha256,
                file.name,
            )
            reference_files.save(ref, out)
            precision = served.precision
    return {
        "command": "reference build",
        "input": str(file),
        "output": str(out),
        "n_cells": len(rows),
        "n_left_out": int(counts.n_cells - len(rows)),
        "label_keys": {key: classes for key, (classes, _) in ref.labels.items()},
        "bundle": str(bundle.path),
        "bundle_sha256": ref.bundle_sha256,
        "precision": precision,
        "seconds": round(time.perf_counter() - t0, 3),
    }
