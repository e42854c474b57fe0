"""Classifier-free guidance for masked diffusion (paper Appendix B.3; ML-GSAI/LLaDA
generate.py and get_log_likelihood.py).

The unconditional input is the same sequence with every prompt position replaced by the mask
token; both run in one batched forward, and the logits are combined as
`un + (cfg_scale + 1) * (cond - un)`. Shared by the sampler and the likelihood estimator.
"""

from __future__ import annotations

import torch


def predict_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    prompt_index: torch.Tensor,
    mask_id: int,
    cfg_scale: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits (B, L, V) for the canvas x (B, L), guided when cfg_scale > 0.

    prompt_index: bool, (B, L) or (L,): the positions that the unconditional pass masks.
    """
    if cfg_scale <= 0:
        return model(x, attention_mask=attention_mask).logits
    unconditional = x.masked_fill(prompt_index, mask_id)
    both = torch.cat([x, unconditional], dim=0)
    mask_both = (
        None if attention_mask is None else torch.cat([attention_mask, attention_mask], dim=0)
    )
    logits = model(both, attention_mask=mask_both).logits
    conditional, unconditional_logits = torch.chunk(logits, 2, dim=0)
    return unconditional_logits + (cfg_scale + 1) * (conditional - unconditional_logits)
