"""The shipped models: they load by name, and the instruct model does its tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llada
from llada.eval.tasks import SYNTHETIC_TASKS, evaluate_tasks, synthetic_examples
from llada.sampling.config import GenerateConfig

MODELS = Path(__file__).parents[1] / "models"
pytestmark = pytest.mark.skipif(
    not (MODELS / "llada-tiny-instruct").is_dir(),
    reason="the shipped models are not in this checkout",
)


@pytest.mark.parametrize("name", ["llada-tiny-base", "llada-tiny-instruct"])
def test_shipped_models_load_by_name_with_their_tokenizer(name):
    model = llada.load_model(name)
    tokenizer = llada.load_tokenizer(model)
    assert model.dtype == torch.bfloat16
    tokens = model.special_tokens
    assert tokens.mask_id == tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert tokens.eot_id == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert (MODELS / name / "README.md").is_file()


def test_instruct_model_answers_generated_tasks_well_above_chance():
    model = llada.load_model("llada-tiny-instruct", dtype=torch.float32)
    tokenizer = llada.load_tokenizer(model)
    examples = [e for task in SYNTHETIC_TASKS for e in synthetic_examples(task, 24, "eval")]
    config = GenerateConfig(steps=16, gen_length=16, block_length=16)
    results = evaluate_tasks(model, tokenizer, examples, config, batch_size=48)
    # Chance is about 1% for arithmetic and far less for the sequence tasks.
    for task in ("copy", "reverse", "sort", "arithmetic"):
        assert results[task]["accuracy"] >= 0.2, results
