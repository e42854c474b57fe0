"""The model forward's achieved FLOP/s against a large torch.mm, eager and compiled.

    OMP_NUM_THREADS=1 python bench/forward_efficiency.py
    OMP_NUM_THREADS=2 python bench/forward_efficiency.py --models tiny --batches 1 8 \\
        --seqs 256 1024 --dtypes float32 bfloat16

Models: 'tiny' is the shipped llada-tiny-base (d 256, 8 layers, vocabulary 2048); 'slice' is one
layer of LLaDA-8B's shape (d 4096, 32 heads, MLP 12288; random weights, vocabulary 2048 so that
the head stays small) for the matmul sizes of the real model. Every setting times the eager
forward, the forward compiled by `llada.compile_model` (inductor, the device's default mode; dynamic=True
by default here: one graph per model and dtype serves every size, as the samplers' changing
windows end up with after their first size change) and a large torch.mm in the same dtype, alternating (A B C
A B C ...) after warm-up (the compiled forward's first calls compile), and reports medians.
The ratio is the claim (BENCHMARKING.md): achieved FLOP/s / torch.mm FLOP/s, both measured in
the same window of the same process.

Model FLOPs per query position: 2 x non-embedding parameters + 2 x d_model x vocab (LM head) +
attention (QK^T and AV: 4 x keys x d_model per layer); logits for every position.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import llada
from llada.model.config import LLaDAConfig
from llada.model.transformer import LLaDAModel

ROOT = Path(__file__).resolve().parents[1]
SLICE = {"d_model": 4096, "n_heads": 32, "mlp_hidden_size": 12288, "n_layers": 1}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load(name: str, dtype: torch.dtype) -> LLaDAModel:
    if name == "tiny":
        return llada.load_model(ROOT / "models" / "llada-tiny-base", dtype=dtype).eval()
    config = LLaDAConfig(
        **SLICE, vocab_size=2048, embedding_size=2048, max_sequence_length=4096, weight_tying=False
    )
    torch.manual_seed(0)
    model = LLaDAModel(config).to(dtype).eval()
    model.init_weights()
    return model


def forward_flops(model: LLaDAModel, batch: int, seq: int) -> float:
    """FLOPs of one forward over batch x seq positions, logits at every position."""
    config = model.config
    blocks = sum(p.numel() for p in model.blocks.parameters())
    head = config.d_model * config.padded_vocab_size
    attention = 4 * seq * config.d_model * config.n_layers
    return batch * seq * (2 * blocks + 2 * head + attention)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model, compiled_call, ids, mm, repeats: int) -> dict[str, float]:
    """Median seconds of the eager forward, the compiled one and the torch.mm, alternating."""

    def eager():
        type(model).forward(model, ids)

    def compiled():
        compiled_call(ids)

    compile_seconds = timed(compiled)  # the first call at these sizes (compiles if needed)
    for fn in (eager, compiled, mm):
        fn()
    times = {"eager": [], "compiled": [], "mm": []}
    for _ in range(repeats):
        for name, fn in (("eager", eager), ("compiled", compiled), ("mm", mm)):
            times[name].append(timed(fn))
    result = {name: statistics.median(values) for name, values in times.items()}
    result["first_compiled_call"] = compile_seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "slice"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--seqs", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument(
        "--slice-sizes",
        nargs="+",
        default=["1x256"],
        help="batch x seq settings for 'slice' (a layer of 8B is ~0.1 TFLOP per 256 positions)",
    )
    parser.add_argument("--mm", type=int, default=2048, help="torch.mm size n (n x n @ n x n)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--static", action="store_true", help="compile with dynamic=None (a graph per new size)"
    )
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, commit {commit}"
    )
    header = (
        f"{'model':6} {'dtype':9} {'B':>2} {'T':>5} {'GFLOP':>8} {'mm GF/s':>8} "
        f"{'eager GF/s':>10} {'comp GF/s':>9} {'eager/mm':>8} {'comp/mm':>8} {'speedup':>7} "
        f"{'1st comp s':>10}"
    )
    print(header)
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        a = torch.randn(args.mm, args.mm, dtype=dtype)
        b = torch.randn(args.mm, args.mm, dtype=dtype)

        def mm(a=a, b=b):
            torch.mm(a, b)

        mm_flops = 2 * args.mm**3
        for name in args.models:
            torch._dynamo.reset()
            model = load(name, dtype)
            compiled_model = llada.compile_model(
                load(name, dtype), dynamic=None if args.static else True
            )
            compiled_model.load_state_dict(model.state_dict())
            if name == "slice":
                sizes = [tuple(int(v) for v in s.split("x")) for s in args.slice_sizes]
            else:
                sizes = [(b_, t) for b_ in args.batches for t in args.seqs]
            for batch, seq in sizes:
                ids = torch.randint(0, model.config.vocab_size, (batch, seq))
                seconds = measure(model, compiled_model, ids, mm, args.repeats)
                flops = forward_flops(model, batch, seq)
                row = {
                    "model": name,
                    "dtype": dtype_name,
                    "batch": batch,
                    "seq": seq,
                    "gflop": flops / 1e9,
                    "mm_gflops": mm_flops / seconds["mm"] / 1e9,
                    "eager_gflops": flops / seconds["eager"] / 1e9,
                    "compiled_gflops": flops / seconds["compiled"] / 1e9,
                    "first_compiled_call_s": seconds["first_compiled_call"],
                }
                row["eager_vs_mm"] = row["eager_gflops"] / row["mm_gflops"]
                row["compiled_vs_mm"] = row["compiled_gflops"] / row["mm_gflops"]
                row["speedup"] = seconds["eager"] / seconds["compiled"]
                rows.append(row)
                print(
                    f"{name:6} {dtype_name:9} {batch:>2} {seq:>5} {row['gflop']:>8.1f} "
                    f"{row['mm_gflops']:>8.1f} {row['eager_gflops']:>10.1f} "
                    f"{row['compiled_gflops']:>9.1f} {row['eager_vs_mm']:>8.2f} "
                    f"{row['compiled_vs_mm']:>8.2f} {row['speedup']:>6.2f}x "
                    f"{row['first_compiled_call_s']:>10.1f}",
                    flush=True,
                )
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "commit": commit,
                "dynamic": not args.static,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
