"""Training objectives: LLaDA pre-training and SFT losses (paper Eq. 3 and 5; ML-GSAI/LLaDA
GUIDELINES.md), LLaDA 2.x's block-diffusion loss on the same masking (`block_diffusion_loss`),
an autoregressive loss on the same network for equal-compute comparisons, the routers'
load-balancing loss of mixture-of-experts models (`load_balancing_loss`), and LLaDA 1.5's
preference objective (VRPO: DPO on masked-diffusion ELBO estimates; `dpo_loss`, `elbo_draws`,
`elbo_estimate`, `preference_loss`).

The masking comes from `llada.diffusion`, the module the likelihood estimator uses too. The LM
head runs only on the positions a loss reads (`logits_at`), and cross-entropy is taken in
float32 whatever the model dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .diffusion import PRETRAIN_EPS, block_masked_logits, random_masking
from .model.transformer import causal_attention_mask, flat_positions

# GUIDELINES.md: 1% of pre-training batches are cropped to a random length, so that the model
# also sees sequences shorter than the training length.
RANDOM_LENGTH_PROBABILITY = 0.01


@dataclass
class LossOutput:
    """loss: the LLaDA (or autoregressive) loss; num_targets: tokens that contributed to it;
    aux_loss: the routers' load-balancing loss of the same forward when the trainer asked for it
    (the trainer minimises loss + router_aux_loss_coef * aux_loss)."""

    loss: torch.Tensor
    num_targets: int
    aux_loss: torch.Tensor | None = None


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
    noisy, is_masked, p_mask = _corrupt(x0, mask_id, None, eps, generator)
    logits = model(noisy, logits_at=flat_positions(is_masked)).logits  # (N, V)
    return _weighted_loss(logits, x0, is_masked, p_mask, None)


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
    noisy, is_masked, p_mask = _corrupt(x0, mask_id, prompt_lengths, eps, generator)
    logits = model(noisy, logits_at=flat_positions(is_masked)).logits
    return _weighted_loss(logits, x0, is_masked, p_mask, prompt_lengths)


def block_diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    mask_id: int,
    *,
    block_length: int,
    prompt_lengths: torch.Tensor | None = None,
    eps: float = PRETRAIN_EPS,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """The block-diffusion loss of LLaDA 2.x (inclusionAI/dFactory, tasks/train_llada2_bd.py,
    block_diffusion_mode; the objective of Arriola et al. 2025, "Block Diffusion", arXiv
    2503.09573): every block of x0 (B, L) is denoised from the clean blocks before it.

    x0 is corrupted as by `pretraining_loss` (with `prompt_lengths` (B,): as by `sft_loss`, the
    prompt never masked), and the model reads [x_t ; x_0] (B, 2L) in one forward, under
    `block_diffusion_training_mask` with RoPE positions 0..L-1 for each half: a noisy query sees
    its own noisy block and the clean blocks before it, which is the context the LLaDA 2.x
    samplers give that block. The LM head runs only on the masked noisy positions; logits at
    position i predict token i. The loss is the one of `pretraining_loss` (no prompt:
    Σ_masked CE / p_mask / (B · L)) or of `sft_loss` (each row by its answer length, then the
    mean over rows), the same formula.

    Masking ratio. t ~ U(0, 1) per sequence with p_mask = (1 - eps) t + eps, LLaDA's convention
    (`llada.diffusion.random_masking`), not dFactory's trainer setting t ~ U(0.3, 0.8). With
    the 1/p_mask weight over the whole of (0, 1] the value is an unbiased estimate of the
    negative ELBO per token of the block-diffusion model (the sum over blocks of each block's
    masked-diffusion bound given the clean blocks before it; one t per sequence shared by its
    blocks leaves every block's expectation, so the sum, unchanged). A ratio restricted to
    [0.3, 0.8] weighted by 1/t bounds nothing (it drops the integral outside that range), and its
    values would not compare with the validation -ELBO of the other families.
    """
    if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
        raise ValueError(f"block_length must be a positive integer, got {block_length!r}")
    noisy, is_masked, p_mask = _corrupt(x0, mask_id, prompt_lengths, eps, generator)
    # (N, V), rows in the order of x0[is_masked]
    logits = block_masked_logits(model, noisy, x0, is_masked, block_length)
    return _weighted_loss(logits, x0, is_masked, p_mask, prompt_lengths)


def _corrupt(
    x0: torch.Tensor,
    mask_id: int,
    prompt_lengths: torch.Tensor | None,
    eps: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`random_masking` of x0 (B, L); with prompt_lengths (B,), the prompt is left clean."""
    noisy, is_masked, p_mask = random_masking(x0, mask_id, eps=eps, generator=generator)
    if prompt_lengths is None:
        return noisy, is_masked, p_mask
    is_prompt = torch.arange(x0.shape[1], device=x0.device)[None, :] < prompt_lengths[:, None]
    return torch.where(is_prompt, x0, noisy), is_masked & ~is_prompt, p_mask


def _weighted_loss(
    logits: torch.Tensor,
    x0: torch.Tensor,
    is_masked: torch.Tensor,
    p_mask: torch.Tensor,
    prompt_lengths: torch.Tensor | None,
) -> LossOutput:
    """Σ CE / p_mask over the masked positions (logits (N, V) in the order of x0[is_masked]),
    normalised by all tokens (B · L) or, with prompt_lengths, by each row's answer length and
    then the batch size (GUIDELINES.md)."""
    batch, length = x0.shape
    token_loss = F.cross_entropy(logits.float(), x0[is_masked], reduction="none")
    if prompt_lengths is None:
        loss = (token_loss / p_mask[is_masked]).sum() / x0.numel()
    else:
        answer_lengths = (length - prompt_lengths)[:, None].expand(batch, length)
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
    causal = causal_attention_mask(None, length, x0.device)
    logits = model(x0, attention_mask=causal, logits_at=flat_positions(predicts)).logits
    targets = torch.roll(x0, shifts=-1, dims=1)[predicts]
    if targets.numel() == 0:
        # A one-token batch (the random-length crop can make one) predicts nothing: a zero
        # loss with zero gradients, not the NaN of an empty mean.
        return LossOutput(loss=logits.float().sum() * 0.0, num_targets=0)
    loss = F.cross_entropy(logits.float(), targets, reduction="mean")
    return LossOutput(loss=loss, num_targets=int(predicts.sum()))


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    token_mask: torch.Tensor | None = None,
    *,
    per_layer: bool = False,
) -> torch.Tensor:
    """The auxiliary load-balancing loss of top-k routers: num_experts * sum_e f_e * P_e.

    Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, eq. 4), in the top-k form of the
    LLaDA-MoE reference (`load_balancing_loss_func` in ZHZisZZ/dllm
    dllm/pipelines/llada/models/modeling_lladamoe.py, the OLMoE/Mixtral function):
    - P_e: the mean over rows of softmax(logits)[e] (float32 here);
    - f_e: the fraction of rows whose top-k of that softmax holds e (so sum_e f_e = k);
    - the rows of every MoE layer are pooled before the means, as the reference concatenates
      the layers' logits; with `token_mask` (B, T), only the rows of real tokens count.
    A perfectly even router gives top_k. As in the reference, the top-k is taken on the
    unbiased probabilities even when the model routes with `expert_bias`. Only f_e is
    piecewise constant: the gradient reaches the routers through P_e.

    router_logits: one (B*T, E) or (B, T, E) tensor per MoE layer, over the same tokens.
    per_layer: the mean over layers of each layer's own loss instead. Pooled, one layer's
    overloaded expert e and another layer's underloaded expert e cancel out (expert indices of
    different layers are unrelated), so the pooled loss can sit at top_k while every layer is
    uneven; per layer, it cannot.
    """
    if not router_logits:
        raise ValueError("load_balancing_loss needs the router logits of at least one layer")
    if per_layer and len(router_logits) > 1:
        losses = [
            load_balancing_loss([layer], num_experts, top_k, token_mask) for layer in router_logits
        ]
        return torch.stack(losses).mean()
    logits = torch.cat([layer.reshape(-1, num_experts) for layer in router_logits]).float()
    probabilities = torch.softmax(logits, dim=-1)  # (layers * tokens, E)
    chosen = torch.topk(probabilities, top_k, dim=-1).indices
    routed = torch.zeros_like(probabilities).scatter_(1, chosen, 1.0)  # 0/1 per (row, expert)
    if token_mask is None:
        tokens_per_expert = routed.mean(0)
        probability_per_expert = probabilities.mean(0)
    else:
        # Layer-major rows, each layer's in (B, T) order: the mask repeats once per layer.
        weights = token_mask.reshape(-1).to(torch.float32).repeat(len(router_logits))[:, None]
        count = weights.sum().clamp(min=1.0)  # a tensor: no host synchronisation
        tokens_per_expert = (routed * weights).sum(0) / count
        probability_per_expert = (probabilities * weights).sum(0) / count
    return num_experts * (tokens_per_expert * probability_per_expert).sum()


