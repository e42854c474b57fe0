"""`llada rl`: reinforcement learning with checkable rewards (GRPO, as d1's diffu-GRPO)."""

from __future__ import annotations

import argparse
import json
import sys

from ..train.rl_config import RLConfig
from .options import add_dataclass_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rl",
        help="reinforcement learning with checkable rewards (GRPO on the generated tasks)",
        description=(
            "GRPO of a LLaDA or LLaDA-MoE model: answers sampled by the fast sampler, rewards "
            "by exact match on the generated tasks (or --reward module:function), "
            "group-relative advantages, a clipped objective with a KL penalty to the starting "
            "model; log-probabilities by d1's one-step estimate or the ELBO (--estimator)."
        ),
    )
    parser.add_argument(
        "--config", default=None, help="JSON file of settings; flags given here override it"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_arguments(parser, RLConfig, "reinforcement learning", suppress_defaults=True)
    parser.set_defaults(run=run)


def _say(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)


def run(args: argparse.Namespace) -> int:
    from ..train.checkpointing import CheckpointWriteError
    from ..train.rl import RewardError, train_rl

    settings: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            settings = json.load(f)
    settings.update(
        {
            k: v
            for k, v in vars(args).items()
            if k in RLConfig.__dataclass_fields__ and v is not None
        }
    )
    config = RLConfig.from_dict(settings)
    try:
        result = train_rl(config, progress=not args.no_progress, say=_say)
    except (RewardError, CheckpointWriteError) as error:
        print(f"llada: rl stopped: {error}", file=sys.stderr)
        return 3
    if result.checkpoint is not None:
        print(f"final checkpoint: {result.checkpoint}")
    return 0
