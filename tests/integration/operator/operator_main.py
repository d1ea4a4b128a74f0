"""The operator process of the crash tests (`operator_process.OperatorProcess`).

    python operator_main.py    # imports kopf and kubetune.operator.handlers, then waits for
                               # a line on stdin and runs the operator cluster-wide

Importing takes most of an operator's start (about a second on a busy CPU), so the tests keep
the next process imported and waiting: a crash is followed by an operator that starts at once,
as a Deployment's replacement pod would once its image is pulled. End of input (the tests went
away, even killed) ends the process, before or after it started: no operator outlives its
tests.
"""

from __future__ import annotations

import os
import sys
import threading

import kopf

import kubetune.operator.handlers  # noqa: F401 - registers the handlers


def _exit_at_end_of_input() -> None:
    sys.stdin.read()
    os._exit(0)


def main() -> None:
    if not sys.stdin.readline():
        return
    threading.Thread(target=_exit_at_end_of_input, name="stdin-watch", daemon=True).start()
    kopf.configure(verbose=False)
    kopf.run(standalone=True, clusterwide=True)


if __name__ == "__main__":
    main()
