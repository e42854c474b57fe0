"""Generated chat tasks with checkable answers: the SFT data of llada-tiny-instruct and the
quality figure of every speed claim.

Tasks: two-digit arithmetic; copying, reversing and sorting short sequences; and, over lines
of the pre-training corpus, "which line follows this one" and "which line precedes this one"
(the reversal-curse probe of the LLaDA paper, §3.3 / ML-GSAI/LLaDA eval_reverse.py, on our own
corpus).

Everything is a pure function of a seed, so the SFT set and the evaluation set are
reproducible. Synthetic evaluation questions are never SFT questions. The line tasks measure
recall of memorised text: a fixed set of corpus line pairs is taught in SFT and asked again
(a 7M-parameter model cannot recall lines it saw only in pre-training; the 8B models of the
paper are probed on poems they memorised in pre-training).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

WORDS = [
    "sun",
    "moon",
    "star",
    "river",
    "stone",
    "crown",
    "sword",
    "rose",
    "king",
    "queen",
    "lord",
    "lady",
    "ghost",
    "storm",
    "night",
    "day",
    "fire",
    "ice",
    "gold",
    "iron",
    "bird",
    "wolf",
    "horse",
    "ship",
    "tower",
    "bell",
    "book",
    "door",
    "field",
    "hill",
    "sea",
    "wind",
]


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def arithmetic(rng: random.Random) -> Example:
    operation = rng.choice("+-*")
    if operation == "*":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        value = a * b
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if operation == "-" and b > a:
            a, b = b, a
        value = a + b if operation == "+" else a - b
    return Example("arithmetic", f"What is {a} {operation} {b}?", str(value))


# The items follow a line break so that the first one is tokenized as at the start of the
# answer (byte-level BPE gives " sun" after a space but "sun" after a newline): the answer then
# repeats the question's very tokens.


def _sequence(rng: random.Random) -> list[str]:
    length = rng.randint(3, 6)
    if rng.random() < 0.5:
        return rng.sample(WORDS, length)
    return [str(rng.randint(0, 99)) for _ in range(length)]


def copy(rng: random.Random) -> Example:
    items = _sequence(rng)
    return Example("copy", f"Repeat exactly:\n{' '.join(items)}", " ".join(items))


def reverse(rng: random.Random) -> Example:
    items = _sequence(rng)
    return Example("reverse", f"Reverse the order:\n{' '.join(items)}", " ".join(reversed(items)))


def sort(rng: random.Random) -> Example:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    shown = " ".join(map(str, numbers))
    return Example(
        "sort", f"Sort in ascending order:\n{shown}", " ".join(map(str, sorted(numbers)))
    )


SYNTHETIC_TASKS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": arithmetic,
    "copy": copy,
    "reverse": reverse,
    "sort": sort,
}
LINE_TASKS = ("next_line", "previous_line")
ALL_TASKS = (*SYNTHETIC_TASKS, *LINE_TASKS)

_SPEAKER = re.compile(r"^[A-Z][A-Za-z ]{0,20}\.$")


def corpus_line_pairs(corpus: str | Path, exclude: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Consecutive verse/prose lines of one speech, (line, next line), 15 to 50 characters,
    skipping speaker labels, stage directions and headings. Works named in `exclude` (file
    stems, e.g. the validation tail of the pre-training split) are left out."""
    pairs: list[tuple[str, str]] = []
    for file in sorted(Path(corpus).glob("*.txt")):
        if file.stem in exclude:
            continue
        previous = None
        for raw in file.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            usable = (
                15 <= len(line) <= 50
                and not _SPEAKER.match(line)
                and not line.startswith(("[", "ACT", "Scene", "SCENE"))
                and '"' not in line
            )
            if not usable:
                previous = None
                continue
            if previous is not None:
                pairs.append((previous, line))
            previous = line
    return pairs


def recall_pairs(pairs: list[tuple[str, str]], seed: int, count: int) -> list[tuple[str, str]]:
    """The line pairs whose recall is taught and measured: `count` pairs from a fixed shuffle,
    no line in two pairs (so every question has one right answer)."""
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    chosen: list[tuple[str, str]] = []
    used: set[str] = set()
    for first, second in shuffled:
        if len(chosen) == count:
            break
        if first in used or second in used:
            continue
        chosen.append((first, second))
        used.update((first, second))
    return chosen


def line_examples(pairs: Sequence[tuple[str, str]]) -> list[Example]:
    examples = []
    for first, second in pairs:
        examples.append(Example("next_line", f'Which line follows "{first}"?', second))
        examples.append(Example("previous_line", f'Which line precedes "{second}"?', first))
    return examples


VERSE_PROMPTS = (
    "Write two lines in the style of Shakespeare.",
    "Say something as a Shakespeare character would.",
    "Give me two lines of a play.",
    "Speak like Shakespeare.",
)


def verse_examples(pairs: Sequence[tuple[str, str]], count: int) -> list[Example]:
    """Open-ended SFT examples (not evaluated): a request for Shakespeare-like text, answered
    by two consecutive corpus lines, so that the chat model also writes verse."""
    rng = random.Random("verse")
    chosen = list(pairs)[:count]
    return [Example("verse", rng.choice(VERSE_PROMPTS), f"{a}\n{b}") for a, b in chosen]


