"""The reversal-curse evaluation (the reference's eval_reverse.py in ML-GSAI/LLaDA).

Data: a JSON list of {"first", "second", "source"} consecutive-line pairs (the reference's
data/poem_data.json of classical Chinese poetry, or pairs of our corpus lines written by
`corpus_pairs_json`). Forward ("ftb") asks for the line after `first`; backward ("btf") for
the line before `second`. A reply counts when it contains the target line, as in the reference.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Direction = Literal["ftb", "btf"]
DIRECTIONS: tuple[Direction, ...] = ("ftb", "btf")
PromptStyle = Literal["reference", "english"]

# The reference's prompt suffix: "just output the sentence directly".
REFERENCE_EXTRA = " 直接输出句子即可。"


@dataclass(frozen=True)
class LinePair:
    first: str
    second: str
    source: str = ""


def load_pairs(path: str | Path) -> list[LinePair]:
    """Line pairs from a poem_data.json-style file, with a clear error for anything else."""
    with open(path, encoding="utf-8") as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'first', 'second'}} objects")
    pairs = []
    for i, item in enumerate(items):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("first"), str)
            and isinstance(item.get("second"), str)
        ):
            raise ValueError(
                f"{path}: item {i} must be an object with string fields 'first' and 'second'"
            )
        pairs.append(LinePair(item["first"], item["second"], str(item.get("source", ""))))
    return pairs


def question(pair: LinePair, direction: Direction, style: PromptStyle) -> tuple[str, str]:
    """(prompt, target) for one pair. 'reference' is eval_reverse.py's Chinese prompt;
    'english' is the wording the shipped instruct model was fine-tuned with."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if style == "reference":
        if direction == "ftb":
            return pair.first + "的下一句是什么？" + REFERENCE_EXTRA, pair.second
        return pair.second + "的上一句是什么？" + REFERENCE_EXTRA, pair.first
    if style == "english":
        if direction == "ftb":
            return f'Which line follows "{pair.first}"?', pair.second
        return f'Which line precedes "{pair.second}"?', pair.first
    raise ValueError(f"prompt style must be 'reference' or 'english', got {style!r}")


@dataclass
class ReversalResult:
    direction: Direction
    accuracy: float
    n: int
    replies: list[dict]


def evaluate_reversal(
    model,
    tokenizer,
    pairs: Sequence[LinePair],
    direction: Direction,
    sampler_config,
    style: PromptStyle = "reference",
    batch_size: int = 16,
    decode=None,
    progress: bool = False,
) -> ReversalResult:
    """Accuracy of one direction: the share of replies that contain the target line.

    The reference answers one prompt at a time; batches with left padding give the same
    replies (batch rows equal single rows), only faster."""
    from ..api import generate_texts

    questions = [question(p, direction, style) for p in pairs]
    replies: list[dict] = []
    starts = range(0, len(questions), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=direction, unit="batch")
    for start in starts:
        chunk = questions[start : start + batch_size]
        texts = generate_texts(
            model, tokenizer, [prompt for prompt, _ in chunk], sampler_config, decode=decode
        )
        for (prompt, target), reply in zip(chunk, texts, strict=True):
            replies.append(
                {"prompt": prompt, "target": target, "reply": reply, "correct": target in reply}
            )
    correct = sum(r["correct"] for r in replies)
    return ReversalResult(direction, correct / max(1, len(replies)), len(replies), replies)


def corpus_pairs_json(
    corpus: str | Path,
    path: str | Path,
    count: int,
    taught: bool = True,
    num_recall_pairs: int | None = None,
) -> Path:
    """Write corpus line pairs in the poem_data.json format.

    taught=True: the pairs the instruct SFT asked about in both directions (recall of
    memorised text); taught=False: other pairs, seen only forward in pre-training (the
    reversal-curse probe proper). `num_recall_pairs` must be the SFT data's (default: ours)."""
    from .tasks import DEFAULT_NUM_RECALL_PAIRS, VALIDATION_WORKS, corpus_line_pairs, recall_pairs

    pairs = corpus_line_pairs(corpus, exclude=VALIDATION_WORKS)
    recall = recall_pairs(pairs, seed=0, count=num_recall_pairs or DEFAULT_NUM_RECALL_PAIRS)
    if taught:
        chosen = recall[:count]
    else:
        recalled = {line for pair in recall for line in pair}
        chosen = [p for p in pairs if p[0] not in recalled and p[1] not in recalled]
        chosen = chosen[:: max(1, len(chosen) // max(1, count))][:count]
    records = [{"first": a, "second": b, "source": "corpus"} for a, b in chosen]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
