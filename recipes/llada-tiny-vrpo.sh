#!/usr/bin/env bash
# Preference optimization on llada-tiny-instruct at equal compute: VRPO (LLaDA 1.5, arXiv
# 2505.19223, default reductions), plain DPO on one-draw ELBOs and continued SFT on the chosen
# answers, each scored before and after on the 200 held-out arithmetic questions of
# `llada eval tasks` (presets fast and reference) and on copy / reverse / sort (fast).
# Results and the compute arithmetic: BENCHMARKS.md, "Preference optimization on
# llada-tiny-instruct (VRPO vs DPO vs SFT)".
#
#   bash recipes/llada-tiny-vrpo.sh            # work files in runs/tiny-vrpo
#   LR=3e-5 WORK=runs/tiny-vrpo-lr3e-5 bash recipes/llada-tiny-vrpo.sh   # the lr 3e-5 rows
#
# Equal compute, counted in sequence passes (a forward of one padded sequence is 1, a
# forward + backward 3; the frozen reference's forwards count; all rows are prompt + answer
# padded to the same 24-token answer window, so a pass is the same FLOPs in every arm):
#   VRPO  B=4 pairs, n=8 draws:   policy 2*4*8 rows x 3 + reference 2*4*8 x 1 = 256 per step
#   DPO   B=32 pairs, n=1 draw:   policy 2*32*1 x 3   + reference 2*32*1 x 1  = 256 per step
#   SFT   B=85 chosen answers:    85 x 3                                      = 255 per step
# and the same number of steps, learning-rate schedule and seed in all three.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/tiny-vrpo}
START=${START:-models/llada-tiny-instruct}
STEPS=${STEPS:-80}
LR=${LR:-1e-4}
SFT_LR=${SFT_LR:-$LR}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$WORK"

# 1. Pairs from the model's own answers (4 per question, temperature 1, fast preset) to SFT-side
# arithmetic questions; rows whose question is one of the 200 held-out evaluation questions are
# dropped (the make-preferences of the measured run excluded only the first evaluation question of
# each task; a current one excludes the first 1,000, and this finds none), and the
# last 100 questions are kept apart as validation pairs.
llada --threads 1 eval make-preferences --model "$START" --tasks arithmetic --per-task 1500 \
  --samples 4 --preset fast --seed 0 --out "$WORK/pairs_raw.jsonl"
python - "$WORK" <<'EOF'
import json
import sys

from llada.eval.tasks import build_task_sets

work = sys.argv[1]
held_out = {e.prompt for e in build_task_sets(None, eval_per_task=200, sft_per_task={}).evaluation}
rows = [json.loads(line) for line in open(f"{work}/pairs_raw.jsonl")]
kept = [r for r in rows if r["prompt"] not in held_out]
seen, unique = set(), []
for r in kept:
    if r["prompt"] not in seen:
        seen.add(r["prompt"])
        unique.append(r)
train, val = unique[:-100], unique[-100:]
assert not {r["prompt"] for r in unique} & held_out
assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


