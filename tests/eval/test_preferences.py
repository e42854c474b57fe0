"""`llada eval make-preferences`: pairs of the task's correct answer and a wrong answer the model
itself produced, reproducible by seed, in the JSONL the preference trainer reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llada.api import generate_texts, load
from llada.cli.main import main
from llada.eval.preferences import make_preferences
from llada.eval.tasks import build_task_sets, is_correct
from llada.sampling.config import profile

INSTRUCT = Path(__file__).resolve().parents[2] / "models" / "llada-tiny-instruct"


@pytest.mark.skipif(not INSTRUCT.is_dir(), reason="llada-tiny-instruct is not shipped here")
def test_pairs_are_the_right_answer_against_the_models_own_wrong_one(tmp_path, capsys):
    model, tokenizer, _ = load(INSTRUCT)
    examples = build_task_sets(None, eval_per_task=1, sft_per_task={"sort": 4, "copy": 4}).sft
    config = profile("preferences").config(gen_length=16, steps=16, block_length=16)
    pairs, stats = make_preferences(model, tokenizer, examples, config, samples=2, seed=5)
    assert stats.questions == 8 and stats.pairs == len(pairs) == 8 - stats.all_correct
    # The replies, drawn again with the same seeds: a question is paired iff one was wrong.
    replies = []
    for round_ in range(2):
        torch.manual_seed(5 * 1000003 + round_)
        replies.append(generate_texts(model, tokenizer, [e.prompt for e in examples], config))
    by_prompt = {p["prompt"]: p for p in pairs}
    for i, example in enumerate(examples):
        wrong = [r[i].strip() for r in replies if r[i].strip() and not is_correct(example, r[i])]
        if not wrong:
            assert example.prompt not in by_prompt
            continue
        pair = by_prompt[example.prompt]
        assert pair["chosen"] == example.answer and pair["task"] == example.task
        assert pair["rejected"] in wrong and pair["rejected"] != pair["chosen"]

    out = tmp_path / "pairs.jsonl"
    args = ["eval", "make-preferences", "--model", str(INSTRUCT), "--out", str(out)]
    args += ["--tasks", "sort,copy", "--per-task", "4", "--samples", "2", "--seed", "5"]
    args += ["--gen-length", "16", "--steps", "16", "--block-length", "16"]
    assert main(args) == 0
    assert f"{len(pairs)} preference pairs written" in capsys.readouterr().out
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == pairs
    assert main([*args[:-6], "--tasks", "poetry"]) == 2
    assert "--tasks poetry: choose from" in capsys.readouterr().err


def test_preference_questions_never_ask_the_held_out_evaluation_questions():
    """`llada eval make-preferences` draws its questions past the held-out ones: the first
    HELD_OUT_PER_TASK evaluation questions of each task (`llada eval tasks` asks the first 200
    by default). Arithmetic has few distinct questions, so a sample of 1500 met them before."""
    from llada.eval.tasks import (
        EVAL_SEED,
        HELD_OUT_PER_TASK,
        synthetic_examples,
        training_questions,
    )

    questions = training_questions(["arithmetic", "sort"], 1500)
    assert len(questions) == 3000
    held_out = {e.prompt for e in synthetic_examples("arithmetic", HELD_OUT_PER_TASK, EVAL_SEED)}
    held_out |= {e.prompt for e in synthetic_examples("sort", HELD_OUT_PER_TASK, EVAL_SEED)}
    evaluated = {e.prompt for e in synthetic_examples("arithmetic", 200, EVAL_SEED)}
    assert evaluated <= held_out
    assert not {q.prompt for q in questions} & held_out
