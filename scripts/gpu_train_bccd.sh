#!/usr/bin/env bash
# Issue 7 on one GPU machine (16 cores, one H100): the shipped BCCD model, its random-init twin and
# the Table 3 ablation, every run on the same schedule, then evaluated on the held-out test split.
# Inputs (carried into the repo, git-ignored): data/BCCD (VOC layout), data/vgg16_hed_fp16.pth
# (`refinedet weights convert-hed`). Outputs under $RUNS (default runs/bccd).
#
# Usage: bash scripts/gpu_train_bccd.sh [ITERATIONS] [RUN ...]
#   RUN: main random_init abl_no_naf abl_no_cascade abl_no_tcb (default: all five; `main` is also the
#   ablation's "full" row). PARALLEL runs train side by side (default 2: one run alone is bound by
#   kernel launches at ~550 images/s, so two share the GPU well), and the 15 loader workers are split
#   between them. A device call lasts at most 10 minutes, so split the five runs over calls, e.g.
#     bash scripts/gpu_train_bccd.sh 3000 main random_init
#     bash scripts/gpu_train_bccd.sh 3000 abl_no_naf abl_no_cascade abl_no_tcb   # PARALLEL=3
# TRAIN_TIMEOUT (seconds, 0 = none) stops a run; it keeps its last periodic checkpoint (every 250 it).
set -uo pipefail
ITERS=${1:-3000}
shift || true
RUN_NAMES=("$@")
[ ${#RUN_NAMES[@]} -gt 0 ] || RUN_NAMES=(main random_init abl_no_naf abl_no_cascade abl_no_tcb)
PARALLEL=${PARALLEL:-2}
RUNS=${RUNS:-runs/bccd}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-0}
DATA=${DATA:-data/BCCD}
HED=${HED:-data/vgg16_hed_fp16.pth}
WORKERS=$(( 15 / (PARALLEL < ${#RUN_NAMES[@]} ? PARALLEL : ${#RUN_NAMES[@]}) ))
mkdir -p "$RUNS"
common=(--preset refinedet320_vgg16 --data "$DATA" --split trainval --batch-size 32 --lr 2e-3
        --warmup 200 --clip-grad 20 --channels-last --no-progress --log-every 20 --seed 0
        --iterations "$ITERS" --workers "$WORKERS" --checkpoint-every 250)
run_args() {  # name -> its extra arguments
  case $1 in
    main) echo "--pretrained $HED" ;;
    random_init) echo "--pretrained none" ;;
    abl_no_naf) echo "--pretrained $HED --no-negative-filtering" ;;
    abl_no_cascade) echo "--pretrained $HED --no-negative-filtering --no-cascade" ;;
    abl_no_tcb) echo "--pretrained $HED --no-negative-filtering --no-cascade --no-tcb" ;;
    *) echo "unknown run '$1' (main random_init abl_no_naf abl_no_cascade abl_no_tcb)" >&2; return 1 ;;
  esac
}
evaluate() {  # run metric
  refinedet eval --checkpoint "$RUNS/$1/last.pth" --data "$DATA" --split test --metric "$2" --batch-size 32 \
    --no-progress --output "$RUNS/$1/eval_test_$2" >"$RUNS/$1/eval_test_$2.log" 2>&1 || echo "$1: eval $2 failed"
}
train_and_evaluate() {  # name
  local name=$1 extra
  extra=$(run_args "$name") || return 1
  # shellcheck disable=SC2086  # extra holds separate arguments
  timeout "$TRAIN_TIMEOUT" refinedet train "${common[@]}" $extra --output "$RUNS/$name" >"$RUNS/$name.log" 2>&1
  echo "$name: train exit $? ($(date +%T))"
  [ -f "$RUNS/$name/last.pth" ] || { echo "$name: no checkpoint"; return 1; }
  evaluate "$name" voc07
  evaluate "$name" voc12
}
for name in "${RUN_NAMES[@]}"; do run_args "$name" >/dev/null || exit 2; done
start=$(date +%s)
for name in "${RUN_NAMES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
  train_and_evaluate "$name" &
done
wait
echo "all runs done in $(( $(date +%s) - start )) s"
for name in "${RUN_NAMES[@]}"; do echo "== $name"; tail -n 7 "$RUNS/$name/eval_test_voc07.log" 2>/dev/null; done
