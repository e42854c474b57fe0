"""Every case of the reference vectors (produced by running the published LLaDA code)."""

from __future__ import annotations

import pytest
import torch

import llada
from conftest import (
    PARITY_DEVICE,
    PARITY_DTYPES,
    assert_logits_match,
    parity_model,
    reference_cases,
)


@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", reference_cases("logits"), ids=lambda c: c["name"])
def test_logits_match_reference(tiny_model, case, implementation, dtype):
    model = parity_model(tiny_model, dtype)
    request = case["request"]
    input_ids = torch.tensor(request["input_ids"], device=PARITY_DEVICE)
    attention_mask = (
        torch.tensor(request["attention_mask"], device=PARITY_DEVICE)
        if "attention_mask" in request
        else None
    )
    model.attn_implementation = implementation
    try:
        logits = model(input_ids, attention_mask=attention_mask).logits
    finally:
        model.attn_implementation = "sdpa"
    assert_logits_match(logits, case["expected"], dtype)


def _arguments(request: dict) -> dict:
    arguments = {k: v for k, v in request.items() if k not in ("mode", "seed")}
    for key in ("prompt", "answer", "attention_mask"):
        if key in arguments:
            arguments[key] = torch.tensor(arguments[key])
    return arguments


@pytest.mark.parametrize("case", reference_cases("generate"), ids=lambda c: c["name"])
def test_generate_matches_reference(tiny_model, case):
    torch.manual_seed(case["request"].get("seed", 0))
    output = llada.generate(tiny_model, **_arguments(case["request"]))
    assert output.tolist() == case["expected"]["output"]


@pytest.mark.parametrize("case", reference_cases("generate"), ids=lambda c: c["name"])
def test_generate_default_mask_id_is_the_models(tiny_model, case):
    arguments = _arguments(case["request"])
    assert arguments.pop("mask_id") == tiny_model.special_tokens.mask_id
    torch.manual_seed(case["request"].get("seed", 0))
    assert llada.generate(tiny_model, **arguments).tolist() == case["expected"]["output"]


@pytest.mark.parametrize("case", reference_cases("loglik"), ids=lambda c: c["name"])
def test_log_likelihood_matches_reference(tiny_model, case):
    torch.manual_seed(case["request"].get("seed", 0))
    value = llada.get_log_likelihood(tiny_model, **_arguments(case["request"]))
    expected = case["expected"]["loglik"]
    assert value == pytest.approx(expected, rel=1e-3)
