"""The kubetune API: pydantic models that are the single source of truth.

CRDs (`crds/`), the trainer's input contract and `docs/api.md` are generated from these
models. This package imports neither the operator nor the trainer.
"""

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
