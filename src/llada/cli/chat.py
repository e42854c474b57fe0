"""`llada chat`: a multi-turn conversation in the terminal."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..sampling.config import GenerateConfig, coerce_setting
from .options import (
    add_model_arguments,
    add_runtime_arguments,
    add_sampler_arguments,
    decode_from_args,
    load_from_args,
    sampler_config,
)

HELP = "commands: /reset (new conversation), /set NAME=VALUE (e.g. /set steps=64, /set preset=fast), /settings, /quit"
MULTILINE_HELP = (
    'multi-line messages: end a line with \\ to continue it on the next, or put """ on a line '
    "of its own before and after the message"
)
BLOCK = '"""'


def read_message(stdin, prompt) -> str | None:
    """The next message of the user: one line; lines ending in a backslash joined to the next
    (the backslash dropped); or every line between two lines of three double quotes. None at the
    end of the input (an unfinished message is still returned)."""
    lines: list[str] = []
    in_block = False
    while True:
        prompt(bool(lines) or in_block)
        line = stdin.readline()
        if not line:
            return "\n".join(lines) if lines else None
        line = line.rstrip("\r\n")
        if in_block:
            if line.strip() == BLOCK:
                return "\n".join(lines)
            lines.append(line)
        elif not lines and line.strip() == BLOCK:
            in_block = True
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Multi-turn chat; the history is kept as the reference chat.py keeps it. "
        + HELP
        + "; "
        + MULTILINE_HELP,
    )
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the denoising live (default: when the terminal is interactive)",
    )
    add_model_arguments(parser)
    add_runtime_arguments(parser)
    add_sampler_arguments(parser, "chat")
    parser.set_defaults(run=run)


def _set(config: GenerateConfig, assignment: str) -> GenerateConfig:
    name, _, value = assignment.partition("=")
    name = name.strip().replace("-", "_")
    fields = {f.name: f for f in dataclasses.fields(GenerateConfig)}
    if name not in fields or not value:
        raise ValueError(f"use /set NAME=VALUE with NAME one of {sorted(fields)}")
    try:
        parsed = coerce_setting(GenerateConfig, name, value)
    except ValueError as error:
        raise ValueError(f"/set {error}") from None
    return dataclasses.replace(config, **{name: parsed})


def run(args: argparse.Namespace) -> int:
    import torch

    from ..api import ChatSession

    model, tokenizer, _ = load_from_args(args)
    config = sampler_config(args, model)
    torch.manual_seed(args.seed)
    session = ChatSession(model, tokenizer, config, decode=decode_from_args(args, model))
    interactive = sys.stdin.isatty()
    live = args.live if args.live is not None else interactive and sys.stdout.isatty()
    if interactive:
        print(f"llada chat ({model.checkpoint_folder}); {HELP}; {MULTILINE_HELP}")

    def prompt(continued: bool) -> None:
        if interactive:
            print("...  " if continued else "you> ", end="", flush=True)

    while True:
        message = read_message(sys.stdin, prompt)
        if message is None:
            return 0
        text = message.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            session.reset()
            continue
        if text == "/settings":
            print(dataclasses.asdict(session.config), session.decode)
            continue
        if text.startswith("/set preset="):
            name, previous = text.partition("=")[2].strip(), args.preset
            try:
                args.preset = name
                session.decode = decode_from_args(args, model)
                print(f"preset: {name}")
            except ValueError as error:
                args.preset = previous
                print(f"error: {error}", file=sys.stderr)
            continue
        if text.startswith("/set"):
            try:
                session.config = _set(session.config, text[4:].strip())
            except ValueError as error:
                print(f"error: {error}", file=sys.stderr)
            continue
        answer = _reply_live(session, text) if live else session.reply(text)
        print(("llada> " if interactive else "") + answer, flush=True)


def _reply_live(session, text: str) -> str:
    """The reply, with its canvas redrawn after every step while it is denoised."""
    from rich.console import Console
    from rich.live import Live

    from .live import LiveAnswer

    mask_id = session.model.special_tokens.mask_id
    with Live(console=Console(), transient=True, refresh_per_second=20) as display:
        redraw = LiveAnswer(display, session.config.gen_length, session.tokenizer, mask_id)
        return session.reply(text, on_step=redraw)
