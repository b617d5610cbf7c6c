"""The fuzz corpus: broken copies of real files of every kind the runtime reads.

Seeds are cells of ../shared/data whose genes the committed test bundle knows, written as
h5ad (csr, csc, dense) and 10x v3 and v2 HDF5, real files of other tools and eras (anndata
0.6 to 0.8, a two-genome 10x v2 file), the test bundle, and a reference built with it.
A mutation turns a seed into a broken copy, seeded and reproducible:

- bytes: truncation; flips in the superblock, in each kind of HDF5 structure (object headers,
  B-trees, local and global heaps, found by their signatures), in data chunks and anywhere;
- structure (h5py edits of a copy): datasets swapped, wrong dtypes and shapes, absurd sizes
  (indptr claiming 2^40 values), NaN, inf and negative counts, an empty and an all-zero matrix,
  duplicate barcodes and genes, names that are not UTF-8;
- bundles and references: the same byte mutations on one of their files.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REAL_SEEDS = [  # files of other tools and eras, as they are
    "formats/h5ad/tiledbsoma_pbmc-small.h5ad",
    "formats/h5ad/tiledbsoma_pbmc-small_anndata07.h5ad",
    "formats/h5ad/tiledbsoma_multiome_subset_100_100.h5ad",
    "formats/h5ad/zellkonverter_krumsiek11_augmented_v0-8.h5ad",
    "formats/h5ad/kang2018_scgen_valid_legacy06.h5ad",
    "formats/10x/scanpy_1.2.0_multiple_genomes.h5",
]
KANG = SHARED / "labelled" / "kang2018_pbmc_counts.h5ad"
LIAO = SHARED / "unlabelled" / "liao2020_balf_GSM4339772_C144_filtered_feature_bc_matrix.h5"
N_CELLS = 60  # cells of the generated seeds
BUNDLE = ROOT / "tests" / "fixtures" / "bundles" / "small"
# Signatures of HDF5's on-disk structures (the file format specification, section III).
SIGNATURES = {
    "object header": b"OHDR",
    "B-tree v1": b"TREE",
    "B-tree v2": b"BTHD",
    "local heap": b"HEAP",
    "global heap": b"GCOL",
    "fractal heap": b"FRHP",
    "symbol table": b"SNOD",
}


def make_seeds(workdir: Path) -> list[Path]:
    """Seeds whose genes the test bundle knows (Kang cells as csr, csc and dense h5ad; Liao
    cells as 10x v3 and v2), then the real files of REAL_SEEDS."""
    import anndata as ad
    import scipy.sparse as sp

    kang = ad.read_h5ad(KANG)[:N_CELLS].copy()
    out = []
    for layout in ("csr", "csc", "dense"):
        x = kang.X.toarray() if layout == "dense" else getattr(sp, f"{layout}_matrix")(kang.X)
        path = workdir / f"kang-{layout}.h5ad"
        ad.AnnData(x, obs=kang.obs, var=kang.var).write_h5ad(path)
        out.append(path)
    out += [_liao_v3(workdir / "liao-v3.h5"), _liao_v2(workdir / "liao-v2.h5")]
    return out + [SHARED / rel for rel in REAL_SEEDS]


def _liao_v3(dst: Path) -> Path:
    return first_cells_10x(LIAO, dst, N_CELLS)


def first_cells_10x(src: Path, dst: Path, n: int) -> Path:
    """The first n cells of the 10x v3 file `src`, as a 10x v3 file."""
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        m, end = f["matrix"], int(f["matrix"]["indptr"][n])
        out = g.create_group("matrix")
        f.copy(m["features"], out, "features")
        out["barcodes"] = m["barcodes"][:n]
        out["data"], out["indices"] = m["data"][:end], m["indices"][:end]
        out["indptr"] = m["indptr"][: n + 1]
        out["shape"] = np.array([m["shape"][0], n], dtype=m["shape"].dtype)
    return dst


def _liao_v2(dst: Path) -> Path:
    """The same cells in the CellRanger 2 layout: one group per genome."""
    with h5py.File(LIAO) as f, h5py.File(dst, "w") as g:
        m, end = f["matrix"], int(f["matrix"]["indptr"][N_CELLS])
        out = g.create_group("GRCh38")
        out["barcodes"] = m["barcodes"][:N_CELLS]
        out["data"], out["indices"] = m["data"][:end], m["indices"][:end]
        out["indptr"] = m["indptr"][: N_CELLS + 1]
        out["shape"] = np.array([m["shape"][0], N_CELLS], dtype=np.int32)
        out["genes"], out["gene_names"] = m["features"]["id"][()], m["features"]["name"][()]
    return dst


# Byte mutations: (data, rng, file) -> mutated data, or None where the mutation does not apply


def truncate(data: bytes, rng: np.random.Generator, _: Path) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def flip(data: bytes, rng: np.random.Generator, lo: int, hi: int, n: int = 4) -> bytes:
    out = bytearray(data)
    for i in rng.integers(lo, max(lo + 1, hi), n):
        out[int(i)] ^= int(rng.integers(1, 256))
    return bytes(out)


def flip_superblock(data: bytes, rng: np.random.Generator, _: Path) -> bytes:
    return flip(data, rng, 0, min(96, len(data)), n=2)


def flip_anywhere(data: bytes, rng: np.random.Generator, _: Path) -> bytes:
    return flip(data, rng, 0, len(data), n=int(rng.integers(1, 9)))


def flip_structure(signature: bytes) -> Callable:
    def mutate(data: bytes, rng: np.random.Generator, _: Path) -> bytes | None:
        found = list(_find_all(data, signature))
        if not found:
            return None
        at = int(rng.choice(found))
        return flip(data, rng, at, min(len(data), at + 64), n=2)

    return mutate


def flip_data(data: bytes, rng: np.random.Generator, path: Path) -> bytes | None:
    """Flips inside the stored bytes of a dataset (a chunk, or contiguous storage)."""
    extents = _data_extents(path)
    if not extents:
        return None
    start, size = extents[int(rng.integers(len(extents)))]
    return flip(data, rng, start, start + size, n=int(rng.integers(1, 5)))


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0 and len(out) < 10_000:
        out.append(i)
        i = data.find(needle, i + 1)
    return out


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """(file offset, bytes) of every chunk or contiguous dataset of at least 16 bytes."""
    extents: list[tuple[int, int]] = []

    def visit(_: str, obj: object) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.id.get_storage_size() < 16:
            return
        if obj.chunks is None:
            offset = obj.id.get_offset()
            if offset is not None:
                extents.append((offset, obj.id.get_storage_size()))
            return
        for i in range(min(obj.id.get_num_chunks(), 64)):
            info = obj.id.get_chunk_info(i)
            extents.append((info.byte_offset, info.size))

    try:
        with h5py.File(path, "r") as h5:
            h5.visititems(visit)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):
        return []
    return extents


def zero_heap_object(data: bytes, rng: np.random.Generator, _: Path) -> bytes | None:
    """A global heap object made free space of size 0: libhdf5 then loops forever reading the
    collection (HDFGroup/hdf5#1707). Objects: index (2 bytes), references (2), reserved (4),
    size (8), data padded to 8 bytes; index 0 is the collection's free space."""
    collections = _find_all(data, b"GCOL")
    if not collections:
        return None
    at = int(rng.choice(collections))
    end = at + int.from_bytes(data[at + 8 : at + 16], "little")
    objects, p = [], at + 16
    while p + 16 <= min(end, len(data)) and int.from_bytes(data[p : p + 2], "little"):
        objects.append(p)
        p += 16 + -(-int.from_bytes(data[p + 8 : p + 16], "little") // 8) * 8
    if not objects:
        return None
    p = int(rng.choice(objects))
    return data[:p] + bytes(2) + data[p + 2 : p + 8] + bytes(8) + data[p + 16 :]


BYTE_MUTATIONS: dict[str, Callable] = {
    "truncate": truncate,
    "flip superblock": flip_superblock,
    **{f"flip {name}": flip_structure(sig) for name, sig in SIGNATURES.items()},
    "zero global heap object": zero_heap_object,
    "flip data": flip_data,
    "flip anywhere": flip_anywhere,
}


# Structural mutations: edits of an HDF5 copy with h5py; each returns False where it does not
# apply to the file. `m` is the sparse matrix group (or dense dataset) that is read.


def _matrix(h5: h5py.File) -> h5py.Group | h5py.Dataset | None:
    for key in ("raw/X", "X", "matrix"):
        if key in h5:
            return h5[key]
    groups = [h5[k] for k in h5 if isinstance(h5[k], h5py.Group) and "indptr" in h5[k]]
    return groups[0] if groups else None


def _replace(g: h5py.Group, name: str, values: np.ndarray) -> None:
    attrs = dict(g[name].attrs)
    del g[name]
    g[name] = values
    g[name].attrs.update(attrs)


def swap_datasets(h5: h5py.File, rng: np.random.Generator) -> bool:
    m = _matrix(h5)
    if not isinstance(m, h5py.Group):
        return False
    h5.move(f"{m.name}/data", f"{m.name}/tmp")
    h5.move(f"{m.name}/indices", f"{m.name}/data")
    h5.move(f"{m.name}/tmp", f"{m.name}/indices")
    return True


def wrong_dtype(h5: h5py.File, rng: np.random.Generator) -> bool:
    m = _matrix(h5)
    if not isinstance(m, h5py.Group):
        return False
    name = str(rng.choice(["data", "indices", "indptr"]))
    _replace(m, name, np.array([b"x"] * len(m[name]), dtype="S1"))
    return True


def wrong_shape(h5: h5py.File, rng: np.random.Generator) -> bool:
    m = _matrix(h5)
    if not isinstance(m, h5py.Group):
        return False
    which = int(rng.integers(3))
    if which == 0:
        _replace(m, "indptr", m["indptr"][: max(1, len(m["indptr"]) // 2)])
    elif which == 1:
        _replace(m, "indices", m["indices"][: len(m["indices"]) // 2])
    elif "shape" in m.attrs:
        m.attrs["shape"] = np.array(m.attrs["shape"]) * 3
    elif "shape" in m:
        _replace(m, "shape", np.array(m["shape"][()]) * 3)
    else:
        return False
    return True


def absurd_sizes(h5: h5py.File, rng: np.random.Generator) -> bool:
    m = _matrix(h5)
    if not isinstance(m, h5py.Group):
        return False
    indptr = m["indptr"][()].astype(np.int64)
    indptr[int(rng.integers(1, len(indptr)))] = 2**40
    _replace(m, "indptr", indptr)
    return True


def bad_values(h5: h5py.File, rng: np.random.Generator) -> bool:
    m = _matrix(h5)
    ds = m["data"] if isinstance(m, h5py.Group) else m
    if ds is None or ds.size == 0 or ds.dtype.kind not in "fiu":
        return False
    values = ds[()].astype(np.float32)
    flat = values.reshape(-1)
    flat[rng.integers(0, flat.size, 3)] = rng.choice([np.nan, np.inf, -1.0, -np.inf])
    parent, name = ds.parent, ds.name.rsplit("/", 1)[1]
    _replace(parent, name, values)
    return True


def emptied(h5: h5py.File, rng: np.random.Generator) -> bool:
    m = _matrix(h5)
    if not isinstance(m, h5py.Group):
        return False
    zero_cells = bool(rng.integers(2))
    indptr = m["indptr"][()]
    if zero_cells:  # no stored values at all: every cell all-zero
        _replace(m, "data", m["data"][:0])
        _replace(m, "indices", m["indices"][:0])
        _replace(m, "indptr", np.zeros_like(indptr))
    else:
        _replace(m, "data", np.zeros_like(m["data"][()]))
    return True


def duplicate_names(h5: h5py.File, rng: np.random.Generator) -> bool:
    for key in ("obs/_index", "var/_index", "obs/index", "var/index", "matrix/barcodes"):
        if key in h5 and isinstance(h5[key], h5py.Dataset) and len(h5[key]) > 1:
            names = h5[key][()]
            names[1:] = names[0]
            _replace(h5[key].parent, key.rsplit("/", 1)[1], names)
            return True
    return False


def not_utf8(h5: h5py.File, rng: np.random.Generator) -> bool:
    for key in ("var/_index", "var/index", "matrix/features/name", "matrix/gene_names"):
        if key in h5 and isinstance(h5[key], h5py.Dataset) and len(h5[key]):
            n = len(h5[key])
            names = np.array([b"\xff\xfeG%d" % i for i in range(n)], dtype=object)
            parent, name = h5[key].parent, key.rsplit("/", 1)[1]
            attrs = dict(h5[key].attrs)
            del parent[name]
            parent.create_dataset(name, data=names, dtype=h5py.vlen_dtype(bytes))
            parent[name].attrs.update(attrs)
            return True
    return False


STRUCT_MUTATIONS: dict[str, Callable] = {
    "swap data and indices": swap_datasets,
    "wrong dtype": wrong_dtype,
    "wrong shape": wrong_shape,
    "absurd indptr": absurd_sizes,
    "NaN, inf or negative values": bad_values,
    "empty or all-zero matrix": emptied,
    "duplicate names": duplicate_names,
    "names not UTF-8": not_utf8,
}


def mutate_file(src: Path, dst: Path, mutation: str, rng: np.random.Generator) -> bool:
    """A broken copy of `src` at `dst`; False where `mutation` does not apply to it."""
    if mutation in BYTE_MUTATIONS:
        out = BYTE_MUTATIONS[mutation](src.read_bytes(), rng, src)
        if out is None:
            return False
        dst.write_bytes(out)
        return True
    shutil.copyfile(src, dst)
    dst.chmod(0o644)
    with h5py.File(dst, "r+") as h5:
        return STRUCT_MUTATIONS[mutation](h5, rng)


def mutate_bundle(src: Path, dst: Path, mutation: str, rng: np.random.Generator) -> bool:
    """A copy of bundle directory `src` with one of its files broken by a byte mutation."""
    shutil.copytree(src, dst)
    files = sorted(p for p in dst.iterdir() if p.is_file())
    target = files[int(rng.integers(len(files)))]
    out = BYTE_MUTATIONS[mutation](target.read_bytes(), rng, target)
    if out is None:
        return False
    target.write_bytes(out)
    return True
