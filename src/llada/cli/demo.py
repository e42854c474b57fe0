"""`llada demo`: a web page (Gradio) to chat with a model and watch its denoising live."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import INTERACTIVE_PRESET, add_model_arguments, add_preset_argument, load_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="web demo: chat and watch the denoising live (needs the 'demo' extra)",
        description="A Gradio page: a multi-turn chat with the sampler's controls and word "
        "constraints, and the answer canvas redrawn after every denoising step. It serves on "
        "127.0.0.1 by default, offline (no share link, no analytics).",
    )
    add_model_arguments(parser)
    add_preset_argument(parser, INTERACTIVE_PRESET)
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

    model, tokenizer, is_random = load_from_args(args)
    torch.manual_seed(args.seed)
    folder = getattr(model, "checkpoint_folder", None)
    name = args.model or (Path(folder).name if folder is not None else "")
    app = build_app(
        model,
        tokenizer,
        model_name=name,
        is_random=is_random,
        max_gen_length=args.max_gen_length,
        preset=args.preset,
    )
    launch(app, args.host, args.port, block=True)
    return 0
