# One image for every service of the pipeline; the command picks the service:
#   text-generation-launcher (default: everything in one container),
#   text-generation-gateway | -scheduler | -worker | -tokenizer, text-generation-server ...
#
#   docker build -t tgis-pipeline .
#   # NVIDIA GPUs: a CUDA build of torch instead of the CPU one, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t tgis-pipeline:cuda .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: the biggest download and the one that changes least.
# pyproject pins torch==2.13.0, which the +cpu / +cuXXX local build satisfies, so
# `pip install .` below keeps it instead of pulling the default (CUDA) wheel from PyPI.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Install from a scratch copy, then delete it: the services run from site-packages only.
COPY . /tmp/src
RUN pip install /tmp/src && rm -rf /tmp/src

# Non-root user; group 0 and group-writable folders so that OpenShift's arbitrary
# UIDs (always in group 0) work too. /shared_model_storage is the HF cache mount
# point used by compose and k8s: a new named volume copies this owner, so the
# model-init service can write to it.
RUN useradd --uid 2000 --gid 0 --create-home --home-dir /home/tgis tgis \
 && mkdir -p /shared_model_storage/hub \
 && chown -R 2000:0 /home/tgis /shared_model_storage \
 && chmod -R g=u /home/tgis /shared_model_storage

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 2000:0
WORKDIR /home/tgis

ENV PORT=3000 GRPC_PORT=8033 HOME=/home/tgis HF_HUB_OFFLINE=1
EXPOSE 8033 3000

CMD ["text-generation-launcher"]
