"""Writing results: CSV/TSV tables, .npy arrays, .h5ad files, and shard parts with their merge.

Every file is written to a temporary name beside its destination and renamed into place
(`io.atomic.atomic_path`), in place too (`--inplace`): an interrupted run leaves the old file
whole. A shard run writes a part file (HDF5, below); `merge` joins the parts of one input and
writes the output through the same writers as an unsharded run, so the two are identical.

Part file (`.part`), format version 2 (version 1 lacked codes and knn_distance):
    attrs   format "scgpt-part", format_version 2, shard "I/N", start, stop,
            settings (JSON: command, input, bundle, precision, options; equal in every part),
            labels (JSON: class names), variants (JSON: graph length -> cells)
    obs_names (n,) str, n_genes (n,) int64, embedding (n, d) float32,
    class_probs (n, n_cls) float32, codes (n,) int64 predicted class (-1: Unknown)
    (annotate only), knn_distance (n,) float32 (annotate with a reference only)
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np

from .errors import InputError, OutputError
from .io import open_counts
from .io.atomic import atomic_path, temp_prefix
from .io.write import add_to_h5ad, extensible, write_new_h5ad
from .results import Result

SUFFIXES = {"annotate": (".csv", ".tsv", ".h5ad"), "embed": (".npy", ".h5ad", ".csv", ".tsv")}
EMBEDDING_KEY = "X_scGPT"  # obsm key, as the official scGPT code names it
UNS_KEY = "scGPT"  # provenance of the results
PART_FORMAT, PART_VERSION, PART_SUFFIX = "scgpt-part", 2, ".part"
_STR = h5py.string_dtype()


def output_kind(command: str, out: Path | None, *, inplace: bool, shard: bool) -> str:
    """The kind of output the options ask for: "csv", "tsv", "npy", "h5ad", "part", "inplace"
    or "stdout"; ValueError with the message for the user where they do not fit together."""
    if inplace:
        if out is not None or shard:
            raise ValueError("--inplace writes into FILE: drop --out and --shard")
        return "inplace"
    if shard:
        if out is None or out.suffix != PART_SUFFIX:
            raise ValueError(
                f"with --shard, --out names a part file ending in {PART_SUFFIX} "
                "(join the parts with scgpt-run merge)"
            )
        return "part"
    if out is None:
        if command == "embed":
            raise ValueError("embed needs --out (.npy, .h5ad, .csv or .tsv)")
        return "stdout"
    if out.suffix not in SUFFIXES[command]:
        raise ValueError(
            f"--out {out}: {command} writes {', '.join(SUFFIXES[command])} files, "
            f"not {out.suffix or 'files without a suffix'}"
        )
    return out.suffix[1:]


def check_output(out: Path, *, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, an output that cannot or may not be written (OutputError)."""
    if source is not None and out.exists() and source.exists() and out.samefile(source):
        raise OutputError(f"{out}: is the input file; pass --inplace to write into it")
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file name for the output")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite to replace it")
    writable(out)


def writable(out: Path) -> None:
    """OutputError unless a file can be created beside `out` (permissions, read-only disks)."""
    try:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=temp_prefix(out), suffix=".probe")
    except OSError as e:
        raise OutputError(f"{out}: cannot write in {out.parent} ({e.strerror})") from e
    os.close(fd)
    Path(name).unlink()
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{out}: is read-only; write the results to another file")


def write(
    kind: str,
    result: Result,
    settings: dict[str, Any],
    *,
    out: Path | None = None,
    top_k: int = 0,
    prefix: str = "scgpt_",
    stream: IO[str] | None = None,
) -> Path | None:
    """Write `result` as `kind` (output_kind) to `out` (or `stream` for "stdout"): its
    annotation where it has class probabilities, else its embedding.

    `settings` are recorded in .h5ad files (uns["scGPT"]); for h5ad and inplace outputs the
    input file named in settings["input"] is copied or written into. Returns the path written.
    """
    ann = result if result.class_probs is not None else None
    top_k = min(top_k, len(result.labels or []))  # there are no more classes than that
    if kind == "stdout":
        _write_table(stream, result, ann, top_k, ",")
        return None
    if kind in ("csv", "tsv"):
        with atomic_path(out) as tmp, tmp.open("w", newline="") as f:
            _write_table(f, result, ann, top_k, "\t" if kind == "tsv" else ",")
        return out
    if kind == "npy":
        with atomic_path(out) as tmp, tmp.open("wb") as f:
            save_npy(f, result.embedding)
        return out
    if kind in ("h5ad", "inplace"):
        obs = {} if ann is None else _annotation_columns(ann, top_k, prefix)
        return _write_h5ad(out, result, settings, obs, inplace=kind == "inplace")
    raise ValueError(f"unknown output kind {kind!r}")


