#!/usr/bin/env bash
# The whole benchmark on the H100 machine in one call (under 9 minutes: the four steps are capped at
# 180 + 75 + 40 + 230 s by `timeout`, plus the wheel install):
#   (a) install the carried wheels (.whl/, made by bench/gpu_prepare.sh) into /tmp/site,
#   (b) a `refinedet` shim on PATH,
#   (c) the model benchmark on CUDA (<3 min), the CPU comparison with 2 threads on 2 cores (<1 min),
#       a check of the service's batched GPU JPEG decoder against PIL on the photos (pixels, time),
#       the service benchmark (<4 min: refinedet serve with JPEG decoding on the GPU
#       (REFINEDET_ENGINE_DECODE=auto: on with CUDA, PIL if nvJPEG fails its start-up check, as the
#       server log says) with 1 and with 4 uvicorn workers, then the naive app; concurrency
#       1/4/16/64, 6 s each).
# Writes 5 files to $OUT (the device tool returns at most 8): model_bench.json, model_bench_cpu.json,
# gpu_decode_check.json, service_bench.json and logs.tar.gz (model_bench.log, service_bench.log,
# service_server.log for both worker counts, naive_server.log, run.log: the environment and the CPU
# comparison's and the decode check's output)
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
printf '#!/bin/sh\nexec %s -m refinedet "$@"\n' "$(command -v "$PYTHON")" >/tmp/bin/refinedet
chmod +x /tmp/bin/refinedet
export PATH=/tmp/bin:$PATH

IMAGES=()
if [ -d data/bench_photos ]; then IMAGES=(--images data/bench_photos); fi
CKPT=(); MODEL=()  # default: the shipped checkpoint (model.zoo), else random weights
if [ -n "${BENCH_CHECKPOINT:-}" ]; then CKPT=(--checkpoint "$BENCH_CHECKPOINT"); MODEL=(--model "$BENCH_CHECKPOINT"); fi

if [ -n "${BENCH_QUICK:-}" ]; then  # local dry run: tiny sizes and durations
  MODEL_ARGS=(--sizes 320 --batch-sizes 1 --iters 3 --warmup 1 --time-budget 1)
  CPU_ARGS=(--iters 3 --warmup 1 --time-budget 1)
  SERVICE_ARGS=(--concurrency 1,4 --duration 3 --warmup 1 --client-processes 2 --max-batch-size 4
                --workers 1,2 --server-env REFINEDET_ENGINE_DECODE=auto)
  LIMIT_MODEL=600 LIMIT_CPU=300 LIMIT_SERVICE=300
else
  MODEL_ARGS=(--time-budget 1.0 --warmup 5 --iters 300 --max-seconds 140)
  CPU_ARGS=(--iters 40 --warmup 3 --time-budget 6)
  SERVICE_ARGS=(--concurrency 1,4,16,64 --duration 6 --warmup 2 --client-processes 4
                --max-batch-size 32 --max-delay-ms 0 --max-queue-size 1024
                --workers 1,4 --server-env REFINEDET_ENGINE_DECODE=auto)
  LIMIT_MODEL=180 LIMIT_CPU=75 LIMIT_SERVICE=230
fi

{
  echo "== environment $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  "$PYTHON" -c "import torch, torchvision, sys; print(sys.version); print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
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

echo "== batched JPEG decode in the engine ($DEVICE) vs PIL" | tee -a "$RUNLOG"
timeout -k 10 40 "$PYTHON" - "$DEVICE" "$OUT/gpu_decode_check.json" "${IMAGES[@]}" >>"$RUNLOG" 2>&1 <<'EOF'
import json, statistics, sys, time
import torch
from bench.common import find_jpegs, read_jpegs, write_json
from service.decoding import JpegDecoder
from service.imaging import decode_image, read_header
device, out, sources = torch.device(sys.argv[1]), sys.argv[2], sys.argv[4:]
bodies = read_jpegs(find_jpegs(sources, limit=32))
jpegs = [read_header(b, 40_000_000, 8).deferred(b) for b in bodies]
decoder = JpegDecoder(device)
decoder.warmup()
def timed(fn, reps=20):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)
decoded = decoder(jpegs)
reference = [decode_image(b, 40_000_000, 8).pixels for b in bodies]
diffs = [(d.cpu().float() - r.float()).abs() for d, r in zip(decoded, reference)]
result = {
    "device": str(device), "images": len(bodies), "sizes": sorted({tuple(r.shape) for r in reference}),
    "mean_abs_diff_vs_pil": round(float(torch.stack([d.mean() for d in diffs]).mean()), 4),
    "max_abs_diff_vs_pil": float(max(d.max() for d in diffs)),
    "engine_batch_ms": timed(lambda: decoder(jpegs)), "engine_one_ms": timed(lambda: decoder(jpegs[:1])),
    "pil_one_ms": timed(lambda: decode_image(bodies[0], 40_000_000, 8)),
}
write_json(out, result)
print(json.dumps(result))
EOF
rc=$?
tail -n 1 "$RUNLOG"
echo "decode check exit $rc" | tee -a "$RUNLOG"

echo "== service benchmark ($DEVICE)" | tee -a "$RUNLOG"
timeout -k 40 "$LIMIT_SERVICE" "$PYTHON" -m bench.service_bench --device "$DEVICE" "${SERVICE_ARGS[@]}" \
  "${IMAGES[@]}" "${MODEL[@]}" --log-dir "$OUT" --json "$OUT/service_bench.json" 2>&1 | tee "$OUT/service_bench.log" | tail -n 30
echo "service benchmark exit ${PIPESTATUS[0]}" | tee -a "$RUNLOG"
ls -la "$OUT" | tee -a "$RUNLOG"
# The device tool returns at most 8 files: the logs travel as one archive.
(cd "$OUT" && tar -czf logs.tar.gz -- *.log && rm -f -- *.log)
