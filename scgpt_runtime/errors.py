"""Errors for bad input; the CLI turns each into a one-line message and an exit code.

Exit codes (documented in README.md):
  0 success, 1 internal error (a bug: please report), 2 usage error (bad flags),
  3 input file error, 4 gene match error, 5 model bundle error, 6 output error.
"""

from __future__ import annotations


class ScgptError(Exception):
    """Base of every error that is the user's input, not a bug. The message is one line."""

    exit_code = 1


class InputError(ScgptError):
    """A data file is missing, unreadable, of an unknown format, or holds invalid values."""

    exit_code = 3


class GeneMatchError(ScgptError):
    """Too few genes of a data file match the model vocabulary. `match` (a genes.GeneMatch) and
    `columns` (the file's gene columns) are there for advice; None where not known."""

    exit_code = 4

    def __init__(self, message: str, match: object = None, columns: list[str] | None = None):
        super().__init__(message)
        self.match = match
        self.columns = columns or []


class BundleError(ScgptError):
    """A model bundle is missing, damaged, or of an unsupported format version."""

    exit_code = 5


class DeviceError(ScgptError):
    """The requested device cannot run: `--device cuda` where the CUDA provider cannot start."""

    exit_code = 2


class OutputError(ScgptError):
    """An output path exists (without --overwrite), or cannot be written."""

    exit_code = 6


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, Snakemake) while an output is written (io.atomic.writing):
    raised like Ctrl-C so that the temporary file is removed on the way out."""
