#!/usr/bin/env bash
# Train the models docs/EXPORT.md exports: the HR baseline, the LR baseline (64 px input), the
# teacher and the MSAD student on the synthetic set, with a short schedule (the export and
# verification results do not depend on how long they trained).
#   bash scripts/export_models.sh            # -> runs/export/{hr,lr,teacher,student}/last.pt
set -euo pipefail
cd "$(dirname "$0")/.."
MSAD=${MSAD:-msad}
DATA=${DATA:-data/synth}
RUNS=${RUNS:-runs/export}
SHORT="train.max_iters=250 train.steps=[170,225] train.warmup_iters=50 train.eval_period=250 train.checkpoint_period=50"
if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  $MSAD data synth --out "$DATA" --train 2000 --val 300 --size 128 --seed 0 --no-progress
fi
run() {  # run NAME RECIPE [ARGS...]
  local name=$1; shift
  [ -f "$RUNS/$name/best.pt" ] && return 0
  # shellcheck disable=SC2086
  $MSAD train "$@" --config configs/synth_cpu.yaml --out "$RUNS/$name" --resume --no-progress data.root="$DATA" $SHORT
}
run hr baseline
run lr baseline input.train_min_sizes=[64] input.train_max_size=64 input.test_min_size=64 input.test_max_size=64 input.size_divisibility=32
run teacher teacher
run student student --teacher "$RUNS/teacher/last.pt"
