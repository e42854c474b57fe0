"""`llada rl`: reinforcement learning with checkable rewards (GRPO, as d1's diffu-GRPO)."""

from __future__ import annotations

import argparse
import sys

from ..train.rl_config import RLConfig
from .options import add_run_arguments, run_settings, say_above_progress


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rl",
        help="reinforcement learning with checkable rewards (GRPO on the generated tasks)",
        description=(
            "GRPO of a LLaDA, LLaDA-MoE or LLaDA 2.x model: answers sampled by the fast "
            "sampler (LLaDA 2.x: its block sampler, --decode llada2.0), rewards "
            "by exact match on the generated tasks (or --reward module:function), "
            "group-relative advantages, a clipped objective with a KL penalty to the starting "
            "model; log-probabilities by d1's one-step estimate or the ELBO (--estimator). "
            "LoRA with --lora-rank; runs as one process or on N with "
            "`torchrun --nproc_per_node N -m llada.cli.main rl ...` (the step's questions "
            "shared out; gloo on CPU, NCCL on GPU)."
        ),
    )
    add_run_arguments(parser, RLConfig, "reinforcement learning")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpointing import CheckpointWriteError
    from ..train.rl import RewardError, train_rl

    config = run_settings(RLConfig, args)
    try:
        result = train_rl(config, progress=not args.no_progress, say=say_above_progress)
    except (RewardError, CheckpointWriteError) as error:
        print(f"llada: rl stopped: {error}", file=sys.stderr)
        return 3
    if result.checkpoint is not None:
        print(f"final checkpoint: {result.checkpoint}")
    return 0
