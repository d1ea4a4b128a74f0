"""The evaluation report of a run: one self-contained HTML file (`eval/report.html`) and
the terminal summary of `kubetune report`.

- `load_run(RUN_URI)` reads a published run (manifest required, files verified);
  `load_folder(folder, run_uri=…)` reads local files before they are published.
- `render_report(run)` returns the HTML; `build_plots(run)` the plots as PNG bytes;
  `render_unpublished(layout, paths, …)` renders from local files at publish time.
- `summary_text(run)` is the plain-text summary; `report(RUN_URI, …)` is the command.

Importing this package loads neither torch nor matplotlib (plots import it when drawn).
"""

from __future__ import annotations

from kubetune.report.artifacts import (
    ReportError,
    RunArtifacts,
    TokenLengths,
    load_folder,
    load_published,
    load_run,
)
from kubetune.report.command import report
from kubetune.report.plots import Plot, build_plots
from kubetune.report.render import render_report, render_report_from_folder, render_unpublished
from kubetune.report.summary import summary_text

__all__ = [
    "Plot",
    "ReportError",
    "RunArtifacts",
    "TokenLengths",
    "build_plots",
    "load_folder",
    "load_published",
    "load_run",
    "render_report",
    "render_report_from_folder",
    "render_unpublished",
    "report",
    "summary_text",
]
