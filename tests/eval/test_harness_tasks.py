"""`llada eval make-harness-tasks`: local lm-eval tasks over the shipped models' data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

pytest.importorskip("lm_eval")

from conftest import go_offline  # noqa: E402
from llada.cli.main import main  # noqa: E402
from llada.eval.harness_tasks import (  # noqa: E402
    CHOICE_TASK,
    GENERATE_TASK,
    HARNESS_TASKS,
    PERPLEXITY_TASK,
    write_harness_tasks,
)
from llada.eval.tasks import SYNTHETIC_TASKS, synthetic_examples  # noqa: E402

MODELS = Path(__file__).parents[2] / "models"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "winters_tale.txt").write_text(
        "\n".join(f"Line {i} of the last play." for i in range(1000)) + "\n\n"
    )
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_files_hold_the_held_out_tail_and_checkable_questions(corpus, tmp_path):
    written = write_harness_tasks(tmp_path, corpus, per_task=5)
    assert [p.stem for p in written] == list(HARNESS_TASKS)
    for path in written:
        config = yaml.safe_load(path.read_text())
        assert config["task"] == path.stem
        assert config["dataset_path"] == "json"
        assert Path(config["dataset_kwargs"]["data_files"]["test"]).is_file()

    documents = read_jsonl(tmp_path / f"{PERPLEXITY_TASK}.jsonl")
    text = "\n".join(d["text"] for d in documents).splitlines()
    assert text == [f"Line {i} of the last play." for i in range(400, 1000)]

    expected = {
        (e.prompt, e.answer)
        for task in SYNTHETIC_TASKS
        for e in synthetic_examples(task, 5, "eval")
    }
    choices = read_jsonl(tmp_path / f"{CHOICE_TASK}.jsonl")
    assert len(choices) == 5 * len(SYNTHETIC_TASKS)
    # Interleaved, so that --limit keeps every task.
    assert [d["task"] for d in choices[: len(SYNTHETIC_TASKS)]] == list(SYNTHETIC_TASKS)
    for doc in choices:
        assert (doc["question"], doc["choices"][doc["answer"]]) in expected
        assert len(set(doc["choices"])) == len(doc["choices"]) >= 2
    generated = read_jsonl(tmp_path / f"{GENERATE_TASK}.jsonl")
    assert {(d["question"], d["answer"]) for d in generated} == expected


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="winters_tale.txt not found"):
        write_harness_tasks(tmp_path / "out", tmp_path)
    with pytest.raises(ValueError, match="per_task must be positive"):
        write_harness_tasks(tmp_path / "out", tmp_path, per_task=0)


@pytest.mark.skipif(
    not (MODELS / "llada-tiny-instruct").is_dir(), reason="llada-tiny-instruct is not shipped"
)
def test_cli_runs_the_tasks_on_the_shipped_instruct_model(corpus, tmp_path, monkeypatch):
    """The documented commands, offline; the generation task's exact match is the one of our own
    task evaluator on the same questions."""
    import torch

    from llada.api import generate_texts, load
    from llada.sampling.config import GenerateConfig

    go_offline(monkeypatch)
    folder = tmp_path / "tasks"
    assert main(["eval", "make-harness-tasks", "--out", str(folder), "--corpus", str(corpus)]) == 0
    output = tmp_path / "results"
    limit = 8
    code = main(
        [
            "eval",
            "lm-eval",
            "--model",
            str(MODELS / "llada-tiny-instruct"),
            "--include-path",
            str(folder),
            "--tasks",
            f"{CHOICE_TASK},{GENERATE_TASK},{PERPLEXITY_TASK}",
            "--apply-chat-template",
            "--limit",
            str(limit),
            "--model-args",
            "mc_num=8,batch_size=8,steps=32,gen_length=32,block_length=32,max_length=128",
            "--output-path",
            str(output),
        ]
    )
    assert code == 0
    (results_file,) = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    # Every request type ran; its scores are checked against the library in test_lm_eval.py.
    assert set(results) == set(HARNESS_TASKS)
    assert results[CHOICE_TASK]["sample_len"] == limit
    assert math.isfinite(results[PERPLEXITY_TASK]["bits_per_byte,none"])
    assert results[PERPLEXITY_TASK]["bits_per_byte,none"] > 0

    documents = read_jsonl(folder / f"{GENERATE_TASK}.jsonl")[:limit]
    model, tokenizer, _ = load(MODELS / "llada-tiny-instruct")
    torch.manual_seed(0)
    replies = generate_texts(
        model,
        tokenizer,
        [d["question"] for d in documents],
        GenerateConfig(steps=32, gen_length=32, block_length=32),
    )
    ours = sum(r.strip() == d["answer"] for r, d in zip(replies, documents, strict=True)) / limit
    assert results[GENERATE_TASK]["exact_match,none"] == pytest.approx(ours)
