"""LLaDA-MoE experts: forward tokens/s of the grouped experts against the expert loop (and,
given its file, the reference modeling code's MoE block) on one layer of LLaDA-MoE-7B-A1B's real
shapes (D 2048, F 1024, 64 experts, top-8), with the achieved FLOP/s of the active expert
parameters (2 * 3 * D * F * k per token) against a large torch.mm measured in the same run.

    OMP_NUM_THREADS=1 python bench/moe_speed.py
    OMP_NUM_THREADS=1 python bench/moe_speed.py --tokens 256 --dtypes bfloat16 \\
        --reference-code /path/to/dllm/dllm/pipelines/llada/models/modeling_lladamoe.py

T = batch x seq tokens go through the layer at once (the MoE block is per token). Every row
times the whole block (router softmax and top-k, then the experts) on the same weights and
inputs; the reference's block reads our stacked weights in place. `--sections` adds (by
default) whole-model forward rows of a small random LLaDA-MoE and training rows (the experts'
forward + backward at that model's layer shapes).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from llada.model.experts import experts_forward, experts_grouped, experts_loop, pick_backend

OFFICIAL = {"d": 2048, "f": 1024, "experts": 64, "k": 8}
# The whole-model rows: the official layout shrunk to fit a small CPU (a quarter of the width,
# 4 of 16 layers, a small vocabulary), still 64 experts top-8.
SMALL_MODEL = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "expert_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_layer_freq": (1, 1, 1, 1),
    "pad_token_id": 4095,
    "eos_token_id": 4095,
}


def route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA-MoE's router: float32 softmax over all experts, top-k, weights not renormalised."""
    probs = F.softmax(F.linear(x, router), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k, dim=-1)
    return ids, weights.to(x.dtype)


