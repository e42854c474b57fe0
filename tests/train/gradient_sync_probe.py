"""Run under torchrun by test_parallel_training.py: one training step of the trainer at
grad_accum 1 and at grad_accum 2, counting the gradient reductions across processes of each.

FSDP2: `set_all_reduce_hook` on every sharded module runs once after each reduce-scatter of
that module's gradients. DDP: a communication hook that counts, then all-reduces as DDP does.
It also records the dtype of a block's weight as the forward sees it, and of the sharded
gradient the optimizer sees (the mixed-precision policy). Rank 0 writes the JSON report.

    python -m torch.distributed.run --standalone --nproc_per_node 2 gradient_sync_probe.py \
        CONFIG.json REPORT.json
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from llada.train.config import TrainConfig
from llada.train.loop import Trainer


def reductions_per_step(config: TrainConfig, seen: dict) -> int:
    trainer = Trainer(config)
    count = [0]

    def counted(_output: torch.Tensor) -> None:
        count[0] += 1

    if config.parallel == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        for module in trainer.model.modules():
            if isinstance(module, FSDPModule):
                module.set_all_reduce_hook(counted)
    else:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            counted(bucket.buffer())
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, hook)
    block = trainer.base_model.blocks[0].attn.q_proj

    def forward_dtype(module, args):
        seen["forward_weight_dtype"] = str(module.weight.dtype)

    handle = block.register_forward_pre_hook(forward_dtype)
    trainer.train_step()
    handle.remove()
    seen["optimizer_state_dtype"] = str(
        next(iter(trainer.optimizer.state.values()))["exp_avg"].dtype
    )
    return count[0]


def main() -> None:
    config = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    report: dict = {}
    for accum in (1, 2):
        run = replace(config, grad_accum=accum, out_dir=f"{config.out_dir}-{accum}")
        report[f"reductions_accum{accum}"] = reductions_per_step(run, report)
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