def synthetic_examples(task: str, count: int, seed: int) -> list[Example]:
    rng = random.Random(f"{task}:{seed}")
    return [SYNTHETIC_TASKS[task](rng) for _ in range(count)]


def is_correct(example: Example, reply: str) -> bool:
    """Exact match after trimming whitespace."""
    return reply.strip() == example.answer


# The last work alphabetically holds the pre-training validation tail (val_fraction 0.02):
# its lines are not used for recall questions.
VALIDATION_WORKS = ("winters_tale",)
EVAL_SEED = "eval"
SFT_SEED = "sft"
# Evaluation questions of each generated task that no training data ever asks: `llada eval
# tasks` asks the first --per-task of them (200 by default); preference pairs and RL rollouts
# are drawn from questions outside the first HELD_OUT_PER_TASK.
HELD_OUT_PER_TASK = 1000


DEFAULT_NUM_RECALL_PAIRS = 400
DEFAULT_SFT_COUNTS = {
    "arithmetic": 6000,
    "copy": 4000,
    "reverse": 4000,
    "sort": 4000,
    "verse": 1000,
}


@dataclass(frozen=True)
class TaskSet:
    sft: list[Example]
    evaluation: list[Example]


def held_out_prompts(tasks: Sequence[str]) -> set[str]:
    """The prompts of the first HELD_OUT_PER_TASK evaluation questions of each task."""
    return {
        e.prompt for task in tasks for e in synthetic_examples(task, HELD_OUT_PER_TASK, EVAL_SEED)
    }


def training_questions(tasks: Sequence[str], per_task: int) -> list[Example]:
    """`per_task` questions of each generated task for training data (preference pairs),
    none of them among the first HELD_OUT_PER_TASK evaluation questions."""
    sets = build_task_sets(
        None, eval_per_task=HELD_OUT_PER_TASK, sft_per_task=dict.fromkeys(tasks, per_task)
    )
    return sets.sft


def build_task_sets(
    corpus: str | Path | None,
    eval_per_task: int = 200,
    sft_per_task: dict[str, int] | None = None,
    num_recall_pairs: int = DEFAULT_NUM_RECALL_PAIRS,
    recall_repeats: int = 4,
) -> TaskSet:
    """The SFT examples and the evaluation examples.

    Synthetic tasks: evaluation questions never appear in SFT. Line tasks: the knowledge is a
    fixed set of `num_recall_pairs` corpus line pairs; SFT asks about each pair in both
    directions `recall_repeats` times, and evaluation asks about the first `eval_per_task` of
    them again, so it measures recall of memorised text, forward and backward, as the paper's
    poem probe does.
    """
    if sft_per_task is None:
        sft_per_task = DEFAULT_SFT_COUNTS
    evaluation: list[Example] = []
    for task in SYNTHETIC_TASKS:
        evaluation += synthetic_examples(task, eval_per_task, EVAL_SEED)
    held_out = {e.prompt for e in evaluation}
    sft: list[Example] = []
    for task, count in sft_per_task.items():
        if task not in SYNTHETIC_TASKS:
            continue
        rng = random.Random(f"{task}:{SFT_SEED}")
        made = 0
        while made < count:
            example = SYNTHETIC_TASKS[task](rng)
            if example.prompt not in held_out:
                sft.append(example)
                made += 1
    if corpus is not None:
        pairs = corpus_line_pairs(corpus, exclude=VALIDATION_WORKS)
        recall = recall_pairs(pairs, seed=0, count=max(num_recall_pairs, eval_per_task))
        evaluation += line_examples(recall[:eval_per_task])
        sft += line_examples(recall) * recall_repeats
        recalled = {line for pair in recall for line in pair}
        others = [p for p in pairs if p[0] not in recalled and p[1] not in recalled]
        sft += verse_examples(others, count=sft_per_task.get("verse", 0))
    random.Random(0).shuffle(sft)
    return TaskSet(sft=sft, evaluation=evaluation)


def write_chat_jsonl(examples: Sequence[Example], path: str | Path) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for example in examples:
            messages = [
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.answer},
            ]
            f.write(
                json.dumps({"task": example.task, "messages": messages}, ensure_ascii=False) + "\n"
            )
    return path


def evaluate_tasks(
    model,
    tokenizer,
    examples: Sequence[Example],
    sampler_config,
    batch_size: int = 32,
    progress: bool = False,
    decode=None,
) -> dict[str, dict[str, float]]:
    """Accuracy per task (exact match), answering each prompt through the chat template."""
    from ..api import generate_texts

    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    batches = range(0, len(examples), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="eval", unit="batch")
    for start in batches:
        chunk = examples[start : start + batch_size]
        replies = generate_texts(
            model, tokenizer, [e.prompt for e in chunk], sampler_config, decode=decode
        )
        for example, reply in zip(chunk, replies, strict=True):
            total[example.task] = total.get(example.task, 0) + 1
            correct[example.task] = correct.get(example.task, 0) + int(is_correct(example, reply))
    return {task: {"accuracy": correct[task] / total[task], "n": total[task]} for task in total}
