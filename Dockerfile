# syntax=docker/dockerfile:1
#
# reap-vlm: REAP expert scoring and pruning of Qwen3-VL-MoE models on NVIDIA GPUs.
#   ./run.sh build            (docker compose build; REAP_* variables there set the build args below)
#   docker build -t reap-vlm .   (without SOURCE_HASH, which run.sh computes: it then warns that it cannot tell
#                                 whether the image holds the checkout's code)
#
# torch 2.11 from PyPI is built for CUDA 13.0 and carries its own CUDA libraries (cuBLAS, cuDNN, NCCL, ...),
# so the base image only adds NVIDIA's container hooks and needs a host driver >= 580. For an older driver
# (535/550/570: CUDA 12.x) build with a CUDA 12 base and PyTorch's CUDA 12.8 wheels:
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Optional extras (off by default):
#   --build-arg INSTALL_FLASH_ATTN=1   flash-attn, compiled in a CUDA devel stage (DEVEL_IMAGE) that is not shipped
#   --build-arg INSTALL_VLLM=1         vLLM (VLLM_VERSION must be one that accepts torch 2.11 / transformers 5.17)

ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG INSTALL_FLASH_ATTN=0

# ---- python: the OS layer every stage shares (Ubuntu 24.04's Python 3.12 in a virtual environment) ----------
FROM ${BASE_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# ---- flash-attn-1: builds the flash-attn wheel against the same torch, with nvcc (only when asked) -----------
FROM ${DEVEL_IMAGE} AS flash-attn-1
ARG DEBIAN_FRONTEND=noninteractive
ARG TORCH_INDEX_URL=""
ARG FLASH_ATTN_VERSION=2.8.3.post2
# 90 = Hopper (H100/H200); "80;90" adds Ampere. Each architecture adds a long compile.
ARG FLASH_ATTN_CUDA_ARCHS=90
ARG MAX_JOBS=8
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt /tmp/req/
RUN python3 -m venv /opt/venv \
    && grep -E '^torch==' /tmp/req/requirements.txt \
       | xargs pip install --no-cache-dir ${TORCH_INDEX_URL:+"--index-url=$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir ninja==1.13.2 packaging==26.3 psutil==7.2.2 setuptools==84.2.1 wheel==0.48.0 \
    && pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /wheels "flash-attn==${FLASH_ATTN_VERSION}"

# ---- flash-attn-0: nothing to add -----------------------------------------------------------------------------
FROM python AS flash-attn-0
RUN mkdir /wheels

# hadolint ignore=DL3006
FROM flash-attn-${INSTALL_FLASH_ATTN} AS flash-attn

# ---- runtime -------------------------------------------------------------------------------------------------
FROM python AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_INDEX_URL=""
ARG INSTALL_VLLM=0
ARG VLLM_VERSION=0.26.0

# Dependencies first, so that a code change does not reinstall them. torch/torchvision come first so that
# TORCH_INDEX_URL can pick their CUDA build; the rest of requirements*.txt then finds them satisfied.
COPY requirements.txt requirements-dev.txt /tmp/req/
RUN python3 -m venv /opt/venv \
    && grep -E '^torch(vision)?==' /tmp/req/requirements.txt \
       | xargs pip install --no-cache-dir ${TORCH_INDEX_URL:+"--index-url=$TORCH_INDEX_URL"} \
    && pip install --no-cache-dir -r /tmp/req/requirements-dev.txt \
    && if [ "$INSTALL_VLLM" = 1 ]; then \
         pip install --no-cache-dir --constraint /tmp/req/requirements.txt "vllm==${VLLM_VERSION}"; \
       fi \
    && rm -rf /tmp/req

# flash-attn's wheel (none unless INSTALL_FLASH_ATTN=1), read from its stage without adding it to a layer.
RUN --mount=type=bind,from=flash-attn,source=/wheels,target=/tmp/wheels \
    find /tmp/wheels -name '*.whl' -print0 | xargs -0 --no-run-if-empty pip install --no-cache-dir

# A non-root user. docker-compose.yml runs the container as the calling user (REAP_UID:REAP_GID, which run.sh
# sets from `id`), so the writable folders are open to any uid; Ubuntu's own uid-1000 user makes way.
ARG USER_UID=1000
ARG USER_GID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid "${USER_GID}" reap \
    && useradd --uid "${USER_UID}" --gid "${USER_GID}" --create-home --shell /bin/bash reap \
    && install -d -o reap -g reap -m 1777 /app/data /app/output /app/demo /app/cache /app/logs \
    && chmod 1777 /home/reap

# HF_HOME and the other caches live in /app/cache (a named volume in docker-compose.yml). HF_HUB_OFFLINE is left
# unset: set it (or TRANSFORMERS_OFFLINE) to 1 when every model is already local.
ENV HOME=/home/reap \
    HF_HOME=/app/cache/huggingface \
    XDG_CACHE_HOME=/app/cache \
    MPLCONFIGDIR=/app/cache/matplotlib \
    TRITON_CACHE_DIR=/app/cache/triton \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    REAP_RUNTIME=native \
    REAP_PYTHON=/opt/venv/bin/python

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir --no-deps -e /app

# The code is baked in, so the image goes stale when the checkout changes: run.sh labels it with a hash of the
# checkout (SOURCE_HASH, from ./run.sh build) and warns when that no longer matches. Declared after the last RUN,
# so that a new value changes only this label.
ARG SOURCE_HASH=""
LABEL org.opencontainers.image.title="reap-vlm" \
      org.opencontainers.image.description="REAP expert pruning for Qwen3-VL-MoE vision-language models" \
      org.opencontainers.image.licenses="MIT" \
      org.reap-vlm.source-sha256="${SOURCE_HASH}"
USER ${USER_UID}:${USER_GID}
CMD ["bash"]
