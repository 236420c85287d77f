# One image for every service of the pipeline; the command picks the service:
#   text-generation-launcher (default: everything in one container),
#   text-generation-gateway | -scheduler | -worker | -tokenizer, text-generation-server ...
#
#   docker build -t tgis-pipeline:0.1.0 .                                # CPU torch
#   docker build --build-arg VARIANT=cuda -t tgis-pipeline:0.1.0-cuda .  # CUDA torch (NVIDIA GPUs)
#
# Layers, from the one that changes least: base, torch, the other dependencies (from
# pyproject.toml only), then the package. A code edit rebuilds only the last one, and the
# source never reaches the runtime image: it gets the finished virtualenv.
#
# The base is pinned by digest so that a rebuild gets the same OS and Python. This digest is
# one that public projects pin for python:3.11-slim-bookworm; it could not be checked from the
# machine this was written on (no registry access). To refresh it (monthly, or for a CVE fix):
#   docker buildx imagetools inspect python:3.11-slim-bookworm --format '{{json .Manifest.Digest}}'
# and put the new digest here (or pass --build-arg BASE_IMAGE=python:3.11-slim-bookworm@sha256:...).
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE} AS build

# cpu: torch's CPU wheels; cuda: its CUDA wheels (they bring the CUDA runtime; the node's
# NVIDIA driver comes in through the container toolkit).
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG CUDA_WHEELS=cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN python -m venv /opt/venv

# torch first, in its own layer: the biggest download and the one that changes least.
# pyproject pins torch==2.13.0, which the +cpu / +cuXXX local build satisfies, so the
# dependency install below keeps it instead of pulling the default wheel from PyPI.
RUN case "${VARIANT}" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index="https://download.pytorch.org/whl/${CUDA_WHEELS}" ;; \
      *) echo "VARIANT must be cpu or cuda, not ${VARIANT}" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${index}"

# The other dependencies, read from pyproject.toml alone: edits to the code keep this layer.
COPY pyproject.toml /src/
RUN python -c "import tomllib; print(*tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /src/requirements.txt \
 && pip install --no-cache-dir -r /src/requirements.txt

# The package itself (no dependency resolution left to do).
COPY README.md /src/
COPY services /src/services
COPY bench /src/bench
RUN pip install --no-cache-dir --no-deps /src

FROM ${BASE_IMAGE} AS runtime

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="tgis-pipeline" \
      org.opencontainers.image.description="TGIS-compatible LLM inference server as a ZeroMQ service pipeline (${VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

COPY --from=build /opt/venv /opt/venv

# g++: CPU workers compile their native decode-attention kernel for the node's CPU at start-up
# (services/worker/native.py; -march=native, so it cannot be built into the image), and
# PT2_COMPILE's inductor compiles its C++ kernels with it too. Without it both fall back.
# Unpinned on purpose: the base image's digest fixes the Debian release, and with it g++.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

# Non-root user; group 0 and group-writable folders so that OpenShift's arbitrary UIDs
# (always in group 0) work too. /shared_model_storage is the HF cache mount point used by
# compose and k8s: a new named volume copies this owner, so the download step can write it.
RUN useradd --uid 2000 --gid 0 --create-home --home-dir /home/tgis tgis \
 && mkdir -p /shared_model_storage/hub \
 && chown -R 2000:0 /home/tgis /shared_model_storage \
 && chmod -R g=u /home/tgis /shared_model_storage

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 2000:0
WORKDIR /home/tgis

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/tgis \
    HF_HUB_CACHE=/shared_model_storage/hub \
    HF_HUB_OFFLINE=1 \
    PORT=3000 \
    GRPC_PORT=8033
EXPOSE 8033 3000

CMD ["text-generation-launcher"]
