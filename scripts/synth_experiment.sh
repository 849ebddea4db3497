#!/usr/bin/env bash
# The synthetic MSAD experiment of docs/RESULTS.md: every row, for each seed given (default 0 1).
#   bash scripts/synth_experiment.sh [SEED ...]
# Re-running continues interrupted runs (msad train --resume) and skips finished evaluations.
# Then: python -m msad_deploy.training.results docs/results > docs/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
MSAD=${MSAD:-msad}
CONFIG=${CONFIG:-configs/synth_cpu.yaml}
DATA=${DATA:-data/synth}
RUNS=${RUNS:-runs/synth}
RESULTS=${RESULTS:-docs/results}
EXTRA=${EXTRA:-}  # more key=value overrides for every run, e.g. train.max_iters=500

if [ ! -f "$DATA/annotations/instances_val.json" ]; then
  $MSAD data synth --out "$DATA" --train 2000 --val 300 --size 128 --seed 0 --no-progress
fi
# LR baselines resize images straight to 64 px. They have no HR partner to align with, so their
# batches are padded to 32 (the C5 stride, as in torchvision/detectron2), not to 128.
LR_INPUT="input.test_min_size=64 input.test_max_size=64 input.size_divisibility=32"
LR_SINGLE="input.train_min_sizes=[64] input.train_max_size=64 $LR_INPUT"
LR_MULTI="input.train_min_sizes=[40,48,56,64] input.train_max_size=64 $LR_INPUT"

for seed in "${@:-0 1}"; do
  for s in $seed; do
    dir="$RUNS/seed$s"
    train() {  # train NAME RECIPE [ARGS...]
      local name=$1; shift
      local start=$SECONDS
      # shellcheck disable=SC2086
      $MSAD train "$@" --config "$CONFIG" --out "$dir/$name" --resume --no-progress data.root="$DATA" train.seed="$s" $EXTRA
      mkdir -p "$RESULTS/seed$s"
      echo "{\"run\": \"$name\", \"seed\": $s, \"wall_s\": $((SECONDS - start))}" >> "$RESULTS/seed$s/wall_times.jsonl"
    }
    evaluate() {  # evaluate NAME RESULT_NAME [ARGS...]
      local name=$1 result=$2; shift 2
      mkdir -p "$RESULTS/seed$s"
      [ -f "$RESULTS/seed$s/$result.json" ] && return 0
      $MSAD eval --model "$dir/$name/last.pt" --data "$DATA" --out "$RESULTS/seed$s/$result.json" --no-progress "$@"
    }
    mkdir -p "$dir"
    train hr_baseline baseline && evaluate hr_baseline hr_baseline
    # shellcheck disable=SC2086
    train lr_baseline_single baseline $LR_SINGLE && evaluate lr_baseline_single lr_baseline_single
    # shellcheck disable=SC2086
    train lr_baseline_multi baseline $LR_MULTI && evaluate lr_baseline_multi lr_baseline_multi
    train lr_shifted_control baseline model.pyramid_shift=1 && evaluate lr_shifted_control lr_shifted_control
    train teacher teacher && evaluate teacher teacher_fused --branch fused && evaluate teacher teacher_lr_branch --branch lr
    train student_unaligned student --teacher "$dir/teacher/last.pt" distill.aligned=false
    evaluate student_unaligned student_unaligned
    train msad_student student --teacher "$dir/teacher/last.pt" && evaluate msad_student msad_student
  done
done
