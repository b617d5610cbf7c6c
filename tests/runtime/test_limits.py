"""Resource limits: a 1-cell file, a cell with every gene, a file whose indptr claims 2^31
values, a 10-million-cell file: a result or one error line, in bounded memory (the peak
resident memory of the command's process tree, from wait4)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

BUNDLE = Path(__file__).parents[1] / "fixtures" / "bundles" / "small"
# The peak resident memory of the command's own address space (VmHWM), read as it exits: a
# child's ru_maxrss would count the pytest process it was forked from.
CLI = """import atexit, sys
status = sys.argv.pop(1)
atexit.register(lambda: open(status, "w").write(open("/proc/self/status").read()))
from scgpt_runtime.cli import main
main()"""


def run(*args: object) -> tuple[int, int, str]:
    """Exit code, peak resident memory (MB) and stderr of scgpt-run ARGS."""
    with tempfile.TemporaryDirectory() as tmp:
        status = Path(tmp) / "status"
        cmd = [sys.executable, "-c", CLI, str(status), *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return done.returncode, int(hwm.split()[1]) // 1024, done.stderr


@pytest.fixture(scope="module")
def cells(kang, tmp_path_factory) -> ad.AnnData:
    return ad.read_h5ad(kang)[:60].copy()


def test_one_cell_and_a_cell_with_every_gene_get_labels(cells, tmp_path):
    cells[:1].copy().write_h5ad(tmp_path / "one.h5ad")
    x = cells.X.toarray()
    x[0] = 1.0  # every gene of the file expressed
    ad.AnnData(sp.csr_matrix(x), obs=cells.obs, var=cells.var).write_h5ad(tmp_path / "all.h5ad")
    for name, n in (("one", 1), ("all", 60)):
        code, _, err = run(
            "annotate",
            tmp_path / f"{name}.h5ad",
            "--model",
            BUNDLE,
            "--out",
            tmp_path / f"{name}.csv",
        )
        assert code == 0, err
        rows = (tmp_path / f"{name}.csv").read_text().splitlines()
        assert len(rows) == n + 1
    max_len = 256  # the test bundle's length: the cell with every gene is cut to it
    assert rows[1].split(",")[-1] == str(max_len - 1)


def test_an_indptr_claiming_2_31_values_is_an_error_not_an_allocation(cells, tmp_path):
    path = tmp_path / "claims.h5ad"
    cells.write_h5ad(path)
    n = 2**31
    with h5py.File(path, "r+") as f:  # chunked and never written: a few KB on disk
        for name, dtype in (("data", "f4"), ("indices", "i4")):
            del f["X"][name]
            f["X"].create_dataset(name, shape=(n,), dtype=dtype, chunks=(1 << 20,))
        del f["X"]["indptr"]
        f["X"]["indptr"] = np.linspace(0, n, 61).astype(np.int64)
    for command in ("inspect", "annotate"):
        code, mb, err = (
            run(command, path, "--model", BUNDLE) if command == "annotate" else run(command, path)
        )
        assert code == 3, err
        assert f"{path}: X/indptr of cells 0-60: cell 7 has 35791395 values, more than the " in err
        assert mb < 500  # reading the values it claims would take 16 GB


def test_a_ten_million_cell_file_is_inspected_in_bounded_memory(cells, tmp_path):
    path = tmp_path / "ten_million.h5ad"
    cells[:1].copy().write_h5ad(path)
    n = 10_000_000
    with h5py.File(path, "r+") as f:  # every cell empty; names as fixed-length strings
        index = f["obs"].attrs["_index"]
        del f["obs"][index]
        names = np.char.add(b"c", np.arange(n).astype("S8"))
        f["obs"].create_dataset(index, data=names, chunks=(1 << 16,), compression="gzip")
        f["obs"][index].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        for col in list(f["obs"].attrs["column-order"]):
            del f["obs"][col]
        f["obs"].attrs["column-order"] = np.array([], dtype="S1")
        x = f["X"]
        x.attrs["shape"] = np.array([n, x.attrs["shape"][1]])
        del x["indptr"]
        x.create_dataset(
            "indptr", data=np.zeros(n + 1, np.int64), chunks=(1 << 20,), compression="gzip"
        )
    code, mb, err = run("inspect", path, "--json")
    assert code == 0, err
    assert mb < 400  # the 10 million names are not read (as str they take 360 MB)
    header = path.with_name("header.h5ad")
    cells.write_h5ad(header)
    with h5py.File(header, "r+") as f:  # a shape that claims 10 million cells, data for 60
        f["X"].attrs["shape"] = np.array([n, cells.n_vars])
    code, mb, err = run("inspect", header)
    assert code == 3
    assert err.strip().endswith(f"{header}: obs has 60 entries but X has 10000000 rows")
