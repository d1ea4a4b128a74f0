"""The `kubetune` command line (docs/cli.md is the contract)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune import __version__


@dataclass(frozen=True)
class Problem:
    """One problem `kubetune validate` reports."""

    file: str
    line: int
    kind: str
    name: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        subject = f"{self.kind}/{self.name}: " if self.kind else ""
        field = f"{self.path}: " if self.path else ""
        return f"{where}: {subject}{field}{self.message}"


def validate_files(paths: Sequence[str]) -> tuple[list[Problem], int]:
    """Validate every kubetune manifest in the files; returns the problems and the count
    of manifests checked."""
    from kubetune.api.validation import is_kubetune_manifest, validate_manifest
    from kubetune.manifests import ManifestError, load_documents

    problems: list[Problem] = []
    checked = 0
    for path in paths:
        try:
            documents = load_documents(path)
        except ManifestError as exc:
            problems.append(Problem(path, exc.line, "", "", "", exc.problem))
            continue
        ours = [d for d in documents if is_kubetune_manifest(d.data)]
        if not documents:
            problems.append(Problem(path, 1, "", "", "", "the file is empty"))
            continue
        if not ours:
            problems.append(
                Problem(path, 1, "", "", "", "no kubetune manifest (apiVersion kubetune.io/…)")
            )
            continue
        for doc in ours:
            checked += 1
            kind = str(doc.data.get("kind", ""))
            metadata = doc.data.get("metadata")
            name = str(metadata.get("name", "")) if isinstance(metadata, dict) else ""
            found = [
                Problem(
                    path,
                    doc.line_of(error.path) if error.path else doc.first_line,
                    kind,
                    name,
                    error.path,
                    error.detail,
                )
                for error in validate_manifest(doc.data)
            ]
            problems.extend(sorted(found, key=lambda p: (p.line, p.path)))
    return problems, checked


def _problem_text(problem: Problem) -> str:
    if problem.line == 0:
        return f"{problem.file}: {problem.message}"
    return str(problem)


def cmd_validate(args: argparse.Namespace) -> int:
    problems, checked = validate_files(args.files)
    if args.json:
        print(json.dumps({"checked": checked, "problems": [asdict(p) for p in problems]}))
    else:
        for problem in problems:
            print(_problem_text(problem), file=sys.stderr)
        if not problems:
            print(f"{checked} manifest(s) valid")
        else:
            print(f"{len(problems)} problem(s) in {len(args.files)} file(s)", file=sys.stderr)
    return 1 if problems else 0


def cmd_crds(args: argparse.Namespace) -> int:
    from kubetune.api.crd import build_crds, crd_filename, to_yaml

    crds = build_crds()
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for crd in crds:
            (out / crd_filename(crd)).write_text(to_yaml([crd]), encoding="utf-8")
            print(out / crd_filename(crd))
    else:
        sys.stdout.write(to_yaml(crds))
    return 0


def _fail(reason: object, message: str) -> int:
    from kubetune.api.contract import Reason, exit_code_for

    print(f"error: {message}", file=sys.stderr)
    return exit_code_for(reason) if isinstance(reason, Reason) else 1


def cmd_prepare(args: argparse.Namespace) -> int:
    import tempfile

    from kubetune.api.contract import Reason
    from kubetune.runs import JobFileError, load_job, local_layout
    from kubetune.storage import StorageError, open_store
    from kubetune.trainer.data.prepare import DataStageError
    from kubetune.trainer.data_stage import run_data_stage
    from kubetune.trainer.resolve import ModelResolutionError, resolve_model

    try:
        job = load_job(args.job)
    except JobFileError as exc:
        return _fail(Reason.INVALID_SPEC, str(exc))
    try:
        layout = local_layout(job, args.output)
        store = open_store(layout.output_uri)
        resolved = resolve_model(job.spec.model, allow_builtin_random=True)
        with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as work:
            run_data_stage(
                job.spec,
                layout,
                store,
                tokenizer_dir=resolved.path,
                work_dir=Path(work),
                log=lambda line: print(line, file=sys.stderr),
            )
    except (DataStageError, ModelResolutionError, StorageError) as exc:
        return _fail(exc.reason, str(exc))
    print(layout.run_uri)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Fine-tune, evaluate, quantize and serve LLMs on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser(
        "validate",
        help="check manifests offline, as the API server would",
        description="Check FineTuneJob and ModelDeployment manifests offline: schema, "
        "cross-field rules and models. Every problem is printed as FILE:LINE: Kind/name: "
        "field: message. Exit status 1 if there is any.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML files ('-' for stdin)")
    validate.add_argument("--json", action="store_true", help="print a JSON report")
    validate.set_defaults(func=cmd_validate)

    crds = sub.add_parser(
        "crds",
        help="print the CustomResourceDefinitions",
        description="Print the CRDs for `kubectl apply -f -`, or write one file per CRD.",
    )
    crds.add_argument("--output-dir", metavar="DIR", help="write one YAML file per CRD here")
    crds.set_defaults(func=cmd_crds)

    prepare = sub.add_parser(
        "prepare",
        help="run the data stage of a FineTuneJob locally",
        description="Read, clean, deduplicate and split spec.dataset, and write "
        "RUN_URI/data/ (train.jsonl, val.jsonl, report.json, token-lengths.png). Prints "
        "the RUN_URI last. See docs/data.md.",
    )
    prepare.add_argument("job", metavar="JOB.yaml", help="a file with one FineTuneJob")
    prepare.add_argument(
        "--output", metavar="ROOT", help="artifact root (default: spec.output.uri or ./artifacts)"
    )
    prepare.set_defaults(func=cmd_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