@contextmanager
def recording_router_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the router logits of every MoE layer during the forwards run inside the block.

    The model names its routers (`model.routers()`, e.g. `LLaDAMoEModel`); a forward hook on
    each appends its output, in layer order, to the list this yields; a model without routers
    records nothing. The hooks are removed on leaving, before any backward pass, so that the
    recomputation of activation checkpointing does not record twice. Pass the unwrapped model
    (hooks on its modules fire under DDP and FSDP2 as well).
    """
    recorded: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        recorded.append(output)

    routers = model.routers() if hasattr(model, "routers") else []
    handles = [router.register_forward_hook(keep) for router in routers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


# Preference optimization ----------------------------------------------------------------------
#
# LLaDA 1.5 (Zhu et al. 2025, "LLaDA 1.5: Variance-Reduced Preference Optimization for Large
# Language Diffusion Models", arXiv 2505.19223): DPO in which every log-likelihood is replaced by
# the masked-diffusion ELBO  B(y | x) = E_t E_{y_t} [ (1/t) sum over masked answer tokens of
# log p(y^i | x, y_t) ], estimated by Monte Carlo for the policy and for the frozen reference.
# VRPO lowers the variance of the resulting preference score by (i) a larger budget n of draws
# per ELBO, (ii) spending it on n distinct timesteps with one mask each, and (iii) antithetic
# sampling: the policy's and the reference's estimates of the same answer use the same draws.

Allocation = Literal["timesteps", "naive"]
ALLOCATIONS = ("timesteps", "naive")


@dataclass
class PreferenceOutput(LossOutput):
    """The DPO loss of a micro-batch of pairs (mean over pairs), and per pair its preference
    score s = (B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l)) (P,), detached."""

    scores: torch.Tensor | None = None


def preference_scores(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l)), elementwise over pairs."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The DPO loss (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), mean over pairs:
    -log sigmoid(beta * [(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))]).

    The four arguments are (P,) log-likelihoods of the chosen (w) and rejected (l) answers, or,
    for LLaDA 1.5's VRPO, their ELBO estimates (`elbo_estimate`). Computed in float32 with
    `logsigmoid`, which stays finite for any score."""
    scores = preference_scores(
        policy_chosen.float(), policy_rejected.float(), ref_chosen.float(), ref_rejected.float()
    )
    return -F.logsigmoid(beta * scores).mean()


