"""Greedy left-to-right decoding of a LLaDA network trained with the autoregressive objective
(`llada train --autoregressive`): the baseline of masked-diffusion vs autoregressive
comparisons at equal training compute. Not a fast path: every token re-runs the causal
forward over the sequence, which is plenty for the short answers these comparisons use."""

from __future__ import annotations

import torch

from ..inputs import check_attention_mask, check_context, check_prompt, device_of, vocab_size_of
from ..model.transformer import causal_attention_mask
from ..tokens import special_tokens_of


@torch.no_grad()
def generate_autoregressive(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
) -> torch.Tensor:
    """(B, Lp + max_new_tokens): each prompt row continued by greedy next-token predictions;
    a row that has produced EOS/EoT is filled with EOS from there on."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens <= 0
    ):
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    tokens = special_tokens_of(model, None)
    device = device_of(model)
    x = check_prompt(prompt, vocab_size_of(model)).to(device)
    batch, prompt_length = x.shape
    check_context(model, prompt_length + max_new_tokens, prompt_length, max_new_tokens)
    if attention_mask is not None:
        attention_mask = check_attention_mask(attention_mask, (batch, prompt_length)).to(device)
    stop = torch.tensor(tokens.stop_ids, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)
    for _ in range(max_new_tokens):
        length = x.shape[1]
        causal = causal_attention_mask(attention_mask, length, device)
        # The head runs only at each row's last position (flat positions into B*T).
        last = rows * length + (length - 1)
        logits = model(x, attention_mask=causal, logits_at=last).logits
        following = logits.reshape(batch, -1).argmax(-1)
        following = torch.where(ended, torch.full_like(following, tokens.eos_id), following)
        ended |= torch.isin(following, stop)
        x = torch.cat([x, following[:, None]], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask[:, :1] * 0 + 1], dim=1)
    return x
