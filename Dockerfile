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
# Every step that is not about the base image runs docker/build.sh, shared with docker/Dockerfile.cpu,
# which scripts/container_check.sh builds and runs.
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

# --system-site-packages: the venv sees the TensorRT Python bindings that come with the base image
# (whose Python has no ensurepip: the base's pip installs the venv's own).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VENV_ARGS="--system-site-packages --without-pip" \
    TORCH_INDEX_URL= \
    WHEELS=/src/docker/wheels \
    ONNXRUNTIME=onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION} \
    EXPECT=gpu

WORKDIR /src
# torch first, in its own layer: changing the project's code does not reinstall it.
COPY docker/build.sh docker/
COPY docker/wheels/ docker/wheels/
RUN sh docker/build.sh torch

# The serve extra brings the CPU onnxruntime; build.sh swaps it for the CUDA build (same import name).
COPY docker/check_install.py docker/
COPY pyproject.toml README.md ./
COPY model ./model
COPY conversion ./conversion
COPY service ./service
COPY deploy ./deploy
COPY scaleout ./scaleout
COPY refinedet ./refinedet
RUN sh docker/build.sh project

# --- runtime -------------------------------------------------------------------------------------
FROM ${TENSORRT_IMAGE}

LABEL org.opencontainers.image.title="refinedet-gpu" \
      org.opencontainers.image.description="RefineDet detection service: TensorRT engine built on first start, ONNX Runtime / torch fallback" \
      org.opencontainers.image.licenses="MIT"

COPY docker/build.sh /usr/local/lib/refinedet/build.sh
RUN sh /usr/local/lib/refinedet/build.sh runtime /triton-repo
COPY --from=build /opt/venv /opt/venv

# The same ENV keys, volume, port, user, healthcheck and command as the CPU image (a test checks it).
# Engines, ONNX exports and timing caches go to /var/cache/refinedet: mount a volume there so they
# survive restarts. Models are read from /models (set REFINEDET_MODEL=/models/<file>).
# Everything else is the service's own default (service/settings.py): backend and device auto, fp16
# engines, batches of up to 8 on a GPU.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    REFINEDET_HOST=0.0.0.0 \
    REFINEDET_PORT=8000 \
    REFINEDET_CACHE_DIR=/var/cache/refinedet

VOLUME ["/var/cache/refinedet"]
EXPOSE 8000
USER 10001:10001
WORKDIR /home/refinedet

# The first start may spend several minutes building the engine: a long start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15m --retries=3 \
    CMD ["refinedet", "healthcheck"]

# The base image's ENTRYPOINT (NVIDIA's, which sets up CUDA forward compatibility) runs this command.
CMD ["refinedet", "serve"]
