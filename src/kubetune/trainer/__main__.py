"""The trainer pod's entry point: `python -m kubetune.trainer --config FILE`.

The config (a TrainerConfig, YAML or JSON, rendered by the operator) is validated before
torch is imported. The result goes to the termination-message file (under 4 KiB) and the
exit code follows the contract's table, so the operator knows whether to retry.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kubetune.trainer.runner import run_from_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune.trainer", description=__doc__)
    parser.add_argument("--config", required=True, help="TrainerConfig file (YAML or JSON)")
    parser.add_argument(
        "--result-file",
        default=os.environ.get("KUBETUNE_RESULT_FILE", "/dev/termination-log"),
        help="where the TrainerResult JSON goes (default: the termination-message path)",
    )
    parser.add_argument(
        "--work-dir",
        default=os.environ.get("KUBETUNE_WORK_DIR", "/scratch/work"),
        help="scratch directory for data, checkpoints and exports",
    )
    args = parser.parse_args(argv)
    return run_from_file(Path(args.config), Path(args.result_file), Path(args.work_dir))


if __name__ == "__main__":
    sys.exit(main())
