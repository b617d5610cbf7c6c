"""`Report`: one self-contained HTML file of sections, facts, tables and figures.

Figures are embedded as base64 PNG; there is no script, no external URL and no font to fetch,
so the file reads the same offline, mailed, archived or printed. Tables carry an `id`, so that a
test (or a script) can read the numbers back.
"""

from __future__ import annotations

import base64
import html
import io
import numbers
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_path

DPI = 110  # sharp on screen and on paper, a few hundred kB per figure

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.subtitle { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
table.facts th { width: 14em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; }
figcaption, .note { color: #555; font-size: .9em; }
nav ol { columns: 2; }
code { font-size: .9em; }
@media print { body { max-width: none; margin: 0; } section { break-inside: avoid-page; }
               nav { display: none; } }
"""


class Report:
    """An HTML document built section by section; `write` puts it in place atomically."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self._sections: list[tuple[str, str, list[str]]] = []  # (anchor, title, html parts)

    def section(self, title: str, anchor: str) -> None:
        """Start a section: what follows goes under `title`, linked from the contents."""
        self._sections.append((anchor, title, []))

    def text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self._add(f"<p{cls}>{html.escape(text)}</p>")

    def facts(self, items: dict[str, Any], id: str | None = None) -> None:
        """A two-column table of names and values."""
        rows = "".join(f"<tr><th>{html.escape(k)}</th>{_cell(v)}</tr>" for k, v in items.items())
        self._add(f'<table class="facts"{_id(id)}>{rows}</table>')

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], id: str | None = None):
        """A table; numbers are right-aligned, floats to 10 significant digits."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
        self._add(f"<table{_id(id)}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def figure(self, fig: Any, caption: str = "") -> None:
        """A matplotlib figure as an embedded PNG (the figure is closed)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        alt = html.escape(caption or "figure")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self._add(f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">{cap}</figure>')

    def anchors(self) -> list[str]:
        """The sections, in order, by anchor."""
        return [a for a, _, _ in self._sections]

    def html(self) -> str:
        contents = "".join(
            f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t, _ in self._sections
        )
        sections = "".join(
            f'<section id="{a}"><h2>{html.escape(t)}</h2>{"".join(parts)}</section>'
            for a, t, parts in self._sections
        )
        subtitle = f'<p class="subtitle">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{subtitle}<nav><ol>{contents}</ol></nav>"
            f"{sections}</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        """The document written to `path` through a temporary file renamed into place."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.html(), encoding="utf-8")
        return path

    def _add(self, part: str) -> None:
        if not self._sections:
            raise ValueError("start a section before adding to the report")
        self._sections[-1][2].append(part)


def _id(id: str | None) -> str:
    return f' id="{html.escape(id)}"' if id else ""


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return f"<td>{'' if value is None else value}</td>"
    if isinstance(value, numbers.Integral):
        return f'<td class="n">{value}</td>'
    if isinstance(value, numbers.Real):
        return f'<td class="n">{value:.10g}</td>'
    return f"<td>{html.escape(str(value))}</td>"
