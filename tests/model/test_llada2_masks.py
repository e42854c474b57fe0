"""LLaDA 2.x's block-diffusion training mask ([x_t ; x_0] input, dFactory's block_diffusion_mode)
against the context the samplers give each block."""

from __future__ import annotations

import torch

import llada
from conftest import REFERENCE
from llada.model.llada2 import block_attention_mask, block_diffusion_training_mask


def test_training_mask_pattern():
    allowed = block_diffusion_training_mask(6, 2)[0, 0]
    n = 6
    for q in range(2 * n):
        for k in range(2 * n):
            qb, kb = (q % n) // 2, (k % n) // 2
            q_noisy, k_noisy = q < n, k < n
            if q_noisy and k_noisy:
                expected = qb == kb
            elif q_noisy:
                expected = kb < qb
            else:
                expected = (not k_noisy) and kb <= qb
            assert bool(allowed[q, k]) == expected, (q, k)


def test_noisy_half_sees_what_the_sampler_shows_each_block():
    """The noisy block b of one training forward gets the logits that the sampler's forward
    over [clean blocks before b ; noisy block b] under the inference mask gives it."""
    model = llada.load_model(REFERENCE / "llada2-tiny", dtype=torch.float32)
    block, n = 4, 12
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 500, (1, n), generator=generator)
    noisy = torch.where(torch.rand(1, n, generator=generator) < 0.5, 511, clean)
    positions = torch.arange(n).repeat(2)
    logits = model(
        torch.cat([noisy, clean], 1),
        block_diffusion_training_mask(n, block),
        positions=positions,
    ).logits
    for b in range(n // block):
        end = (b + 1) * block
        window = torch.cat([clean[:, : b * block], noisy[:, b * block : end]], 1)
        alone = model(window, block_attention_mask(end, block)).logits
        torch.testing.assert_close(
            logits[:, b * block : end], alone[:, b * block :], atol=1e-4, rtol=1e-4
        )
    # and the clean half is the inference forward of the clean sequence
    torch.testing.assert_close(
        logits[:, n:], model(clean, block_attention_mask(n, block)).logits, atol=1e-4, rtol=1e-4
    )
