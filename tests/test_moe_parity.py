"""LLaDA-MoE against the reference vectors (the dllm copy of the official modeling code with the
ML-GSAI sampler and likelihood), loaded through the family-detecting `llada.load_model`."""

from __future__ import annotations

import json

import pytest
import torch

import llada
from conftest import PARITY_DEVICE, PARITY_DTYPES, REFERENCE, assert_logits_match, parity_model
from llada.model.llada_moe import LLaDAMoEModel
from llada.sampling.config import GenerateConfig
from llada.sampling.fast import sample

MOE_MODELS = ("moe-tiny", "moe-tiny-opts")


def _cases(mode: str) -> list[dict]:
    with open(REFERENCE / "moe-cases.json", encoding="utf-8") as f:
        cases = json.load(f)
    return [c for c in cases if c["request"]["mode"] == mode]


@pytest.fixture(scope="module")
def moe_models() -> dict[str, LLaDAMoEModel]:
    return {name: llada.load_model(REFERENCE / name, dtype=torch.float32) for name in MOE_MODELS}


def _arguments(request: dict) -> dict:
    arguments = {k: v for k, v in request.items() if k not in ("mode", "seed", "input_ids")}
    for key in ("prompt", "answer", "attention_mask"):
        if key in arguments:
            arguments[key] = torch.tensor(arguments[key])
    return arguments


def test_every_case_is_covered():
    assert sum(len(_cases(mode)) for mode in ("logits", "generate", "loglik")) == 22


def test_the_family_is_detected_despite_model_type_llada(moe_models):
    for name, model in moe_models.items():
        raw = json.loads((REFERENCE / name / "config.json").read_text(encoding="utf-8"))
        assert raw["model_type"] == "llada"
        assert type(model) is LLaDAMoEModel
        assert model.dtype == torch.float32


@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", _cases("logits"), ids=lambda c: c["name"])
def test_logits_match_reference(moe_models, case, implementation, dtype):
    model = parity_model(moe_models[case["model"]], dtype)
    request = case["request"]
    mask = request.get("attention_mask")
    mask = None if mask is None else torch.tensor(mask, device=PARITY_DEVICE)
    ids = torch.tensor(request["input_ids"], device=PARITY_DEVICE)
    model.attn_implementation = implementation
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
    finally:
        model.attn_implementation = "sdpa"
    assert_logits_match(logits, case["expected"], dtype)


@pytest.mark.parametrize("case", _cases("generate"), ids=lambda c: c["name"])
def test_generate_matches_reference(moe_models, case):
    torch.manual_seed(case["request"].get("seed", 0))
    output = llada.generate(moe_models[case["model"]], **_arguments(case["request"]))
    assert output.tolist() == case["expected"]["output"]


@pytest.mark.parametrize("case", _cases("loglik"), ids=lambda c: c["name"])
def test_log_likelihood_matches_reference(moe_models, case):
    torch.manual_seed(case["request"].get("seed", 0))
    value = llada.get_log_likelihood(moe_models[case["model"]], **_arguments(case["request"]))
    assert value == pytest.approx(case["expected"]["loglik"], rel=1e-3)


@pytest.mark.parametrize("case", _cases("generate"), ids=lambda c: c["name"])
def test_reference_preset_of_the_fast_loop_equals_generate(moe_models, case):
    arguments = _arguments(case["request"])
    prompt = arguments.pop("prompt")
    mask = arguments.pop("attention_mask", None)
    mask_id = arguments.pop("mask_id")
    torch.manual_seed(case["request"].get("seed", 0))
    result = sample(
        moe_models[case["model"]], prompt, mask, GenerateConfig(**arguments), "reference", mask_id
    )
    assert result.tokens.tolist() == case["expected"]["output"]
    assert result.forward_passes == GenerateConfig(**arguments).steps


@pytest.mark.parametrize("name", MOE_MODELS)
def test_left_padded_batch_equals_each_row_alone(moe_models, name):
    model = moe_models[name]
    rows = [[5, 17, 300, 42, 8, 99, 7], [250, 3, 77]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[509] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            # Masked keys change the attention's float32 reductions (1.7e-5 seen on an AMD EPYC,
            # under 1e-5 on a Xeon); a padding bug moves logits by orders of magnitude more.
            torch.testing.assert_close(batch[i, width - len(row) :], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_kv_cache_window_equals_the_full_forward(moe_models, name):
    """The prefix/dual caches of the fast samplers: a window forward over a freshly filled cache
    gives the full forward's logits there."""
    model = moe_models[name]
    ids = torch.tensor([[5, 17, 300, 42, 8, 99, 7, 511, 511, 511, 511, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_kv_cache(*ids.shape, attention_mask=mask)
        filled = model(ids, kv_cache=cache).logits
        window = model(ids[:, 7:11], kv_cache=cache, window_start=7).logits
    torch.testing.assert_close(filled, full, atol=0, rtol=0)
    torch.testing.assert_close(window, full[:, 7:11], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["fast", "fastdllm-dual", "fastdllm-prefix"])
@pytest.mark.parametrize("name", MOE_MODELS)
def test_fast_presets_run_on_the_moe(moe_models, name, preset):
    prompt = torch.tensor([[500, 5, 17, 300, 42], [5, 17, 300, 42, 8]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    config = GenerateConfig(steps=8, gen_length=8, block_length=4, temperature=0.0)
    result = sample(moe_models[name], prompt, mask, config, preset, mask_id=511)
    tokens = result.tokens
    assert tokens.shape == (2, 13)
    assert torch.equal(tokens[:, :5], prompt)
    assert not (tokens[:, 5:] == 511).any()
    assert 1 <= result.forward_passes <= 8
