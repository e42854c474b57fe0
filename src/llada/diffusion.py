"""The forward (masking) process of LLaDA, shared by the training losses and the likelihood.

A clean sequence x0 is corrupted to x_t by replacing tokens with the mask token; the model is
trained, and evaluated, on predicting the masked tokens, each weighted by 1 / p_mask. Training
and evaluation call these same functions, so they cannot disagree about what "masked" means.
"""

from __future__ import annotations

import torch

from .model.llada2 import block_diffusion_training_mask
from .model.transformer import flat_positions

# Paper §2.1 / GUIDELINES.md: p_mask = (1 - eps) t + eps keeps the weight 1/p_mask bounded.
PRETRAIN_EPS = 1e-3


def random_masking(
    x0: torch.Tensor,
    mask_id: int,
    eps: float = PRETRAIN_EPS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-training corruption: t ~ U(0, 1) per sequence, each token masked independently.

    x0: (B, L). Returns (x_t, is_masked, p_mask), the last two (B, L); p_mask = (1 - eps) t + eps.
    """
    batch, length = x0.shape
    t = torch.rand(batch, device=x0.device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(batch, length)
    is_masked = torch.rand((batch, length), device=x0.device, generator=generator) < p_mask
    return torch.where(is_masked, mask_id, x0), is_masked, p_mask


def stratified_masking(
    batch: torch.Tensor, prompt_index: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The likelihood estimator's corruption (reference `forward_process` of ML-GSAI/LLaDA
    get_log_likelihood.py).

    batch: (b, l) copies of one sequence; prompt_index: (l,) bool, prompt positions are never
    masked. Row i masks exactly n_i of the T answer tokens, with the n_i spread evenly over
    [1, T] from one random start (stratified, lower variance than independent draws), placed
    by a random permutation. Returns (noisy batch, p_mask (b, l) = n_i / T).

    The random draws (one randint on the batch's device, then b CPU randperms) follow the
    reference exactly, so a seeded run gives the reference's estimate.
    """
    b, length = batch.shape
    target_len = int(length - int(prompt_index.sum()))
    k = torch.randint(1, target_len + 1, (), device=batch.device)
    counts = torch.round(
        torch.linspace(float(k), k + (b - 1) * (target_len / b), steps=b, device=batch.device)
    ).long()
    counts = ((counts - 1) % target_len) + 1  # wrap into [1, T]
    indices = torch.arange(target_len, device=batch.device).repeat(b, 1)
    is_masked = indices < counts.unsqueeze(1)
    for row in range(b):
        is_masked[row] = is_masked[row][torch.randperm(target_len)]
    prompt_part = torch.zeros(b, length - target_len, dtype=torch.bool, device=batch.device)
    is_masked = torch.cat((prompt_part, is_masked), dim=1)
    noisy = torch.where(is_masked, mask_id, batch)
    return noisy, (counts / target_len).unsqueeze(1).repeat(1, length)


def block_masked_logits(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    clean: torch.Tensor,
    is_masked: torch.Tensor,
    block_length: int,
) -> torch.Tensor:
    """A LLaDA 2.x model's logits (N, V) at the N positions of `is_masked` (B, L), row-major,
    each predicted from its own block of `noisy` (B, L) and the blocks of `clean` (B, L) before
    it: one forward of [noisy ; clean] (B, 2L) under `block_diffusion_training_mask` with RoPE
    positions 0..L-1 in each half (inclusionAI/dFactory's block_diffusion_mode, the training
    forward of `llada.losses.block_diffusion_loss` and the likelihood's). Blocks are counted from position 0."""
    length = noisy.shape[1]
    device = noisy.device
    targets = torch.cat([is_masked, torch.zeros_like(is_masked)], dim=1)  # the noisy half
    return model(
        torch.cat([noisy, clean], dim=1),
        attention_mask=block_diffusion_training_mask(length, block_length, device),
        positions=torch.arange(length, device=device).repeat(2),
        logits_at=flat_positions(targets),
    ).logits
