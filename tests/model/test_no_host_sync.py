"""The model forwards hold no host synchronisation: run on the meta device, where tensors have
shapes but no values, any read-back (`int(t)`, `bool(t)`, `.item()`, `.tolist()`, a boolean
mask index) raises. Each family runs a plain forward, a left-padded one, one with `logits_at`,
and a whole-canvas forward over a KV cache followed by a window forward. Since the model
applies any mask it is given, the samplers must drop a mask of ones themselves: tested last."""

from __future__ import annotations

import pytest
import torch

from conftest import make_random_model
from llada.model.config import LLaDAConfig
from llada.model.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from llada.model.transformer import LLaDAModel
from llada.sampling.config import DecodeConfig, GenerateConfig
from llada.sampling.fast import sample
from llada.sampling.reference import generate

META = torch.device("meta")


def dense_model() -> LLaDAModel:
    config = LLaDAConfig(
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        mlp_hidden_size=48,
        vocab_size=64,
        embedding_size=64,
        max_sequence_length=256,
    )
    with META:
        return LLaDAModel(config).eval()


def moe_model(partial_rotary_factor: float = 1.0) -> LLaDAMoEModel:
    config = LLaDAMoEConfig(
        vocab_size=64,
        hidden_size=32,
        dense_intermediate_size=48,
        expert_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_layer_freq=(0, 1),
        partial_rotary_factor=partial_rotary_factor,
    )
    # bfloat16: the experts' grouped matmuls (sync-free) serve that dtype off the CPU; other
    # dtypes there run per-expert slices, sized on the host (experts.py).
    with META:
        return LLaDAMoEModel(config).to(torch.bfloat16).eval()


MODELS = {
    "dense": dense_model,
    "moe": moe_model,
    "moe-partial-rope": lambda: moe_model(partial_rotary_factor=0.5),
}


@pytest.fixture(params=sorted(MODELS))
def meta_model(request):
    model = MODELS[request.param]()
    assert model.embed.weight.device == META
    return model


def test_meta_inputs_refuse_a_read_back():
    # The premise of this file: on meta, reading a value back to the host raises.
    with pytest.raises((RuntimeError, NotImplementedError)):
        int(torch.zeros(3, device=META).max())


@torch.no_grad()
def test_plain_forward_has_no_host_sync(meta_model):
    ids = torch.zeros(2, 12, dtype=torch.long, device=META)
    logits = meta_model(ids).logits
    assert logits.shape == (2, 12, 64) and logits.device == META


@torch.no_grad()
def test_padded_forward_has_no_host_sync(meta_model):
    ids = torch.zeros(2, 12, dtype=torch.long, device=META)
    mask = torch.ones(2, 12, dtype=torch.long, device=META)
    logits = meta_model(ids, attention_mask=mask).logits
    assert logits.shape == (2, 12, 64)


@torch.no_grad()
def test_logits_at_forward_has_no_host_sync(meta_model):
    ids = torch.zeros(2, 12, dtype=torch.long, device=META)
    logits_at = torch.zeros(5, dtype=torch.long, device=META)  # flat positions into 2 * 12
    logits = meta_model(ids, logits_at=logits_at).logits
    assert logits.shape == (5, 64) and logits.device == META


@torch.no_grad()
def test_kv_cache_forwards_have_no_host_sync(meta_model):
    ids = torch.zeros(2, 12, dtype=torch.long, device=META)
    mask = torch.ones(2, 12, dtype=torch.long, device=META)
    cache = meta_model.new_kv_cache(2, 12, attention_mask=mask)
    assert len(cache.keys) == 2 and cache.bias is not None
    assert cache.keys[0].device == META and cache.keys[0].shape == (2, 2, 12, 8)
    logits = meta_model(ids, kv_cache=cache).logits
    assert logits.shape == (2, 12, 64)
    at = torch.zeros(3, dtype=torch.long, device=META)
    logits = meta_model(ids[:, 4:8], kv_cache=cache, window_start=4, logits_at=at).logits
    assert logits.shape == (3, 64)
    assert cache.keys[0].shape[2] == 12


class MaskSpy(torch.nn.Module):
    """A real model that records the attention_mask of every forward it is called with."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config, self.special_tokens = model.config, model.special_tokens
        self.masks: list[torch.Tensor | None] = []

    def new_kv_cache(self, batch, length, attention_mask=None):
        self.masks.append(attention_mask)
        return self.model.new_kv_cache(batch, length, attention_mask)

    def forward(self, input_ids, attention_mask=None, **options):
        self.masks.append(attention_mask)
        return self.model(input_ids, attention_mask, **options)


@pytest.mark.parametrize("decoder", ["reference", "full", "prefix", "dual", "block"])
def test_samplers_hand_the_model_no_mask_when_nothing_is_padded(decoder):
    # The model applies any mask it is given (deciding otherwise would read it back), so the
    # samplers drop a mask of ones: the call stays on the maskless kernels, as the reference.
    spy = MaskSpy(make_random_model(seed=0))
    prompt = torch.tensor([[5, 6, 7], [5, 6, 8]])
    ones, padded = torch.ones_like(prompt), torch.tensor([[0, 1, 1], [1, 1, 1]])
    results = []
    for mask in (None, ones, padded):
        spy.masks.clear()
        if decoder == "reference":
            tokens = generate(spy, prompt, mask, steps=4, gen_length=4, block_length=4)
        else:
            config = GenerateConfig(steps=4, gen_length=4, block_length=4)
            tokens = sample(spy, prompt, mask, config, DecodeConfig(source=decoder)).tokens
        results.append(tokens)
        given = [m for m in spy.masks if m is not None]
        assert (len(given) > 0) == (mask is padded), decoder
    assert torch.equal(results[0], results[1])
