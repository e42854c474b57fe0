"""The LLaDA 2.x block sampler with the block KV cache (`llada.block_sample`) against the plain
one (`llada.block_generate`, which re-runs the whole window x[:, :end] at every step), on a
small random LLaDA 2.x: tokens/s, forward passes and query positions per generated token, and
their ratios, measured in one run; every answer is checked to be the same token for token.

    OMP_NUM_THREADS=1 python bench/block_speed.py
    OMP_NUM_THREADS=1 python bench/block_speed.py --gen-lengths 256 1024 --batches 1 8

Settings: LLaDA 2.0's defaults (block 32, 32 steps a block, threshold 0.95), greedy. A random
model is never 0.95 sure, so every step commits its quota of one token: 32 forwards a block in
both samplers. The EOS and [MASK] rows of the LM head are zeroed so that no answer ends early
and no [MASK] is proposed (every row decodes all gen_length positions). block_generate takes
one prompt at a time: for a batch, its figures are its runs over the batch's prompts one by
one. Query positions count rows x window positions run through the blocks (padding and rows
riding along included), the same from a forward hook for both.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llada.model.llada2 import LLaDA2Config, LLaDA2Model
from llada.sampling.block import block_generate
from llada.sampling.block_cached import block_sample

# 4 layers (the first dense), hidden 256, 16 experts top-4 in 4 groups (2 kept), 1 shared.
CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    num_shared_experts=1,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
    pad_token_id=4094,
)
MASK_ID, EOS_ID = 4095, 4094


def build_model(seed: int) -> LLaDA2Model:
    model = LLaDA2Model(LLaDA2Config(**CONFIG)).requires_grad_(False).eval()
    model.init_weights(torch.Generator().manual_seed(seed))
    model.lm_head.weight[[MASK_ID, EOS_ID]] = 0.0  # never the most probable: no early end
    return model


class Counter:
    """Forward passes and query positions (rows x positions), from a forward pre-hook."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.forwards = self.positions = 0
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        self.forwards += 1
        self.positions += ids.numel()


def run(model, prompts, options, cached: bool) -> tuple[list[list[int]], float, Counter]:
    counter = Counter(model)
    try:
        begin = time.perf_counter()
        if cached:
            answers = [a.tolist() for a in block_sample(model, prompts, **options).answers]
        else:
            answers = [block_generate(model, p[None], **options)[0].tolist() for p in prompts]
        seconds = time.perf_counter() - begin
    finally:
        counter.handle.remove()
    return answers, seconds, counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[256])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build_model(args.seed)
    layers = CONFIG["num_hidden_layers"]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), float32, CPU"
    )
    print(
        "| gen | batch | sampler | seconds | tokens/s | forwards / token | query positions "
        "/ token | layer positions / token |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for gen_length in args.gen_lengths:
        for batch in args.batches:
            generator = torch.Generator().manual_seed(args.seed + batch)
            lengths = [int(n) for n in torch.randint(16, 100, (batch,), generator=generator)]
            if batch == 1:
                lengths = [40]
            prompts = [torch.randint(0, 4000, (n,), generator=generator) for n in lengths]
            options = dict(
                version="2.0", gen_length=gen_length, block_length=args.block_length,
                steps=args.block_length, threshold=0.95, eos_id=EOS_ID, mask_id=MASK_ID,
            )  # fmt: skip
            results = {}
            for name, cached in (("block_generate", False), ("block_sample", True)):
                answers, seconds, counter = run(model, prompts, options, cached)
                tokens = sum(len(a) for a in answers)
                results[name] = (answers, seconds, counter, tokens)
                print(
                    f"| {gen_length} | {batch} | {name} | {seconds:.1f} | {tokens / seconds:,.1f} "
                    f"| {counter.forwards / tokens:.3f} | {counter.positions / tokens:,.1f} "
                    f"| {counter.positions * layers / tokens:,.1f} |",
                    flush=True,
                )
            plain, fast = results["block_generate"], results["block_sample"]
            if plain[0] != fast[0]:
                raise SystemExit(f"gen {gen_length} batch {batch}: the answers differ")
            print(
                f"| {gen_length} | {batch} | cached / plain | {fast[1] / plain[1]:.3f} "
                f"| **{plain[1] / fast[1]:.1f}x** | {fast[2].forwards / plain[2].forwards:.3f} "
                f"| {fast[2].positions / plain[2].positions:.3f} "
                f"| {fast[2].positions / plain[2].positions:.3f} |",
                flush=True,
            )
            print(f"<!-- gen {gen_length} batch {batch}: {plain[3]} tokens, answers equal -->")


if __name__ == "__main__":
    main()
