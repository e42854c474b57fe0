"""Quantized weights (llada.quantization, through torchao) on the tiny reference checkpoints.

The oracle for int8-weight is the float model whose `nn.Linear` weights are replaced by
torchao's own dequantized weights (qdata * scale): in float32 the two forward passes agree to
rounding (1e-4 relative), so any wrong wiring (a layer skipped, a scale misapplied, the wrong
layers quantized) shows. The quantization itself is checked against its definition (per-row
symmetric int8, error at most half a step). Against the unquantized model the tolerance is
the measured quantization error with a margin (docs/quantization.md): 5 % relative L2 of the
logits on the dense checkpoint, where nothing else moves; the random tiny MoE checkpoints
amplify small changes through their routers, so there the oracle is the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

import llada  # noqa: E402
from llada.quantization import MODES, weight_bytes  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "reference"
CHECKPOINTS = ("tiny-gqa", "moe-tiny", "llada2-tiny")


def load(name: str, dtype: str = "float32") -> torch.nn.Module:
    return llada.load_model(REFERENCE / name, dtype=dtype)


def inputs(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (2, 24), generator=generator)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter
    }


def dequantized_copy(name: str, quantized: torch.nn.Module) -> torch.nn.Module:
    """The float checkpoint with each quantized Linear weight replaced by its dequantized value."""
    model = load(name)
    weights = quantized_linears(quantized)
    for module_name, weight in weights.items():
        model.get_submodule(module_name).weight.data = weight.dequantize().float()
    return model


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_int8_weight_equals_the_float_model_with_dequantized_weights(name):
    model = llada.quantize(load(name), "int8-weight")
    ids = inputs()
    got = model(ids).logits
    expected = dequantized_copy(name, model)(ids).logits
    assert relative_error(got, expected) < 1e-4


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_which_layers_are_quantized(name):
    model = load(name)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    routers = {id(r) for r in model.routers()} if hasattr(model, "routers") else set()
    router_names = [n for n, m in model.named_modules() if id(m) in routers]
    floats = {n: p.detach().clone() for n, p in model.named_parameters()}
    llada.quantize(model, "int8-weight")
    quantized = quantized_linears(model)
    # Every Linear except the routers; the embedding, norms and stacked experts stay float.
    assert sorted(quantized) == sorted(n for n in linears if n not in router_names)
    assert "lm_head" in quantized
    for module_name, weight in quantized.items():
        w = floats[f"{module_name}.weight"]
        assert weight.qdata.dtype == torch.int8 and weight.scale.shape == (w.shape[0], 1)
        # Symmetric per-row int8: the largest magnitude of each row maps to about 127, and no
        # weight moves by more than half a step.
        assert weight.qdata.to(torch.int16).abs().amax(dim=1).min() >= 127
        step = weight.scale.float()
        assert ((weight.dequantize().float() - w).abs() <= step / 2 + 1e-6).all()
    for param_name, param in model.named_parameters():
        if param_name.rpartition(".")[0] not in quantized:
            assert type(param) is torch.nn.Parameter
            assert torch.equal(param, floats[param_name])


@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic"])
def test_dense_logits_within_the_documented_tolerance(mode):
    float_model = load("tiny-gqa")
    ids = inputs()
    expected = float_model(ids).logits
    got = llada.quantize(float_model, mode)(ids).logits
    error = relative_error(got, expected)
    # Measured 0.022 (int8-weight) and 0.033 (int8-dynamic); docs/quantization.md.
    assert 0 < error < 0.05
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= 0.95


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_int8_dynamic_runs_on_every_family_and_halves_the_bytes(name):
    model = load(name, "bfloat16")
    before = weight_bytes(model)
    float_logits = model(inputs()).logits
    llada.quantize(model, "int8-dynamic")
    logits = model(inputs()).logits
    assert logits.shape == float_logits.shape and torch.isfinite(logits).all()
    assert weight_bytes(model) < before
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic"])
def test_save_and_load_give_identical_logits(name, mode, tmp_path):
    model = llada.quantize(load(name, "bfloat16"), mode)
    ids = inputs(1)
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    config = (tmp_path / "q" / "config.json").read_text(encoding="utf-8")
    assert f'"mode": "{mode}"' in config
    assert not (tmp_path / "q" / "model.safetensors").exists()
    loaded = llada.load_model(tmp_path / "q")
    assert loaded.quantization["mode"] == mode
    assert sorted(quantized_linears(loaded)) == sorted(quantized_linears(model))
    assert torch.equal(loaded(ids).logits, expected)
    with pytest.raises(ValueError, match="saved in torch.bfloat16"):
        llada.load_model(tmp_path / "q", dtype="float32")


@pytest.mark.parametrize("name", ["tiny-gqa", "moe-tiny"])
def test_fast_sampler_runs_on_the_quantized_model(name):
    quantized = llada.quantize(load(name), "int8-weight")
    oracle = dequantized_copy(name, quantized)
    # moe-tiny's config carries no mask id; its reference cases use the last vocabulary id.
    tokens = quantized.special_tokens
    mask_id = tokens.mask_id if tokens is not None else quantized.config.vocab_size - 1
    config = llada.GenerateConfig(gen_length=16, block_length=8, steps=8)
    prompt = inputs(2)[:1, :8]
    got = llada.sample(quantized, prompt, None, config, "fast", mask_id=mask_id)
    expected = llada.sample(oracle, prompt, None, config, "fast", mask_id=mask_id)
    assert torch.equal(got.tokens, expected.tokens)
    assert (got.tokens[:, 8:] != mask_id).all()


def test_block_sampler_runs_on_the_quantized_llada2():
    quantized = llada.quantize(load("llada2-tiny"), "int8-weight")
    oracle = dequantized_copy("llada2-tiny", quantized)
    prompt = inputs(3)[0, :6].tolist()
    # llada2-tiny declares no special ids; its parity tests use the last id as mask and the
    # third last as EOS (tests/test_llada2_parity.py).
    vocab = quantized.config.vocab_size
    options = dict(gen_length=16, block_length=8, steps=8, mask_id=vocab - 1, eos_id=vocab - 3)
    got = llada.block_sample(quantized, [prompt], **options).answers
    expected = llada.block_sample(oracle, [prompt], **options).answers
    assert [a.tolist() for a in got] == [a.tolist() for a in expected]
    assert len(got[0]) > 0


def test_bad_modes_and_devices_are_one_clear_error():
    model = load("tiny-gqa", "bfloat16")
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'; use one of"):
        llada.quantize(model, "int3")
    with pytest.raises(ValueError, match="int4-weight runs on CUDA GPUs only.*use int8-weight"):
        llada.quantize(model, "int4-weight")
    assert set(MODES) == {"int8-weight", "int8-dynamic", "int4-weight"}
    llada.quantize(model, "int8-weight")
    with pytest.raises(ValueError, match="already quantized .int8-weight."):
        llada.quantize(model, "int8-dynamic")
    with pytest.raises(ValueError, match="saved as it is"):
        model.save_pretrained("/nonexistent/never-written", dtype="float32")


def test_a_broken_quantization_entry_is_one_clear_error(tmp_path):
    model = llada.quantize(load("tiny-gqa", "bfloat16"), "int8-weight")
    model.save_pretrained(tmp_path / "q")
    config_path = tmp_path / "q" / "config.json"
    config_path.write_text(
        config_path.read_text(encoding="utf-8").replace('"int8-weight"', '"int2-weight"'),
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="'quantization' entry .* is not one llada wrote"):
        llada.load_model(tmp_path / "q")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="int4 runs on CUDA only")
def test_int4_weight_on_gpu(tmp_path):
    model = llada.load_model(REFERENCE / "tiny-gqa", dtype="bfloat16", device="cuda")
    ids = inputs().cuda()
    expected = model(ids).logits
    llada.quantize(model, "int4-weight", group_size=32)
    got = model(ids).logits
    assert quantized_linears(model)
    assert relative_error(got, expected) < 0.2
    model.save_pretrained(tmp_path / "q")
    loaded = llada.load_model(tmp_path / "q", device="cuda")
    assert torch.equal(loaded(ids).logits, got)
