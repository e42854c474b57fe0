"""`llada demo`: a web page (Gradio) to chat with a model and watch its denoising live."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from ..sampling.config import profile
from .options import (
    add_model_arguments,
    add_preset_argument,
    decode_from_args,
    load_from_args,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="web demo: chat and watch the denoising live (needs the 'demo' extra)",
        description="A Gradio page: a multi-turn chat with the sampler's controls and word "
        "constraints, and the answer canvas redrawn after every denoising step. It serves on "
        "127.0.0.1 by default, offline (no share link, no analytics).",
    )
    add_model_arguments(parser)
    add_preset_argument(parser, profile("demo").preset)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=7860, help="port; 0 picks a free one (default: 7860)"
    )
    parser.add_argument(
        "--max-gen-length",
        type=int,
        default=512,
        help="largest gen_length a request may ask for (default: 512)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.max_gen_length < 1:
        raise ValueError(f"--max-gen-length must be at least 1, got {args.max_gen_length}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must lie in 0..65535, got {args.port}")
    from ..demo.app import import_gradio

    try:
        import_gradio()
    except ImportError as error:
        print(f"llada: error: {error}", file=sys.stderr)
        return 2
    import torch

    from ..demo.app import build_app, launch

    check_port(args.host, args.port)  # before the model is read: a busy port fails at once
    model, tokenizer, is_random = load_from_args(args)
    torch.manual_seed(args.seed)
    folder = getattr(model, "checkpoint_folder", None)
    name = args.model or (Path(folder).name if folder is not None else "")
    decode = decode_from_args(args, model)  # the family's presets; flags are refused here
    if not isinstance(decode, str):
        raise ValueError(
            "llada demo takes a --preset; the LLaDA 2.x sampler flags are for llada generate, "
            "chat and serve"
        )
    app = build_app(
        model,
        tokenizer,
        model_name=name,
        is_random=is_random,
        max_gen_length=args.max_gen_length,
        preset=decode,
    )
    try:
        launch(app, args.host, args.port, block=True)
    except OSError as error:  # taken between the check and the launch: Gradio's own words
        if "port" not in str(error).lower():
            raise
        raise ValueError(_busy(args.host, args.port)) from None
    return 0


def _busy(host: str, port: int) -> str:
    from ..demo.app import free_port

    return f"port {port} is in use: pass --port {free_port(host)} (or --port 0 for any free port)"


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, or a host this machine has no address
    for, in one line (Gradio's own error speaks of `launch()` arguments)."""
    if port == 0:
        return
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host}: unknown address ({error.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As servers bind: a port left in TIME_WAIT by a previous run is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(_busy(host, port)) from None
            raise ValueError(
                f"--host {host} --port {port}: cannot listen there ({error.strerror})"
            ) from None