def load_reference_block(path: Path, weights: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The reference file's LLaDAMoESparseMoeBlock, its experts' weights views of ours."""
    # transformers 5 dropped the module the reference imports for its causal-mask helper; the
    # MoE block never uses it, so a placeholder lets the file import unchanged.
    try:
        importlib.import_module("transformers.modeling_attn_mask_utils")
    except ModuleNotFoundError:
        stub = types.ModuleType("transformers.modeling_attn_mask_utils")
        stub.AttentionMaskConverter = object
        sys.modules["transformers.modeling_attn_mask_utils"] = stub
    package = types.ModuleType("moe_reference")  # its relative import of the config file
    package.__path__ = [str(path.parent)]
    sys.modules["moe_reference"] = package
    spec = importlib.util.spec_from_file_location("moe_reference.modeling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = SimpleNamespace(
        hidden_size=OFFICIAL["d"],
        expert_intermediate_size=OFFICIAL["f"],
        num_experts=OFFICIAL["experts"],
        num_experts_per_tok=OFFICIAL["k"],
        hidden_act="silu",
        moe_router_score_function="softmax",
        moe_router_enable_expert_bias=False,
    )
    with torch.device("meta"):
        block = module.LLaDAMoESparseMoeBlock(config)
    block.gate.weight = torch.nn.Parameter(weights["router"], requires_grad=False)
    for e, expert in enumerate(block.experts):
        for name in ("gate", "up", "down"):
            proj = getattr(expert, f"{name}_proj")
            proj.weight = torch.nn.Parameter(weights[name][e], requires_grad=False)
    return block.to(dtype).eval()


def block_rows(weights: dict, reference: torch.nn.Module | None, k: int) -> dict:
    """One MoE block forward (router, then experts) per implementation, x (T, D) -> (T, D)."""
    experts = (weights["gate"], weights["up"], weights["down"])

    def block(impl: str, x: torch.Tensor) -> torch.Tensor:
        ids, w = route(x, weights["router"], k)
        if impl == "loop":
            return experts_forward(x, ids, w, *experts, impl="loop")
        return experts_grouped(x, ids, w, *experts, backend=impl)

    rows = {name: functools.partial(block, name) for name in ("loop", "grouped_mm", "slices")}
    if reference is not None:
        rows["reference code"] = lambda x: reference(x[None])[0]
    return rows


def model_rows(args, g: torch.Generator) -> None:
    """Whole-model forward tokens/s of a small random LLaDA-MoE, its experts run each way."""
    from llada.model import llada_moe

    config = llada_moe.LLaDAMoEConfig(**SMALL_MODEL)
    print(
        f"\nwhole model, small random LLaDA-MoE ({config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, {config.num_experts} experts of {config.expert_intermediate_size}"
        f", top-{config.num_experts_per_tok}, vocab {config.vocab_size})"
    )
    print(f"{'dtype':<9} {'batch x seq':>11} {'impl':<17} {'ms':>8} {'tokens/s':>9} {'vs loop':>7}")
    original = llada_moe.routed_experts
    impls = {
        "loop": functools.partial(experts_forward, impl="loop"),
        "grouped_mm": functools.partial(grouped_with, "grouped_mm"),
        "slices": functools.partial(grouped_with, "slices"),
    }
    try:
        for dtype_name in args.dtypes.split(","):
            model = llada_moe.LLaDAMoEModel(config)
            model.init_weights(g)
            model = model.to(getattr(torch, dtype_name)).eval()
            for batch, seq in ((1, 256), (4, 256), (1, 1024)):
                ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
                times = dict.fromkeys(impls, float("inf"))
                with torch.inference_mode():
                    for _ in range(args.repeats + 1):  # the first round warms up
                        for name, impl in impls.items():
                            llada_moe.routed_experts = impl
                            seconds = best_time(functools.partial(model, ids), 1)
                            times[name] = min(times[name], seconds)
                moe = next(block.mlp for block in model.blocks if block.is_moe)
                x = torch.empty(batch * seq, config.hidden_size, dtype=model.dtype)
                pairs = torch.zeros(batch * seq, config.num_experts_per_tok, dtype=torch.int64)
                auto = pick_backend(x, pairs, moe.gate_proj, moe.up_proj, moe.down_proj)
                for name, seconds in times.items():
                    print(
                        f"{dtype_name:<9} {f'{batch} x {seq}':>11} {name:<17} "
                        f"{seconds * 1e3:8.1f} {batch * seq / seconds:9.0f} "
                        f"{times['loop'] / seconds:6.2f}x{'  <- auto' if name == auto else ''}",
                        flush=True,
                    )
    finally:
        llada_moe.routed_experts = original


def train_rows(args, g: torch.Generator) -> None:
    """Experts forward + backward (weights and inputs requiring grad), the small model's layer."""
    d, f = SMALL_MODEL["hidden_size"], SMALL_MODEL["expert_intermediate_size"]
    num_experts, k = SMALL_MODEL["num_experts"], SMALL_MODEL["num_experts_per_tok"]
    print(
        f"\ntraining step of the experts (forward + backward), D {d}, F {f}, {num_experts} experts"
    )
    print(f"{'dtype':<9} {'T':>5} {'impl':<11} {'ms':>8} {'tokens/s':>9} {'vs loop':>7}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        weights = [
            (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(dtype).requires_grad_()
            for shape in ((num_experts, f, d), (num_experts, f, d), (num_experts, d, f))
        ]
        for tokens in (int(t) for t in args.train_tokens.split(",")):
            x = torch.randn(tokens, d, generator=g).to(dtype).requires_grad_()
            ids, w = route(x.detach(), torch.randn(num_experts, d, generator=g).to(dtype), k)
            w.requires_grad_()
            cotangent = torch.randn(tokens, d, generator=g).to(dtype)
            args_ = (x, ids, w, *weights)
            impls = {
                "loop": functools.partial(experts_loop, *args_),
                "grouped_mm": functools.partial(experts_grouped, *args_, backend="grouped_mm"),
                "slices": functools.partial(experts_grouped, *args_, backend="slices"),
            }
            times = dict.fromkeys(impls, float("inf"))
            for round_ in range(args.train_repeats + 1):  # the first round warms up
                for name, fn in impls.items():
                    for leaf in (x, w, *weights):
                        leaf.grad = None
                    start = time.perf_counter()
                    fn().backward(cotangent)
                    if round_:
                        times[name] = min(times[name], time.perf_counter() - start)
            auto = pick_backend(x, ids, *weights)
            for name, seconds in times.items():
                print(
                    f"{dtype_name:<9} {tokens:>5} {name:<11} {seconds * 1e3:8.1f} "
                    f"{tokens / seconds:9.0f} {times['loop'] / seconds:6.2f}x"
                    f"{'  <- auto' if name == auto else ''}",
                    flush=True,
                )


def grouped_with(backend: str, x, topk_ids, topk_weights, gate, up, down) -> torch.Tensor:
    return experts_grouped(x, topk_ids, topk_weights.to(x.dtype), gate, up, down, backend=backend)


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an (n, n) @ (n, n) torch.mm in this dtype: the machine's matmul peak here."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), repeats)


def copy_bandwidth(megabytes: int = 512, repeats: int = 3) -> float:
    """Bytes/s read plus written by a large tensor copy: what streaming the weights can reach."""
    src = torch.ones(megabytes << 18)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: dst.copy_(src), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="256,1024,2048", help="T = batch x seq, comma list")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row (best kept)")
    parser.add_argument("--reference-code", type=Path, help="the reference modeling_lladamoe.py")
    parser.add_argument("--sections", default="experts,model,train", help="which tables to run")
    parser.add_argument("--train-tokens", default="256,1024,4096", help="T for the train rows")
    parser.add_argument("--train-repeats", type=int, default=2)
    args = parser.parse_args()
    d, f, num_experts, k = OFFICIAL["d"], OFFICIAL["f"], OFFICIAL["experts"], OFFICIAL["k"]
    active_flop = 2 * 3 * d * f * k  # per token: three projections of the k routed experts
    print(f"D {d}, F {f}, {num_experts} experts, top-{k}; {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}; active expert FLOP per token {active_flop / 1e6:.1f} M")
    g = torch.Generator().manual_seed(0)
    sections = args.sections.split(",")
    for dtype_name in args.dtypes.split(",") if "experts" in sections else ():
        dtype = getattr(torch, dtype_name)
        weights = {  # one layer; stacked as the model stores them
            "gate": (torch.randn(num_experts, f, d, generator=g) / d**0.5).to(dtype),
            "up": (torch.randn(num_experts, f, d, generator=g) / d**0.5).to(dtype),
            "down": (torch.randn(num_experts, d, f, generator=g) / f**0.5).to(dtype),
            "router": (torch.randn(num_experts, d, generator=g) / d**0.5).to(dtype),
        }
        weight_bytes = sum(weights[name].nbytes for name in ("gate", "up", "down"))
        peak = matmul_peak(dtype)
        print(
            f"\n{dtype_name}: torch.mm 2048^3 peak {peak / 1e9:.1f} GFLOP/s; copy "
            f"{copy_bandwidth() / 1e9:.1f} GB/s; expert weights {weight_bytes / 1e9:.2f} GB/layer"
        )
        reference = None
        if args.reference_code is not None:
            reference = load_reference_block(args.reference_code, weights, dtype)

        rows = block_rows(weights, reference, k)
        header = f"{'T':>5} {'impl':<17} {'ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'of peak':>7}"
        print(header + f" {'wt GB/s':>7} {'vs loop':>7} {'vs ref':>7} {'max |diff| vs loop':>18}")
        for tokens in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(1, tokens, d, generator=g).to(dtype)[0]
            with torch.inference_mode():
                outs = {name: fn(x) for name, fn in rows.items()}  # warm-up, and the diffs
                expected = outs["loop"]
                times = dict.fromkeys(rows, float("inf"))
                for _ in range(args.repeats):  # interleaved, so drift hits every row alike
                    for name, fn in rows.items():
                        times[name] = min(times[name], best_time(functools.partial(fn, x), 1))
            ids = torch.zeros(tokens, k, dtype=torch.int64)
            auto = pick_backend(x, ids, weights["gate"], weights["up"], weights["down"])
            for name, seconds in times.items():
                flops = active_flop * tokens / seconds
                ref = times.get("reference code")
                vs_ref = f"{ref / seconds:6.2f}x" if ref else "      -"
                diff = (outs[name].float() - expected.float()).abs().max().item()
                print(
                    f"{tokens:>5} {name:<17} {seconds * 1e3:8.1f} {tokens / seconds:9.0f} "
                    f"{flops / 1e9:8.1f} {flops / peak:7.0%} {weight_bytes / seconds / 1e9:7.1f} "
                    f"{times['loop'] / seconds:6.2f}x "
                    f"{vs_ref} {diff:18.2e}{'  <- auto' if name == auto else ''}",
                    flush=True,
                )

    if "model" in sections:
        model_rows(args, g)
    if "train" in sections:
        train_rows(args, g)


if __name__ == "__main__":
    main()
