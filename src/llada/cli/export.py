"""`llada export`: a training run or checkpoint -> a clean official checkpoint folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint in the official layout of its family (LLaDA, LLaDA-MoE)",
        description="Export a training run (its latest checkpoint) or a checkpoint folder as an "
        "official folder of its family (LLaDA-8B or LLaDA-MoE tensor names and config.json): "
        "config.json, safetensors, tokenizer files; no trainer state.",
    )
    parser.add_argument("source", help="a run folder (OUT of llada train) or a checkpoint folder")
    parser.add_argument("destination", help="folder to write")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..model.checkpoint import load_model
    from ..tokenizer import TOKENIZER_FILES
    from ..train.checkpointing import latest_checkpoint

    source = Path(args.source)
    if not (source / "config.json").is_file():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise FileNotFoundError(
                f"{source} is neither a checkpoint folder nor a run with checkpoints"
            )
        source = checkpoint
    model = load_model(source)

    def copy_tokenizer(staging: Path) -> None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)

    model.save_pretrained(
        args.destination,
        max_shard_size=args.max_shard_size,
        dtype=args.dtype,
        add_files=copy_tokenizer,
    )
    print(f"exported {source} to {args.destination}")
    return 0
