"""Sampling speed and quality of every decoding preset, as ratios against the reference sampler
and against Fast-dLLM's methods measured in the same run (../shared/BENCHMARKING.md).

For each setting (gen_length x block_length x batch size) every method answers the same task
prompts, methods alternating prompt by prompt (A B C A B C ...) after two warm-up calls. A
generated token is an answer token before the first EOS/EoT; prompt, padding and EOS filler
never count. Reported per method: tokens/s per sequence (median over calls; at batch > 1 the
batch's tokens/s), forward passes (NFE) and tokens per forward (TPF) per sequence, task
accuracy (exact match, trained models), and the achieved FLOP/s of its forward passes as a
fraction of this machine's measured matmul FLOP/s.

    python bench/sampling_speed.py                              # llada-tiny-instruct
    python bench/sampling_speed.py --random-model 100M --prompts 4 --gen-lengths 256

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from llada.api import load
from llada.eval.tasks import build_task_sets, is_correct
from llada.model.config import LLaDAConfig
from llada.model.transformer import LLaDAModel
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig
from llada.sampling.fast import sample
from llada.tokenizer import encode_chat, left_pad

METHODS = ("reference", "fastdllm-prefix", "fastdllm-dual", "fast", "fastest")
# Further compositions, selectable with --methods.
EXTRA = {
    "fast-factor": DecodeConfig(source="dual", commit="factor", factor=1.0),
    "fast-entropy": DecodeConfig(source="dual", commit="entropy", entropy_bound=0.5),
    "fastest-vicinity8": DecodeConfig(source="block", commit="threshold", vicinity=8),
    # Fast-dLLM's methods at our threshold: the Fast-dLLM baselines of equal accuracy.
    "fastdllm-prefix-0.99": DecodeConfig(
        source="prefix",
        commit="threshold",
        threshold=0.99,
        early_stop=False,
        fastdllm_numerics=True,
    ),
    "fastdllm-dual-0.99": DecodeConfig(
        source="dual", commit="threshold", threshold=0.99, early_stop=False, fastdllm_numerics=True
    ),
}
DECODERS = {**PRESETS, **EXTRA}


def matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """This machine's matmul rate in the model's dtype: a large torch.mm, repeated."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def forward_flops(config: LLaDAConfig, work: dict[str, int]) -> float:
    """Model FLOPs of the work counted by the sampler (BENCHMARKING.md): 2 x non-embedding
    parameters per query position, 2 x d_model x vocab per LM-head position, and the attention
    products (4 x head_dim x heads per attended pair per layer)."""
    d, layers = config.d_model, config.n_layers
    kv = config.effective_n_kv_heads * config.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.hidden_size
    attention = 4 * config.n_heads * config.head_dim * layers
    return (
        2 * per_layer * layers * work["query_positions"]
        + attention * work["attended_pairs"]
        + 2 * d * config.padded_vocab_size * work["head_positions"]
    )


