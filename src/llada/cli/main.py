"""Entry point of the `llada` command. Subcommand modules are imported here, but each imports
torch and the model only when it runs, so that `llada --help` stays fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import chat, data, demo, eval, export, generate, serve, train


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="llada", description="LLaDA masked diffusion language models."
    )
    parser.add_argument("--version", action="version", version=f"llada {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    generate.add_parser(subparsers)
    chat.add_parser(subparsers)
    serve.add_parser(subparsers)
    demo.add_parser(subparsers)
    train.add_parser(subparsers)
    data.add_parser(subparsers)
    export.add_parser(subparsers)
    eval.add_parser(subparsers)
    return parser


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
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"llada: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
