"""`llada train`: pre-training or SFT, in one process or under torchrun."""

from __future__ import annotations

import argparse
import sys

from ..train.config import TrainConfig
from .options import add_run_arguments, run_settings, say_above_progress


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
    add_run_arguments(parser, TrainConfig, "training")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpointing import CheckpointWriteError
    from ..train.loop import TrainingDiverged, train

    config = run_settings(TrainConfig, args)
    try:
        # Validation and checkpoint lines, the final ones included, are said as they happen.
        train(config, progress=not args.no_progress, say=say_above_progress)
    except (TrainingDiverged, CheckpointWriteError) as error:
        print(f"llada: training stopped: {error}", file=sys.stderr)
        return 3
    return 0
