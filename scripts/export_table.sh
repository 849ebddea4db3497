#!/usr/bin/env bash
# docs/EXPORT.md's verification table: export every model of scripts/export_models.sh to ONNX at
# fp32, fp16 and int8 (int8 calibrated on 64 training images), verify each against eager PyTorch
# on the synthetic val set, then render the table into docs/EXPORT.md.
#   bash scripts/export_models.sh && bash scripts/export_table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MSAD=${MSAD:-msad}
DATA=${DATA:-data/synth}
RUNS=${RUNS:-runs/export}
OUT=${OUT:-runs/export/artifacts}
mkdir -p "$OUT"
for model in hr lr student; do
  for precision in fp32 fp16 int8; do
    artifact="$OUT/${model}_${precision}.onnx"
    [ -f "$artifact.verify.json" ] && continue
    $MSAD export onnx "$RUNS/$model/last.pt" --out "$artifact" --precision "$precision" \
      --calib-data "$DATA/train" --calib-images 64 --no-verify
    $MSAD export verify "$artifact" --data "$DATA" --no-progress || true  # failures are rows of the table
  done
done
python -m msad_deploy.export.verify "$OUT" --update docs/EXPORT.md
