"""Self-contained HTML reports (the optional extra `[report]`): a document of sections and
tables (`document.py`), figures that are functions of data (`figures.py`), and the 2-D map of
cell embeddings (`embedding_map.py`). Commands compose them; nothing here knows a command."""

from __future__ import annotations

from pathlib import Path

from ..errors import ScgptError

EXTRA = "report"


class MissingExtra(ScgptError):
    """An option needs an optional extra that is not installed (a usage error)."""

    exit_code = 2


def report_path(path: str | Path, option: str = "--report") -> Path:
    """`path` as a report's file; ValueError (a usage error) unless it names an .html file."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"{option} {path}: a report is an .html file")
    return path


def require(option: str = "--report") -> None:
    """Raise MissingExtra, naming the extra, unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingExtra(
            f"{option} needs the {EXTRA!r} extra, which is not installed: "
            f"pip install 'scgpt-deploy[{EXTRA}]'"
        ) from None