def _write_table(
    f: IO[str], result: Result, ann: Result | None, top_k: int, delimiter: str
) -> None:
    """Rows keyed by cell barcode, in file order: annotations, or embeddings where `ann` is
    None. Floats: 6 significant digits for probabilities, 9 (exact float32) for embeddings."""
    w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
    if ann is None:
        w.writerow(["cell", *(str(i) for i in range(result.embedding.shape[1]))])
        for name, row in zip(result.obs_names, result.embedding, strict=True):
            w.writerow([name, *(f"{x:.9g}" for x in row.tolist())])
        return
    mapped = ann.knn_distance is not None
    header = ["cell", "predicted_labels", "conf_score", "n_genes"] + ["knn_distance"] * mapped
    for j in range(1, top_k + 1):
        header += [f"top{j}_label", f"top{j}_prob"]
    w.writerow(header)
    top_names, top_probs = ann.top_k(top_k)
    distances = ann.knn_distance.tolist() if mapped else [None] * ann.n_cells
    rows = zip(
        ann.obs_names,
        ann.predicted_labels,
        ann.conf_score.tolist(),
        ann.n_genes.tolist(),
        distances,
        top_names,
        top_probs.tolist(),
        strict=True,
    )
    for name, label, conf, n_genes, distance, names, probs in rows:
        row = [name, label, f"{conf:.6g}", n_genes]
        if mapped:
            row.append(f"{distance:.6g}")
        for label_j, prob_j in zip(names, probs, strict=True):
            row += [label_j, f"{prob_j:.6g}"]
        w.writerow(row)


def _annotation_columns(ann: Result, top_k: int, prefix: str) -> dict[str, np.ndarray]:
    obs = {
        f"{prefix}predicted_labels": ann.predicted_labels,
        f"{prefix}conf_score": ann.conf_score,
        f"{prefix}n_genes": ann.n_genes,
    }
    if ann.knn_distance is not None:
        obs[f"{prefix}knn_distance"] = ann.knn_distance
    names, probs = ann.top_k(top_k)
    for j in range(top_k):
        obs[f"{prefix}top{j + 1}_label"] = names[:, j]
        obs[f"{prefix}top{j + 1}_prob"] = probs[:, j]
    return obs


def _write_h5ad(
    out: Path | None,
    result: Result,
    settings: dict[str, Any],
    obs: dict[str, np.ndarray],
    *,
    inplace: bool,
) -> Path:
    source = Path(settings["input"])
    obsm = {EMBEDDING_KEY: result.embedding}
    uns = {UNS_KEY: _uns(settings)}
    if not source.exists():  # a file, or a 10x Matrix Market folder
        raise InputError(f"{source}: the input is gone; its .h5ad output copies it")
    if inplace or (settings["input_format"] == "h5ad" and extensible(source)):
        return add_to_h5ad(
            source, None if inplace else out, obs=obs, obsm=obsm, uns=uns, overwrite=True
        )
    # A 10x file or a legacy anndata file: a new, modern .h5ad of its cells and the results.
    options = settings["options"]
    with open_counts(
        source,
        layer=options.get("layer"),
        use_raw=options.get("use_raw", True),
        genome=options.get("genome"),
    ) as counts:
        return write_new_h5ad(out, counts, obs=obs, obsm=obsm, uns=uns, overwrite=True)


