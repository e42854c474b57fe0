"""`llada generate`: answers to prompts given as arguments, a file, or standard input."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .options import (
    add_model_arguments,
    add_runtime_arguments,
    add_sampler_arguments,
    add_tensor_parallel_argument,
    decode_from_args,
    load_from_args,
    sampler_config,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate answers to prompts",
        description="Generate an answer to each prompt with a LLaDA sampler (see --preset). "
        "Prompts with line breaks (every task format of the shipped model has one) come from "
        "--file or stdin with --input-format paragraphs (a blank line or --separator ends each) "
        "or jsonl, or as arguments with the shell's $'...\\n...'.",
    )
    parser.add_argument(
        "prompts",
        nargs="*",
        help="prompt texts (a shell string may hold line breaks: $'Sort:\\n3 1 2'); '-' or "
        "none reads prompts from stdin",
    )
    parser.add_argument(
        "--file", default=None, help="read prompts from this file (see --input-format)"
    )
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default=None,
        help="how --file and stdin hold prompts: 'lines', one prompt per line; 'paragraphs', "
        "multi-line prompts separated by a blank line (or by --separator lines); 'jsonl', one "
        'JSON value per line, a string or an object with a "prompt" string, line breaks '
        "written \\n (default: jsonl for a .jsonl --file, paragraphs with --separator, else "
        "lines)",
    )
    parser.add_argument(
        "--separator",
        default=None,
        metavar="LINE",
        help="a line equal to LINE ends a prompt instead of a blank line (write --separator=--- "
        "for a LINE that starts with a dash); implies --input-format paragraphs",
    )
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
        help='print one JSON object per prompt ({"prompt": ..., "answer": ...}) instead of text '
        "(the output; for JSON input see --input-format jsonl)",
    )
    add_model_arguments(parser)
    add_runtime_arguments(parser)
    add_tensor_parallel_argument(parser)
    add_sampler_arguments(parser, "generate")
    parser.set_defaults(run=run)


INPUT_FORMATS = ("lines", "paragraphs", "jsonl")


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{source} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def split_prompts(text: str, input_format: str, separator: str | None, source: str) -> list[str]:
    """The prompts of a file's or stdin's text in one of INPUT_FORMATS (`source` names it in
    errors). Blank prompts are dropped; a prompt's inner line breaks are kept."""
    if input_format == "lines":
        return [line for line in text.splitlines() if line.strip()]
    if input_format == "paragraphs":
        prompts, current = [], []
        for line in text.splitlines() + [separator or ""]:
            ends = line.strip() == "" if separator is None else line.rstrip() == separator
            if ends:
                if "".join(current).strip():
                    prompts.append("\n".join(current).strip("\n"))
                current = []
            else:
                current.append(line)
        return prompts
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} line {number} is not JSON ({error.msg})") from None
        if isinstance(value, dict):
            value = value.get("prompt")
        if not isinstance(value, str):
            raise ValueError(
                f'{source} line {number}: expected a JSON string or an object with a "prompt" '
                f"string, got {line.strip()[:60]}"
            )
        prompts.append(value)
    return prompts


def _read_prompts(args: argparse.Namespace) -> list[str]:
    input_format = args.input_format
    if input_format is None:
        if args.separator is not None:
            input_format = "paragraphs"
        elif args.file and args.file.endswith(".jsonl"):
            input_format = "jsonl"
        else:
            input_format = "lines"
    if args.separator is not None and input_format != "paragraphs":
        raise ValueError(f"--separator needs --input-format paragraphs, not {input_format}")
    prompts = [p for p in args.prompts if p != "-"]
    if args.file:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as error:  # missing, a folder, unreadable: the flag and the reason
            raise ValueError(f"--file {args.file}: {error.strerror or error}") from None
        text = _decode(data, f"--file {args.file}")
        prompts += split_prompts(text, input_format, args.separator, f"--file {args.file}")
    if "-" in args.prompts or not (args.prompts or args.file):
        if getattr(args, "tensor_parallel", False) and os.environ.get("WORLD_SIZE", "1") != "1":
            raise ValueError(
                "--tensor-parallel takes its prompts as arguments or from --file (every "
                "process must read the same prompts; standard input reaches only one)"
            )
        if sys.stdin.isatty():
            how = {
                "lines": "one per line",
                "paragraphs": "separated by "
                + ("a blank line" if args.separator is None else f"a line {args.separator!r}"),
                "jsonl": "one JSON value per line",
            }[input_format]
            print(f"reading prompts from stdin ({how}; Ctrl-D to end) ...", file=sys.stderr)
        buffer = getattr(sys.stdin, "buffer", None)
        text = _decode(buffer.read(), "standard input") if buffer else sys.stdin.read()
        prompts += split_prompts(text, input_format, args.separator, "standard input")
    return prompts


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import generate_texts

    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    prompts = _read_prompts(args)
    if not prompts and args.file and "-" not in args.prompts:
        raise ValueError(f"--file {args.file} holds no prompts")
    if not prompts:
        raise ValueError("no prompts: pass them as arguments, with --file, or on standard input")
    model, tokenizer, _ = load_from_args(args)
    config = sampler_config(args, model)
    decode = decode_from_args(args, model)
    from tqdm import tqdm

    progress = args.progress
    if progress is None:
        progress = sys.stderr.isatty() and len(prompts) > args.batch_size
    env = getattr(args, "parallel_env", None)
    progress = progress and (env is None or env.is_main)
    torch.manual_seed(args.seed)
    with tqdm(total=len(prompts), unit="prompt", disable=not progress) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            done: list[str] = []
            for answer in generate_texts(
                model, tokenizer, batch, config, chat=not args.raw, decode=decode
            ):
                if args.jsonl:
                    answer = json.dumps({"prompt": prompts[start + len(done)], "answer": answer})
                done.append(answer)
                bar.write(answer, file=sys.stdout)
                sys.stdout.flush()
            bar.update(len(batch))
    return 0
