"""Preference pairs from a model's own answers on the generated tasks, for preference training
(`llada train --objective vrpo` / `dpo`): for each question the chosen answer is the task's
correct answer and the rejected one is a wrong answer the model itself produced, so the pairs
teach the model away from its own mistakes (as LLaDA 1.5's preference data pairs a preferred
and a dispreferred response to one prompt).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .tasks import Example, is_correct


@dataclass(frozen=True)
class PreferenceStats:
    """questions: asked; pairs: written; all_correct: questions every sample answered right (no
    rejected answer to pair with)."""

    questions: int
    pairs: int
    all_correct: int


def make_preferences(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    sampler_config,
    *,
    samples: int = 4,
    decode=None,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[list[dict[str, str]], PreferenceStats]:
    """Chat-record preference pairs {"prompt", "chosen", "rejected", "task"}: `samples` answers
    per question (temperature from `sampler_config`; > 0 gives different answers), and for a
    question with a wrong answer among them, the correct answer as chosen and the first wrong
    non-empty one as rejected. Round r answers every question after `torch.manual_seed(seed *
    1000003 + r)`, so the same call gives the same pairs."""
    from ..api import generate_texts

    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    wrong: dict[int, str] = {}
    for round_ in range(samples):
        torch.manual_seed(seed * 1000003 + round_)
        for start in range(0, len(examples), batch_size):
            chunk = range(start, min(start + batch_size, len(examples)))
            replies = generate_texts(
                model, tokenizer, [examples[i].prompt for i in chunk], sampler_config,
                decode=decode,
            )  # fmt: skip
            for i, reply in zip(chunk, replies, strict=True):
                text = reply.strip()
                if text and not is_correct(examples[i], reply) and i not in wrong:
                    wrong[i] = text
    pairs = [
        {
            "prompt": examples[i].prompt,
            "chosen": examples[i].answer,
            "rejected": wrong[i],
            "task": examples[i].task,
        }
        for i in sorted(wrong)
    ]
    return pairs, PreferenceStats(len(examples), len(pairs), len(examples) - len(pairs))


def write_preferences(pairs: Sequence[dict[str, str]], path: str | Path) -> Path:
    """One JSON object per line, as `llada train --objective vrpo` reads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    return path
