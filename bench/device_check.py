"""One device check: the parity tests on the device, then the cost of one denoising step of an
LLaDA-8B-shaped and a LLaDA-MoE-7B-A1B-shaped model (random weights built on the device, nothing
downloaded) against the machine's physical limits (../shared/BENCHMARKING.md).

A denoising step of the reference sampler is one forward over the whole canvas (prompt and
answer), so the step is timed as one forward of `batch x seq` tokens, at batch 1 and 8 and seq
512 and 1024, three ways:
- eager: the model as it is;
- compiled: `llada.compile_model` (torch.compile from outside the model; plain torch.compile of
  the forward where this checkout has no `llada.compile`);
- CUDA graphs: the eager forward captured once per shape with `torch.cuda.graph` and replayed
  (CUDA only; the forward never reads a tensor back to the host, so it captures whole).
Each is set against two floors measured in the same run: streaming every weight once from device
memory (weight bytes / the bandwidth of a large device-to-device copy, counted as bytes read plus
bytes written) and the arithmetic (model FLOPs / the rate of a large matmul in the model's dtype).
Model FLOPs per step = 2 x active matmul parameters x tokens (routed experts counted at k of E)
+ 2 x d_model x vocab x tokens (LM head) + 4 x seq^2 x d_model x layers x batch (attention).

    bash bench/device_check.sh                 # on a CUDA machine: the full check, under 8 minutes
    python bench/device_check.py --reduced     # tiny shapes on the CPU (CI runs this)

Without CUDA the check runs reduced automatically. It prints a table, then ONE JSON line (the
last line) with every figure and the device's name. Phases that would overrun --budget-s are
skipped and named in the JSON, so the line always comes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from llada.model.config import LLaDAConfig
from llada.model.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from llada.model.transformer import LLaDAModel

ROOT = Path(__file__).resolve().parents[1]
PARITY_TESTS = (
    "tests/test_reference_parity.py",
    "tests/test_moe_parity.py",
    "tests/test_llada2_parity.py",
)


def dense_config(reduced: bool) -> LLaDAConfig:
    """LLaDA-8B's shape (LLaDAConfig's defaults: 32 layers, d_model 4096), or a tiny one."""
    if not reduced:
        return LLaDAConfig()
    vocab = 256
    return LLaDAConfig(
        d_model=64,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=128,
        vocab_size=vocab,
        embedding_size=vocab,
        max_sequence_length=256,
        mask_token_id=vocab - 1,
        eos_token_id=vocab - 3,
        pad_token_id=vocab - 3,
    )


def moe_config(reduced: bool) -> LLaDAMoEConfig:
    """LLaDA-MoE-7B-A1B's shape (LLaDAMoEConfig's defaults: 16 layers, hidden 2048, 64 experts
    top-8), or a tiny one."""
    if not reduced:
        return LLaDAMoEConfig()
    vocab = 256
    return LLaDAMoEConfig(
        vocab_size=vocab,
        hidden_size=64,
        dense_intermediate_size=128,
        expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_experts=8,
        num_experts_per_tok=2,
        pad_token_id=vocab - 3,
        eos_token_id=vocab - 3,
    )


MODELS = {"llada-8b": dense_config, "llada-moe-7b-a1b": moe_config}


def build(config, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random model of `config`, created directly on `device` and initialised there."""
    cls = LLaDAMoEModel if isinstance(config, LLaDAMoEConfig) else LLaDAModel
    with torch.device(device):
        model = cls(config)
    model = model.to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        model.init_weights(generator)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` after `warmup` calls, synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of an (n, n) @ (n, n) torch.mm in `dtype`: the machine's matmul rate here."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats)


def copy_bandwidth(device: torch.device, megabytes: int, repeats: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting the bytes read and the bytes written."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / median_seconds(lambda: target.copy_(source), device, repeats)


def step_flops(model: torch.nn.Module, batch: int, seq: int) -> float:
    """Model FLOPs of one forward over `batch x seq` tokens (the module docstring's formula)."""
    config = model.config
    routed = getattr(config, "num_experts_per_tok", 1) / getattr(config, "num_experts", 1)
    active = 0.0
    for name, parameter in model.named_parameters():
        if parameter.dim() < 2 or name.startswith(("embed", "lm_head")):
            continue
        # Stacked expert weights (experts, out, in): each token runs k of the E experts.
        active += parameter.numel() * (routed if parameter.dim() == 3 else 1.0)
    vocab, d = model.embed.weight.shape
    layers = len(model.blocks)
    tokens = batch * seq
    return 2 * active * tokens + 2 * d * vocab * tokens + 4 * seq * seq * d * layers * batch


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight a forward reads (the embedding table only by its gathered rows,
    which is negligible, so it is left out)."""
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not name.startswith("embed")
    )


def compiler():
    """`llada.compile_model` where this checkout has it, else torch.compile of the forward."""
    try:
        from llada.compile import compile_model

        return compile_model, "llada.compile_model"
    except ImportError:

        def compile_forward(model, mode=None, *, dynamic=True, backend="inductor"):
            forward = type(model).forward.__get__(model)
            model.forward = torch.compile(forward, mode=mode, dynamic=dynamic, backend=backend)
            return model

        return compile_forward, "torch.compile"


def cuda_graph_step(model: torch.nn.Module, ids: torch.Tensor):
    """The eager forward on `ids` captured once as a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            model(ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(ids)
    return graph


def run_parity(device: torch.device, reduced: bool) -> dict:
    """The reference-vector tests with LLADA_TEST_DEVICE = `device` (only the logits tests when
    reduced); returns their counts and exit status."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS]
    if reduced:
        command += ["-k", "logits"]
    env = {**os.environ, "LLADA_TEST_DEVICE": str(device)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    counts = {
        word: int(number)
        for number, word in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", done.stdout)
    }
    result = {
        "device": str(device),
        "returncode": done.returncode,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
        "skipped": counts.get("skipped", 0),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if done.returncode != 0:
        result["tail"] = (done.stdout + done.stderr)[-2000:]
    return result


def time_model(name, config, args, device, dtype, machine, deadline) -> dict:
    """Eager, CUDA-graph and compiled step times of one model at every (batch, seq)."""
    start = time.perf_counter()
    model = build(config, device, dtype)
    shapes = [(b, s) for b in args.batches for s in args.seqs]
    report = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
        "dtype": str(dtype).removeprefix("torch."),
        "build_s": round(time.perf_counter() - start, 1),
        "skipped": [],
    }
    inputs = {
        (b, s): torch.randint(0, model.embed.weight.shape[0], (b, s), device=device)
        for b, s in shapes
    }
    rows = {}
    for b, s in shapes:
        flops = step_flops(model, b, s)
        rows[(b, s)] = {
            "batch": b,
            "seq": s,
            "flops": flops,
            "weight_floor_s": report["weight_bytes"] / machine["copy_bandwidth"],
            "compute_floor_s": flops / machine["matmul_flops"],
        }
    with torch.inference_mode():
        for b, s in shapes:
            ids = inputs[(b, s)]
            rows[(b, s)]["eager_s"] = median_seconds(partial(model, ids), device, args.repeats)
        if device.type == "cuda":
            for b, s in shapes:
                if time.monotonic() > deadline:
                    report["skipped"].append(f"cuda graphs at batch {b} seq {s}: out of budget")
                    continue
                try:
                    graph = cuda_graph_step(model, inputs[(b, s)])
                    rows[(b, s)]["cuda_graphs_s"] = median_seconds(
                        graph.replay, device, args.repeats
                    )
                    del graph
                except Exception as error:  # a failed capture is a finding, not the end
                    report["skipped"].append(f"cuda graphs at batch {b} seq {s}: {error!r}"[:500])
                torch.cuda.empty_cache()
        else:
            report["skipped"].append("cuda graphs: not a CUDA device")
        compile_model, how = compiler()
        report["compiler"] = how
        report["compile_mode"] = args.compile_mode
        report["compile_backend"] = args.compile_backend
        if time.monotonic() + args.compile_reserve_s > deadline:
            report["skipped"].append(
                f"compiled: under {args.compile_reserve_s} s of budget left (--compile-reserve-s)"
            )
        else:
            mode = None if args.compile_backend != "inductor" else args.compile_mode
            compile_model(model, mode=mode, dynamic=True, backend=args.compile_backend)
            report["compile_s"] = {}
            for b, s in shapes:
                if time.monotonic() > deadline:
                    report["skipped"].append(f"compiled at batch {b} seq {s}: out of budget")
                    continue
                ids = inputs[(b, s)]
                try:
                    first = time.perf_counter()
                    model(ids)  # compiles this kind of call (or reuses the dynamic graph)
                    sync(device)
                    report["compile_s"][f"{b}x{s}"] = round(time.perf_counter() - first, 2)
                    rows[(b, s)]["compiled_s"] = median_seconds(
                        partial(model, ids), device, args.repeats
                    )
                except Exception as error:  # a failed compile is a finding, not the end
                    report["skipped"].append(f"compiled at batch {b} seq {s}: {error!r}"[:500])
            del model.forward
    for row in rows.values():
        floor = max(row["weight_floor_s"], row["compute_floor_s"])
        for way in ("eager", "compiled", "cuda_graphs"):
            if f"{way}_s" in row:
                # Achieved share of the matmul rate and distance to the roofline floor.
                row[f"{way}_flops_share"] = row["flops"] / row[f"{way}_s"] / machine["matmul_flops"]
                row[f"{way}_x_floor"] = row[f"{way}_s"] / floor
    report["steps"] = list(rows.values())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def print_table(name: str, report: dict) -> None:
    print(
        f"\n{name}: {report['parameters'] / 1e9:.2f} B parameters, "
        f"{report['weight_bytes'] / 1e9:.2f} GB of weights in {report['dtype']}"
    )
    print(
        f"{'batch':>5} {'seq':>5} {'eager ms':>9} {'compiled':>9} {'graphs':>9} "
        f"{'w-floor':>8} {'c-floor':>8} {'eager %mm':>9}"
    )

    def ms(value):
        return f"{value * 1e3:9.2f}" if value is not None else f"{'-':>9}"

    for row in report["steps"]:
        print(
            f"{row['batch']:>5} {row['seq']:>5} {ms(row.get('eager_s'))} "
            f"{ms(row.get('compiled_s'))} {ms(row.get('cuda_graphs_s'))} "
            f"{row['weight_floor_s'] * 1e3:8.2f} {row['compute_floor_s'] * 1e3:8.2f} "
            f"{row['eager_flops_share']:9.1%}"
        )
    for reason in report["skipped"]:
        print(f"  skipped: {reason}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--reduced", action="store_true", help="tiny shapes (automatic without CUDA)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="default 512 1024")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip phases past this")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode ('default' compiles in about a minute; "
        "'max-autotune-no-cudagraphs', compile_model's CUDA choice, autotunes for minutes)",
    )
    parser.add_argument("--compile-backend", default=None, help="default inductor; eager reduced")
    parser.add_argument("--compile-reserve-s", type=float, default=None)
    parser.add_argument("--no-parity", action="store_true", help="skip the parity tests")
    parser.add_argument("--models", nargs="+", default=["llada-8b", "llada-moe-7b-a1b"])
    args = parser.parse_args(argv)
    for model_name in args.models:
        if model_name not in MODELS:
            parser.error(f"--models: unknown {model_name!r}; choose from {sorted(MODELS)}")
    began = time.monotonic()
    deadline = began + args.budget_s
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reduced = args.reduced or device.type != "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.batches = args.batches or ([1, 2] if reduced else [1, 8])
    args.seqs = args.seqs or ([32, 64] if reduced else [512, 1024])
    # Reduced: capture the graph without generating code (no C++ compiler needed, seconds).
    args.compile_backend = args.compile_backend or ("eager" if reduced else "inductor")
    if args.compile_reserve_s is None:
        args.compile_reserve_s = 0.0 if reduced else 90.0
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    out: dict = {
        "device": str(device),
        "device_name": name,
        "reduced": reduced,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
    }
    print(f"device check on {name} ({device}), torch {out['torch']}, reduced={reduced}")
    if not args.no_parity:
        out["parity"] = run_parity(device, reduced)
        p = out["parity"]
        print(f"parity tests on {device}: {p['passed']} passed, {p['failed']} failed")
    machine = {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_flops": matmul_rate(device, dtype, 512 if reduced else 8192),
        "copy_bandwidth": copy_bandwidth(device, 64 if reduced else 4096),
    }
    out["machine"] = machine
    print(
        f"matmul {machine['matmul_flops'] / 1e12:.3f} TFLOP/s ({machine['matmul_dtype']}); "
        f"copy {machine['copy_bandwidth'] / 1e9:.1f} GB/s (read + write)"
    )
    out["models"] = {}
    for model_name in args.models:
        config = MODELS[model_name](reduced)
        report = time_model(model_name, config, args, device, dtype, machine, deadline)
        out["models"][model_name] = report
        print_table(model_name, report)
    out["elapsed_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
