"""Conditional log-likelihood by the Monte Carlo ELBO (paper Eq. 6 / Appendix B.5; ML-GSAI/LLaDA
get_log_likelihood.py).

log p(answer | prompt) >= E_{n, masks} [ sum over masked answer tokens of log p(token) / p_mask ].
`get_log_likelihood` reproduces the reference estimator, random draws included; it is a lower
bound, and its variance falls with `mc_num` (128 in the paper, 1 for single-token answers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import stratified_masking
from .guidance import predict_logits
from .inputs import check_token_ids, device_of, vocab_size_of
from .settings import require_non_negative_numbers, require_positive_ints
from .tokens import special_tokens_of


@dataclass(frozen=True)
class LikelihoodConfig:
    """Settings of the Monte Carlo likelihood estimate.

    mc_num: Monte Carlo samples (masked copies of the answer).
    batch_size: samples per forward pass. The reference draws `mc_num // batch_size` batches,
        silently dropping a remainder, and crashes when mc_num < batch_size; here that case uses
        one batch of mc_num samples.
    cfg_scale: classifier-free guidance strength (0 = off).
    exact_mc_num: draw exactly mc_num samples, the last batch smaller, instead of the
        reference's `mc_num // batch_size` full batches.
    """

    mc_num: int = 128
    batch_size: int = 16
    cfg_scale: float = 0.0
    exact_mc_num: bool = False

    def __post_init__(self) -> None:
        require_positive_ints(self, "mc_num", "batch_size")
        require_non_negative_numbers(self, "cfg_scale")

    def batch_sizes(self) -> list[int]:
        """Samples per forward pass, in order."""
        size = min(self.batch_size, self.mc_num)
        full, remainder = divmod(self.mc_num, size)
        return [size] * full + ([remainder] if self.exact_mc_num and remainder else [])


@torch.no_grad()
def get_log_likelihood(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    answer: torch.Tensor,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    *,
    exact_mc_num: bool = False,
) -> float:
    """Monte Carlo ELBO estimate of log p(answer | prompt), as the reference function.

    prompt: (l1,) and answer: (l2,) token ids, one sequence each. mask_id: None takes the
    model's own. Returns a float (nats, summed over the answer tokens).
    """
    config = LikelihoodConfig(
        mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale, exact_mc_num=exact_mc_num
    )
    mask_id = special_tokens_of(model, mask_id).mask_id
    vocab = vocab_size_of(model)
    device = device_of(model)
    prompt = check_token_ids("prompt", prompt, 1, vocab)
    answer = check_token_ids("answer", answer, 1, vocab)
    if answer.numel() == 0:
        raise ValueError("answer is empty: there is nothing to score")

    sequence = torch.cat([prompt, answer]).to(device)
    prompt_index = torch.arange(sequence.shape[0], device=device) < len(prompt)
    total_loss, total_samples = 0.0, 0
    for size in config.batch_sizes():
        batch = sequence[None, :].repeat((size, 1))
        noisy, p_mask = stratified_masking(batch, prompt_index, mask_id)
        is_masked = noisy == mask_id
        logits = predict_logits(
            model, noisy, prompt_index=prompt_index, mask_id=mask_id, cfg_scale=config.cfg_scale
        )
        token_loss = (
            F.cross_entropy(logits[is_masked], batch[is_masked], reduction="none")
            / p_mask[is_masked]
        )
        # The reference averages per-batch means; weighting by batch size is the same when all
        # batches are full, and right when the last one is not.
        total_loss += (token_loss.sum() / size).item() * size
        total_samples += size
    return -total_loss / total_samples
