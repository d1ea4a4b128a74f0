"""Local runs: which FineTuneJob a file holds, and where its run lives."""

from __future__ import annotations

from pathlib import Path

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.storage import RunLayout, new_run_id, run_id_for

DEFAULT_OUTPUT = "./artifacts"
LOCAL_NAMESPACE = "local"


class JobFileError(Exception):
    """The file does not hold exactly one valid FineTuneJob; the message says why."""


def load_job(path: str | Path) -> FineTuneJob:
    """The one FineTuneJob in a YAML file, validated as the API server would."""
    from kubetune.cli import validate_files

    problems, _ = validate_files([str(path)])
    if problems:
        raise JobFileError(
            "\n".join(str(p) if p.line else f"{p.file}: {p.message}" for p in problems)
        )
    from kubetune.manifests import load_documents

    jobs = [d for d in load_documents(path) if d.data.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise JobFileError(f"{path}: expected one FineTuneJob, found {len(jobs)}")
    return FineTuneJob.model_validate(jobs[0].data)


def local_layout(
    job: FineTuneJob, output: str | None = None, *, new_run: bool = False
) -> RunLayout:
    """The run of a job on this machine: `<output>/<namespace>/<job>/<run-id>`.

    The output root is `--output`, else `spec.output.uri`, else ./artifacts; the namespace
    is `metadata.namespace`, else "local". The same spec gives the same run (and resumes
    it); `new_run` adds a unique suffix.
    """
    root = output or (job.spec.output.uri if job.spec.output else None) or DEFAULT_OUTPUT
    run_id = run_id_for(job.spec)
    return RunLayout(
        output_uri=root,
        namespace=job.metadata.namespace or LOCAL_NAMESPACE,
        job_name=job.metadata.name or "job",
        run_id=new_run_id(run_id) if new_run else run_id,
    )