def write(name, records):
    with open(f"{work}/{name}", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def chat(r):
    return {"task": r["task"], "messages": [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}


write("pairs.jsonl", train)
write("val_pairs.jsonl", val)
write("sft.jsonl", [chat(r) for r in train])
write("val_sft.jsonl", [chat(r) for r in val])
print(f"{len(rows)} pairs, {len(rows) - len(kept)} on held-out questions dropped, "
      f"{len(kept) - len(unique)} repeated questions dropped: {len(train)} train, {len(val)} val")
EOF

# 2. The three arms (same steps, schedule, seed; compute as above).
COMMON=(--model "$START" --seq-len 96 --answer-tokens 24 --max-steps "$STEPS" --warmup-steps 5
  --schedule cosine --min-lr-ratio 0.1 --weight-decay 0.0 --grad-clip 1.0 --seed 0
  --eval-every "$STEPS" --eval-batches 4 --save-every "$STEPS" --log-every 5 --no-progress)
llada --threads 1 train --objective vrpo --data "$WORK/pairs.jsonl" \
  --val-data "$WORK/val_pairs.jsonl" --out-dir "$WORK/vrpo" --batch-size 4 --lr "$LR" "${COMMON[@]}"
llada --threads 1 train --objective dpo --vrpo-budget 1 --data "$WORK/pairs.jsonl" \
  --val-data "$WORK/val_pairs.jsonl" --out-dir "$WORK/dpo" --batch-size 32 --lr "$LR" "${COMMON[@]}"
llada --threads 1 train --objective sft --data "$WORK/sft.jsonl" --val-data "$WORK/val_sft.jsonl" \
  --out-dir "$WORK/sft" --batch-size 85 --lr "$SFT_LR" "${COMMON[@]}"

# 3. Before / after on the held-out questions, the RL section's settings (greedy, gen_length 32,
# one block, 32 steps, float32): `llada eval tasks`' questions, sampler and batches, with every
# reply kept, so that the models can be compared answer by answer.
cat > "$WORK/replies.py" <<'EOF'
import json
import sys

import torch

from llada.api import generate_texts, load
from llada.cli.main import build_parser
from llada.cli.options import decode_from_args, sampler_config
from llada.eval.tasks import build_task_sets, is_correct

torch.set_num_threads(1)
args = build_parser().parse_args(["eval", "tasks", "--no-lines", *sys.argv[2:]])
wanted = args.tasks.split(",") if args.tasks else ["arithmetic", "copy", "reverse", "sort"]
sets = build_task_sets(None, eval_per_task=args.per_task, sft_per_task={})
examples = [e for e in sets.evaluation if e.task in wanted]
model, tokenizer, _ = load(args.model, dtype=args.dtype, device="cpu")
config, decode = sampler_config(args, model), decode_from_args(args, model)
torch.manual_seed(args.seed)
replies = []
for i in range(0, len(examples), args.batch_size):
    prompts = [e.prompt for e in examples[i : i + args.batch_size]]
    replies += generate_texts(model, tokenizer, prompts, config, decode=decode)
rows = [{"task": e.task, "prompt": e.prompt, "answer": e.answer, "reply": r,
         "correct": is_correct(e, r)} for e, r in zip(examples, replies, strict=True)]
accuracy = {t: sum(r["correct"] for r in rows if r["task"] == t) / args.per_task for t in wanted}
json.dump({"model": args.model, "accuracy": accuracy, "rows": rows}, open(sys.argv[1], "w"))
print(sys.argv[1], {t: f"{a:.1%}" for t, a in accuracy.items()})
EOF
EVAL=(--per-task 200 --gen-length 32 --steps 32 --block-length 32 --dtype float32)
last() { ls -d "$WORK/$1"/checkpoints/step-* | tail -1; }
for name in start vrpo dpo sft; do
  model=$START
  [ "$name" = start ] || model=$(last "$name")
  python "$WORK/replies.py" "$WORK/eval-$name-fast.json" --model "$model" --preset fast "${EVAL[@]}"
  python "$WORK/replies.py" "$WORK/eval-$name-reference.json" --model "$model" --preset reference \
    --tasks arithmetic "${EVAL[@]}"
done

# 4. +a / -b against the start model, answer by answer, with the two-sided sign test.
python - "$WORK" <<'EOF'
import json
import sys
from math import comb

work = sys.argv[1]
for preset in ("fast", "reference"):
    start = json.load(open(f"{work}/eval-start-{preset}.json"))
    before = {r["prompt"]: r["correct"] for r in start["rows"]}
    for name in ("start", "vrpo", "dpo", "sft"):
        after = json.load(open(f"{work}/eval-{name}-{preset}.json"))
        for task, accuracy in after["accuracy"].items():
            rows = [r for r in after["rows"] if r["task"] == task]
            gained = sum(r["correct"] and not before[r["prompt"]] for r in rows)
            lost = sum(before[r["prompt"]] and not r["correct"] for r in rows)
            n, k = gained + lost, min(gained, lost)
            p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
            print(f"{preset:<9} {name:<5} {task:<10} {accuracy:6.1%}  +{gained} / -{lost}  p={p:.2f}")
EOF
