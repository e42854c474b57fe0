"""`llada generate`: answers to prompts given as arguments, a file, or standard input."""

from __future__ import annotations

import argparse
import json
import sys

from ..sampling.config import GenerateConfig
from .options import (
    CHAT_SAMPLER_DEFAULTS,
    INTERACTIVE_PRESET,
    add_dataclass_arguments,
    add_model_arguments,
    add_preset_argument,
    dataclass_from_args,
    load_from_args,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate answers to prompts",
        description="Generate an answer to each prompt with a LLaDA sampler (see --preset).",
    )
    parser.add_argument(
        "prompts", nargs="*", help="prompt texts; '-' or none reads one prompt per line from stdin"
    )
    parser.add_argument("--file", default=None, help="read prompts from this file, one per line")
    parser.add_argument(
        "--raw", action="store_true", help="use the prompt text as is, without the chat template"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts per sampler call (default: 8)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar over the prompts on stderr (default: with several batches on a terminal)",
    )
    parser.add_argument(
        "--jsonl",
        action="store_true",
        help='print one JSON object per prompt ({"prompt": ..., "answer": ...}) instead of text',
    )
    add_model_arguments(parser)
    add_preset_argument(parser, INTERACTIVE_PRESET)
    add_dataclass_arguments(parser, GenerateConfig, "sampler", defaults=CHAT_SAMPLER_DEFAULTS)
    parser.set_defaults(run=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in args.prompts if p != "-"]
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts or "-" in args.prompts:
        prompts += [line.rstrip("\n") for line in sys.stdin if line.strip()]
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import generate_texts

    config = dataclass_from_args(GenerateConfig, args)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    prompts = _read_prompts(args)
    if not prompts:
        raise ValueError("no prompts: pass them as arguments, with --file, or on standard input")
    model, tokenizer, _ = load_from_args(args)
    from tqdm import tqdm

    progress = args.progress
    if progress is None:
        progress = sys.stderr.isatty() and len(prompts) > args.batch_size
    torch.manual_seed(args.seed)
    with tqdm(total=len(prompts), unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            done: list[str] = []
            for answer in generate_texts(
                model, tokenizer, batch, config, chat=not args.raw, decode=args.preset
            ):
                if args.jsonl:
                    answer = json.dumps({"prompt": prompts[start + len(done)], "answer": answer})
                done.append(answer)
                bar.write(answer, file=sys.stdout)
                sys.stdout.flush()
            bar.update(len(batch))
    return 0
