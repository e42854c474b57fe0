"""The generated tasks: answers are right, SFT and evaluation never share a question."""

from __future__ import annotations

import random

from llada.eval.tasks import (
    SYNTHETIC_TASKS,
    Example,
    build_task_sets,
    corpus_line_pairs,
    is_correct,
)


def _corpus(tmp_path):
    rng = random.Random(0)
    words = [
        "thou",
        "art",
        "the",
        "king",
        "of",
        "all",
        "this",
        "land",
        "and",
        "more",
        "than",
        "that",
        "my",
        "lord",
    ]
    for work in ("hamlet", "macbeth", "winters_tale"):
        lines = ["ACT I.", "", "Ham."]
        for _ in range(300):
            lines.append(" ".join(rng.choice(words) for _ in range(6)).capitalize() + ",")
        (tmp_path / f"{work}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_synthetic_answers_are_right():
    rng = random.Random(1)
    for _ in range(200):
        example = SYNTHETIC_TASKS["arithmetic"](rng)
        question = example.prompt.removeprefix("What is ").removesuffix("?")
        assert str(eval(question)) == example.answer  # noqa: S307 - our own generated text
        sort = SYNTHETIC_TASKS["sort"](rng)
        numbers = [int(n) for n in sort.prompt.split(":\n")[1].split()]
        assert sort.answer == " ".join(map(str, sorted(numbers)))
        reverse = SYNTHETIC_TASKS["reverse"](rng)
        assert reverse.answer.split() == reverse.prompt.split(":\n")[1].split()[::-1]


def test_synthetic_questions_are_held_out_and_line_questions_are_taught(tmp_path):
    corpus = _corpus(tmp_path)
    sft_per_task = {"arithmetic": 500, "copy": 100, "verse": 20}
    sets = build_task_sets(
        corpus, eval_per_task=50, sft_per_task=sft_per_task, num_recall_pairs=80, recall_repeats=3
    )
    sft_prompts = {e.prompt for e in sets.sft}
    synthetic = [e for e in sets.evaluation if e.task in SYNTHETIC_TASKS]
    lines = [e for e in sets.evaluation if e.task in ("next_line", "previous_line")]
    assert synthetic and not {e.prompt for e in synthetic} & sft_prompts
    # Line recall asks again what SFT taught (3 times each, both directions): memorised text.
    assert len(lines) == 100 and {e.prompt for e in lines} <= sft_prompts
    assert sum(e.task == "next_line" for e in sets.sft) == 3 * 80
    # Each recall line has one right answer, and the verse examples use other lines.
    answers = {}
    for e in sets.sft:
        if e.task in ("next_line", "previous_line"):
            assert answers.setdefault(e.prompt, e.answer) == e.answer
    recalled = {e.answer for e in sets.sft if e.task in ("next_line", "previous_line")}
    verse_lines = {line for e in sets.sft if e.task == "verse" for line in e.answer.split("\n")}
    assert verse_lines and not verse_lines & recalled
    tasks = {e.task for e in sets.evaluation}
    assert tasks == {"arithmetic", "copy", "reverse", "sort", "next_line", "previous_line"}
    assert sum(e.task == "verse" for e in sets.sft) == 20


def test_line_pairs_skip_labels_and_the_validation_work(tmp_path):
    corpus = _corpus(tmp_path)
    pairs = corpus_line_pairs(corpus, exclude=("winters_tale",))
    assert pairs and all(15 <= len(a) <= 50 and not a.startswith("ACT") for a, _ in pairs)
    assert len(pairs) < len(corpus_line_pairs(corpus))


def test_exact_match():
    example = Example("copy", "Repeat exactly: a b", "a b")
    assert is_correct(example, " a b\n") and not is_correct(example, "a b c")


def test_make_sft_counts_per_task_and_refuses_unknown_tasks(tmp_path, capsys):
    import json

    from llada.cli.main import main

    corpus = _corpus(tmp_path)
    out = tmp_path / "sft.jsonl"
    args = ["eval", "make-sft", "--corpus", str(corpus), "--out", str(out)]
    counts = ["--count", "arithmetic=7", "--count", "copy=0", "--count", "reverse=3"]
    counts += ["--count", "sort=2", "--count", "verse=1", "--recall-repeats", "1"]
    assert main([*args, *counts]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [r["messages"][0]["content"] for r in records]
    assert sum(p.startswith("What is") for p in prompts) == 7
    assert sum(p.startswith("Reverse the order") for p in prompts) == 3
    assert not any(p.startswith("Repeat exactly") for p in prompts)
    assert main([*args, "--count", "poems=3"]) != 0
    assert "TASK one of arithmetic" in capsys.readouterr().err
