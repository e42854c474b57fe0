"""The Monte Carlo likelihood beyond the reference vectors."""

from __future__ import annotations

import math

import pytest
import torch

import llada
from llada.diffusion import random_masking, stratified_masking
from llada.likelihood import LikelihoodConfig


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.special_tokens = model.special_tokens
        self.config = model.config
        self.rows = []

    def forward(self, x, attention_mask=None):
        self.rows.append(x.shape[0])
        return self.inner(x, attention_mask=attention_mask)


def test_single_token_answer_is_exact(random_model):
    # With one answer token, every sample masks exactly it with p_mask = 1, so the estimate is
    # the exact conditional log-probability.
    prompt, answer = torch.tensor([5, 9, 11]), torch.tensor([17])
    logits = random_model(torch.tensor([[5, 9, 11, random_model.special_tokens.mask_id]])).logits
    exact = torch.log_softmax(logits[0, -1], dim=-1)[17].item()
    assert llada.get_log_likelihood(
        random_model, prompt, answer, mc_num=4, batch_size=2
    ) == pytest.approx(exact, rel=1e-5)


def test_mc_num_below_batch_size_does_not_crash(random_model):
    # The reference divides by zero here.
    counting = CountingModel(random_model)
    value = llada.get_log_likelihood(
        counting, torch.tensor([1, 2]), torch.tensor([3, 4, 5]), mc_num=3, batch_size=16
    )
    assert math.isfinite(value) and value < 0
    assert counting.rows == [3]


def test_exact_mc_num_draws_the_remainder(random_model):
    counting = CountingModel(random_model)
    llada.get_log_likelihood(
        counting, torch.tensor([1, 2]), torch.tensor([3, 4, 5]), mc_num=10, batch_size=4
    )
    assert counting.rows == [4, 4]  # the reference drops the remainder
    counting.rows.clear()
    llada.get_log_likelihood(
        counting,
        torch.tensor([1, 2]),
        torch.tensor([3, 4, 5]),
        mc_num=10,
        batch_size=4,
        exact_mc_num=True,
    )
    assert counting.rows == [4, 4, 2]


def test_estimate_converges_towards_a_likely_answer(random_model):
    # A sanity check of sign and scale: a bound on log p of 4 tokens over a 64-token
    # vocabulary from a near-uniform random model is close to 4 * log(1/64).
    torch.manual_seed(0)
    value = llada.get_log_likelihood(
        random_model, torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6]), mc_num=64, batch_size=16
    )
    assert 4 * math.log(1 / 64) * 1.5 < value < 4 * math.log(1 / 64) * 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"mc_num": 0}, ValueError, "mc_num"),
        ({"batch_size": -2}, ValueError, "batch_size"),
        ({"cfg_scale": -1.0}, ValueError, "cfg_scale"),
        ({"answer": torch.tensor([], dtype=torch.long)}, ValueError, "empty"),
        ({"answer": torch.tensor([[3, 4]])}, ValueError, "shape"),
        ({"prompt": [1, 2]}, TypeError, "LongTensor"),
    ],
)
def test_bad_arguments_are_explained(random_model, kwargs, error, words):
    arguments = {
        "prompt": torch.tensor([1, 2]),
        "answer": torch.tensor([3, 4]),
        "mc_num": 4,
        "batch_size": 2,
        **kwargs,
    }
    with pytest.raises(error, match=words):
        llada.get_log_likelihood(random_model, **arguments)


def test_config_batches():
    assert LikelihoodConfig(mc_num=128, batch_size=32).batch_sizes() == [32] * 4
    assert LikelihoodConfig(mc_num=5, batch_size=8).batch_sizes() == [5]


def test_stratified_masking_counts():
    torch.manual_seed(0)
    batch = torch.arange(10).repeat(4, 1)
    prompt_index = torch.arange(10) < 2
    noisy, p_mask = stratified_masking(batch, prompt_index, mask_id=99)
    is_masked = noisy == 99
    assert not is_masked[:, :2].any(), "the prompt is never masked"
    counts = is_masked.sum(1)
    torch.testing.assert_close(p_mask[:, 0], counts / 8)
    # Strata: the counts are spread over [1, 8], not clustered: distinct here.
    assert len(set(counts.tolist())) == 4 and counts.min() >= 1


def test_random_masking_rate():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2000, 50, dtype=torch.long)
    noisy, is_masked, p_mask = random_masking(x0, mask_id=7, generator=generator)
    assert torch.equal(noisy == 7, is_masked)
    assert float(p_mask.min()) >= 1e-3 and float(p_mask.max()) <= 1
    # Independent masking: the masked fraction matches p_mask on average.
    assert abs(float(is_masked.float().mean() - p_mask.mean())) < 0.01
