"""Per-GPU weight memory of LLaDA2.x-mini and -flash under llada.parallel's tensor + expert
parallel layout, in bfloat16, int8 and int4, and the KV cache per 1k tokens of context.

Nothing is loaded or allocated: the counts come from the config sizes (`LLaDA2Config`) and
`llada.parallel.rank_parameters`, the layout `tensor_parallel` builds (the 2-process test checks
that count against what each rank really holds). Replicated parts (embedding, lm_head, norms,
routers) count in full on every GPU.

    python bench/llada2_memory.py            # the Markdown tables of docs/llada2-memory.md

Assumptions (also printed):
- weights only: no activations, no CUDA context, no allocator slack;
- int8 / int4 quantize the matrices the forward multiplies by (attention, dense MLP, routed and
  shared experts, lm_head); the embedding (a lookup), the norms and the routers stay bfloat16;
- int8 has one bf16 scale per output row (under 0.1%, not counted); int4 has a bf16 scale and a
  bf16 zero point per 128 weights (4 bytes per 128 weights: 0.53125 bytes per weight);
- the KV cache is bfloat16: 2 (keys, values) x layers x the GPU's KV heads x head_dim x 1024
  tokens x 2 bytes, per sequence; a GPU holds num_key_value_heads / W heads, at least one.
"""

from __future__ import annotations

import argparse

from llada.model.llada2 import LLaDA2Config
from llada.parallel import check_tensor_parallel, rank_parameters

# The sizes of the official config files (LLaDA2.0 and 2.1 share them); the defaults of
# LLaDA2Config are mini's.
MODELS = {
    "LLaDA2.x-mini": LLaDA2Config(),
    "LLaDA2.x-flash": LLaDA2Config(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=9216,
        moe_intermediate_size=1024,
        num_hidden_layers=32,
    ),
}
# The totals the model cards' sizes come from (billions: total, active per token).
STATED = {"LLaDA2.x-mini": (16.26, 1.43), "LLaDA2.x-flash": (102.9, 6.15)}
QUANTIZED_PARTS = ("attention", "dense_mlp", "routed_experts", "shared_experts", "lm_head")
# Bytes per weight of the quantized parts; everything else is bfloat16 (2 bytes).
FORMATS = {"bf16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 128}
GIB = 1 << 30


def weight_bytes(config: LLaDA2Config, world_size: int, fmt: str) -> float:
    """Bytes of weights on one GPU of `world_size` in format `fmt`."""
    parts = rank_parameters(config, world_size)
    return sum(n * (FORMATS[fmt] if part in QUANTIZED_PARTS else 2.0) for part, n in parts.items())


def kv_bytes_per_1k(config: LLaDA2Config, world_size: int) -> int:
    """bfloat16 keys and values of 1024 positions of one sequence on one GPU."""
    kv_heads = max(config.n_kv_heads // world_size, 1)
    return 2 * config.num_hidden_layers * kv_heads * config.dim_per_head * 1024 * 2


def tables(world_sizes: list[int]) -> str:
    lines = []
    for name, config in MODELS.items():
        total = config.num_parameters() / 1e9
        active = config.num_parameters(active=True) / 1e9
        stated_total, stated_active = STATED[name]
        agrees = (
            round(total, 2 if total < 100 else 1) == stated_total
            and round(active, 2) == stated_active
        )
        lines += [
            f"### {name}",
            "",
            f"{total:.2f}B parameters, {active:.2f}B active per token (stated: "
            f"{stated_total}B / {stated_active}B: {'agrees' if agrees else 'DISAGREES'}); "
            f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"{config.num_attention_heads} / {config.n_kv_heads} KV heads x {config.dim_per_head}, "
            f"{config.num_experts} experts top-{config.num_experts_per_tok} of "
            f"{config.moe_intermediate_size} + {config.num_shared_experts} shared, "
            f"vocabulary {config.vocab_size}.",
            "",
            "| GiB per GPU | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in world_sizes) + " |",
            "|---|" + "---:|" * len(world_sizes),
        ]  # fmt: skip
        for fmt in FORMATS:
            cells = [f"{weight_bytes(config, w, fmt) / GIB:.1f}" for w in world_sizes]
            lines.append(f"| weights, {fmt} | " + " | ".join(cells) + " |")
        cells = [f"{kv_bytes_per_1k(config, w) / (1 << 20):.1f} MiB" for w in world_sizes]
        lines.append("| KV cache per 1k tokens per sequence (bf16) | " + " | ".join(cells) + " |")
        one = rank_parameters(config, 1)
        last = rank_parameters(config, world_sizes[-1])
        lines += [
            "",
            f"Of the bf16 weights on one of {world_sizes[-1]} GPUs: "
            + ", ".join(f"{part} {n * 2 / GIB:.2f} GiB" for part, n in last.items())
            + f" (on one GPU: routed experts {one['routed_experts'] * 2 / GIB:.1f} GiB).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    for config in MODELS.values():
        for w in args.world_sizes:
            check_tensor_parallel(config, w)
    print(tables(args.world_sizes))


if __name__ == "__main__":
    main()
