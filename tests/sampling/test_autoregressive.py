"""Greedy decoding of the autoregressive baseline."""

from __future__ import annotations

import pytest
import torch

from conftest import make_random_model
from llada.model.transformer import causal_attention_mask
from llada.sampling.autoregressive import generate_autoregressive


def test_greedy_decoding_follows_the_causal_argmax_and_ignores_later_tokens():
    model = make_random_model(seed=3)
    prompt = torch.tensor([[5, 9, 11, 4]])
    out = generate_autoregressive(model, prompt, max_new_tokens=5)
    x = prompt
    for _ in range(5):
        logits = model(x, attention_mask=causal_attention_mask(None, x.shape[1])).logits
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    eos = model.special_tokens.eos_id
    stop = set(model.special_tokens.stop_ids)
    expected = x[0].tolist()
    for i in range(4, len(expected)):  # after a stop token everything is EOS
        if expected[i] in stop:
            expected[i + 1 :] = [eos] * (len(expected) - i - 1)
            break
    assert out[0].tolist() == expected


def test_left_padded_batch_rows_equal_single_rows():
    model = make_random_model(seed=3)
    pad = model.special_tokens.pad_id
    rows = [[5, 9, 11, 4], [7, 8]]
    single = [generate_autoregressive(model, torch.tensor([r]), max_new_tokens=4) for r in rows]
    ids = torch.tensor([rows[0], [pad, pad, *rows[1]]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    batched = generate_autoregressive(model, ids, mask, max_new_tokens=4)
    assert batched[0].tolist() == single[0][0].tolist()
    assert batched[1, 2:].tolist() == single[1][0].tolist()
    with pytest.raises(ValueError, match="max_new_tokens must be positive"):
        generate_autoregressive(model, ids, mask, max_new_tokens=0)
