"""The training objectives (ML-GSAI/LLaDA GUIDELINES.md; paper Eq. 3-5), against direct
computations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from conftest import make_random_model
from llada.diffusion import random_masking
from llada.losses import autoregressive_loss, maybe_crop, pretraining_loss, sft_loss
from llada.model.transformer import causal_attention_mask
from llada.train.activation_checkpointing import apply_activation_checkpointing


def test_pretraining_loss_is_the_weighted_masked_cross_entropy():
    model = make_random_model(seed=0)
    mask_id = model.special_tokens.mask_id
    x0 = torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(0))
    out = pretraining_loss(model, x0, mask_id, generator=torch.Generator().manual_seed(7))
    noisy, is_masked, p_mask = random_masking(
        x0, mask_id, generator=torch.Generator().manual_seed(7)
    )
    logits = model(noisy).logits
    ce = F.cross_entropy(logits[is_masked], x0[is_masked], reduction="none")
    expected = (ce / p_mask[is_masked]).sum() / x0.numel()  # normalised by all tokens
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.num_targets == int(is_masked.sum())


def test_sft_loss_never_masks_the_prompt_and_normalises_by_answer_length():
    model = make_random_model(seed=1)
    mask_id = model.special_tokens.mask_id
    x0 = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    prompt_lengths = torch.tensor([4, 9])
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, logits_at=None):
            seen["x"], seen["at"] = x, logits_at
            return model(x, logits_at=logits_at)

    out = sft_loss(Spy(), x0, prompt_lengths, mask_id, generator=torch.Generator().manual_seed(3))
    x = seen["x"]
    # The model is given flat row-major positions into B*T: back to the (B, T) selection.
    at = torch.zeros(x.numel(), dtype=torch.bool)
    at[seen["at"]] = True
    at = at.view(x.shape)
    assert torch.equal(x[0, :4], x0[0, :4]) and torch.equal(x[1, :9], x0[1, :9])
    assert not at[0, :4].any() and not at[1, :9].any()
    # Recompute: p_mask per row from the same draws.
    t = torch.rand(2, generator=torch.Generator().manual_seed(3))
    p_mask = (1 - 1e-3) * t + 1e-3
    logits = model(x).logits
    ce = F.cross_entropy(logits[at], x0[at], reduction="none")
    rows = at.nonzero()[:, 0]
    answer_lengths = (12 - prompt_lengths)[rows]
    expected = (ce / p_mask[rows] / answer_lengths).sum() / 2
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_autoregressive_loss_is_causal():
    model = make_random_model(seed=2)
    x0 = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(2))
    causal = causal_attention_mask(None, 8)
    logits = model(x0, attention_mask=causal).logits
    changed = x0.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 60
    logits_changed = model(changed, attention_mask=causal).logits
    torch.testing.assert_close(logits[:, :6], logits_changed[:, :6])  # the future is not seen
    assert not torch.allclose(logits[:, 6:], logits_changed[:, 6:])
    out = autoregressive_loss(model, x0)
    expected = F.cross_entropy(logits[0, :-1], x0[0, 1:])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    answer_only = autoregressive_loss(model, x0, prompt_lengths=torch.tensor([5]))
    torch.testing.assert_close(
        answer_only.loss, F.cross_entropy(logits[0, 4:-1], x0[0, 5:]), atol=1e-5, rtol=1e-5
    )


def test_autoregressive_loss_of_a_one_token_crop_is_zero_not_nan():
    """The random-length crop can leave one token, which predicts nothing (this was a NaN that
    stopped the reversal-curse recipe's autoregressive run)."""
    model = make_random_model(seed=2)
    out = autoregressive_loss(model, torch.tensor([[5], [7]]))
    assert out.num_targets == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_random_length_crop_happens_about_one_percent_of_the_time():
    x0 = torch.zeros(2, 50, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    lengths = [maybe_crop(x0, generator).shape[1] for _ in range(5000)]
    cropped = sum(length != 50 or False for length in lengths)
    assert 20 <= cropped <= 90  # about 50 expected; a crop to the full length is not seen
    assert min(lengths) >= 1


def test_loss_is_a_bound_in_sensible_units():
    # A random model's -ELBO per token is near log(vocab) (each masked token costs about
    # log V nats, weighted by 1/p_mask, over a fraction p_mask of the tokens).
    model = make_random_model(seed=3)
    x0 = torch.randint(0, 60, (64, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = pretraining_loss(
            model, x0, model.special_tokens.mask_id, generator=torch.Generator().manual_seed(0)
        )
    value = float(out.loss)
    assert 0.7 * math.log(64) < value < 1.3 * math.log(64)


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    model = make_random_model(seed=4).train()
    keys = list(model.state_dict())
    x0 = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(4))
    # The attention: the recomputation stops once the block's last saved tensor is made again,
    # inside the MLP, before an MLP hook would fire.
    attention_calls = []
    model.blocks[0].attn.register_forward_hook(lambda *_: attention_calls.append(1))
    grads, calls = [], []
    for checkpointing in (False, True):
        if checkpointing:
            apply_activation_checkpointing(model)
        model.zero_grad()
        attention_calls.clear()
        out = pretraining_loss(
            model, x0, model.special_tokens.mask_id, generator=torch.Generator().manual_seed(1)
        )
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        calls.append(len(attention_calls))
    torch.testing.assert_close(grads[0], grads[1])
    # The backward pass ran the block again (its activations were not kept), and the model's
    # names are untouched: checkpoints load as before.
    assert calls == [1, 2]
    assert list(model.state_dict()) == keys
    # Out of training (or without grad) nothing is recomputed.
    model.eval()
    attention_calls.clear()
    model(x0).logits.sum().backward()
    assert len(attention_calls) == 1
