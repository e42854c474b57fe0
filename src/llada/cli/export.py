"""`llada export`: a training run or checkpoint -> a clean official checkpoint folder."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a checkpoint in the official layout of its family (LLaDA, LLaDA-MoE)",
        description="Export a training run (its latest checkpoint) or a checkpoint folder as an "
        "official folder of its family (LLaDA-8B or LLaDA-MoE tensor names and config.json): "
        "config.json, safetensors, tokenizer files; no trainer state, no adapter.",
    )
    parser.add_argument("source", help="a run folder (OUT of llada train) or a checkpoint folder")
    parser.add_argument("destination", help="folder to write")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA checkpoints: load the base model, apply the checkpoint's peft adapter "
        "(adapter_config.json, adapter_model.safetensors) and merge it with peft's "
        "merge_and_unload, instead of reading the merged weights the checkpoint holds",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="with --merge: the base model folder (default: adapter_config.json's "
        "base_model_name_or_path)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..model.checkpoint import load_model
    from ..tokenizer import TOKENIZER_FILES
    from ..train.checkpointing import latest_checkpoint
    from ..train.lora import ADAPTER_CONFIG, merge_peft_adapter

    source = Path(args.source)
    if not (source / "config.json").is_file():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise FileNotFoundError(
                f"{source} is neither a checkpoint folder nor a run with checkpoints"
            )
        source = checkpoint
    if args.base and not args.merge:
        raise ValueError("--base names the model a LoRA adapter is merged into: add --merge")
    if args.merge:
        adapter_config = source / ADAPTER_CONFIG
        if not adapter_config.is_file():
            raise ValueError(
                f"--merge: {source} holds no LoRA adapter ({ADAPTER_CONFIG}); it is not from a "
                "LoRA run: export it without --merge"
            )
        base = args.base or json.loads(adapter_config.read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
        if not base:
            raise ValueError(f"--merge: {adapter_config} names no base model: pass --base FOLDER")
        model = merge_peft_adapter(load_model(base, dtype="float32"), source)
    else:
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
