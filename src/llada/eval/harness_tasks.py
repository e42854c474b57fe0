"""lm-evaluation-harness tasks over the shipped models' own data, written as local files.

They exercise the three request types of the `llada` harness model on models that know
something, offline:

- `llada_shakespeare_heldout` (`loglikelihood_rolling`): document perplexity on the end of
  The Winter's Tale, which lies inside the part of the corpus held out from pre-training
  (the last 2% of the token file; the works are concatenated in alphabetical order).
- `llada_tiny_choice` (`multiple_choice`): the generated tasks' questions with the right answer
  among wrong ones (the sequence copied, reversed or sorted; nearby numbers), scored by the
  ELBO of each answer given the chat-formatted question.
- `llada_tiny_generate` (`generate_until`): the same questions answered by the sampler, exact
  match (the harness's twin of `llada eval tasks`).

Each task is a YAML file with `dataset_path: json` and a JSONL file beside it, so
`lm_eval --include-path FOLDER` (or `llada eval lm-eval --include-path FOLDER`) finds them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .tasks import EVAL_SEED, SYNTHETIC_TASKS, Example, synthetic_examples

PERPLEXITY_TASK = "llada_shakespeare_heldout"
CHOICE_TASK = "llada_tiny_choice"
GENERATE_TASK = "llada_tiny_generate"
HARNESS_TASKS = (PERPLEXITY_TASK, CHOICE_TASK, GENERATE_TASK)

HELD_OUT_WORK = "winters_tale"


def heldout_documents(corpus: str | Path, lines: int = 600, per_document: int = 60) -> list[str]:
    """The last `lines` lines of The Winter's Tale, cut into documents of `per_document`
    lines (about 500 tokens each)."""
    path = Path(corpus) / f"{HELD_OUT_WORK}.txt"
    if not path.is_file():
        raise ValueError(f"{path} not found: pass the Shakespeare corpus folder")
    text_lines = path.read_text(encoding="utf-8").rstrip().splitlines()[-lines:]
    return [
        "\n".join(text_lines[start : start + per_document]).strip()
        for start in range(0, len(text_lines), per_document)
    ]


def _wrong_answers(example: Example, rng: random.Random) -> list[str]:
    if example.task == "arithmetic":
        value = int(example.answer)
        return [str(v) for v in (value + 1, value - 1, value + 10, value - 10) if v >= 0]
    items = example.prompt.split("\n", 1)[1].split()
    numeric = all(item.isdigit() for item in items)
    ordered = sorted(items, key=int) if numeric else sorted(items)
    shuffled = list(items)
    rng.shuffle(shuffled)
    candidates = [items, items[::-1], ordered, ordered[::-1], shuffled]
    return [" ".join(c) for c in candidates]


def interleaved_questions(per_task: int) -> list[Example]:
    """The evaluation questions of every generated task, one of each in turn (so that lm-eval's
    `--limit` keeps every task)."""
    by_task = [synthetic_examples(task, per_task, EVAL_SEED) for task in SYNTHETIC_TASKS]
    return [example for group in zip(*by_task, strict=True) for example in group]


def choice_documents(per_task: int) -> list[dict]:
    """The questions, each with the right answer and up to 4 distinct wrong ones, in a seeded
    order."""
    rng = random.Random("choices")
    documents = []
    for example in interleaved_questions(per_task):
        choices = [example.answer]
        for wrong in _wrong_answers(example, rng):
            if wrong not in choices:
                choices.append(wrong)
        choices = choices[:5]
        rng.shuffle(choices)
        documents.append(
            {
                "task": example.task,
                "question": example.prompt,
                "choices": choices,
                "answer": choices.index(example.answer),
            }
        )
    return documents


def generate_documents(per_task: int) -> list[dict]:
    return [
        {"task": e.task, "question": e.prompt, "answer": e.answer}
        for e in interleaved_questions(per_task)
    ]


def _task_config(name: str, data: Path) -> dict:
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
    }
    if name == PERPLEXITY_TASK:
        return {
            **common,
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": name, "aggregation": aggregation, "higher_is_better": False}
                for name, aggregation in (
                    ("word_perplexity", "weighted_perplexity"),
                    ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"),
                )
            ],
        }
    if name == CHOICE_TASK:
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "{{question}}",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            # The answers are trained to start the reply with no space before them.
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    return {
        **common,
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32, "do_sample": False},
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "regexes_to_ignore": ["^\\s+", "\\s+$"],
            }
        ],
    }


def write_harness_tasks(out: str | Path, corpus: str | Path, per_task: int = 100) -> list[Path]:
    """Write the three tasks (YAML + JSONL each) to `out`; returns the YAML paths."""
    import yaml

    if per_task <= 0:
        raise ValueError(f"per_task must be positive, got {per_task}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    documents = {
        PERPLEXITY_TASK: [{"text": text} for text in heldout_documents(corpus)],
        CHOICE_TASK: choice_documents(per_task),
        GENERATE_TASK: generate_documents(per_task),
    }
    written = []
    for name, rows in documents.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        config = folder / f"{name}.yaml"
        config.write_text(yaml.safe_dump(_task_config(name, data), sort_keys=False))
        written.append(config)
    return written
