"""Reference files: labelled cells embedded once by a bundle, to annotate other cells by their
nearest neighbours (specified in docs/reference-format.md; this module is the only code that
knows the layout).

A `.scref` file is a safetensors file (no pickle): the L2-normalised embeddings, the cell
names, the classes and codes of each label key, the distances of sampled reference cells to
their nearest other reference cell (for "Unknown": a query farther from the reference than
almost every reference cell is from its neighbour), and a header naming the bundle whose
embeddings these are (its config.json sha256). Written atomically; read through one memory map,
so a large reference costs the pages the search touches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .bundle.format import decode_strings, encode_strings
from .errors import BundleError, InputError
from .io.atomic import atomic_path
from .knn import search, vote
from .results import Result

FORMAT, FORMAT_VERSION = "scgpt-reference", 1
SUFFIX = ".scref"
DISTANCE_SAMPLE = 2000  # reference cells whose nearest-neighbour distance sets the threshold
K = 10  # neighbours that vote (the official reference mapping's)
UNKNOWN_BELOW = 0.5  # a label needs at least half the votes (docs/results.md measures it)
DISTANCE_QUANTILE = 0.99  # farther than this share of reference cells from theirs: Unknown
_DTYPES = {"F32": np.float32, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


@dataclass(frozen=True)
class Reference:
    """Labelled reference cells: what `annotate --reference` maps query cells onto."""

    embeddings: np.ndarray  # (n, d) float32, L2-normalised
    obs_names: list[str]
    labels: dict[str, tuple[list[str], np.ndarray]]  # key -> (classes, codes (n,) int32, -1)
    nn_distances: np.ndarray  # (m,) float32: sampled cells' distance to their nearest other
    bundle_sha256: str
    source: str  # the file the cells came from

    @property
    def label_keys(self) -> list[str]:
        return list(self.labels)

    def check_bundle(self, sha256: str, path: str | Path) -> None:
        """BundleError unless the reference was embedded by the bundle of `sha256`."""
        if sha256 != self.bundle_sha256:
            raise BundleError(
                f"{path}: the reference was built with another model bundle (sha256 "
                f"{self.bundle_sha256[:12]}..., not {sha256[:12]}...); pass that bundle as "
                "--model, or build the reference again with this one"
            )

    def distance_threshold(self, quantile: float) -> float:
        """The `quantile` of the reference cells' nearest-neighbour distances (1: never)."""
        if quantile >= 1 or not len(self.nn_distances):
            return float("inf")
        return float(np.quantile(self.nn_distances.astype(np.float64), quantile))

    def map(
        self,
        query: np.ndarray,
        label_key: str | None = None,
        k: int = 10,
        how: str = "majority",
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(classes, vote shares (m, C), distance to the nearest reference cell (m,)) of
        L2-normalised query embeddings, for `label_key` (default: the first)."""
        key = self.key(label_key)
        classes, codes = self.labels[key]
        neighbours, distances = search(query, self.embeddings, k)
        shares = vote(neighbours, distances, codes, len(classes), how)
        return classes, shares.astype(np.float32), distances[:, 0].astype(np.float32)

    def key(self, label_key: str | None) -> str:
        if label_key is None:
            return self.label_keys[0]
        if label_key not in self.labels:
            raise InputError(
                f"the reference has no label key {label_key!r} "
                f"(it has {', '.join(self.label_keys)})"
            )
        return label_key


def label(
    result: Result,
    reference: Reference,
    label_key: str | None = None,
    k: int = K,
    how: str = "majority",
    unknown_below: float = 0.0,
    distance_quantile: float = DISTANCE_QUANTILE,
) -> Result:
    """`result` (L2-normalised embeddings) labelled by its cells' k nearest reference cells:
    vote shares as class_probs, the distance to the nearest reference cell, and Unknown where
    the share is below `unknown_below` or the cell is farther from the reference than the
    `distance_quantile` of the reference cells' own nearest-neighbour distances."""
    classes, shares, nearest = reference.map(result.embedding, label_key, k, how)
    result.labels, result.class_probs, result.knn_distance = classes, shares, nearest
    result.decide(unknown_below, nearest > reference.distance_threshold(distance_quantile))
    return result


def build(
    embeddings: np.ndarray,
    obs_names: list[str] | np.ndarray,
    labels: dict[str, np.ndarray],
    bundle_sha256: str,
    source: str,
    seed: int = 0,
) -> Reference:
    """A Reference of cells' L2-normalised embeddings (as the engine gives them, kept bit for
    bit) with their labels (key -> (n,) values, None = missing)."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    coded = {}
    for key, values in labels.items():
        present = [v for v in values if v is not None]
        if not present:
            raise InputError(f"{source}: no cell has a {key!r} label")
        classes = sorted({str(v) for v in present})
        index = {c: i for i, c in enumerate(classes)}
        codes = np.array([-1 if v is None else index[str(v)] for v in values], dtype=np.int32)
        coded[key] = (classes, codes)
    return Reference(
        emb, [str(n) for n in obs_names], coded, _self_distances(emb, seed), bundle_sha256, source
    )


def _self_distances(emb: np.ndarray, seed: int) -> np.ndarray:
    """Distances of up to DISTANCE_SAMPLE seeded reference cells to their nearest other."""
    if len(emb) < 2:
        return np.zeros(0, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).permutation(len(emb))[:DISTANCE_SAMPLE])
    neighbours, distances = search(emb[rows], emb, 2)
    itself = neighbours[:, 0] == rows  # a duplicate of the cell may come first: take the other
    return np.where(itself, distances[:, 1], distances[:, 0]).astype(np.float32)


# The file


def save(reference: Reference, path: str | Path) -> Path:
    """Write `reference` to `path` (safetensors), atomically."""
    path = Path(path)
    tensors = {
        "embeddings": np.ascontiguousarray(reference.embeddings, dtype=np.float32),
        "nn_distances": reference.nn_distances.astype(np.float32),
    }
    tensors |= dict(
        zip(
            ("obs_names.bytes", "obs_names.offsets"),
            encode_strings(reference.obs_names),
            strict=True,
        )
    )
    for i, (classes, codes) in enumerate(reference.labels.values()):
        tensors[f"labels.{i}.codes"] = codes.astype(np.int32)
        tensors |= dict(
            zip((f"labels.{i}.bytes", f"labels.{i}.offsets"), encode_strings(classes), strict=True)
        )
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "bundle_sha256": reference.bundle_sha256,
        "label_keys": json.dumps(reference.label_keys),
        "source": reference.source,
        "data_sha256": _digest(tensors),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def load(path: str | Path) -> Reference:
    """Read and check a reference file; BundleError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: no such reference file (scgpt-run reference build)")
    try:
        meta, tensors = _read(path)
        if meta.get("format") != FORMAT:
            raise BundleError(f"{path}: not an scGPT reference file (scgpt-run reference build)")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise BundleError(
                f"{path}: reference format version {meta.get('format_version')} is not "
                f"supported (this runtime reads {FORMAT_VERSION})"
            )
        if _digest(tensors) != meta["data_sha256"]:
            raise BundleError(f"{path}: checksum mismatch: the reference file is damaged")
        keys = json.loads(meta["label_keys"])
        labels = {
            key: (decode_strings(tensors, f"labels.{i}"), tensors[f"labels.{i}.codes"])
            for i, key in enumerate(keys)
        }
        emb, names = tensors["embeddings"], decode_strings(tensors, "obs_names")
        if emb.ndim != 2 or len(names) != len(emb):
            raise ValueError("embeddings and cell names disagree")
        for key, (classes, codes) in labels.items():
            if codes.shape != (len(emb),) or codes.max(initial=-1) >= len(classes):
                raise ValueError(f"label key {key}: codes do not fit the cells or classes")
        return Reference(
            emb, names, labels, tensors["nn_distances"], meta["bundle_sha256"], meta["source"]
        )
    except BundleError:
        raise
    except (OSError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not a readable reference file ({e})") from e


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Header metadata and tensors (views of one read-only memory map) of a safetensors file."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int(raw[:8].view("<u8")[0]) if len(raw) >= 8 else -1
    if not 0 < n <= len(raw) - 8:
        raise ValueError("the header size is wrong")
    header = json.loads(bytes(raw[8 : 8 + n]))
    meta = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        lo, hi = (8 + n + int(x) for x in entry["data_offsets"])
        dtype, shape = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"])
        if hi > len(raw) or hi - lo != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name} lies outside the file")
        tensors[name] = raw[lo:hi].view(dtype).reshape(shape)
    return meta, tensors


def _digest(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over the tensors' names and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).data)  # no copy of a memory map
    return h.hexdigest()
