"""`kubetune report RUN_URI [--open]`: print a run's summary and write its HTML report.

Where the report goes:

- `output` when given;
- a local run (a directory, `file://`, `pvc://`): `<run>/eval/report.html`;
- an `s3://` run: `./report-<run-id>.html`. A published run in S3 is never modified: its
  manifest lists (and checksums) every file, and the caller may only have read access.

A run that already publishes `eval/report.html` (listed in its manifest) is not rendered
again: that file is checked against its sha256 and used (copied to `output`, or downloaded
for `s3://`), so the run stays identical to its manifest. Otherwise the report is rendered
from the run's files; for a local run the new `eval/report.html` is not part of the
manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kubetune.api.contract import Reason
from kubetune.report.artifacts import (
    ReportError,
    load_published,
    open_run,
    read_verified_bytes,
)
from kubetune.report.render import render_report
from kubetune.report.summary import summary_text
from kubetune.storage import RunLayout, Store
from kubetune.storage.local import LocalStore, atomic_writer


def default_output(store: Store, layout: RunLayout) -> Path:
    """`<run>/eval/report.html` for a local store, else `./report-<run-id>.html`."""
    if isinstance(store, LocalStore):
        return store.root.joinpath(*layout.key(RunLayout.EVAL_REPORT).split("/"))
    return Path.cwd() / f"report-{layout.run_id}.html"


def report(
    run_uri: str,
    *,
    open_browser: bool = False,
    output: Path | None = None,
    endpoint_url: str | None = None,
    open_url: Callable[[str], object] | None = None,
) -> tuple[str, Path]:
    """Write the HTML report of a published run and return its summary and path.

    Args:
        run_uri: the RUN_URI (`kubetune run` prints it last).
        open_browser: open the report in the default browser.
        output: where to write the report (default: see the module docstring).
        endpoint_url: S3 endpoint for `s3://` runs; default from the environment.
        open_url: opens a URL (default `webbrowser.open`); for tests.

    Returns:
        The summary text (ending with the report's path) and the path of the report.

    Raises:
        ReportError: not a run URI, no run there, the run is incomplete (no manifest), its
            files do not match the manifest, or the report cannot be written.
    """
    layout, store = open_run(run_uri, endpoint_url=endpoint_url)
    run = load_published(store, layout)
    target = Path(output) if output is not None else default_output(store, layout)
    published = run.file(RunLayout.EVAL_REPORT)
    if published is not None:
        data = read_verified_bytes(store, layout, published)
        if not _same_file(target, default_output(store, layout), store):
            _write(target, data)
        origin = "published with the run"
    else:
        _write(target, render_report(run).encode("utf-8"))
        origin = "rendered now"
    text = summary_text(run) + f"\n\nreport    {target} ({origin})"
    if open_browser:
        opener = open_url or _default_opener()
        if opener(target.resolve().as_uri()) is False:
            text += "\n          (no browser could be started: open the file yourself)"
    return text, target


def _same_file(target: Path, published_path: Path, store: Store) -> bool:
    """Whether `target` is the published file itself (a local run's eval/report.html)."""
    return isinstance(store, LocalStore) and target.resolve() == published_path.resolve()


def _write(target: Path, data: bytes) -> None:
    try:
        with atomic_writer(target) as handle:
            handle.write(data)
    except OSError as exc:
        raise ReportError(
            f"could not write the report to {target}: {exc.strerror or exc}; choose another "
            "file with --output",
            Reason.UPLOAD_FAILED,
        ) from exc


def _default_opener() -> Callable[[str], object]:
    import webbrowser

    return webbrowser.open
