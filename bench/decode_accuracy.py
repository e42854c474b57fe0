"""Task accuracy and wall time of decode settings on the generated tasks (exact match), for
choosing commit rules and thresholds against the reference sampler.

    python bench/decode_accuracy.py --per-task 50 --gen-length 256 --block-length 32 \
        --decodes reference fast dual:threshold:0.99 block:threshold:0.99 dual:schedule

A decode is a preset name or SOURCE:COMMIT[:THRESHOLD][:FIELD=VALUE...] (sources full, prefix,
dual, block; commits schedule, threshold, factor, entropy; fields of DecodeConfig, e.g.
refresh=8), always with early stop except for 'reference'.
Prints a markdown table; the last line is one JSON object with every figure. `--replies FILE`
keeps every reply (JSON, per decode) and reuses the decodes already in it, so the slow reference
run is done once; the table then also shows how many answers differ from the first decode's
(a paired comparison: far less noisy than the difference of two accuracies). Wall times of
reused decodes come from the run that made them; the table marks them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llada.api import generate_texts, load
from llada.eval.tasks import SYNTHETIC_TASKS, build_task_sets, is_correct
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig


def parse_decode(text: str) -> DecodeConfig | str:
    """A preset name, or SOURCE:COMMIT[:THRESHOLD][:FIELD=VALUE...] (DecodeConfig fields,
    e.g. dual:threshold:0.99:refresh=8)."""
    if text in PRESETS:
        return text
    source, _, rest = text.partition(":")
    items = rest.split(":")
    if not items[0]:
        raise ValueError(f"{text!r}: expected a preset name or SOURCE:COMMIT[:THRESHOLD]")
    settings: dict = {"source": source, "commit": items[0]}
    for item in items[1:]:
        name, equals, value = item.partition("=")
        if not equals:
            name, value = "threshold", item
        settings[name] = float(value) if "." in value else int(value)
    return DecodeConfig(**settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the shipped model")
    parser.add_argument("--per-task", type=int, default=50)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--decodes", nargs="+", default=["reference", "fast"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--replies", default=None, help="JSON file keeping every reply")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, _ = load(args.model)
    tasks = build_task_sets(None, eval_per_task=args.per_task, sft_per_task={})
    examples = [e for e in tasks.evaluation if e.task in SYNTHETIC_TASKS]
    config = GenerateConfig(
        steps=args.gen_length, gen_length=args.gen_length, block_length=args.block_length
    )
    saved_path = Path(args.replies) if args.replies else None
    saved = json.loads(saved_path.read_text()) if saved_path and saved_path.exists() else {}
    # Replies depend on the batching too (padding changes bf16 rounding), so it is in the key.
    key = f"{args.model}|{args.per_task}|{args.gen_length}|{args.block_length}|{args.batch_size}"
    cache = saved.setdefault(key, {})
    rows = {}
    for text in args.decodes:
        if text in cache:
            rows[text] = {**cache[text], "reused": True}
            continue
        started = time.perf_counter()
        replies = []
        for start in range(0, len(examples), args.batch_size):
            chunk = examples[start : start + args.batch_size]
            replies += generate_texts(
                model, tokenizer, [e.prompt for e in chunk], config, decode=parse_decode(text)
            )
        seconds = time.perf_counter() - started
        correct = [is_correct(e, r) for e, r in zip(examples, replies, strict=True)]
        accuracy = {
            task: sum(c for e, c in zip(examples, correct, strict=True) if e.task == task)
            / sum(e.task == task for e in examples)
            for task in {e.task for e in examples}
        }
        rows[text] = {
            "accuracy": accuracy,
            "mean": sum(correct) / len(correct),
            "seconds": seconds,
            "replies": replies,
            "correct": correct,
        }
        if saved_path:
            cache[text] = rows[text]
            saved_path.write_text(json.dumps(saved))

    names = sorted({e.task for e in examples})
    first = rows[args.decodes[0]]
    print(f"first decode: {args.decodes[0]}; {len(examples)} questions")
    print(f"| decode | {' | '.join(names)} | mean | wall | speed-up | right/wrong vs first |")
    print("|---|" + "---|" * (len(names) + 4))
    for text, row in rows.items():
        cells = " | ".join(f"{100 * row['accuracy'][n]:.1f}%" for n in names)
        gained = sum(c and not f for c, f in zip(row["correct"], first["correct"], strict=True))
        lost = sum(f and not c for c, f in zip(row["correct"], first["correct"], strict=True))
        wall = f"{row['seconds']:.1f} s" + (" (saved)" if row.get("reused") else "")
        print(
            f"| {text} | {cells} | {100 * row['mean']:.1f}% | {wall} | "
            f"{first['seconds'] / row['seconds']:.1f}x | +{gained} / -{lost} |"
        )
    summary = {
        t: {k: v for k, v in r.items() if k not in ("replies", "correct")} for t, r in rows.items()
    }
    print(json.dumps({"settings": vars(args), "results": summary}))


if __name__ == "__main__":
    main()
