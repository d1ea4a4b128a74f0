"""The bad-input catalog (tests/reliability/cases.py) through every surface a user sees.

For each case: the contract's reason and exit code, and a message that names the field or
file:line and says what to do, on the command line (`kubetune run` / `prepare`), in the
trainer's result file, in the FineTuneJob status the operator computes from it (or from
its own refusal), and in the ModelDeployment status for serving refusals. Nothing is lost:
a failed run leaves no manifest and no partial data, a run that skips rows counts and lists
each one, and no surface shows a traceback or InternalError. docs/reliability.md carries
the catalog as a table, checked here against the generated one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.api.contract import EXIT_CODES, FailureClass, Reason, exit_code_for
from reliability import catalog_table
from reliability.cases import CASES, Case, JobInput, OperatorInput, ServingInput, Surface
from reliability.surfaces import (
    Seen,
    data_report,
    expected_condition,
    leftovers,
    operator_status,
    run_cli,
    run_cli_process,
    run_trainer,
    run_trainer_process,
    s3_checks_credentials,
    serving_status,
    status_after_pod,
)
from reliability.workspace import Workspace
from support.s3 import moto_s3


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def workspace(
    tmp_path: Path, tiny_model_dir: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Workspace:
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "model-cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "case").mkdir()
    return Workspace(tmp_path / "case", tiny_model_dir, s3_endpoint)


def check(seen: Seen, case: Case) -> None:
    """The surface shows the case's reason, exit code and an actionable message."""
    shown = f"{seen.surface.value} said {seen.reason} (exit {seen.exit_code}): {seen.message}"
    assert seen.reason == case.reason.value, shown
    assert Reason.INTERNAL_ERROR.value not in seen.message, shown
    assert "Traceback" not in seen.message, shown
    assert case.where in seen.message, f"does not name {case.where!r}: {shown}"
    assert case.fix in seen.message, f"does not say {case.fix!r}: {shown}"
    if seen.exit_code is not None:
        assert seen.exit_code == case.exit_code, shown
    if seen.condition_status is not None:
        assert seen.condition_status == expected_condition(case.reason), shown


def check_nothing_left(case: Case, ws: Workspace) -> None:
    """A failed run publishes no manifest and, unless it got past its data stage (whose
    files and checkpoints a retry resumes from), nothing at all: no partial data."""
    files = leftovers(ws)
    assert not [f for f in files if f.endswith("manifest.json")], files
    if not case.keeps_progress:
        assert files == [], f"a failed run left files behind: {files}"


def check_rows_counted(case: Case, ws: Workspace) -> None:
    """A run that skips rows counts each one and lists it with its file:line."""
    report = data_report(ws)
    counts = report["counts"]
    assert counts["invalid"] == case.counted, counts
    kept = counts["train"] + counts["validation"]
    assert kept + counts["invalid"] + counts["filtered"] + counts["duplicates"] == counts["rows"]
    listed = [p for p in report["problems"] if case.where in p and case.fix in p]
    assert len(listed) == 1, report["problems"]


def run_job(case: Case, job: JobInput, ws: Workspace) -> None:
    with s3_checks_credentials(ws.s3_endpoint, job.s3_auth):
        if Surface.CLI in case.surfaces:
            cli = run_cli(case, job, ws)
            check(cli, case)
            if case.cli == "run" and Surface.STATUS in case.surfaces:  # the run started
                assert f"error: {case.reason.value}: " in cli.message, cli.message
        if Surface.RESULT in case.surfaces:
            result, termination_message = run_trainer(case, job, ws)
            check(result, case)
            if Surface.STATUS in case.surfaces:
                assert result.exit_code is not None
                check(status_after_pod(case, job, result.exit_code, termination_message), case)
    if case.counted is not None:
        check_rows_counted(case, ws)
    else:
        check_nothing_left(case, ws)


def _param(case: Case) -> object:
    marks = [pytest.mark.xfail(reason=case.gap, strict=True)] if case.gap else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    given = case.build(workspace)
    if isinstance(given, JobInput):
        for name, value in given.env.items():
            monkeypatch.setenv(name, value)
        run_job(case, given, workspace)
    elif isinstance(given, OperatorInput):
        assert case.surfaces == (Surface.STATUS,)
        check(operator_status(case, given), case)
    else:
        assert isinstance(given, ServingInput)
        assert case.surfaces == (Surface.SERVING,)
        check(serving_status(case, given), case)


PROCESS_CASES = [
    pytest.param(c, s, id=f"{c.id}-{s.name.lower()}") for c in CASES for s in c.processes
]


@pytest.mark.parametrize(("case", "surface"), PROCESS_CASES)
def test_bad_input_in_a_real_process(
    case: Case, surface: Surface, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console command and the pod's entry point, as processes: the exit code the
    operator's podFailurePolicy sees and what the user reads."""
    given = case.build(workspace)
    assert isinstance(given, JobInput)
    if surface == Surface.CLI:
        check(run_cli_process(case, given, workspace), case)
    else:
        seen, message = run_trainer_process(case, given, workspace)
        check(seen, case)
        assert seen.exit_code is not None
        check(status_after_pod(case, given, seen.exit_code, message), case)
    check_nothing_left(case, workspace)


# --- The catalog itself -------------------------------------------------------------------


def test_catalog_is_consistent_with_the_exit_code_table() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    for case in CASES:
        processes = {Surface.CLI, Surface.RESULT} & set(case.surfaces)
        if case.reason == Reason.SUCCEEDED:
            assert case.exit_code == 0, case.id
        elif processes:
            assert case.exit_code == exit_code_for(case.reason) != 1, case.id
        else:
            assert case.exit_code is None, case.id
        assert set(case.processes) <= processes, case.id
        assert case.where.strip(), case.id
        assert case.fix.strip(), case.id


def test_every_user_error_of_the_exit_code_table_has_a_case() -> None:
    covered = {c.reason for c in CASES}
    user = {row.reason for row in EXIT_CODES if row.failure_class == FailureClass.USER}
    assert user <= covered, f"no case for {sorted(r.value for r in user - covered)}"


def test_reliability_doc_has_the_generated_catalog() -> None:
    doc = catalog_table.DOC.read_text(encoding="utf-8")
    assert catalog_table.generated_part(doc) == catalog_table.render_section(), (
        "docs/reliability.md is stale: run python -m tests.reliability.catalog_table --write"
    )
