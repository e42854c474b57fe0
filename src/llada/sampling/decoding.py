"""The parts of a denoising step that the fast loop composes: proposals and commit rules.

A step has three questions. How are logits obtained (`sources.py`)? What does the model propose
at each candidate position, and how confident is it (`propose`)? Which proposals are committed
(`commit`)? The rules here:

- `schedule`: the reference's linear schedule, the top-k most confident per step.
- `threshold`: every proposal whose confidence reaches `threshold`, and always the most confident
  one (Fast-dLLM's parallel decoding).
- `factor`: Fast-dLLM's factor rule: with confidences sorted c_1 >= c_2 >= ..., take the first n
  while c_i >= 1 - factor / (i + 1), reproducing its quirk that reaching the last one takes all.
- `entropy`: the EB-sampler's rule: sorted by entropy, the longest run whose summed entropy stays
  within `entropy_bound` nats (always at least one); errors of jointly committed tokens are
  bounded by their total uncertainty rather than by each token's confidence alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tokens import SpecialTokens
from .config import GenerateConfig
from .reference import add_gumbel_noise


def propose(
    logits: torch.Tensor,
    config: GenerateConfig,
    tokens: SpecialTokens,
    *,
    softmax_dtype: torch.dtype | None = None,
    need_entropy: bool = False,
    never_propose: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Proposals for N positions from their logits (N, V): (token (N,), confidence (N,), entropy).

    The confidence is the model's probability of the proposed token, as the reference computes
    it (including its `confidence_eos_eot_inf` quirk, ML-GSAI/LLaDA generate.py). By default it
    comes from a
    float32 log-sum-exp, with no full-vocabulary probability tensor; `softmax_dtype` instead
    computes the full softmax in that dtype and gathers, bit for bit as the reference (the
    logits' dtype for LLaDA's sampler, float64 for Fast-dLLM's). Random draws (Gumbel noise, random remasking) have the
    shape of `logits`, so N = B * L rows in row-major order consume the global generator
    exactly as the reference does.

    never_propose: a token id that is never proposed. The fast loop passes the mask id: a
    proposed mask would leave its position masked, and a rule that decodes until the block is
    full would never finish (the reference, with a fixed step count, just wastes the step).
    It still counts in the distribution: confidences and entropies are those of the model's
    full softmax, as in Fast-dLLM (renormalising without it would raise every confidence by
    the mask's probability and move threshold decisions).

    generator: the random draws' source (default: torch's global generator).
    """
    if config.logits_eos_inf:
        logits = logits.clone()
        logits[:, tokens.eos_id] = -torch.inf
    noisy = add_gumbel_noise(logits, config.temperature, generator)
    if never_propose is not None:
        noisy = noisy.index_fill(-1, torch.tensor([never_propose], device=noisy.device), -torch.inf)
    proposal = noisy.argmax(dim=-1)
    entropy = None
    if need_entropy:
        log_p = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).nan_to_num().sum(-1)
    if config.remasking == "low_confidence":
        scored = logits.to(softmax_dtype or torch.float32)
        if config.confidence_eos_eot_inf and not config.fix_confidence_eos_eot:
            # The reference sets EoT (and, at temperature 0, also EOS) to -inf after choosing
            # the proposals and before its softmax.
            excluded = [tokens.eot_id] if tokens.eot_id is not None else []
            if config.temperature == 0:
                excluded.append(tokens.eos_id)
            if excluded:
                scored = scored.clone()
                scored[:, excluded] = -torch.inf
        if softmax_dtype is not None:
            confidence = torch.softmax(scored, dim=-1).gather(-1, proposal[:, None]).squeeze(-1)
        else:
            chosen = scored.gather(-1, proposal[:, None]).squeeze(-1)
            confidence = (chosen - torch.logsumexp(scored, dim=-1)).exp()
    else:
        confidence = torch.rand(proposal.shape, device=proposal.device, generator=generator)
    if config.confidence_eos_eot_inf and config.fix_confidence_eos_eot:
        stop = torch.tensor(tokens.stop_ids, device=proposal.device)
        confidence = torch.where(torch.isin(proposal, stop), confidence - 2, confidence)
    return proposal, confidence, entropy


