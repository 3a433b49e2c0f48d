#!/usr/bin/env bash
# Run HERE (the development machine) before the GPU call that runs bench/gpu_run.sh:
#  - fills .whl/ with the service's packages the GPU image lacks (one version of each),
#  - copies 32 BCCD test photos into data/bench_photos/ (ignored by git; the whole BCCD folder is too
#    large to travel beside the ~60 MB checkpoint),
#  - prints what to carry and how much the call will send (the limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  python-dotenv==1.2.4 annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5
  typing-extensions==4.16.0 anyio==4.16.0 python-multipart==0.0.34 uvicorn==0.54.0 httptools==0.9.0
  opentelemetry-api==1.45.2
)
mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec##*==}; stem=$(echo "$name" | tr - _)
  if ls .whl | grep -qi "^${stem}-${version}-"; then continue; fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
dupes=$(ls .whl | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then echo "ERROR: several versions in .whl of: $dupes (keep one)" >&2; exit 1; fi

bccd=""
for d in "${REFINEDET_BCCD:-}" data/BCCD ../shared/data/BCCD; do
  if [ -n "$d" ] && [ -d "$d/JPEGImages" ]; then bccd=$d; break; fi
done
if [ -z "$bccd" ]; then echo "ERROR: BCCD not found (set REFINEDET_BCCD)" >&2; exit 1; fi
mkdir -p data/bench_photos
head -n 32 "$bccd/ImageSets/Main/test.txt" | while read -r id; do
  cp -n "$bccd/JPEGImages/$id.jpg" data/bench_photos/
done

tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry=$(du -cb .whl data/bench_photos | tail -1 | cut -f1)
total=$((tree + carry))
echo "working tree $((tree / 1048576)) MiB + carry (.whl, data/bench_photos) $((carry / 1048576)) MiB = $((total / 1048576)) MiB of 64"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "WARNING: over 64 MiB: the call would be refused; carry less (e.g. drop httptools from .whl)" >&2
fi
echo 'GPU call: run(command="bash bench/gpu_run.sh", carry=[".whl", "data/bench_photos"], timeout_s=600)'
