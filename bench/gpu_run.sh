#!/usr/bin/env bash
# The whole benchmark on the H100 machine in one call (about 8 minutes at most):
#   (a) install the carried wheels (.whl/, made by bench/gpu_prepare.sh) into /tmp/site,
#   (b) a `refinedet` shim on PATH,
#   (c) the model benchmark on CUDA (~3 min), the CPU comparison with 2 threads on 2 cores (<1 min),
#       the service benchmark (~3 min: refinedet serve vs the naive app, concurrency 1/4/16/64).
# Writes 8 files to $OUT: model_bench.{json,log}, model_bench_cpu.json, service_bench.{json,log},
# service_server.log, naive_server.log, run.log (environment + the CPU comparison's output).
#
# Local dry run (CPU, tiny durations):  OUT=/tmp/out PYTHON=.venv/bin/python BENCH_DEVICE=cpu \
#   BENCH_QUICK=1 SKIP_WHEELS=1 [BENCH_CHECKPOINT=small.pth] bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
PYTHON=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUNLOG=$OUT/run.log

if [ -z "${SKIP_WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >>"$RUNLOG" 2>&1 || { echo "wheel install failed" | tee -a "$RUNLOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec %s -m model.cli "$@"\n' "$(command -v "$PYTHON")" >/tmp/bin/refinedet
chmod +x /tmp/bin/refinedet
export PATH=/tmp/bin:$PATH

IMAGES=()
if [ -d data/bench_photos ]; then IMAGES=(--images data/bench_photos); fi
CKPT=(); MODEL=()  # default: the shipped checkpoint (model.zoo), else random weights
if [ -n "${BENCH_CHECKPOINT:-}" ]; then CKPT=(--checkpoint "$BENCH_CHECKPOINT"); MODEL=(--model "$BENCH_CHECKPOINT"); fi

if [ -n "${BENCH_QUICK:-}" ]; then  # local dry run: tiny sizes and durations
  MODEL_ARGS=(--sizes 320 --batch-sizes 1 --iters 3 --warmup 1 --time-budget 1)
  CPU_ARGS=(--iters 3 --warmup 1 --time-budget 1)
  SERVICE_ARGS=(--concurrency 1,4 --duration 3 --warmup 1 --client-processes 2 --max-batch-size 4)
  LIMIT_MODEL=600 LIMIT_CPU=300 LIMIT_SERVICE=300
else
  MODEL_ARGS=(--time-budget 1.0 --warmup 5 --iters 300 --max-seconds 170)
  CPU_ARGS=(--iters 40 --warmup 3 --time-budget 6)
  SERVICE_ARGS=(--concurrency 1,4,16,64 --duration 8 --warmup 2 --client-processes 4
                --max-batch-size 32 --max-delay-ms 2 --max-queue-size 1024)
  LIMIT_MODEL=215 LIMIT_CPU=75 LIMIT_SERVICE=200
fi

{
  echo "== environment $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  "$PYTHON" -c "import fastapi, uvicorn, pydantic; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'pydantic', pydantic.VERSION)"
  nproc; uptime
} >>"$RUNLOG" 2>&1

echo "== model benchmark ($DEVICE)" | tee -a "$RUNLOG"
timeout -k 10 "$LIMIT_MODEL" "$PYTHON" -m bench.model_bench --device "$DEVICE" "${MODEL_ARGS[@]}" "${IMAGES[@]}" "${CKPT[@]}" \
  --json "$OUT/model_bench.json" 2>&1 | tee "$OUT/model_bench.log" | tail -n 60
echo "model benchmark exit ${PIPESTATUS[0]}" | tee -a "$RUNLOG"

echo "== CPU: onnxruntime vs torch eager, batch 1, 2 threads on 2 cores" | tee -a "$RUNLOG"
PIN=(); if command -v taskset >/dev/null; then PIN=(taskset -c 0,1); fi
timeout -k 10 "$LIMIT_CPU" "${PIN[@]}" "$PYTHON" -m bench.model_bench --device cpu --threads 2 --sizes 320 \
  --batch-sizes 1 --backends torch-eager,onnxruntime "${CPU_ARGS[@]}" "${IMAGES[@]}" "${CKPT[@]}" \
  --json "$OUT/model_bench_cpu.json" >>"$RUNLOG" 2>&1
rc=$?
tail -n 4 "$RUNLOG"
echo "cpu benchmark exit $rc" | tee -a "$RUNLOG"

echo "== service benchmark ($DEVICE)" | tee -a "$RUNLOG"
timeout -k 40 "$LIMIT_SERVICE" "$PYTHON" -m bench.service_bench --device "$DEVICE" "${SERVICE_ARGS[@]}" \
  "${IMAGES[@]}" "${MODEL[@]}" --log-dir "$OUT" --json "$OUT/service_bench.json" 2>&1 | tee "$OUT/service_bench.log" | tail -n 30
echo "service benchmark exit ${PIPESTATUS[0]}" | tee -a "$RUNLOG"
ls -la "$OUT" | tee -a "$RUNLOG"
