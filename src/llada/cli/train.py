"""`llada train`: pre-training or SFT, in one process or under torchrun."""

from __future__ import annotations

import argparse
import json
import sys

from ..train.config import TrainConfig
from .options import add_dataclass_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="pre-train or fine-tune a LLaDA, LLaDA-MoE or LLaDA 2.x model",
        description=(
            "Train with the LLaDA losses (LLaDA 2.x: block diffusion, see --block-length). "
            "Runs as one process, or on N processes with "
            "`torchrun --nproc_per_node N -m llada.cli.main train ...` (gloo on CPU, NCCL on GPU)."
        ),
    )
    parser.add_argument(
        "--config", default=None, help="JSON file of settings; flags given here override it"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_arguments(parser, TrainConfig, "training", suppress_defaults=True)
    parser.set_defaults(run=run)


def _say(line: str) -> None:
    """A line of the run, above the progress bar; warnings to stderr."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpointing import CheckpointWriteError
    from ..train.loop import TrainingDiverged, train

    settings: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            settings = json.load(f)
    settings.update(
        {
            k: v
            for k, v in vars(args).items()
            if k in TrainConfig.__dataclass_fields__ and v is not None
        }
    )
    config = TrainConfig.from_dict(settings)
    try:
        # Validation and checkpoint lines, the final ones included, are said as they happen.
        train(config, progress=not args.no_progress, say=_say)
    except (TrainingDiverged, CheckpointWriteError) as error:
        print(f"llada: training stopped: {error}", file=sys.stderr)
        return 3
    return 0
