"""Does a row's answer depend on what else is in its batch? 64 varied prompts (the shipped
instruct model's tasks, mixed prompt lengths) are answered in one left-padded batch and each
alone; the rows whose answers differ are counted, per preset and dtype, with and without
`DecodeConfig(batch_invariant=True)`.

    OMP_NUM_THREADS=1 python bench/batch_invariance.py
    OMP_NUM_THREADS=1 python bench/batch_invariance.py --dtypes bfloat16 --presets fast
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch

from llada.api import generate_texts, load
from llada.sampling.config import PRESETS, GenerateConfig

WORDS = "king moon sword apple river stone cloud tiger lamp ocean green seven paper house bird fire"


def prompts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = WORDS.split()
    out = []
    for _ in range(count):
        kind = rng.choice(["copy", "reverse", "sort", "add"])
        if kind == "add":
            out.append(f"What is {rng.randint(10, 99)} + {rng.randint(10, 99)}?")
            continue
        sequence = " ".join(rng.sample(words, rng.randint(2, 8)))
        lead = {"copy": "Copy this: ", "reverse": "Reverse the order:\n", "sort": "Sort these:\n"}
        out.append(lead[kind] + sequence)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/llada-tiny-instruct")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--presets", default="fast,fastest,reference")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=32)
    args = parser.parse_args()
    questions = prompts(args.prompts)
    config = GenerateConfig(
        steps=args.gen_length, gen_length=args.gen_length, block_length=min(32, args.gen_length)
    )
    print(
        f"{len(questions)} prompts, gen_length {args.gen_length}, {torch.get_num_threads()} threads"
    )
    for dtype_name in args.dtypes.split(","):
        model, tokenizer, _ = load(args.model, dtype=getattr(torch, dtype_name))
        for name in args.presets.split(","):
            alone = [
                generate_texts(model, tokenizer, [q], config, decode=PRESETS[name])[0]
                for q in questions
            ]
            for invariant in (False, True):
                decode = dataclasses.replace(PRESETS[name], batch_invariant=invariant)
                start = time.perf_counter()
                batched = generate_texts(model, tokenizer, questions, config, decode=decode)
                seconds = time.perf_counter() - start
                differ = [i for i, (a, b) in enumerate(zip(batched, alone, strict=True)) if a != b]
                print(
                    f"{dtype_name:9} {name:9} batch_invariant={str(invariant):5} "
                    f"{len(differ):2}/{len(questions)} rows differ from alone {differ} "
                    f"(batch {seconds:.1f} s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
