"""Reading a file's HDF5 metadata once in a child process, before this process touches it.

Some damage makes libhdf5 itself loop forever or crash (a zero-sized global heap object: an
endless loop, HDFGroup/hdf5#1707), inside a C call where neither Ctrl-C nor an exception can
reach. So the commands first read, in a child with a deadline, every attribute, every chunk
index and every string or compound dataset of the file (the names, categories and encodings
the readers decode, anndata 0.6's compound obs; not the counts, whose chunks this package
inflates itself). A child that does not finish in time, or dies of a signal, makes the file an
InputError here; any other error the child meets, this process meets and reports itself.

The child runs this file as a script (h5py alone: a fifth of a second to start).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py

SLICE = 1 << 16  # strings read at a time
DEADLINE = 60.0  # seconds: the metadata of a file of ten million cells reads in about ten
ISSUE = "a libhdf5 defect with some damaged files, HDFGroup/hdf5#1707"
# This file as the child's script, without its folder first on sys.path (it would shadow).
_RUN = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


def probe(path: str | Path, deadline: float | None = None) -> None:
    """InputError where reading the metadata of `path` hangs or crashes libhdf5."""
    from ..errors import InputError  # imported here: the child runs this file as a script

    path, deadline = Path(path), deadline or DEADLINE
    if not path.is_file():
        return  # the reader's own error names it
    try:
        done = subprocess.run(
            [sys.executable, "-c", _RUN, __file__, str(path)], capture_output=True, timeout=deadline
        )
    except subprocess.TimeoutExpired as e:
        raise InputError(
            f"{path}: damaged file: HDF5 does not return while reading its metadata "
            f"(stopped after {deadline:.0f} s; {ISSUE})"
        ) from e
    if done.returncode < 0:
        raise InputError(
            f"{path}: damaged file: HDF5 crashed (signal {-done.returncode}) while reading its "
            "metadata"
        )


def touch(path: Path) -> None:
    """Read every attribute, chunk index and string dataset of `path`."""
    with h5py.File(path, "r") as h5:
        _touch(h5)
        h5.visititems(lambda _, obj: _touch(obj))


def _touch(obj: h5py.HLObject) -> None:
    for key in obj.attrs:
        obj.attrs[key]
    if not isinstance(obj, h5py.Dataset):
        return
    if obj.chunks is not None:
        obj.id.chunk_iter(lambda info: None)  # the chunk index (B-tree) of the dataset
    if h5py.check_string_dtype(obj.dtype) is not None or obj.dtype.kind in "OV":
        if obj.ndim == 0:
            obj[()]
            return
        for i in range(0, len(obj), SLICE):  # in slices: ten million names stay small
            obj[i : i + SLICE]


if __name__ == "__main__":
    try:
        touch(Path(sys.argv[-1]))
    except Exception:  # the parent meets the same error when it reads, and reports it
        sys.exit(3)
