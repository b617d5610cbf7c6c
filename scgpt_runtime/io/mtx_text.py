"""Matrix Market coordinate text (a 10x matrix.mtx(.gz) and its tables), read in chunks and
checked line by line: every error names the file and the line."""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

try:
    from isal import igzip as _gzip  # the optional extra [fast]: inflates 3x faster than zlib
    from isal.isal_zlib import error as _InflateError
except ImportError:
    _gzip = gzip
    _InflateError = zlib.error

from ..errors import InputError, ScgptError

CHUNK_BYTES = 2**23  # text parsed at a time: about 600k entries, 15 MB of numbers
MAX_LINE = 2**16  # bytes: a longer line is no Matrix Market line (a damaged or wrong file)
HEADER = "%%MatrixMarket matrix coordinate integer general"


@dataclass(frozen=True)
class Header:
    """What the lines before the entries say."""

    field: str  # "integer" or "real"
    n_features: int
    n_cells: int
    nnz: int
    n_lines: int  # lines before the first entry


@contextmanager
def opened(path: Path) -> Iterator[BinaryIO]:
    """`path` opened read-only, inflated where it is .gz; its read errors become one InputError."""
    try:
        with _gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb") as f:
            yield f
    except ScgptError:
        raise
    except (EOFError, zlib.error, _InflateError, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: truncated or corrupt gzip ({_detail(e)})") from e
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({_detail(e)})") from e


def _detail(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_header(path: Path, f: BinaryIO) -> Header:
    """The header line, comments and size line, leaving `f` at the first entry."""
    first = f.readline(MAX_LINE)
    words = first.decode("ascii", "replace").lower().split()
    if not words or words[0] != "%%matrixmarket":
        raise InputError(f"{path}: has no Matrix Market header (expected {HEADER!r})")
    if len(words) != 5 or words[1] != "matrix":
        shown = first.decode("ascii", "replace").strip()[:80]
        raise InputError(f"{path}: bad Matrix Market header {shown!r} (expected {HEADER!r})")
    layout, field, symmetry = words[2:]
    if layout != "coordinate":
        raise InputError(
            f"{path}: is a dense ({layout!r}) Matrix Market matrix; 10x writes 'coordinate'"
        )
    if field not in ("integer", "real"):
        raise InputError(f"{path}: holds {field!r} values; counts must be 'integer' or 'real'")
    if symmetry != "general":
        raise InputError(f"{path}: is a {symmetry!r} matrix; a features x cells one is 'general'")
    n_lines = 1
    while (line := f.readline(MAX_LINE)).startswith(b"%") or (line and line.isspace()):
        n_lines += 1
    if not line:
        raise InputError(f"{path}: ends before its size line (n_features n_cells n_entries)")
    try:
        sizes = [int(word) for word in line.split()]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 0:
        shown = line.decode("ascii", "replace").strip()[:80]
        raise InputError(f"{path}: bad size line {shown!r} (expected n_features n_cells n_entries)")
    return Header(field, *sizes, n_lines + 1)


def read_entries(path: Path, header: Header) -> Iterator[tuple[np.ndarray, ...]]:
    """(feature, cell, value) of every entry, 0-based int64, int64, float32, a chunk at a time,
    checked against the header: indices in range, as many entries as it says."""
    seen = 0
    with opened(path) as f:
        if read_header(path, f) != header:
            raise InputError(f"{path}: changed while being read")
        for chunk, line, n_lines in _chunks(path, f, header.n_lines + 1):
            entries = _parse(path, header.field, chunk, line, n_lines)
            if seen + len(entries) > header.nnz:
                where = _line_of(chunk, line, header.nnz - seen)
                raise InputError(
                    f"{path}: line {where}: more entries than the {header.nnz} of its size line"
                )
            seen += len(entries)
            ids = []
            for k, n, noun in ((0, header.n_features, "row"), (1, header.n_cells, "column")):
                i = entries[:, k].astype(np.int64) - 1
                bad = (i < 0) | (i >= n)
                if bad.any():
                    at = int(bad.argmax())
                    raise InputError(
                        f"{path}: line {_line_of(chunk, line, at)}: {noun} {i[at] + 1} is "
                        f"outside 1..{n} (the size line's {'features' if k == 0 else 'cells'})"
                    )
                ids.append(i)
            yield ids[0], ids[1], entries[:, 2].astype(np.float32)
    if seen < header.nnz:
        raise InputError(
            f"{path}: holds {seen} entries but its size line says {header.nnz} (truncated?)"
        )


def _chunks(path: Path, f: BinaryIO, line: int) -> Iterator[tuple[bytes, int, int]]:
    """(text, number of its first line, lines) of whole lines of `f`, CHUNK_BYTES at a time."""
    rest = b""
    while data := f.read(CHUNK_BYTES):
        data = rest + data
        cut = data.rfind(b"\n") + 1
        chunk, rest = data[:cut], data[cut:]
        if len(rest) > MAX_LINE:  # what bounds memory on a file without line breaks
            raise InputError(f"{path}: line {line} is longer than {MAX_LINE} bytes")
        if chunk:
            n_lines = chunk.count(b"\n")
            yield chunk, line, n_lines
            line += n_lines
    if rest:
        yield rest + b"\n", line, 1


def _parse(path: Path, field: str, chunk: bytes, line: int, n_lines: int) -> np.ndarray:
    """(n, 3) int64 (or float64 for real values with decimals) entries of whole lines, checked:
    numbers, three a line (blank lines allowed), integer indices."""
    if chunk.isspace():  # numpy reads a blank text as one number
        return np.empty((0, 3), dtype=np.int64)
    numbers = _numbers(chunk, field == "real")
    if numbers is None:
        raise _not_numbers(path, field, chunk, line)
    if len(numbers) != 3 * n_lines:
        _check_fields(path, chunk, line)
    entries = numbers.reshape(-1, 3)
    if entries.dtype.kind == "f":
        ids = entries[:, :2]
        bad = ~(np.isfinite(ids) & (ids == np.floor(ids))).all(axis=1)
        if bad.any():
            at = int(bad.argmax())
            raise InputError(
                f"{path}: line {_line_of(chunk, line, at)}: index {ids[at].tolist()} is not "
                "a whole number"
            )
    return entries


def _numbers(chunk: bytes, real: bool) -> np.ndarray | None:
    """Every number of `chunk`: int64 where all are integers (5x faster to read), else float64
    where `real`; None where one is not a number."""
    for dtype in (np.int64, np.float64) if real else (np.int64,):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)  # numpy < 2 warns, then raises
                return np.fromstring(chunk, dtype=dtype, sep=" ")
        except (ValueError, DeprecationWarning):
            continue
    return None


def _not_numbers(path: Path, field: str, chunk: bytes, line: int) -> InputError:
    """The error naming the first field of `chunk` that is not a number (of the header's field)."""
    parse, kind = (int, "an integer") if field == "integer" else (float, "a number")
    for i, text in enumerate(chunk.split(b"\n")):
        for word in text.split():
            try:
                parse(word)
            except ValueError:
                shown = word[:40].decode("utf-8", "replace")
                return InputError(f"{path}: line {line + i}: {shown!r} is not {kind}")
    last = line + chunk.count(b"\n") - 1
    return InputError(f"{path}: lines {line}-{last}: cannot read every field as {kind}")


def _check_fields(path: Path, chunk: bytes, line: int) -> None:
    """Every line blank or three fields (row col value)."""
    for i, text in enumerate(chunk.split(b"\n")[:-1]):
        n = len(text.split())
        if n not in (0, 3):
            shown = text[:60].decode("utf-8", "replace")
            raise InputError(
                f"{path}: line {line + i}: {n} fields where an entry has 3 (row col value): "
                f"{shown!r}"
            )


def _line_of(chunk: bytes, line: int, k: int) -> int:
    """The number of the line of the k-th entry of `chunk` (for messages: blank lines skipped)."""
    for i, text in enumerate(chunk.split(b"\n")):
        if text.strip():
            if k == 0:
                return line + i
            k -= 1
    return line + chunk.count(b"\n")


def read_lines(path: Path) -> list[str]:
    """The lines of a small text file (a features or barcodes table)."""
    with opened(path) as f:
        text = f.read().decode("utf-8", "replace")
    if "\x00" in text:
        raise InputError(f"{path}: holds a NUL byte: the file is damaged")
    lines = text.split("\n")  # not splitlines: it also breaks at \x1c, \x85, ... inside names
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def count_lines(path: Path) -> int:
    """How many lines `read_lines` would return, reading CHUNK_BYTES at a time."""
    n, last = 0, b"\n"
    with opened(path) as f:
        while data := f.read(CHUNK_BYTES):
            n, last = n + data.count(b"\n"), data[-1:]
    return n + (last != b"\n")
