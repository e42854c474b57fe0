"""The model itself: attention backends, GQA/MQA, dtypes, config validation."""

from __future__ import annotations

import pytest
import torch

from conftest import make_random_model
from llada.model.config import REFERENCE_DEFAULTS, LLaDAConfig
from llada.model.transformer import (
    attention_bias_from_mask,
    causal_attention_mask,
    flat_positions,
)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_sdpa_agree(n_kv_heads, padded):
    model = make_random_model(seed=1, n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = None
    if padded:
        attention_mask = torch.ones(3, 9, dtype=torch.long)
        attention_mask[1, :3] = 0
        attention_mask[2, :8] = 0
    model.attn_implementation = "sdpa"
    sdpa = model(ids, attention_mask=attention_mask).logits
    model.attn_implementation = "eager"
    eager = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_bfloat16_is_close_to_float32():
    model = make_random_model(seed=2)
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    half = model.to(torch.bfloat16)(ids).logits
    assert half.dtype == torch.bfloat16  # no upcast, as the reference
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)


def test_multi_query_attention_flag_means_one_kv_head():
    config = LLaDAConfig(
        d_model=32,
        n_heads=4,
        n_kv_heads=None,
        multi_query_attention=True,
        n_layers=1,
        vocab_size=16,
        embedding_size=16,
    )
    assert config.effective_n_kv_heads == 1


def test_hidden_states_and_tied_weights():
    model = make_random_model(seed=0, weight_tying=True)
    assert model.lm_head is None
    out = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.n_layers + 1
    torch.testing.assert_close(out.logits, out.hidden_states[-1] @ model.embed.weight.T)


def test_fully_padded_row_is_finite(random_model):
    ids = torch.tensor([[1, 2, 3]])
    out = random_model(ids, attention_mask=torch.zeros_like(ids)).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("alibi", True),
        ("rope", False),
        ("block_type", "sequential"),
        ("activation_type", "gelu"),
        ("layer_norm_type", "default"),
        ("attention_layer_norm", True),
        ("include_bias", True),
        ("include_qkv_bias", True),
        ("input_emb_norm", True),
        ("block_group_size", 2),
    ],
)
def test_unsupported_features_are_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"'{key}'"):
        LLaDAConfig(**{key: value})


def test_inconsistent_sizes_are_explained():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        LLaDAConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LLaDAConfig(n_heads=32, n_kv_heads=5)
    with pytest.raises(ValueError, match="embedding_size"):
        LLaDAConfig(vocab_size=100, embedding_size=50)


def test_missing_keys_take_the_reference_defaults():
    config = LLaDAConfig.from_hf_dict(
        {
            "d_model": 64,
            "n_heads": 4,
            "n_layers": 1,
            "rope": True,
            "block_type": "llama",
            "activation_type": "silu",
            "layer_norm_type": "rms",
            "vocab_size": 100,
            "embedding_size": 128,
            "my_key": [1, 2],
        }
    )
    assert config.weight_tying is REFERENCE_DEFAULTS["weight_tying"]
    assert config.attention_dropout == REFERENCE_DEFAULTS["attention_dropout"]
    assert config.rope_theta == REFERENCE_DEFAULTS["rope_theta"]
    assert config.to_hf_dict()["my_key"] == [1, 2]


def test_model_type_is_checked():
    with pytest.raises(ValueError, match="model_type"):
        LLaDAConfig.from_hf_dict({"model_type": "lladamoe"})


def _old_causal_bias(attention_mask, length, dtype):
    """The additive bias `causal=True` used to build inside the model (the padding bias plus a
    lower-triangular one, clamped): the arithmetic the causal mask from outside must keep."""
    bias = None
    if attention_mask is not None:
        keep = attention_mask.to(torch.bool)[:, None, None, :]
        bias = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    causal = torch.zeros(length, length, dtype=dtype).masked_fill(future, torch.finfo(dtype).min)
    causal = causal[None, None]
    return causal if bias is None else (bias + causal).clamp(min=torch.finfo(dtype).min)