def elbo_draws(
    x0: torch.Tensor,
    prompt_lengths: torch.Tensor,
    budget: int,
    allocation: Allocation = "timesteps",
    *,
    eps: float = PRETRAIN_EPS,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Monte Carlo draws of `budget` ELBO samples for each row of x0 (B, L) (prompt first,
    answer after `prompt_lengths` (B,)): returns (is_masked (n, B, L) bool, p_mask (n, B)).

    Draw j of row b masks each answer token independently with probability
    p_mask[j, b] = (1 - eps) t + eps, t ~ U(0, 1) (LLaDA's forward process, as
    `llada.diffusion.random_masking`; the prompt is never masked).
    - 'timesteps' (LLaDA 1.5's optimal allocation of the budget): the n
      draws have n independent timesteps, one mask each.
    - 'naive': one timestep per row, shared by its n draws, n masks at it.
    Both are unbiased for the same ELBO; the first has the lower variance (the paper's result,
    measured in bench/vrpo_variance.py).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be 'timesteps' or 'naive', got {allocation!r}")
    batch, length = x0.shape
    timesteps = budget if allocation == "timesteps" else 1
    t = torch.rand(timesteps, batch, device=x0.device, generator=generator)  # (n_t, B)
    p_mask = ((1 - eps) * t + eps).expand(budget, batch)  # (n, B)
    draws = torch.rand((budget, batch, length), device=x0.device, generator=generator)
    is_answer = torch.arange(length, device=x0.device)[None, :] >= prompt_lengths[:, None]
    is_masked = (draws < p_mask[:, :, None]) & is_answer[None]
    return is_masked, p_mask.contiguous()


def elbo_estimate(
    model: torch.nn.Module,
    x0: torch.Tensor,
    is_masked: torch.Tensor,
    p_mask: torch.Tensor,
    mask_id: int,
    *,
    block_length: int | None = None,
) -> torch.Tensor:
    """The ELBO estimate of each row's answer given its prompt, (B,) in nats (summed over the
    answer tokens): the mean over the n draws (`elbo_draws`: is_masked (n, B, L), p_mask (n, B))
    of sum over masked tokens of log p(token | x_t) / p_mask. The same estimator as the
    likelihood's (`llada.likelihood`), with the draws given, so two models can be scored on the
    same draws. One forward of the n * B noisy copies; the LM head only at masked positions.
    block_length: a LLaDA 2.x model's block-diffusion forward (`block_masked_logits`)."""
    draws, batch, length = is_masked.shape
    clean = x0[None].expand(draws, batch, length).reshape(draws * batch, length)
    flat_masked = is_masked.reshape(draws * batch, length)
    noisy = torch.where(flat_masked, mask_id, clean)
    if block_length is not None:
        logits = block_masked_logits(model, noisy, clean, flat_masked, block_length)
    else:
        logits = model(noisy, logits_at=flat_positions(flat_masked)).logits  # (N, V)
    log_p = -F.cross_entropy(logits.float(), clean[flat_masked], reduction="none")  # (N,)
    weights = p_mask.reshape(draws * batch, 1).expand(draws * batch, length)[flat_masked]
    rows = flat_masked.nonzero()[:, 0]  # the (draw, row) of each masked token, row-major
    per_draw = torch.zeros(draws * batch, device=x0.device, dtype=torch.float32)
    per_draw = per_draw.index_add(0, rows, log_p / weights)
    return per_draw.view(draws, batch).mean(0)


def preference_loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    x0: torch.Tensor,
    prompt_lengths: torch.Tensor,
    mask_id: int,
    *,
    beta: float,
    budget: int,
    allocation: Allocation = "timesteps",
    antithetic: bool = True,
    eps: float = PRETRAIN_EPS,
    block_length: int | None = None,
    generator: torch.Generator | None = None,
) -> PreferenceOutput:
    """The DPO loss on ELBO estimates of P pairs: x0 (2P, L) holds the chosen answers in rows
    [0, P) and the rejected ones in rows [P, 2P), each after its prompt (prompt_lengths (2P,)).

    The policy's estimates carry the gradient; the reference's are taken without one. With
    `antithetic` (LLaDA 1.5's antithetic sampling) the reference is scored on the policy's own
    draws (same timesteps, same masks), so where the two models agree their estimates cancel
    exactly; without it, the reference gets draws of its own from the same generator.
    budget, allocation: `elbo_draws`. Plain DPO on ELBOs is budget n, allocation 'naive',
    antithetic off; VRPO is 'timesteps' with antithetic on."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if x0.shape[0] % 2:
        raise ValueError(f"x0 must hold chosen then rejected rows (2P), got {x0.shape[0]} rows")
    pairs = x0.shape[0] // 2
    is_masked, p_mask = elbo_draws(
        x0, prompt_lengths, budget, allocation, eps=eps, generator=generator
    )
    policy_elbo = elbo_estimate(policy, x0, is_masked, p_mask, mask_id, block_length=block_length)
    if not antithetic:
        is_masked, p_mask = elbo_draws(
            x0, prompt_lengths, budget, allocation, eps=eps, generator=generator
        )
    with torch.no_grad():
        ref_elbo = elbo_estimate(
            reference, x0, is_masked, p_mask, mask_id, block_length=block_length
        )
    args = (policy_elbo[:pairs], policy_elbo[pairs:], ref_elbo[:pairs], ref_elbo[pairs:])
    return PreferenceOutput(
        loss=dpo_loss(*args, beta),
        num_targets=int(is_masked.sum()),
        scores=preference_scores(*args).detach(),
    )
