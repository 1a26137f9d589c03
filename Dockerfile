# kubetune operator image: the kopf operator only (no torch, no CUDA).
#
#   docker build -t ghcr.io/kubetune/operator:0.1.0 .
#   docker run --rm ghcr.io/kubetune/operator:0.1.0 --help
#
# Dependency versions live only in pyproject.toml (the `operator` extra); tests/unit/test_packaging.py fails if
# this file installs anything else, if that extra pulls in the training stack, or if Python drifts from
# requires-python. The Helm chart runs it with a read-only root filesystem as UID 65532.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /build
# pyproject.toml declares all three packages, so setuptools needs each package folder to build the wheel;
# kubetune_trainer's source is a few hundred kB of Python and its heavy dependencies are not installed.
COPY pyproject.toml ./
COPY operator/kubetune_api operator/kubetune_api
COPY operator/kubetune_operator operator/kubetune_operator
COPY operator/kubetune_cli operator/kubetune_cli
COPY trainer-image/kubetune_trainer trainer-image/kubetune_trainer
RUN pip install --no-cache-dir ".[operator]" \
 && rm -rf /build

WORKDIR /
# 65532 is the conventional "nonroot" UID (distroless); numeric so runAsNonRoot can verify it.
USER 65532:65532
# kopf's liveness endpoint (probes) and the Prometheus metrics port; see helm/kubetune/values.yaml.
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "kubetune_operator"]
