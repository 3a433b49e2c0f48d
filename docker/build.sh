#!/bin/sh
# The steps both images run, so that the CPU image built and run by scripts/container_check.sh
# covers the GPU image's as well. Only the base image and these variables differ between the two:
#
#   build.sh torch      (build stage) venv in /opt/venv, pip, torch (+ torchvision)
#     VENV_ARGS           extra `python3 -m venv` arguments (GPU: --system-site-packages, for TensorRT)
#     PIP_VERSION         pip release installed into the venv
#     TORCH_VERSION       e.g. 2.8.0, or 2.13.0+cpu (a local build, from WHEELS)
#     TORCHVISION_VERSION e.g. 0.23.0; "none": no torchvision (see below)
#     TORCH_INDEX_URL     where torch comes from (CPU: PyTorch's CPU index; GPU: PyPI); "" for PyPI
#     WHEELS              a folder of wheels pip may take from first (docker/wheels/ in the context)
#   build.sh project    (build stage) the project with its serve and export extras, checked, pruned
#     ONNXRUNTIME         "" to keep the serve extra's onnxruntime (CPU); a requirement that replaces
#                         it (GPU: onnxruntime-gpu==1.22.0, the same import name)
#     EXPECT              cpu | gpu: what docker/check_install.py asserts about the venv
#   build.sh runtime    (runtime stage) the unprivileged user and the cache and model folders
#
# TORCHVISION_VERSION=none: the service and the ONNX export do not import torchvision (training and
# GPU JPEG decoding do). Where no CPU torchvision wheel can be had, PyPI's (a CUDA build) would be pulled
# in by the project's dependencies and fail on import next to a CPU torch, so it is removed again.
set -eu

VENV=/opt/venv
UID_GID=10001
CACHE_DIR=/var/cache/refinedet

pip() { "$VENV/bin/python" -m pip --no-cache-dir --disable-pip-version-check "$@"; }

find_links() {
    if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        printf '%s\n' --find-links "$WHEELS"
    fi
}

torch_step() {
    # shellcheck disable=SC2086  # VENV_ARGS is a list of arguments
    python3 -m venv ${VENV_ARGS:-} "$VENV"
    pip install "pip==${PIP_VERSION:?}"
    set -- "torch==${TORCH_VERSION:?}"
    if [ "${TORCHVISION_VERSION:?}" != none ]; then
        set -- "$@" "torchvision==$TORCHVISION_VERSION"
    fi
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        set -- --index-url "$TORCH_INDEX_URL" "$@"
    fi
    # shellcheck disable=SC2046  # find_links prints whole arguments, one a line
    pip install $(find_links) "$@"
}

project_step() {
    # Pin the torch (and torchvision) installed above: otherwise the resolver may take a newer release
    # from PyPI (a CUDA build) to satisfy the newest torchvision.
    pip list --format=freeze | grep -E '^(torch|torchvision)==' >/tmp/torch-constraints.txt
    # shellcheck disable=SC2046
    pip install $(find_links) --constraint /tmp/torch-constraints.txt ".[serve,export]"
    if [ -n "${ONNXRUNTIME:-}" ]; then
        pip uninstall --yes onnxruntime
        pip install "$ONNXRUNTIME"
    fi
    if [ "${TORCHVISION_VERSION:?}" = none ]; then
        pip uninstall --yes torchvision
    fi
    prune
    "$VENV/bin/python" docker/check_install.py --expect "${EXPECT:?}"
    du -sh "$VENV"
}

# What serving never loads: build tools, C++ headers and test binaries, and the byte code pip compiled
# for every module at install time. check_install.py then compiles again only what serving imports, so
# that a start (as uid 10001, which cannot write to the venv) does not compile it each time.
prune() {
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    pip uninstall --yes pip setuptools wheel >/dev/null 2>&1 || true
    rm -rf "$site/torch/include" "$site/torch/test" \
        "$site/torch/lib/libtorchbind_test.so" "$site/torch/lib/libaoti_custom_ops.so"
    find "$site/torch/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +
    rm -rf "$site/onnx/backend/test"
    # OpenVINO (a CPU engine, conversion/cpu_engine.py) ships 180 MB: keep the core, the CPU plugin and
    # the ONNX and IR frontends; drop the Intel GPU and NPU plugins, the GPU kernel tuning cache, the
    # frontends for other model formats (paddle, tensorflow, tflite, pytorch, jax, gguf) and the C++
    # headers (104 MB left). OpenVINO lists only the plugins it can load (Core().available_devices ==
    # ['CPU']) and reads ONNX without the others; check_install.py compiles and runs a model to prove it.
    ov="$site/openvino"
    rm -rf "$ov/include" "$ov/libs/cache.json" \
        "$ov/libs/libopenvino_intel_gpu_plugin.so" "$ov/libs/libopenvino_intel_npu_plugin.so"
    for frontend in paddle tensorflow tensorflow_lite pytorch jax gguf; do
        rm -f "$ov/libs/libopenvino_${frontend}_frontend.so"*
    done
    find "$VENV" -depth -name __pycache__ -exec rm -rf {} +
}

runtime_step() {
    groupadd --system --gid "$UID_GID" refinedet
    useradd --system --uid "$UID_GID" --gid refinedet --create-home --home-dir /home/refinedet refinedet
    # The cache holds ONNX exports, engines and timing caches (a volume); /models is mounted read-only.
    mkdir -p "$CACHE_DIR" /models
    chown refinedet:refinedet "$CACHE_DIR"
    for dir in "$@"; do  # image-specific writable folders (GPU: /triton-repo)
        mkdir -p "$dir" && chown refinedet:refinedet "$dir"
    done
}

step=${1:?usage: build.sh torch|project|runtime [folders...]}
shift
case "$step" in
    torch) torch_step ;;
    project) project_step ;;
    runtime) runtime_step "$@" ;;
    *) echo "build.sh: unknown step $step" >&2; exit 2 ;;
esac
