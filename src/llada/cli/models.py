"""`llada models`: the shipped models this install has, and where they are.

They live in models/ of a source checkout, or in llada/shipped_models of an installed wheel
(`llada.model.checkpoint.resolve_checkpoint` finds them by name in both); `llada models NAME`
prints one folder, e.g. to copy it: cp -r "$(llada models llada-tiny-base)" my-model.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the shipped models and their folders",
        description="List the shipped models (name, size, folder); with NAME, print that "
        "model's folder. Every command takes these names as --model.",
    )
    parser.add_argument("name", nargs="?", default=None, help="print only this model's folder")
    parser.set_defaults(run=run)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


def run(args: argparse.Namespace) -> int:
    from ..api import DEFAULT_MODELS
    from ..model.checkpoint import CONFIG_FILE, _shipped_root

    root = _shipped_root()
    folders = (
        sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()) if root.is_dir() else []
    )
    if not folders:
        raise FileNotFoundError(
            f"this install has no shipped models (looked in {root}); install the llada-kit "
            "wheel, which carries them, or pass --model with a checkpoint folder or hub id"
        )
    names = [p.name for p in folders]
    if args.name is not None:
        if args.name not in names:
            raise ValueError(f"no shipped model '{args.name}'; shipped: {', '.join(names)}")
        print(root / args.name)
        return 0
    default = next((n for n in DEFAULT_MODELS if n in names), None)
    width = max(len(n) for n in names)
    for folder in folders:
        mark = "  (default)" if folder.name == default else ""
        print(f"{folder.name:<{width}}  {_size_mb(folder):6.1f} MB  {folder}{mark}")
    return 0
