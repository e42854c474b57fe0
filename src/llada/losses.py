"""Training objectives: LLaDA pre-training and SFT losses (paper Eq. 3 and 5; ML-GSAI/LLaDA
GUIDELINES.md), and an autoregressive loss on the same network for equal-compute comparisons.

The masking comes from `llada.diffusion`, the module the likelihood estimator uses too. The LM
head runs only on the positions a loss reads (`logits_at`), and cross-entropy is taken in
float32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import PRETRAIN_EPS, random_masking

# GUIDELINES.md: 1% of pre-training batches are cropped to a random length, so that the model
# also sees sequences shorter than the training length.
RANDOM_LENGTH_PROBABILITY = 0.01


@dataclass
class LossOutput:
    """loss: the scalar to minimise; num_targets: tokens that contributed to it."""

    loss: torch.Tensor
    num_targets: int


def maybe_crop(
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    probability: float = RANDOM_LENGTH_PROBABILITY,
) -> torch.Tensor:
    """With `probability`, crop the batch (B, L) to a random length in [1, L]."""
    if float(torch.rand((), generator=generator)) >= probability:
        return x0
    length = int(torch.randint(1, x0.shape[1] + 1, (), generator=generator))
    return x0[:, :length]


def pretraining_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    mask_id: int,
    *,
    eps: float = PRETRAIN_EPS,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """-ELBO per token of clean sequences x0 (B, L): Σ_masked CE / p_mask / (B · L).

    The normalisation is by all tokens of the batch, not by the masked ones (ML-GSAI/LLaDA
    GUIDELINES.md), so the value is an unbiased estimate of the negative ELBO per token, in nats.
    """
    noisy, is_masked, p_mask = random_masking(x0, mask_id, eps=eps, generator=generator)
    logits = model(noisy, logits_at=is_masked).logits  # (N, V)
    token_loss = F.cross_entropy(logits.float(), x0[is_masked], reduction="none")
    loss = (token_loss / p_mask[is_masked]).sum() / x0.numel()
    return LossOutput(loss=loss, num_targets=int(is_masked.sum()))


def sft_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    prompt_lengths: torch.Tensor,
    mask_id: int,
    *,
    eps: float = PRETRAIN_EPS,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """SFT loss of prompt + answer sequences x0 (B, L), answers padded with EOS (ML-GSAI/LLaDA
    GUIDELINES.md).

    The prompt is never masked; the EOS padding belongs to the answer and is trained on; each
    row is normalised by its answer length (L - prompt length), then averaged over rows.
    """
    batch, length = x0.shape
    noisy, is_masked, p_mask = random_masking(x0, mask_id, eps=eps, generator=generator)
    is_prompt = torch.arange(length, device=x0.device)[None, :] < prompt_lengths[:, None]
    noisy = torch.where(is_prompt, x0, noisy)
    is_masked = is_masked & ~is_prompt
    answer_lengths = (length - prompt_lengths)[:, None].expand(batch, length)
    logits = model(noisy, logits_at=is_masked).logits
    token_loss = F.cross_entropy(logits.float(), x0[is_masked], reduction="none")
    loss = (token_loss / p_mask[is_masked] / answer_lengths[is_masked]).sum() / batch
    return LossOutput(loss=loss, num_targets=int(is_masked.sum()))


def autoregressive_loss(
    model: torch.nn.Module, x0: torch.Tensor, prompt_lengths: torch.Tensor | None = None
) -> LossOutput:
    """Next-token cross-entropy with a causal mask, mean over predicted tokens (answer tokens
    only when prompt_lengths is given): the same network trained as an autoregressive model."""
    batch, length = x0.shape
    predicts = torch.ones(batch, length, dtype=torch.bool, device=x0.device)
    predicts[:, -1] = False  # the last position has no next token
    if prompt_lengths is not None:
        # Position i predicts token i + 1; train only where that token is in the answer.
        predicts &= torch.arange(length, device=x0.device)[None, :] + 1 >= prompt_lengths[:, None]
    logits = model(x0, logits_at=predicts, causal=True).logits
    targets = torch.roll(x0, shifts=-1, dims=1)[predicts]
    if targets.numel() == 0:
        # A one-token batch (the random-length crop can make one) predicts nothing: a zero
        # loss with zero gradients, not the NaN of an empty mean.
        return LossOutput(loss=logits.float().sum() * 0.0, num_targets=0)
    loss = F.cross_entropy(logits.float(), targets, reduction="mean")
    return LossOutput(loss=loss, num_targets=int(predicts.sum()))