def random_model(size: str) -> tuple[LLaDAModel, None]:
    shapes = {"100M": dict(d_model=768, n_heads=12, n_layers=12, mlp_hidden_size=2048)}
    if size not in shapes:
        raise ValueError(f"--random-model must be one of {sorted(shapes)}")
    config = LLaDAConfig(
        **shapes[size],
        n_kv_heads=12,
        vocab_size=2048,
        embedding_size=2048,
        max_sequence_length=4096,
        mask_token_id=2,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = LLaDAModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    from llada.tokens import resolve_special_tokens

    model.special_tokens = resolve_special_tokens(
        {"mask_token_id": 2, "eos_token_id": 1, "pad_token_id": 1}, None, 2048
    )
    return model.eval(), None


def answer_tokens(row: list[int], stop: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[:i]
    return row


def run_setting(model, tokenizer, examples, prompts, config, batch, methods, device, warmup=2):
    stop = model.special_tokens.stop_ids
    figures = {
        m: {"seconds": [], "tokens": [], "nfe": [], "correct": 0, "n": 0, "same": 0}
        for m in methods
    }
    work = {m: {"query_positions": 0, "attended_pairs": 0, "head_positions": 0} for m in methods}
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    groups = [g for g in groups if len(g) == batch]
    warm = groups[0]
    for method in methods:
        for _ in range(warmup):
            ids, mask = left_pad(warm, model.special_tokens.pad_id)
            sample(model, ids.to(device), mask.to(device), config, DECODERS[method])
    for index, group in enumerate(groups):
        ids, mask = left_pad(group, model.special_tokens.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        reference_answers = None
        for method in methods:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = sample(model, ids, mask, config, DECODERS[method])
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            rows = result.tokens[:, ids.shape[1] :].tolist()
            answers = [answer_tokens(r, stop) for r in rows]
            f = figures[method]
            f["seconds"].append(elapsed)
            f["tokens"].append(sum(map(len, answers)))
            f["nfe"].append(result.forward_passes)
            if method == "reference":
                reference_answers = answers
            if reference_answers is not None:
                f["same"] += sum(a == b for a, b in zip(answers, reference_answers, strict=True))
            for key in work[method]:
                work[method][key] += result.work[key]
            if tokenizer is not None:
                for row, answer in enumerate(answers):
                    example = examples[index * batch + row]
                    reply = tokenizer.decode(answer, skip_special_tokens=True)
                    f["correct"] += int(is_correct(example, reply))
                    f["n"] += 1
    out = {}
    for method, f in figures.items():
        rates = [t / s for t, s in zip(f["tokens"], f["seconds"], strict=True)]
        out[method] = {
            "tokens_per_s": statistics.median(rates),
            "nfe_per_seq": sum(f["nfe"]) / len(f["nfe"]),
            "tpf": sum(f["tokens"]) / (sum(f["nfe"]) * batch),
            "accuracy": f["correct"] / f["n"] if f["n"] else None,
            # Answers identical to the reference sampler's (a quality figure without labels).
            "same_as_reference": f["same"] / (len(f["seconds"]) * batch),
            "flops": forward_flops(model.config, work[method]) / sum(f["seconds"]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llada-tiny-instruct")
    parser.add_argument(
        "--random-model", default=None, help="e.g. 100M: random weights, speed only"
    )
    parser.add_argument("--prompts", type=int, default=48, help="prompts per setting")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=sorted(DECODERS), metavar="METHOD"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per method")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.random_model:
        model, tokenizer = random_model(args.random_model)
        model = model.to(device, getattr(torch, args.dtype) if args.dtype else torch.float32)
        examples = []
        prompts = [[(17 * i + j) % 2000 + 6 for j in range(24)] for i in range(args.prompts)]
    else:
        model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device)
        # Equal numbers of every generated task, interleaved.
        tasks = build_task_sets(None, eval_per_task=args.prompts, sft_per_task={}).evaluation
        by_task: dict[str, list] = {}
        for e in tasks:
            by_task.setdefault(e.task, []).append(e)
        examples = [e for group in zip(*by_task.values(), strict=True) for e in group]
        examples = examples[: args.prompts]
        prompts = [
            encode_chat(tokenizer, [{"role": "user", "content": e.prompt}]) for e in examples
        ]
    peak = matmul_flops(device, model.dtype)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    header = {
        "model": args.random_model or str(args.model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(model.dtype),
        "commit": commit,
        "matmul_flops": peak,
    }
    print(json.dumps(header))
    results = []
    for gen_length in args.gen_lengths:
        for block in args.blocks:
            if gen_length % block:
                continue
            config = GenerateConfig(steps=gen_length, gen_length=gen_length, block_length=block)
            for batch in args.batch_sizes:
                figures = run_setting(
                    model,
                    tokenizer,
                    examples,
                    prompts,
                    config,
                    batch,
                    args.methods,
                    device,
                    args.warmup,
                )
                reference = figures.get("reference")
                best = max(
                    (f for m, f in figures.items() if m.startswith("fastdllm")),
                    key=lambda f: f["tokens_per_s"],
                    default=None,
                )
                print(f"\ngen_length {gen_length}, block {block}, batch {batch}")
                print(
                    f"{'method':<17}{'tok/s':>9}{'x ref':>8}{'x best FD':>10}{'NFE':>8}"
                    f"{'TPF':>6}{'acc':>7}{'=ref':>6}{'%peak':>7}"
                )
                for method, f in figures.items():
                    vs_ref = f["tokens_per_s"] / reference["tokens_per_s"] if reference else None
                    vs_fd = f["tokens_per_s"] / best["tokens_per_s"] if best else None
                    acc = "-" if f["accuracy"] is None else f"{f['accuracy']:.1%}"
                    print(
                        f"{method:<17}{f['tokens_per_s']:>9.1f}"
                        f"{(vs_ref or 0):>8.2f}{(vs_fd or 0):>10.2f}{f['nfe_per_seq']:>8.1f}"
                        f"{f['tpf']:>6.2f}{acc:>7}{f['same_as_reference']:>6.0%}"
                        f"{f['flops'] / peak:>7.1%}"
                    )
                    f.update(x_reference=vs_ref, x_best_fastdllm=vs_fd)
                results.append(
                    dict(gen_length=gen_length, block_length=block, batch=batch, methods=figures)
                )
    print(json.dumps({**header, "results": results}))


if __name__ == "__main__":
    main()