@pytest.mark.parametrize("padded", [False, True])
def test_causal_attention_mask_gives_the_old_causal_bias(padded):
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]) if padded else None
    allowed = causal_attention_mask(attention_mask, 5)
    assert allowed.dtype == torch.bool and allowed.shape == ((2 if padded else 1), 1, 5, 5)
    for dtype in (torch.float32, torch.bfloat16):
        bias = attention_bias_from_mask(allowed, dtype)
        assert torch.equal(bias, _old_causal_bias(attention_mask, 5, dtype))
    # And the model applies it: logits at a token ignore every later token (a padded query may
    # attend to nothing, so it attends uniformly to everything, as before).
    model = make_random_model(seed=5)
    ids = torch.tensor([[5, 9, 11, 4, 7], [0, 0, 11, 4, 7]])
    changed = ids.clone()
    changed[:, 3:] = 8
    mask = causal_attention_mask(attention_mask, 5)
    before = model(ids, attention_mask=mask).logits
    after = model(changed, attention_mask=mask).logits
    first = 2 if padded else 0
    torch.testing.assert_close(before[:, first:3], after[:, first:3], atol=0, rtol=0)
    assert not torch.allclose(before[:, 3:], after[:, 3:])


def test_attention_masks_of_a_wrong_shape_or_type_are_refused():
    model = make_random_model(seed=5)
    ids = torch.randint(0, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expected \\(2, 6\\)"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="4-D attention_mask must be boolean"):
        model(ids, attention_mask=torch.ones(1, 1, 6, 6))
    with pytest.raises(ValueError, match="4-D attention_mask must be boolean"):
        model(ids, attention_mask=torch.ones(3, 1, 6, 6, dtype=torch.bool))


def test_logits_at_takes_flat_positions_and_refuses_a_boolean_selection():
    model = make_random_model(seed=6)
    ids = torch.randint(0, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    selected = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.5
    full = model(ids).logits
    at = flat_positions(selected)
    torch.testing.assert_close(model(ids, logits_at=at).logits, full[selected], atol=0, rtol=0)
    # Any order and repeats: the rows come back as asked.
    at = torch.tensor([20, 0, 8, 8])
    expected = full.flatten(0, 1)[at]
    torch.testing.assert_close(model(ids, logits_at=at).logits, expected, atol=0, rtol=0)
    with pytest.raises(TypeError, match=r"mask\.flatten\(\)\.nonzero\(\)\.squeeze\(1\)"):
        model(ids, logits_at=selected)
    with pytest.raises(ValueError, match="one-dimensional"):
        model(ids, logits_at=at[None])


def test_kv_cache_is_allocated_once_and_its_mode_comes_from_the_call():
    model = make_random_model(seed=7, n_kv_heads=2)
    ids = torch.randint(0, 60, (2, 9), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :3] = 0
    cache = model.new_kv_cache(2, 9, attention_mask=attention_mask)
    n_layers, head_dim = model.config.n_layers, model.config.head_dim
    assert len(cache.keys) == len(cache.values) == n_layers
    assert all(k.shape == (2, 2, 9, head_dim) and k.dtype == model.dtype for k in cache.keys)
    # A window before the whole canvas was written would read unwritten slots.
    with pytest.raises(ValueError, match="run the whole canvas"):
        model(ids[:, 3:6], kv_cache=cache, window_start=3)
    # The padding is the cache's, given once: a mask with a cache is refused.
    with pytest.raises(ValueError, match="new_kv_cache"):
        model(ids, attention_mask=attention_mask, kv_cache=cache)
    whole = model(ids, kv_cache=cache).logits
    reference = model(ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(whole, reference, atol=0, rtol=0)
    keys = [k.clone() for k in cache.keys]
    # A window writes only its slots and attends over all of them.
    window = model(ids[:, 3:6], kv_cache=cache, window_start=3).logits
    torch.testing.assert_close(window, reference[:, 3:6], atol=1e-5, rtol=1e-5)
    for before, after in zip(keys, cache.keys, strict=True):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # Rows leave the batch together with their padding.
    cache.select_rows(torch.tensor([1]))
    alone = model(ids[1:, 3:6], kv_cache=cache, window_start=3).logits
    torch.testing.assert_close(alone, reference[1:, 3:6], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside the cached sequence"):
        model(ids[1:, 3:6], kv_cache=cache, window_start=7)
    with pytest.raises(ValueError, match="holds 1"):
        model(ids[:, 3:6], kv_cache=cache, window_start=3)
    with pytest.raises(ValueError, match="expected \\(2, 9\\)"):
        model.new_kv_cache(2, 9, attention_mask=torch.ones(2, 8))
