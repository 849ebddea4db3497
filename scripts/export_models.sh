#!/usr/bin/env bash
# Train the models docs/EXPORT.md exports: the HR baseline, the LR baseline (64 px input), the
# teacher and the MSAD student on the synthetic set, with short schedules (the export and
# verification results measure fidelity to eager PyTorch, not accuracy).
#   ITERS=250 TEACHER_ITERS=60 bash scripts/export_models.sh   # -> runs/export/{hr,lr,teacher,student}/last.pt
set -euo pipefail
cd "$(dirname "$0")/.."
MSAD=${MSAD:-msad}
DATA=${DATA:-data/synth}
RUNS=${RUNS:-runs/export}
ITERS=${ITERS:-250}                    # baselines
TEACHER_ITERS=${TEACHER_ITERS:-$ITERS}  # teacher and student (each costs 2-3 baseline iterations)
schedule() {  # schedule ITERS: step decay at 70 % and 90 %, one evaluation and checkpoints along the way
  echo "train.max_iters=$1 train.steps=[$(($1 * 7 / 10)),$(($1 * 9 / 10))] train.warmup_iters=$(($1 / 5)) train.eval_period=$1 train.checkpoint_period=50"
}
if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  $MSAD data synth --out "$DATA" --train 2000 --val 300 --size 128 --seed 0 --no-progress
fi
run() {  # run NAME ITERS RECIPE [ARGS...]
  local name=$1 iters=$2; shift 2
  [ -f "$RUNS/$name/best.pt" ] && return 0
  # shellcheck disable=SC2046
  $MSAD train "$@" --config configs/synth_cpu.yaml --out "$RUNS/$name" --resume --no-progress data.root="$DATA" $(schedule "$iters")
}
run hr "$ITERS" baseline
run lr "$ITERS" baseline input.train_min_sizes=[64] input.train_max_size=64 input.test_min_size=64 input.test_max_size=64 input.size_divisibility=32
run teacher "$TEACHER_ITERS" teacher
run student "$TEACHER_ITERS" student --teacher "$RUNS/teacher/last.pt"