def has_nonfinite_logits(logits: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: whether any position's logits (N, V) hold NaN or +inf, or a confidence
    is NaN (e.g. every logit -inf). -inf logits alone are legitimate (forbidden tokens). Left on
    the device, so that the caller folds it into a host sync it makes anyway."""
    return (~(logits.amax(dim=-1) < torch.inf)).any() | confidence.isnan().any()


def _nan_last(confidence: torch.Tensor) -> torch.Tensor:
    """NaN confidences as candidates ranked below every other one. Sorting and top-k rank NaN
    above everything and `> -inf` is False for it, so a row of NaN candidates would otherwise
    commit nothing (or garbage first) and a loop that decodes until its block is full would
    never end. The samplers raise on non-finite logits; the rules stay total regardless."""
    low = torch.finfo(confidence.dtype).min
    return torch.where(confidence.isnan(), low, confidence)


def commit_schedule(confidence: torch.Tensor, quota: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Top-`quota[row]` of each row's confidences (-inf = not a candidate), as the reference.

    `topk` takes its k on the host: the fast loop passes the quota as Python ints (read once
    per block), so a step reads nothing back here; a tensor quota is read back once per call."""
    confidence = _nan_last(confidence)
    counts = quota.tolist() if isinstance(quota, torch.Tensor) else list(quota)
    commit = torch.zeros_like(confidence, dtype=torch.bool)
    for row, k in enumerate(counts):
        _, chosen = torch.topk(confidence[row], k=k)
        commit[row, chosen] = True
    return commit


def _ranked(confidence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted confidences, their columns, candidate counts) per row, most confident first."""
    confidence = _nan_last(confidence)
    ordered, columns = confidence.sort(dim=-1, descending=True, stable=True)
    return ordered, columns, (confidence > -torch.inf).sum(-1)


def _take_first(columns: torch.Tensor, count: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    rank = torch.arange(columns.shape[-1], device=columns.device)
    chosen = rank[None, :] < count[:, None]
    commit = torch.zeros(shape, dtype=torch.bool, device=columns.device)
    return commit.scatter(-1, columns, chosen)


def commit_threshold(confidence: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Every candidate with confidence >= threshold, and each row's most confident one.
    threshold: one number, or one per row as an (R, 1) tensor (so for `commit_factor`'s factor
    and `commit_entropy`'s bound)."""
    ordered, columns, candidates = _ranked(confidence)
    count = (ordered >= threshold).sum(-1).clamp(min=1).minimum(candidates)
    return _take_first(columns, count, confidence.shape)


def commit_factor(confidence: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Fast-dLLM's factor rule (NVlabs/Fast-dLLM llada/generate.py), its all-at-the-end quirk
    included."""
    ordered, columns, candidates = _ranked(confidence)
    n = torch.arange(1, ordered.shape[-1] + 1, device=ordered.device, dtype=ordered.dtype)
    # (W,), or (R, W) for a factor per row. Written as torch computes `factor / (n + 1)` for a
    # Python number, so that a per-row tensor of the same factor gives the same bits.
    thresholds = 1 - (n + 1).reciprocal() * factor
    # The first is always taken: -inf, not -1, as confidences below -1 occur (NaN ranked last,
    # eos_in_order's shifted EOS proposals) and would otherwise commit nothing.
    thresholds[..., 0] = -torch.inf
    fails = (ordered < thresholds) & (n[None, :] <= candidates[:, None])
    first_fail = torch.where(
        fails.any(-1), fails.to(torch.int64).argmax(-1), candidates.to(torch.int64) - 1
    )
    count = torch.where(first_fail >= candidates - 1, candidates, first_fail)
    return _take_first(columns, count, confidence.shape)


def commit_entropy(
    confidence: torch.Tensor, entropy: torch.Tensor, bound: float | torch.Tensor
) -> torch.Tensor:
    """EB-sampler: lowest-entropy candidates first, while their entropy sum stays <= bound.
    A NaN entropy ranks after every finite one, still before the non-candidates."""
    candidate = _nan_last(confidence) > -torch.inf
    entropy = torch.where(entropy.isnan(), torch.finfo(entropy.dtype).max, entropy)
    keyed = torch.where(candidate, entropy, torch.inf)
    ordered, columns = keyed.sort(dim=-1, stable=True)
    total = torch.where(ordered.isinf(), torch.inf, ordered).cumsum(-1)
    count = (total <= bound).sum(-1).clamp(min=1).minimum(candidate.sum(-1))
    return _take_first(columns, count, confidence.shape)
