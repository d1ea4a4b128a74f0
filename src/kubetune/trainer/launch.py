"""One trainer process per GPU, with the trainer's exit code: `python -m kubetune.trainer.launch
[torchrun options] -- [trainer options]`.

torchrun starts the processes and restarts or stops them together, but exits 1 whatever went
wrong, so a Job's podFailurePolicy could not tell a user error (fail fast) from a lost node
(retry). This launcher runs torchrun in-process, then exits with the code of the result the
trainer processes wrote (`--result-file`): the same contract as a single trainer process.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kubetune.api.contract import Reason, TrainerResult, exit_code_for

DEFAULT_RESULT_FILE = "/dev/termination-log"


def split_arguments(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, trainer options) around the `--` separator."""
    if "--" not in argv:
        raise SystemExit(
            "usage: python -m kubetune.trainer.launch [torchrun options] -- [trainer options]"
        )
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


def result_file(trainer_args: list[str]) -> Path:
    """Where the trainer processes write their result (`--result-file`)."""
    for index, arg in enumerate(trainer_args):
        if arg == "--result-file" and index + 1 < len(trainer_args):
            return Path(trainer_args[index + 1])
        if arg.startswith("--result-file="):
            return Path(arg.split("=", 1)[1])
    return Path(DEFAULT_RESULT_FILE)


def exit_code_from(path: Path, launcher_failed: bool) -> int:
    """The code to exit with: the written result's, or InfrastructureError's when the
    processes failed without writing one (killed, lost the rendezvous)."""
    try:
        result = TrainerResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return exit_code_for(Reason.INFRASTRUCTURE_ERROR) if launcher_failed else 0
    if result.reason in (Reason.SUCCEEDED, Reason.EVALUATION_GATE_FAILED):
        return exit_code_for(Reason.INFRASTRUCTURE_ERROR) if launcher_failed else 0
    return exit_code_for(result.reason)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    torchrun_args, trainer_args = split_arguments(list(sys.argv[1:] if argv is None else argv))
    path = result_file(trainer_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size and str(path) != DEFAULT_RESULT_FILE:
        path.unlink()  # a stale result from an earlier attempt must not decide this one
    options = parse_args([*torchrun_args, "-m", "kubetune.trainer", *trainer_args])
    failed = False
    try:
        run(options)
    except ChildFailedError as exc:
        failed = True
        print(f"trainer processes failed: {exc.get_first_failure()[1].message}", file=sys.stderr)
    return exit_code_from(path, failed)


if __name__ == "__main__":
    sys.exit(main())
