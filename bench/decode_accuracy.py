"""Task accuracy and wall time of decode settings on the generated tasks (exact match), for
choosing commit rules and thresholds against the reference sampler.

    python bench/decode_accuracy.py --per-task 50 --gen-length 256 --block-length 32 \
        --decodes reference fast dual:threshold:0.99 block:threshold:0.99 dual:schedule

A decode is a preset name or SOURCE:COMMIT[:THRESHOLD] (sources full, prefix, dual, block;
commits schedule, threshold, factor, entropy), always with early stop except for 'reference'.
Prints a markdown table; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llada.api import load
from llada.eval.tasks import SYNTHETIC_TASKS, build_task_sets, evaluate_tasks
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig


def parse_decode(text: str) -> DecodeConfig | str:
    if text in PRESETS:
        return text
    source, _, rest = text.partition(":")
    commit, _, threshold = rest.partition(":")
    if not commit:
        raise ValueError(f"{text!r}: expected a preset name or SOURCE:COMMIT[:THRESHOLD]")
    settings = {"source": source, "commit": commit}
    if threshold:
        settings["threshold"] = float(threshold)
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, _ = load(args.model)
    tasks = build_task_sets(None, eval_per_task=args.per_task, sft_per_task={})
    examples = [e for e in tasks.evaluation if e.task in SYNTHETIC_TASKS]
    config = GenerateConfig(
        steps=args.gen_length, gen_length=args.gen_length, block_length=args.block_length
    )
    rows = {}
    for text in args.decodes:
        started = time.perf_counter()
        results = evaluate_tasks(
            model,
            tokenizer,
            examples,
            config,
            batch_size=args.batch_size,
            decode=parse_decode(text),
        )
        accuracy = {task: r["accuracy"] for task, r in results.items()}
        rows[text] = {
            "accuracy": accuracy,
            "mean": sum(accuracy.values()) / len(accuracy),
            "seconds": time.perf_counter() - started,
        }
    names = list(SYNTHETIC_TASKS)
    print(f"| decode | {' | '.join(names)} | mean | wall |")
    print("|---|" + "---|" * (len(names) + 2))
    for text, row in rows.items():
        cells = " | ".join(f"{100 * row['accuracy'][n]:.1f}%" for n in names)
        print(f"| {text} | {cells} | {100 * row['mean']:.1f}% | {row['seconds']:.1f} s |")
    print(json.dumps({"settings": vars(args), "results": rows}))


if __name__ == "__main__":
    main()
