"""Shared fixtures. Real-data tests use ../shared/data beside the checkout."""

from __future__ import annotations

import base64
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; a skip where it is absent, a failure where CI requires it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("SCGPT_REQUIRE_SHARED") == "1":
            pytest.fail(f"{SHARED_DATA} is missing and SCGPT_REQUIRE_SHARED=1")
        pytest.skip(f"{SHARED_DATA} is absent: real-data tests need ../shared/data")
    return SHARED_DATA


class ReportPage(HTMLParser):
    """What a test reads back from an HTML report: sections, tables by id, images, links."""

    def __init__(self, text: str):
        super().__init__()
        self.sections: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, list[str]] = {}  # section -> image sources
        self.urls: list[str] = []  # every href and src
        self.tags: set[str] = set()
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs if k in ("href", "src") and v]
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.setdefault(self.sections[-1], []).append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, table: str) -> dict[str, str]:
        """A two-column table (or the first two columns) as {name: value}."""
        return {r[0]: r[1] for r in self.tables[table] if len(r) >= 2}

    def check_self_contained(self) -> None:
        """No script, no external URL; every image an embedded PNG."""
        assert "script" not in self.tags
        for url in self.urls:
            assert url.startswith(("#", "data:image/png;base64,")), url[:60]
        for sources in self.images.values():
            for src in sources:
                png = base64.b64decode(src.split(",", 1)[1])
                assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def read_report():
    """A report file -> ReportPage."""
    return lambda path: ReportPage(Path(path).read_text(encoding="utf-8"))
