"""Entry point of the `llada` command. Subcommand modules are imported here, but each imports
torch and the model only when it runs, so that `llada --help` stays fast."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings

from . import chat, data, demo, eval, export, generate, models, rl, serve, train

THREADS_HELP = (
    "CPU threads for torch (torch.set_num_threads); default: torch's own choice, one per core. "
    "On a machine shared with other jobs, --threads 1 is often many times faster"
)


def _add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v and --threads, on the top-level parser and on every subcommand, so that they may be
    written before or after the command name. On subcommands they default to SUPPRESS, so a
    value given before the command name is not overwritten."""
    suppress = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log progress to stderr, and show the traceback of an error",
        **suppress,
    )
    parser.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP, **suppress)


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser of a command that runs (those without subcommands of their own)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield parser
    for action in subparsers:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="llada", description="LLaDA masked diffusion language models."
    )
    parser.add_argument("--version", action="version", version=f"llada {__version__}")
    _add_global_options(parser, top=True)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    generate.add_parser(subparsers)
    chat.add_parser(subparsers)
    serve.add_parser(subparsers)
    demo.add_parser(subparsers)
    train.add_parser(subparsers)
    rl.add_parser(subparsers)
    data.add_parser(subparsers)
    export.add_parser(subparsers)
    eval.add_parser(subparsers)
    models.add_parser(subparsers)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            _add_global_options(leaf, top=False)
    return parser


def set_threads(threads: int | None) -> None:
    """Apply --threads before any torch work. Inter-op threads can be set only once per
    process and before any parallel work; when that is too late, intra-op threads (the ones
    that matter for a forward pass) are still set."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, RuntimeError) and not isinstance(error, NotImplementedError):
        # torch's messages run over many lines (stack notes, hints); the first says what failed.
        text = text.splitlines()[0]
    return " ".join(text.split("\n"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"llada: warning: {_one_line(Warning(message))}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            if not args.verbose:
                # A library warning (e.g. a setting that does nothing) is one line, not the
                # file:line and source line Python prints.
                warnings.showwarning = _show_warning
            set_threads(args.threads)
            return args.run(args)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        # User errors (bad flags, files, devices, dtypes, missing extras): one line. -v adds
        # the traceback, for a report.
        if args.verbose:
            traceback.print_exc()
        print(f"llada: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("llada: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
