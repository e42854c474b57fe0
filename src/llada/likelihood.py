"""Conditional log-likelihood by the Monte Carlo ELBO (paper Eq. 6 / Appendix B.5; ML-GSAI/LLaDA
get_log_likelihood.py).

log p(answer | prompt) >= E_{n, masks} [ sum over masked answer tokens of log p(token) / p_mask ].
`get_log_likelihood` reproduces the reference estimator, random draws included; it is a lower
bound, and its variance falls with `mc_num` (128 in the paper, 1 for single-token answers).

LLaDA 2.x (block diffusion, `model.block_diffusion`): the model is a chain over blocks of
`block_length` positions, counted from the prompt's first token as the samplers count them, so
log p(answer | prompt) = sum over the blocks b holding answer tokens of
log p(answer tokens of b | the clean tokens before b, the prompt tokens of b), and each term is
bounded below by that block's masked-diffusion ELBO. The same draws as above (the stratified
count n of the T answer tokens, weight T / n, prompt never masked) estimate the sum of the
blocks' ELBOs without bias. Given the mask, block b's term reads only block b's mask. "n
uniform in 1..T, then n positions uniformly, weight T / n" gives a mask S of m positions the
weight (m-1)! (T-m)! / T! = integral over t in (0, 1) of (1/t) t^m (1-t)^(T-m): the same as
masking every position with probability t ~ U(0, 1), weight 1/t. Summing that over the masks
of the other blocks leaves block b's own ELBO (t^k (1-t)^(T_b-k) for its k masked of T_b), so
each block's term has its ELBO as expectation. One forward per draw gives every block its
term: the input [x_t ; x_0] under `block_diffusion_training_mask`, where a noisy block sees
itself and the clean blocks before it, exactly the context the samplers give it
(`block_masked_logits`). The last block ends with the answer (no positions after it), as the
LLaDA-8B estimator scores prompt + answer only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .diffusion import block_masked_logits, stratified_masking
from .guidance import predict_logits
from .inputs import check_token_ids, device_of, vocab_size_of
from .sampling.config import BLOCK_PRESETS
from .settings import require_non_negative_numbers, require_positive_ints
from .tokens import special_tokens_of

# The block length LLaDA 2.x is trained and decoded with (the authors' presets all use 32).
BLOCK_LENGTH = BLOCK_PRESETS["llada2.0"][1]["block_length"]


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
    block_length: int | None = None,
) -> float:
    """Monte Carlo ELBO estimate of log p(answer | prompt), as the reference function.

    prompt: (l1,) and answer: (l2,) token ids, one sequence each. mask_id: None takes the
    model's own. Returns a float (nats, summed over the answer tokens).

    A LLaDA 2.x model (`model.block_diffusion`) is scored by its block-diffusion ELBO (module
    docstring) over blocks of `block_length` positions (None: 32, the family's); its draws are
    the ones above, so a seed gives the same masks in both families. block_length is refused
    for the other families, and cfg_scale for LLaDA 2.x (it has no guidance).
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

    if getattr(model, "block_diffusion", False):
        block_length = check_block_length(BLOCK_LENGTH if block_length is None else block_length)
        if config.cfg_scale:
            raise ValueError(
                f"cfg_scale={cfg_scale!r}: LLaDA 2.x models have no classifier-free guidance; "
                "leave cfg_scale at 0"
            )

        def masked_logits(clean, noisy, is_masked):
            return block_masked_logits(model, noisy, clean, is_masked, block_length)

    else:
        if block_length is not None:
            raise ValueError(
                "block_length is the block size of LLaDA 2.x's block-diffusion likelihood; this "
                "model scores the whole answer as one sequence: leave it out"
            )

        def masked_logits(clean, noisy, is_masked):
            return predict_logits(
                model, noisy, prompt_index=prompt_index, mask_id=mask_id,
                cfg_scale=config.cfg_scale,
            )[is_masked]  # fmt: skip

    return monte_carlo_elbo(sequence, prompt_index, config, mask_id, masked_logits)


def monte_carlo_elbo(
    sequence: torch.Tensor,
    prompt_index: torch.Tensor,
    config: LikelihoodConfig,
    mask_id: int,
    masked_logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> float:
    """The reference estimator's loop: per draw of `config.batch_sizes()` copies of `sequence`
    (L,), `stratified_masking` of its answer (prompt_index (L,) True on the prompt), then
    -sum CE / p_mask over the masked positions, averaged over all copies.
    masked_logits(clean, noisy, is_masked) gives the logits (N, V) at the N masked positions
    of noisy (B, L), row-major (the family's forward)."""
    total_loss, total_samples = 0.0, 0
    for size in config.batch_sizes():
        batch = sequence[None, :].repeat((size, 1))
        noisy, p_mask = stratified_masking(batch, prompt_index, mask_id)
        is_masked = noisy == mask_id
        logits = masked_logits(batch, noisy, is_masked)
        token_loss = F.cross_entropy(logits, batch[is_masked], reduction="none") / p_mask[is_masked]
        # The reference averages per-batch means; weighting by batch size is the same when all
        # batches are full, and right when the last one is not.
        total_loss += (token_loss.sum() / size).item() * size
        total_samples += size
    return -total_loss / total_samples


def check_block_length(block_length: object) -> int:
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
    return block_length
