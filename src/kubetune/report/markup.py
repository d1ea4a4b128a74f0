"""Small HTML building blocks of the report: its style sheet and security policy, escaping,
tables, definition lists, figures."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

from kubetune.report.plots import Plot

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
"""Content-Security-Policy of the page: no script and no remote load of any kind, even if
some text escaped escaping; only the inline style sheet and `data:` images."""

STYLE = """
:root { --fg: #0f172a; --muted: #64748b; --line: #e2e8f0; --soft: #f8fafc;
  --good: #15803d; --bad: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 36px 0 8px; padding-bottom: 4px;
  border-bottom: 2px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
nav { margin: 12px 0 0; font-size: 13px; }
nav a { margin-right: 14px; color: #2563eb; text-decoration: none; }
.muted { color: var(--muted); }
.badge { display: inline-block; padding: 2px 12px; border-radius: 999px; font-weight: 600;
  font-size: 13px; vertical-align: middle; }
.verdict-passed { background: #dcfce7; color: #166534; }
.verdict-failed { background: #fee2e2; color: #991b1b; }
.verdict-none { background: #f1f5f9; color: #475569; }
.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 14px 0; }
.kv dt { color: var(--muted); } .kv dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
thead th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.narrow { width: auto; min-width: 420px; }
.headline .value { font-weight: 600; font-variant-numeric: tabular-nums; white-space: nowrap; }
.better { color: var(--good); } .worse { color: var(--bad); } .same { color: var(--muted); }
.passed { color: var(--good); font-weight: 600; } .failed { color: var(--bad); font-weight: 600; }
figure { margin: 14px 0 22px; } figure img { max-width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 12px; }
table.samples td { white-space: pre-wrap; word-break: break-word; font-size: 13px; }
table.samples td.prompt { max-width: 320px; }
.role { display: inline-block; font-size: 11px; color: var(--muted); text-transform: uppercase;
  margin-right: 6px; }
.turn + .turn { margin-top: 6px; }
.mark { display: inline-block; font-size: 11px; font-weight: 600; padding: 0 6px;
  border-radius: 4px; margin-top: 4px; white-space: nowrap; }
.mark.match { background: #dcfce7; color: #166534; }
.mark.miss { background: #fee2e2; color: #991b1b; }
.mark.judge { background: #e0e7ff; color: #3730a3; }
.mark.error { background: #fef3c7; color: #92400e; }
details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
.note { background: var(--soft); border-left: 3px solid var(--line); padding: 6px 12px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
@media print { nav { display: none; } h2 { break-after: avoid; }
  tr, figure { break-inside: avoid; } }
"""


def esc(value: Any) -> str:
    """Text (or any value) escaped for HTML content and attributes."""
    return html.escape(str(value), quote=True)


def figure(plot: Plot | None) -> str:
    """An inline PNG figure with its alt text and caption ("" for no plot)."""
    if plot is None:
        return ""
    data = base64.b64encode(plot.png).decode("ascii")
    return (
        f'<figure id="plot-{esc(plot.name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{esc(plot.alt)}" title="{esc(plot.title)}" width="{plot.width}">'
        f"<figcaption>{esc(plot.alt)}.</figcaption></figure>"
    )


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    numeric: Sequence[int] = (),
    css: str = "",
) -> str:
    """An HTML table; cells are already HTML; `numeric` columns are right-aligned."""
    head = "".join(
        f'<th class="num">{esc(h)}</th>' if i in numeric else f"<th>{esc(h)}</th>"
        for i, h in enumerate(headers)
    )
    lines = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    klass = f' class="{css}"' if css else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """A definition list; values are already HTML."""
    items = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="kv">{items}</dl>'
