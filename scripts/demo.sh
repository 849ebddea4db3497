#!/usr/bin/env bash
# `make demo`: the whole job on a 2-core CPU, in about 23 minutes from a fresh clone (install included).
#   1. generate the synthetic dataset                 -> data/demo
#   2. train the HR baseline, the LR baseline, the teacher, the MSAD student and a student with a
#      lighter head (configs/demo.yaml)                -> runs/demo/{hr,lr,teacher,student,student_light}
#   3. msad bench: 4 models x 4 HR-frame sizes x {eager PyTorch fp32, ONNX Runtime fp32 and int8}; the
#      ONNX files are exported on the fly (fp32 checked against eager PyTorch, int8 quantised from it
#      and calibrated on training images) -> runs/demo/bench/{results.*,pareto.png}
#   4. print the Pareto table and the answer for a budget of half the HR model's latency
# (The teacher is not deployed, so it is not exported; `msad export onnx TEACHER --branch fused` does it.)
# Every stage is skipped or resumed when its output exists: re-running continues where it stopped.
#   DATA=... RUNS=... MSAD=... THREADS=... bash scripts/demo.sh
# The GPU rows of docs/BENCHMARKS.md train the same models on a GPU and bench another matrix:
#   DEVICE=cuda RUNS=runs/demo_gpu BENCH_CONFIG=configs/bench_gpu.yaml TRAIN_EXTRA=data.num_workers=6 bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MSAD=${MSAD:-msad}
DATA=${DATA:-data/demo}
RUNS=${RUNS:-runs/demo}
BENCH=${BENCH:-$RUNS/bench}
DEVICE=${DEVICE:-cpu}
BENCH_CONFIG=${BENCH_CONFIG:-configs/bench_demo.yaml}
TRAIN_EXTRA=${TRAIN_EXTRA:-}  # more key=value overrides for every training run
START=$(date +%s)

stage() { printf '\n== [%s] %s\n' "$(date -u -d "@$(($(date +%s) - START))" +%M:%S)" "$*"; }

stage "1/4 synthetic dataset -> $DATA"
if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  $MSAD data synth --out "$DATA" --train 1000 --val 200 --size 128 --seed 0 --profile objects > /dev/null
elif ! grep -q '"profile":"objects"' "$DATA/annotations/instances_val.json"; then
  # A demo from before the objects profile: its data and models would be reused silently otherwise.
  echo "demo: $DATA holds an earlier synthetic profile (shapes); move $DATA and $RUNS away, or set DATA=... RUNS=..." >&2
  exit 2
else
  echo "exists"
fi

train() {  # train NAME RECIPE [ARGS...]: skip a finished run, resume an interrupted one
  local name=$1; shift
  if [ -f "$RUNS/$name/done" ]; then
    echo "$name: trained"
    return 0
  fi
  stage "2/4 train $name"
  # shellcheck disable=SC2086
  $MSAD train "$@" --config configs/demo.yaml --out "$RUNS/$name" --resume data.root="$DATA" train.device="$DEVICE" $TRAIN_EXTRA
  touch "$RUNS/$name/done"
}
# The LR baseline resizes images straight to 64 px, batches padded to 32 (as in scripts/synth_experiment.sh).
LR=(input.train_min_sizes=[64] input.train_max_size=64 input.test_min_size=64 input.test_max_size=64 input.size_divisibility=32)
# The students start from the teacher's weights (distill.init_from_teacher): a shorter schedule.
STUDENT=(train.max_iters=480 train.steps=[360,440] train.warmup_iters=80)
# The lighter head: 32 channels, one conv per tower (its FPN and backbone still start from the teacher).
LIGHT=(model.head_channels=32 model.head_num_convs=1)
train hr baseline
train lr baseline "${LR[@]}"
train teacher teacher
train student student --teacher "$RUNS/teacher/last.pt" "${STUDENT[@]}"
train student_light student --teacher "$RUNS/teacher/last.pt" "${STUDENT[@]}" "${LIGHT[@]}"

stage "3/4 benchmark: latency and AP across 4 resolutions, eager PyTorch and ONNX Runtime (fp32, int8)"
$MSAD bench \
  --model hr="$RUNS/hr/last.pt" \
  --model lr="$RUNS/lr/last.pt" \
  --model student="$RUNS/student/last.pt" \
  --model student_light="$RUNS/student_light/last.pt" \
  --config "$BENCH_CONFIG" --devices "$DEVICE" --data "$DATA" \
  ${THREADS:+--threads "$THREADS"} \
  --budget-ms 0.5xhr@128 \
  --title "make demo" \
  --out "$BENCH"

stage "4/4 done"
echo "Pareto table: $BENCH/results.md   plot: $BENCH/pareto.png   all cells: $BENCH/results.csv"
echo "Next, on real data: docs/BENCHMARKS.md ('On COCO') and configs/coco_r50_1x.yaml."