def _uns(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as an anndata uns dict: None dropped (h5ad has no null)."""
    if isinstance(settings, dict):
        return {k: _uns(v) for k, v in settings.items() if v is not None}
    return settings


# Shard parts


def write_part(
    out: Path,
    result: Result,
    settings: dict[str, Any],
    *,
    shard: str,
    start: int,
    stop: int,
) -> Path:
    """The results of one shard, for `merge` (format in the module docstring)."""
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs["format"] = PART_FORMAT
        h5.attrs["format_version"] = PART_VERSION
        h5.attrs["shard"], h5.attrs["start"], h5.attrs["stop"] = shard, start, stop
        h5.attrs["settings"] = json.dumps(settings)
        h5.attrs["labels"] = json.dumps(list(result.labels or []))
        h5.attrs["variants"] = json.dumps(result.graphs)  # graph length -> cells
        h5.create_dataset("obs_names", data=result.obs_names.astype(object), dtype=_STR)
        h5.create_dataset("n_genes", data=result.n_genes)
        h5.create_dataset("embedding", data=result.embedding)
        for name in ("class_probs", "codes", "knn_distance"):
            if getattr(result, name) is not None:
                h5.create_dataset(name, data=getattr(result, name))
    return out


def merge(
    parts: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    inplace: bool = False,
    overwrite: bool = False,
    stream: IO[str] | None = None,
) -> dict[str, Any]:
    """`scgpt-run merge`: join the part files of a sharded run into the output an unsharded
    run writes (format from the suffix of `out`; `inplace`: into the input .h5ad). Returns a
    summary. InputError for parts that are missing, repeated or from different runs."""
    out = None if out is None else Path(out)
    result, settings = read_parts([Path(p) for p in parts])
    kind = output_kind(settings["command"], out, inplace=inplace, shard=False)
    if kind == "inplace":
        check_output(Path(settings["input"]), overwrite=True)
    elif out is not None:
        check_output(out, overwrite=overwrite, source=Path(settings["input"]))
    options = settings["options"]
    written = write(
        kind,
        result,
        settings,
        out=out,
        top_k=options.get("top_k", 0),
        prefix=options.get("prefix", ""),
        stream=stream,
    )
    return {
        "command": "merge",
        "parts": len(parts),
        "input": settings["input"],
        "output": None if written is None else str(written),
        "n_cells": len(result.obs_names),
        "graphs": {str(k): v for k, v in result.graphs.items()},
    }


def read_parts(paths: Sequence[Path]) -> tuple[Result, dict[str, Any]]:
    """The parts of one run joined in shard order and their settings. InputError where a file
    is not a part, the parts come from different runs, or a shard is missing or repeated."""
    parts = [_read_part(Path(p)) for p in paths]
    if not parts:
        raise InputError("merge: no part files given")
    first = parts[0]
    for p in parts[1:]:
        if p["settings"] != first["settings"]:
            diff = sorted(
                k
                for k in first["settings"].keys() | p["settings"].keys()
                if first["settings"].get(k) != p["settings"].get(k)
            )
            raise InputError(
                f"{p['path']}: is not from the same run as {first['path']} "
                f"(differs in {', '.join(diff)})"
            )
    count = int(first["shard"].split("/")[1])
    by_index: dict[int, dict] = {}
    for p in parts:
        index, n = (int(x) for x in p["shard"].split("/"))
        if n != count:
            raise InputError(f"{p['path']}: is shard {p['shard']}, not one of {count} shards")
        if index in by_index:
            raise InputError(f"{p['path']}: shard {p['shard']} is also {by_index[index]['path']}")
        by_index[index] = p
    missing = sorted(set(range(1, count + 1)) - set(by_index))
    if missing:
        raise InputError(
            f"merge: shards {', '.join(f'{i}/{count}' for i in missing)} are missing "
            f"(given {len(parts)} of {count})"
        )
    ordered = [by_index[i] for i in range(1, count + 1)]
    n_cells = first["settings"]["n_cells"]
    bounds = [(p["start"], p["stop"]) for p in ordered]
    if (
        bounds[0][0] != 0
        or bounds[-1][1] != n_cells
        or any(a[1] != b[0] for a, b in pairwise(bounds))
    ):
        raise InputError(f"merge: the parts do not cover cells 0..{n_cells} in order: {bounds}")
    variants: dict[int, int] = {}
    for p in ordered:
        for length, k in p["variants"].items():
            variants[int(length)] = variants.get(int(length), 0) + k
    annotated = ordered[0]["class_probs"] is not None
    joined = Result(
        obs_names=np.concatenate([p["obs_names"] for p in ordered]),
        n_genes=np.concatenate([p["n_genes"] for p in ordered]),
        embedding=np.concatenate([p["embedding"] for p in ordered]),
        labels=first["labels"] if annotated else None,
        graphs=dict(sorted(variants.items())),
    )
    for name in ("class_probs", "codes", "knn_distance"):
        if ordered[0][name] is not None:
            setattr(joined, name, np.concatenate([p[name] for p in ordered]))
    return joined, first["settings"]


def _read_part(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != PART_FORMAT:
                raise InputError(f"{path}: not a part file of scgpt-run --shard")
            if h5.attrs.get("format_version") != PART_VERSION:
                raise InputError(
                    f"{path}: part format version {h5.attrs.get('format_version')} is not "
                    f"supported (this runtime reads {PART_VERSION})"
                )
            return {
                "path": path,
                "shard": str(h5.attrs["shard"]),
                "start": int(h5.attrs["start"]),
                "stop": int(h5.attrs["stop"]),
                "settings": json.loads(h5.attrs["settings"]),
                "variants": json.loads(h5.attrs["variants"]),
                "labels": json.loads(h5.attrs["labels"]),
                "obs_names": h5["obs_names"].asstr()[:].astype(str),
                "n_genes": h5["n_genes"][:],
                "embedding": h5["embedding"][:],
                **{
                    name: h5[name][:] if name in h5 else None
                    for name in ("class_probs", "codes", "knn_distance")
                },
            }
    except OSError as e:
        raise InputError(f"{path}: not a readable part file ({e})") from e
    except (KeyError, ValueError) as e:
        raise InputError(f"{path}: damaged part file ({e!r})") from e


def save_npy(f: IO[bytes], array: np.ndarray) -> None:
    """np.save's format, written through Python: np.save's tofile loses a short write (a full
    disk) without an error."""
    array = np.ascontiguousarray(array)
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
    f.write(array.data)
