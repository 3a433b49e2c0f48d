# syntax=docker/dockerfile:1
#
# RefineDet GPU image: `refinedet serve` with a TensorRT engine built on first start.
#
# Base: NVIDIA's TensorRT container, release 25.06 (Ubuntu 24.04, Python 3.12, CUDA 12.9.1, TensorRT 10.11).
# Host requirements (NVIDIA's release notes for the 25.06 containers):
#   - NVIDIA driver R575 or newer; data-centre GPUs may also run R470.57+, R525.85+, R535.86+ or R545.23+
#     through CUDA forward compatibility (handled by the base image's entrypoint, which this image keeps);
#   - a GPU of compute capability 7.5 or newer (Turing, Ampere, Ada, Hopper, Blackwell);
#   - the NVIDIA Container Toolkit (docker run --gpus all / compose device reservations).
# The engine builder targets the TensorRT 10 API: a base with TensorRT 11 is refused at build time.
# An engine only runs on the GPU model + TensorRT version + precision it was built for, so none is baked
# in: `refinedet serve` builds it into the cache volume on first start (docs/deployment.md).
#
#   docker build -t refinedet:gpu .
#   docker run --gpus all -p 8000:8000 -v refinedet-cache:/var/cache/refinedet refinedet:gpu

ARG TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:25.06-py3

# --- build: a virtual environment with the project and its serving dependencies --------------------
FROM ${TENSORRT_IMAGE} AS build

# PyPI's torch 2.8.0 Linux wheels are the CUDA 12.8 builds (torch is needed on the GPU by the engine
# builder and the TensorRT runner); onnxruntime-gpu 1.22 is built for CUDA 12 and cuDNN 9.
ARG TORCH_VERSION=2.8.0
ARG TORCHVISION_VERSION=0.23.0
ARG ONNXRUNTIME_GPU_VERSION=1.22.0
ARG PIP_VERSION=25.1.1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}

# --system-site-packages: the venv sees the TensorRT Python bindings that come with the base image.
RUN python3 -m venv --system-site-packages --without-pip /opt/venv \
    && /opt/venv/bin/python -m pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY conversion ./conversion
COPY service ./service
COPY deploy ./deploy

# The serve extra brings the CPU onnxruntime; swap it for the CUDA build (same import name).
# DL3013: this installs the local project, whose dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[serve,export]" \
    && pip uninstall --yes onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && python -c "import tensorrt, torch, onnxruntime; \
v = tensorrt.__version__; print('TensorRT', v, '| torch', torch.__version__, '| onnxruntime', onnxruntime.__version__); \
assert v.split('.')[0] == '10', f'TensorRT {v}: the engine builder needs TensorRT 10 (see docs/deployment.md)'; \
assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), 'onnxruntime-gpu is not in place'"

# --- runtime -------------------------------------------------------------------------------------
FROM ${TENSORRT_IMAGE}

LABEL org.opencontainers.image.title="refinedet-gpu" \
      org.opencontainers.image.description="RefineDet detection service: TensorRT engine built on first start, ONNX Runtime / torch fallback" \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --system --gid 10001 refinedet \
    && useradd --system --uid 10001 --gid refinedet --create-home --home-dir /home/refinedet refinedet \
    && mkdir -p /var/cache/refinedet /models /triton-repo \
    && chown refinedet:refinedet /var/cache/refinedet /triton-repo

COPY --from=build /opt/venv /opt/venv

# Engines, ONNX exports and timing caches go to /var/cache/refinedet: mount a volume there so they
# survive restarts. Models are read from /models (set REFINEDET_MODEL=/models/<file>).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    REFINEDET_HOST=0.0.0.0 \
    REFINEDET_PORT=8000 \
    REFINEDET_BACKEND=auto \
    REFINEDET_DEVICE=auto \
    REFINEDET_PRECISION=fp16 \
    REFINEDET_MAX_BATCH_SIZE=8 \
    REFINEDET_CACHE_DIR=/var/cache/refinedet

VOLUME ["/var/cache/refinedet"]
EXPOSE 8000
USER 10001:10001
WORKDIR /home/refinedet

# The first start may spend several minutes building the engine: a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
    CMD ["refinedet", "healthcheck"]

# The base image's ENTRYPOINT (NVIDIA's, which sets up CUDA forward compatibility) runs this command.
CMD ["refinedet", "serve"]
