"""The `kubetune` command line (docs/cli.md is the contract)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import __version__

if TYPE_CHECKING:
    from kubetune.api.v1alpha1.modeldeployment import Variant


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


def _print_summary(run_uri: str) -> None:
    from kubetune.report import load_run, summary_text

    print(summary_text(load_run(run_uri)), file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from kubetune.report import ReportError, report

    try:
        text, _ = report(
            args.run_uri,
            open_browser=args.open,
            output=Path(args.output) if args.output else None,
            endpoint_url=args.endpoint_url,
        )
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import os
    import shutil
    import tempfile

    from kubetune.api.contract import Reason, RunIdentity, TrainerConfig
    from kubetune.runs import JobFileError, load_job, local_layout
    from kubetune.trainer.runner import execute, exit_code

    try:
        job = load_job(args.job)
    except JobFileError as exc:
        return _fail(Reason.INVALID_SPEC, str(exc))
    layout = local_layout(job, args.output, new_run=args.new_run)
    config = TrainerConfig(
        run=RunIdentity(
            namespace=layout.namespace,
            job_name=layout.job_name,
            run_id=layout.run_id,
            output_uri=layout.output_uri,
        ),
        spec=job.spec,
        metrics_port=args.metrics_port,
        allow_builtin_random=True,
    )
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=f"kubetune-{layout.run_id}-"))
    processes = _processes(job.spec, args.nproc_per_node)
    if processes == 1:
        # One process trains on one GPU (the Trainer would otherwise wrap the model in
        # DataParallel over every visible GPU).
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    if processes > 1:
        result = _run_distributed(config, work, processes)
    else:
        result = execute(config, work, lambda line: print(line, file=sys.stderr), args.metrics_port)
    code = exit_code(result)
    if code != 0:
        print(f"error: {result.reason.value}: {result.message}", file=sys.stderr)
        print(f"(work files kept in {work})", file=sys.stderr)
        return code
    shutil.rmtree(work, ignore_errors=True)
    if result.run_uri:
        _print_summary(result.run_uri)
    if result.gate_passed is False:
        print(
            "The evaluation gate FAILED: artifacts are published, deployments refuse them.",
            file=sys.stderr,
        )
    print(result.run_uri)
    return 0


def _processes(spec: Any, requested: int | None) -> int:
    """Trainer processes for `kubetune run`: --nproc-per-node, else one per GPU the job asks
    for, as far as this machine has them."""
    if requested is not None:
        return max(1, requested)
    gpus = spec.resources.gpus if spec.resources is not None else "Auto"
    if not isinstance(gpus, int) or gpus <= 1:
        return 1
    import torch

    available = torch.cuda.device_count()
    return min(gpus, available) if available > 1 else 1


def _run_distributed(config: Any, work: Path, processes: int) -> Any:
    """The pipeline in `processes` trainer processes on this machine (torchrun through the
    launcher the operator's pods use); rank 0 prints the log and publishes."""
    import subprocess

    from kubetune.api.contract import Reason, TrainerResult

    config_path, result_path = work / "trainer-config.json", work / "result.json"
    config_path.write_text(config.model_dump_json(by_alias=True), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "kubetune.trainer.launch",
        "--standalone",
        f"--nproc-per-node={processes}",
        "--",
        "--config",
        str(config_path),
        "--result-file",
        str(result_path),
        "--work-dir",
        str(work),
    ]
    print(f"Training in {processes} processes (torchrun)", file=sys.stderr)
    code = subprocess.call(command)
    try:
        return TrainerResult.model_validate_json(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return TrainerResult(
            reason=Reason.INFRASTRUCTURE_ERROR,
            message=f"the trainer processes exited with {code} without a result",
        )


def cmd_calc(args: argparse.Namespace) -> int:
    from kubetune.api.v1alpha1.methods import Method
    from kubetune.api.v1alpha1.training import DistributedStrategy, Optimizer, Precision
    from kubetune.calc import (
        AdapterSettings,
        ArchitectureError,
        TrainingSetup,
        choose_gpus,
        gpu_class,
        load_architecture,
        preflight,
    )
    from kubetune.calc.report import calculate, parse_enum, render_text, to_json

    try:
        gpu = gpu_class(args.gpu_class) if args.gpu_class else None
        memory: float | None = args.gpu_memory
        if memory is None and gpu is not None:
            memory = gpu.memory_gib
        if args.job:
            from kubetune.api.contract import Reason
            from kubetune.runs import JobFileError, load_job

            try:
                spec = load_job(args.job).spec
            except JobFileError as exc:
                return _fail(Reason.INVALID_SPEC, str(exc))
            arch = load_architecture(spec.model.uri)
            wanted = spec.resources.gpus if spec.resources else "Auto"
            if args.gpus is None and wanted == "Auto" and memory:
                wanted = choose_gpus(spec, arch, memory) or 1
            gpus = args.gpus or (wanted if isinstance(wanted, int) else 1)
            setup, auto, auto_offload = preflight(spec, arch, memory, gpus).setup, False, False
        else:
            arch = load_architecture(args.model or args.arch)
            targets = [t for item in args.target_modules for t in item.split(",") if t]
            setup = TrainingSetup(
                method=parse_enum(Method, args.method, "--method"),
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                adapter=AdapterSettings(args.lora_rank, tuple(targets), args.use_dora),
                gradient_checkpointing=bool(args.gradient_checkpointing),
                offload_activations=bool(args.activation_offload),
                precision=parse_enum(Precision, args.precision, "--precision"),
                optimizer=parse_enum(Optimizer, args.optimizer, "--optimizer"),
                gpus=args.gpus or 1,
                strategy=parse_enum(DistributedStrategy, args.strategy, "--strategy"),
                fused_loss=not args.full_logits,
                fused_kernels=args.fast_paths,
                lean_adapters=args.fast_paths,
            )
            auto = args.gradient_checkpointing is None
            offload_unset = args.activation_offload is None
            auto_offload = offload_unset and args.gradient_checkpointing is not False
        result = calculate(
            arch,
            setup,
            auto_checkpointing=auto,
            auto_offload=auto_offload,
            gpu=gpu,
            gpu_memory_gib=memory,
            tokens=args.tokens,
            epochs=args.epochs,
            mfu=args.mfu,
        )
    except (ArchitectureError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(result), indent=2) if args.json else render_text(result))
    return 1 if result.fits is False else 0  # a script or CI step can gate on the verdict


def _log_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _variant(text: str) -> Variant:
    from kubetune.storage.fetch import parse_variant

    try:
        return parse_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def cmd_fetch(args: argparse.Namespace) -> int:
    from kubetune.storage import StorageError
    from kubetune.storage.fetch import FetchOptions, fetch_run

    if args.model:
        return _fetch_model(args)
    if args.revision:
        print("error: --revision applies to --model only", file=sys.stderr)
        return 2
    if (args.dir is None) == (args.cache_root is None):
        print("error: give DIR or --cache-root ROOT (one of them)", file=sys.stderr)
        return 2
    if args.parallel < 1:
        print("error: --parallel must be at least 1", file=sys.stderr)
        return 2
    try:
        result = fetch_run(
            args.run_uri,
            args.dir,
            variant=args.variant,
            cache_root=args.cache_root,
            expect_digest=args.expect_digest,
            require_gate=args.require_gate,
            link=args.link,
            endpoint_url=args.endpoint_url,
            region=args.region,
            options=FetchOptions(parallel=args.parallel),
            log=_log_line,
        )
    except StorageError as exc:
        return _fail(exc.reason, str(exc))
    print(result.directory)
    return 0


def _fetch_model(args: argparse.Namespace) -> int:
    """`kubetune fetch MODEL_URI DIR --model`: the base model of LoRA adapters, resolved
    into `DIR/../.cache` and linked as DIR (vLLM reads DIR)."""
    import os

    from kubetune.api.v1alpha1.finetunejob import ModelSource
    from kubetune.trainer.resolve import ModelResolutionError, resolve_model

    if args.dir is None or args.cache_root:
        print("error: --model needs DIR (and no --cache-root)", file=sys.stderr)
        return 2
    target = Path(args.dir)
    try:
        source = ModelSource(uri=args.run_uri, revision=args.revision)
        resolved = resolve_model(source, cache_dir=target.parent / ".cache")
    except ModelResolutionError as exc:
        return _fail(exc.reason, str(exc))
    except ValueError as exc:
        return _fail("InvalidSpec", f"{args.run_uri}: {exc}")
    if resolved.random_weights:
        return _fail("InvalidSpec", f"{args.run_uri} has no weights to serve")
    relative = os.path.relpath(resolved.path, target.parent)
    if target.is_symlink() and os.readlink(target) == relative:
        print(f"{target} already links to {resolved.path}", file=sys.stderr)
    else:
        partial = target.with_name(target.name + ".link")
        partial.unlink(missing_ok=True)
        partial.symlink_to(relative)
        partial.replace(target)  # atomic: a reader never sees a missing link
    print(target)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from kubetune.serve import (
        INSTALL_HINT,
        ServeError,
        command_for,
        default_cache_root,
        vllm_executable,
    )
    from kubetune.storage import StorageError
    from kubetune.storage.fetch import fetch_run

    vllm = vllm_executable()
    if vllm is None:
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        fetched = fetch_run(
            args.run_uri,
            variant=args.variant,
            cache_root=args.cache_root or default_cache_root(),
            require_gate=not args.allow_failed_gate,
            endpoint_url=args.endpoint_url,
            region=args.region,
            log=_log_line,
        )
        argv = command_for(
            fetched,
            port=args.port,
            host=args.host,
            base_model=args.base_model,
            extra=args.vllm_args,
        )
    except (StorageError, ServeError) as exc:
        return _fail(exc.reason, str(exc))
    print("Starting " + " ".join(argv), file=sys.stderr, flush=True)
    os.execv(vllm, argv)
    return 1  # not reached: execv replaces this process


def _token_count(text: str) -> int:
    from kubetune.calc.report import parse_count

    return parse_count(text)


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

    run = sub.add_parser(
        "run",
        help="run a FineTuneJob's whole pipeline locally",
        description="Prepare data, train, evaluate base vs tuned, check the gate, merge and "
        "publish RUN_URI with its manifest. The same spec resumes the same run. Prints the "
        "RUN_URI last.",
    )
    run.add_argument("job", metavar="JOB.yaml", help="a file with one FineTuneJob")
    run.add_argument(
        "--output", metavar="ROOT", help="artifact root (default: spec.output.uri or ./artifacts)"
    )
    run.add_argument("--new-run", action="store_true", help="start a fresh run of the same spec")
    run.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics on this port while training (default: off)",
    )
    run.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="trainer processes (one per GPU) through torchrun (default: resources.gpus, as "
        "far as this machine has GPUs, else 1)",
    )
    run.set_defaults(func=cmd_run)

    report = sub.add_parser(
        "report",
        help="summarize a finished run and write its HTML report",
        description="Print the run's metrics (base, tuned, delta), gate verdict and artifacts, "
        "and write the self-contained evaluation report: RUN_URI/eval/report.html for local "
        "runs, ./report-<run id>.html for s3:// runs (the run in S3 is never modified). "
        "Exit status 1 if the run is missing or incomplete. See docs/evaluation.md.",
    )
    report.add_argument("run_uri", metavar="RUN_URI", help="as printed by `kubetune run`")
    report.add_argument("--open", action="store_true", help="open the report in a browser")
    report.add_argument("--output", metavar="FILE", help="write the HTML report here instead")
    report.add_argument(
        "--endpoint-url", metavar="URL", help="S3 endpoint (MinIO, Ceph…); default from AWS_*"
    )
    report.set_defaults(func=cmd_report)

    fetch = sub.add_parser(
        "fetch",
        help="download one variant of a run, verified and resumable",
        description="Stream one variant of a completed run (Merged, Adapter, W4A16, W8A8 or "
        "FP8) into DIR, its files at DIR's top level, each checked against the sha256 in the "
        "run's manifest. A second run resumes an interrupted download and does nothing when "
        "DIR already holds the copy. Prints DIR last. See docs/cli.md.",
    )
    fetch.add_argument("run_uri", metavar="RUN_URI", help="as printed by `kubetune run`")
    fetch.add_argument("dir", nargs="?", metavar="DIR", help="the target folder")
    fetch.add_argument(
        "--variant",
        type=_variant,
        default="Merged",
        metavar="VARIANT",
        help="Merged (default), Adapter, W4A16, W8A8 or FP8",
    )
    fetch.add_argument(
        "--cache-root",
        metavar="ROOT",
        help="instead of DIR: fetch into ROOT/<manifest sha256>/<variant> (a shared cache)",
    )
    fetch.add_argument(
        "--expect-digest",
        metavar="sha256:HEX",
        help="refuse a run whose manifest has another digest; a complete copy is then "
        "recognized without reading the store",
    )
    fetch.add_argument(
        "--require-gate", action="store_true", help="refuse a run whose evaluation gate failed"
    )
    fetch.add_argument(
        "--link", metavar="PATH", help="afterwards, make PATH a symbolic link to the folder"
    )
    fetch.add_argument(
        "--parallel", type=int, default=4, metavar="N", help="files downloaded at once (4)"
    )
    fetch.add_argument(
        "--endpoint-url", metavar="URL", help="S3 endpoint (MinIO, Ceph…); default from AWS_*"
    )
    fetch.add_argument("--region", metavar="REGION", help="S3 region; default from AWS_*")
    fetch.add_argument(
        "--model",
        action="store_true",
        help="RUN_URI is a base model (hf://, s3://, pvc://, builtin://), not a run: resolve "
        "it as the trainer does (safetensors only, no remote code) and make DIR a link to it",
    )
    fetch.add_argument(
        "--revision", metavar="REV", help="with --model: the hf:// revision (commit or tag)"
    )
    fetch.set_defaults(func=cmd_fetch)

    serve = sub.add_parser(
        "serve",
        help="serve a run with vLLM on this machine (needs the serve extra)",
        usage="kubetune serve RUN_URI [options] [-- VLLM_ARG ...]",
        description="Fetch one variant of a run into a local cache, then run `vllm serve` on "
        "it under the job's name (an Adapter is served as a LoRA module on its base model). "
        "Arguments after `--` go to vLLM as they are. Needs vLLM: pip install "
        "'kubetune[serve]'.",
    )
    serve.add_argument("run_uri", metavar="RUN_URI", help="as printed by `kubetune run`")
    serve.add_argument(
        "--variant",
        type=_variant,
        default="Merged",
        metavar="VARIANT",
        help="Merged (default), Adapter, W4A16, W8A8 or FP8",
    )
    serve.add_argument("--port", type=int, default=8000, help="port of the OpenAI API (8000)")
    serve.add_argument("--host", help="address to listen on (vLLM's default: all)")
    serve.add_argument(
        "--base-model",
        metavar="URI",
        help="Adapter only: the base model (hf://org/name or a folder) instead of the one "
        "in the run's lineage",
    )
    serve.add_argument(
        "--cache-root",
        metavar="ROOT",
        help="where fetched variants are kept ($KUBETUNE_RUNS_CACHE_DIR, else "
        "~/.cache/kubetune/runs)",
    )
    serve.add_argument(
        "--allow-failed-gate",
        action="store_true",
        help="serve a run whose evaluation gate failed (refused by default)",
    )
    serve.add_argument(
        "--endpoint-url", metavar="URL", help="S3 endpoint (MinIO, Ceph…); default from AWS_*"
    )
    serve.add_argument("--region", metavar="REGION", help="S3 region; default from AWS_*")
    serve.set_defaults(func=cmd_serve, vllm_args=[])

    calc = sub.add_parser(
        "calc",
        help="GPU memory, LoRA parameters, FLOPs and GPU-hours of a training setup",
        description="Estimate peak GPU memory per GPU (by component), trainable parameters, "
        "FLOPs, training time and checkpoint size. Formulas, calibration and the --json "
        "schema: docs/calc.md.",
    )
    source = calc.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model",
        metavar="URI",
        help="builtin://…, hf://org/name (if cached), a folder with "
        "config.json, or an architecture name",
    )
    source.add_argument("--arch", metavar="NAME", help="an architecture of the built-in table")
    source.add_argument(
        "--job", metavar="JOB.yaml", help="take model, method and training from a FineTuneJob"
    )
    calc.add_argument(
        "--method", default="LoRA", help="LoRA (default), QLoRA, Full, PrefixTuning or PromptTuning"
    )
    calc.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (2048)")
    calc.add_argument(
        "--batch-size", type=int, default=4, help="sequences per GPU per micro-batch (4)"
    )
    calc.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (16)")
    calc.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        metavar="NAME",
        help="modules LoRA adapts (all-linear)",
    )
    calc.add_argument("--use-dora", action="store_true", help="DoRA instead of LoRA")
    calc.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="force checkpointing on or off (default: on only when needed)",
    )
    calc.add_argument(
        "--activation-offload",
        action=argparse.BooleanOptionalAction,
        help="force the checkpointed layers' inputs into host memory, or keep them on the "
        "GPU (default: offloaded only when the step does not fit otherwise)",
    )
    calc.add_argument("--precision", default="Auto", help="Auto, BF16, FP16 or FP32")
    calc.add_argument(
        "--optimizer",
        default="Auto",
        help="Auto, AdamW, AdamW8bit, PagedAdamW8bit, PagedAdamW32bit, Adafactor or SGD",
    )
    calc.add_argument("--gpus", type=int, help="GPUs training together (1)")
    calc.add_argument(
        "--strategy",
        default="None",
        help="None, DDP, FSDP, DeepSpeedZeRO2 "
        "or DeepSpeedZeRO3 (FSDP and ZeRO shard across the GPUs)",
    )
    gpu = calc.add_mutually_exclusive_group()
    gpu.add_argument(
        "--gpu-class", metavar="NAME", help="H200, H100, A100-80GB, A100-40GB, L40S, L4, A10G or T4"
    )
    gpu.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory of one GPU")
    calc.add_argument(
        "--tokens",
        type=_token_count,
        help="training tokens per epoch, for time and GPU-hours (needs --gpu-class)",
    )
    calc.add_argument("--epochs", type=int, default=1, help="passes over --tokens (1)")
    calc.add_argument("--mfu", type=float, default=0.2, help="model FLOPs utilization (0.2)")
    calc.add_argument(
        "--full-logits",
        action="store_true",
        help="plain loss with fp32 logits instead of a fused chunked LM-head loss",
    )
    calc.add_argument(
        "--fast-paths",
        action="store_true",
        help="the trainer's GPU fast paths (Liger's kernels, lean LoRA adapters), as a job "
        "runs them by default; without it, the plain Hugging Face layers (--job reads them "
        "from the job)",
    )
    calc.add_argument("--json", action="store_true", help="print JSON (schema: docs/calc.md)")
    calc.set_defaults(func=cmd_calc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if words[:1] == ["serve"] and "--" in words:
        # Everything after `--` is vLLM's, options included.
        cut = words.index("--")
        words, passthrough = words[:cut], words[cut + 1 :]
    args = build_parser().parse_args(words)
    if passthrough:
        args.vllm_args = passthrough
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
