"""`python -m kubetune.operator`: run the operator (kopf) with the kubetune handlers.

Watches the namespaces of the operator settings (`watchNamespaces`), or the whole cluster
when none are listed. One replica: kopf's peering is off, so run it with the Helm chart's
Recreate strategy.
"""

from __future__ import annotations

import logging

import kopf

from kubetune.operator import handlers  # noqa: F401 - registers the handlers
from kubetune.operator.settings import load_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    namespaces = load_settings().watch_namespaces
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint="http://0.0.0.0:8081/healthz",
    )


if __name__ == "__main__":
    main()
