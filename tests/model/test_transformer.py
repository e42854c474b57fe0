"""The model itself: attention backends, GQA/MQA, dtypes, config validation."""

from __future__ import annotations

import pytest
import torch

from conftest import make_random_model
from llada.model.config import REFERENCE_DEFAULTS, LLaDAConfig


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
