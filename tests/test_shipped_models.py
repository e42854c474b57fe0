"""The shipped models: they load by name, are the default, and do their job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llada
from llada.eval.tasks import SYNTHETIC_TASKS, evaluate_tasks, synthetic_examples
from llada.sampling.config import GenerateConfig

MODELS = Path(__file__).parents[1] / "models"


def shipped(name: str):
    return pytest.mark.skipif(
        not (MODELS / name).is_dir(), reason=f"{name} is not shipped in this checkout"
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("llada-tiny-base", marks=shipped("llada-tiny-base")),
        pytest.param("llada-tiny-instruct", marks=shipped("llada-tiny-instruct")),
    ],
)
def test_shipped_models_load_by_name_with_their_tokenizer(name):
    model = llada.load_model(name)
    tokenizer = llada.load_tokenizer(model)
    assert model.dtype == torch.bfloat16
    tokens = model.special_tokens
    assert tokens.mask_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert tokens.eot_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert (MODELS / name / "README.md").is_file()


@shipped("llada-tiny-base")
def test_a_shipped_model_is_the_default_and_does_its_job():
    from llada.api import generate_texts, load

    model, tokenizer, is_random = load(None)
    assert not is_random
    expected = (
        "llada-tiny-instruct" if (MODELS / "llada-tiny-instruct").is_dir() else "llada-tiny-base"
    )
    assert model.checkpoint_folder.name == expected
    config = GenerateConfig(steps=16, gen_length=16, block_length=16)
    if expected == "llada-tiny-instruct":  # the README's first command
        (text,) = generate_texts(model, tokenizer, ["Reverse the order:\nking moon sword"], config)
        assert text == "sword moon king"
        return
    (text,) = generate_texts(model, tokenizer, ["ROMEO.\n"], config, chat=False)
    # A trained model writes mostly letters and spaces, not byte noise.
    assert len(text) >= 8
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.7 * len(text)


@shipped("llada-tiny-instruct")
def test_instruct_model_answers_generated_tasks_well_above_chance():
    model = llada.load_model("llada-tiny-instruct", dtype=torch.float32)
    tokenizer = llada.load_tokenizer(model)
    examples = [e for task in SYNTHETIC_TASKS for e in synthetic_examples(task, 24, "eval")]
    config = GenerateConfig(steps=16, gen_length=16, block_length=16)
    results = evaluate_tasks(model, tokenizer, examples, config, batch_size=48)
    # Chance is about 1% for arithmetic and far less for the sequence tasks; the model card
    # measures 100% copy, 98% reverse, 90% sort and 22.5% arithmetic on 200 questions each.
    floors = {"copy": 0.8, "reverse": 0.8, "sort": 0.6, "arithmetic": 0.08}
    for task, floor in floors.items():
        assert results[task]["accuracy"] >= floor, results
