#!/usr/bin/env bash
# Reproduces models/llada-tiny-instruct: SFT of models/llada-tiny-base on generated chat tasks
# with checkable answers (arithmetic, copy / reverse / sort, next / previous corpus line), then
# the task accuracies of the model card. Runs on CPU; a GPU is faster.
#
#   bash recipes/llada-tiny-instruct.sh        # work files in runs/tiny-instruct
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/tiny-instruct}
BASE=${BASE:-models/llada-tiny-base}
OUT=${OUT:-models/llada-tiny-instruct}
CORPUS=${CORPUS:-runs/tiny-base/corpus}

python recipes/fetch_shakespeare.py --out "$CORPUS"
llada eval make-sft --corpus "$CORPUS" --out "$WORK/sft.jsonl" --val-out "$WORK/val.jsonl"

llada train \
  --objective sft --model "$BASE" \
  --data "$WORK/sft.jsonl" --val-data "$WORK/val.jsonl" \
  --out-dir "$WORK/run" --seq-len 128 --batch-size 64 --group-by-length --answer-tokens 32 --max-steps ${STEPS:-2500} \
  --lr 2e-3 --warmup-steps 100 --schedule cosine --min-lr-ratio 0.05 \
  --weight-decay 0.1 --grad-clip 1.0 --precision bf16 \
  --eval-every 500 --eval-batches 8 --save-every 500 --log-every 10 --seed 0 --resume "$@"

llada export "$WORK/run" "$OUT" --dtype bfloat16
llada eval tasks --model "$OUT" --corpus "$CORPUS" --json "$WORK/tasks.json"
