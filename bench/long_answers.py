"""Long answers: every sampler on the base model's raw continuation of fixed Shakespeare prompts,
with a fixed gen_length and no stop at EOS, against the peers' own code run on the same model
(../shared/BENCHMARKING.md).

The shipped instruct model answers in 3-10 tokens, so early stop dominates the speed figures
measured on it (bench/sampling_speed.py). Here every answer is gen_length tokens long (256 or
1024), so the figures show the cost of decoding itself: tokens per forward (TPF) and the cost of
each forward.

Methods, all at temperature 0, block 32, steps = gen_length:
- `llada.generate`: our reference sampler (one token per forward), the quality yardstick;
- `sample:<preset>`: `llada.sample` with each preset ('reference', 'fast', 'fastest',
  'fastdllm-prefix', 'fastdllm-dual'), with `early_stop=False` (no stop at EOS);
- with `--reference PATH` (a checkout of ML-GSAI/LLaDA): its `generate.py` `generate`, run on
  our model (which answers `model(x, attention_mask=...).logits` as the reference does);
- with `--fastdllm PATH` (a checkout of NVlabs/Fast-dLLM): its `llada/generate.py` `generate`,
  `generate_with_prefix_cache` and `generate_with_dual_cache` at threshold 0.9 (its published
  setting), run on its own model class (`llada/model/modeling_llada.py`, which needs einops)
  built from the checkpoint's config.json with our checkpoint's weights: the checkpoint is in the
  official LLaDA layout, so no conversion is needed (its logits equal ours). Its functions build
  a batch of one row, so they run at batch 1 only.
Nothing of the peers' code is copied here: their files are imported from the checkout given.

Per method and setting: tokens/s (per sequence at batch 1, the batch's at batch > 1; a token is
an answer token before the first EOS/EoT), forward passes per sequence (NFE), tokens per forward
(TPF), agreement with `llada.generate`'s answer tokens (position by position, and whole answers
equal), and achieved FLOP/s as a share of a large matmul's rate measured in the same run. FLOPs
per forward are counted by a hook on the model: 2 x non-embedding parameters x query positions
+ 2 x d_model x vocab x LM-head positions + 4 x d_model x layers x query positions x canvas
length (a cached window attends the whole canvas). Methods alternate prompt by prompt
(A B C A B C ...) after two warm-up calls each (at gen_length = block_length, to warm the
allocator and the caches' code without paying a long answer twice).

    python bench/long_answers.py --gen-lengths 256 --batch-sizes 1 --prompts 2 \\
        --fastdllm /tmp/Fast-dLLM --reference /tmp/LLaDA

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import llada
from llada.api import load
from llada.sampling.config import PRESETS, GenerateConfig
from llada.sampling.fast import sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_speed import answer_tokens, matmul_flops  # noqa: E402

PRESET_NAMES = ("reference", "fast", "fastest", "fastdllm-prefix", "fastdllm-dual")
# Fixed prompts: openings of passages from Shakespeare's plays (public domain), which the base
# model was trained on; its continuation is the long answer.
PROMPTS = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n",
    "Friends, Romans, countrymen, lend me your ears;\nI come to bury Caesar, not to praise him.\n",
    "All the world's a stage,\nAnd all the men and women merely players;\n",
    "If music be the food of love, play on;\nGive me excess of it, that, surfeiting,\n",
    "O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n",
    "Tomorrow, and tomorrow, and tomorrow,\nCreeps in this petty pace from day to day\n",
    "The quality of mercy is not strain'd,\nIt droppeth as the gentle rain from heaven\n",
)
FASTDLLM_THRESHOLD = 0.9  # Fast-dLLM's published confidence threshold


def import_file(name: str, path: Path):
    """A module from a file of a peer's checkout, under a name of our choosing."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fastdllm_model(checkout: Path, folder: Path, dtype: torch.dtype):
    """Fast-dLLM's own model class (llada/model/modeling_llada.py of `checkout`) holding the
    weights of our checkpoint `folder` (official LLaDA layout: the names match as they are)."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(checkout / "llada"))
    try:
        from model.configuration_llada import LLaDAConfig as TheirConfig
        from model.modeling_llada import LLaDAModelLM
    except ImportError as error:
        raise SystemExit(
            f"--fastdllm: cannot import its model from {checkout}/llada/model ({error}); "
            "it needs einops (pip install einops)"
        ) from error
    config = TheirConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    # The official config.json says use_cache false, which their forward reads when a call does
    # not pass use_cache; this transformers' config no longer keeps the key by default.
    config.use_cache = False
    model = LLaDAModelLM(config)
    weights = load_file(folder / "model.safetensors")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True)
    return model.to(dtype).eval()


class ForwardCounter:
    """Counts forward calls and their model FLOPs (module docstring) through a pre-hook."""

    def __init__(self, model: torch.nn.Module, params: int, d: int, vocab: int, layers: int):
        self.params, self.d, self.vocab, self.layers = params, d, vocab, layers
        self.calls = 0
        self.flops = 0.0
        self.canvas = 0
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        batch, query = ids.shape
        at = kwargs.get("logits_at")
        head = (
            batch * query if at is None else int(at.sum() if at.dtype == torch.bool else at.numel())
        )
        self.calls += 1
        self.flops += (
            2 * self.params * batch * query
            + 2 * self.d * self.vocab * head
            + 4 * self.d * self.layers * batch * query * self.canvas
        )


def build_methods(args, model, tokenizer, mask_id: int) -> dict:
    """name -> (callable(ids, config) -> tokens (B, Lp + gen_length), batch-1-only, counter
    model)."""
    methods: dict = {
        "llada.generate": (
            lambda ids, c: llada.generate(
                model,
                ids,
                steps=c.steps,
                gen_length=c.gen_length,
                block_length=c.block_length,
                temperature=0.0,
                mask_id=mask_id,
            ),
            False,
            model,
        )
    }
    for preset in PRESET_NAMES:
        decode = replace(PRESETS[preset], early_stop=False)
        methods[f"sample:{preset}"] = (
            lambda ids, c, d=decode: sample(model, ids, None, c, d, mask_id).tokens,
            False,
            model,
        )
    if args.reference:
        peer = import_file("mlgsai_generate", Path(args.reference) / "generate.py")
        methods["ML-GSAI generate"] = (
            lambda ids, c: peer.generate(
                model,
                ids,
                steps=c.steps,
                gen_length=c.gen_length,
                block_length=c.block_length,
                temperature=0.0,
                mask_id=mask_id,
            ),
            False,
            model,
        )
    if args.fastdllm:
        checkout = Path(args.fastdllm)
        theirs = fastdllm_model(checkout, Path(args.model), model.dtype)
        fast = import_file("fastdllm_generate", checkout / "llada" / "generate.py")
        for label, fn in (
            ("parallel", fast.generate),
            ("prefix", fast.generate_with_prefix_cache),
            ("dual", fast.generate_with_dual_cache),
        ):
            methods[f"Fast-dLLM {label} 0.9"] = (
                lambda ids, c, fn=fn: fn(
                    theirs,
                    ids,
                    steps=c.steps,
                    gen_length=c.gen_length,
                    block_length=c.block_length,
                    temperature=0.0,
                    mask_id=mask_id,
                    threshold=FASTDLLM_THRESHOLD,
                )[0],
                True,
                theirs,
            )
    return methods


def run_setting(methods, counters, prompts, gen_length, block, batch, stop, warmup) -> dict:
    config = GenerateConfig(steps=gen_length, gen_length=gen_length, block_length=block)
    warm_config = GenerateConfig(steps=block, gen_length=block, block_length=block)
    names = [m for m, (_, batch_one, _) in methods.items() if batch == 1 or not batch_one]
    groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    groups = [torch.tensor(g) for g in groups if len(g) == batch]
    figures = {m: {"seconds": [], "tokens": [], "nfe": 0, "flops": 0.0} for m in names}
    agree = {m: {"positions": 0, "same": 0, "answers": 0, "equal": 0} for m in names}
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                methods[name][0](groups[0], warm_config)
        for ids in groups:
            reference = None
            for name in names:
                counter = counters[id(methods[name][2])]
                counter.canvas = ids.shape[1] + gen_length
                calls, flops = counter.calls, counter.flops
                start = time.perf_counter()
                tokens = methods[name][0](ids, config)
                elapsed = time.perf_counter() - start
                rows = tokens[:, ids.shape[1] :].tolist()
                answers = [answer_tokens(r, stop) for r in rows]
                f = figures[name]
                f["seconds"].append(elapsed)
                f["tokens"].append(sum(map(len, answers)))
                f["nfe"] += counter.calls - calls
                f["flops"] += counter.flops - flops
                if name == "llada.generate":
                    reference = rows
                a = agree[name]
                for row, ref in zip(rows, reference or rows, strict=True):
                    a["positions"] += len(row)
                    a["same"] += sum(x == y for x, y in zip(row, ref, strict=True))
                    a["answers"] += 1
                    a["equal"] += int(row == ref)
    out = {}
    for name, f in figures.items():
        rates = [t / s for t, s in zip(f["tokens"], f["seconds"], strict=True)]
        sequences = len(f["seconds"]) * batch
        out[name] = {
            "tokens_per_s": statistics.median(rates),
            "answer_tokens_per_seq": sum(f["tokens"]) / sequences,
            "nfe_per_seq": f["nfe"] / len(f["seconds"]),
            "tpf": sum(f["tokens"]) / (f["nfe"] * batch),
            "same_tokens": agree[name]["same"] / agree[name]["positions"]
            if "llada.generate" in figures
            else None,
            "same_answers": agree[name]["equal"] / agree[name]["answers"]
            if "llada.generate" in figures
            else None,
            "flops_per_s": f["flops"] / sum(f["seconds"]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/llada-tiny-base")
    parser.add_argument("--prompts", type=int, default=8, help=f"at most {len(PROMPTS)}")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=None, help="default: all available")
    parser.add_argument("--fastdllm", default=None, help="a checkout of NVlabs/Fast-dLLM")
    parser.add_argument("--reference", default=None, help="a checkout of ML-GSAI/LLaDA")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per method")
    parser.add_argument(
        "--no-yardstick",
        dest="yardstick",
        action="store_false",
        help="leave out llada.generate (the reference sampler, the slowest method): no x ref, "
        "=tok or =ans figures; for timing the fast methods alone",
    )
    args = parser.parse_args()
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}, got {args.prompts}")
    for flag, path, inside in (
        ("--fastdllm", args.fastdllm, "llada/generate.py"),
        ("--reference", args.reference, "generate.py"),
    ):
        if path and not (Path(path) / inside).is_file():
            parser.error(f"{flag} {path}: no {inside} there; give the repository's root folder")
    device = torch.device(args.device)
    model, tokenizer, _ = load(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    tokens = model.special_tokens
    methods = build_methods(args, model, tokenizer, tokens.mask_id)
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            parser.error(f"--methods: unknown {unknown}; choose from {list(methods)}")
        keep = set(args.methods) | ({"llada.generate"} if args.yardstick else set())
        methods = {m: v for m, v in methods.items() if m in keep}
    config = model.config
    params = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith(("embed", "lm_head"))
    )
    counters = {
        id(m): ForwardCounter(m, params, config.d_model, config.padded_vocab_size, config.n_layers)
        for m in {id(v[2]): v[2] for v in methods.values()}.values()
    }
    # Every prompt cut to the same length, so that a batch needs no padding.
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[: args.prompts]]
    width = min(map(len, encoded))
    prompts = [e[:width] for e in encoded]
    peak = matmul_flops(device, model.dtype)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    header = {
        "model": str(args.model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": args.device,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(model.dtype),
        "commit": commit,
        "matmul_flops": peak,
        "prompt_tokens": width,
        "prompts": args.prompts,
        "block_length": args.block,
        "fastdllm": args.fastdllm,
        "reference": args.reference,
    }
    print(json.dumps(header))
    results = []
    for gen_length in args.gen_lengths:
        for batch in args.batch_sizes:
            figures = run_setting(
                methods,
                counters,
                prompts,
                gen_length,
                args.block,
                batch,
                tokens.stop_ids,
                args.warmup,
            )
            base = figures["llada.generate"]["tokens_per_s"] if args.yardstick else None
            theirs = [f for m, f in figures.items() if m.startswith("Fast-dLLM")]
            ours = [f for m, f in figures.items() if m.startswith("sample:fastdllm")]
            best = max(theirs or ours, key=lambda f: f["tokens_per_s"], default=None)
            print(f"\ngen_length {gen_length}, block {args.block}, batch {batch}")
            print(
                f"{'method':<24}{'tok/s':>8}{'x ref':>7}{'x best FD':>10}{'NFE':>7}{'TPF':>6}"
                f"{'=tok':>7}{'=ans':>6}{'%peak':>7}"
            )
            for name, f in figures.items():
                f["x_reference"] = f["tokens_per_s"] / base if base else None
                f["x_best_fastdllm"] = f["tokens_per_s"] / best["tokens_per_s"] if best else None
                same = (
                    f"{f['same_tokens']:>7.1%}{f['same_answers']:>6.0%}"
                    if args.yardstick
                    else f"{'-':>7}{'-':>6}"
                )
                print(
                    f"{name:<24}{f['tokens_per_s']:>8.1f}"
                    + (f"{f['x_reference']:>7.2f}" if base else f"{'-':>7}")
                    + f"{(f['x_best_fastdllm'] or 0):>10.2f}{f['nfe_per_seq']:>7.0f}"
                    + f"{f['tpf']:>6.2f}{same}{f['flops_per_s'] / peak:>7.1%}"
                )
            results.append(
                dict(
                    gen_length=gen_length,
                    block_length=args.block,
                    batch=batch,
                    best_fastdllm="their code" if theirs else "our re-implementation",
                    methods=figures,
                )
            )
    print(json.dumps({**header, "results": results}))


if __name__ == "__main__":
    main()
