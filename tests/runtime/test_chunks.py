"""The threaded chunk reader gives HDF5's own values, byte for byte, whatever the filters."""

from __future__ import annotations

import zlib

import h5py
import numpy as np
import pytest

import scgpt_runtime.io.chunks as chunks
from scgpt_runtime.io.chunks import read_range


@pytest.fixture(params=["isal", "zlib"])
def inflate(request, monkeypatch):
    if request.param == "zlib":
        monkeypatch.setattr(chunks, "decompress", zlib.decompress)
        monkeypatch.setattr(chunks, "InflateError", zlib.error)
    else:
        pytest.importorskip("isal")  # the extra [fast]; the test extra installs it
    return request.param


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.float32, np.float64])
def test_ranges_equal_hdf5(tmp_path, inflate, shuffle, dtype):
    values = np.random.default_rng(0).integers(0, 40_000, 10_007).astype(dtype)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        ds = f.create_dataset("v", data=values, chunks=(1000,), compression="gzip", shuffle=shuffle)
        for a, b in [(0, 10_007), (999, 1001), (5, 6), (9_990, 10_007), (1234, 8765), (3, 3)]:
            for out in (np.int64, np.float32):
                got = read_range(ds, a, b, out)
                assert got.dtype == out
                np.testing.assert_array_equal(got, ds[a:b].astype(out))


def test_other_layouts_are_read_by_hdf5(tmp_path):
    values = np.arange(5000, dtype=np.int64)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        plain = f.create_dataset("plain", data=values)  # contiguous, no filter
        lzf = f.create_dataset("lzf", data=values, chunks=(500,), compression="lzf")
        big = f.create_dataset("big", data=values.astype(">i8"), chunks=(500,), compression="gzip")
        for ds in (plain, lzf, big):
            assert chunks._deflate_pipeline(ds) is None
            np.testing.assert_array_equal(read_range(ds, 10, 4000, np.int64), values[10:4000])


def test_a_damaged_chunk_is_a_value_error(tmp_path, inflate):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("v", data=np.arange(4000), chunks=(1000,), compression="gzip")
        offset = f["v"].id.get_chunk_info(1).byte_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with h5py.File(path) as f, pytest.raises(ValueError, match="damaged chunk at element 1000"):
        read_range(f["v"], 0, 4000, np.int64)
