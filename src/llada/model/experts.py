"""Mixture-of-experts feed-forward: k routed SwiGLU experts per token, weighted and summed.

The experts' weights are stacked, one tensor per projection:
    gate (E, F, D), up (E, F, D), down (E, D, F)
for E experts of hidden size F over model width D, so that a grouped implementation can run
every expert in a few batched kernels. A checkpoint's per-expert tensors are stacked and split
by the family's name map.

`experts_loop` is the readable reference path: expert by expert, the tokens routed to it,
accumulated with `index_add_` in expert order, as the reference modeling code of LLaDA-MoE
does (ZHZisZZ/dllm, dllm/pipelines/llada/models/modeling_lladamoe.py). Faster paths must match
it (tests/model/test_experts.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def experts_loop(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * SwiGLU_{topk_ids[t, j]}(x[t]) for every token t.

    x (T, D); topk_ids (T, k) int64 expert ids; topk_weights (T, k) in x's dtype;
    gate, up (E, F, D); down (E, D, F). Returns (T, D) in x's dtype.
    """
    out = torch.zeros_like(x)
    for expert in range(gate.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        h = x[token]
        y = F.linear(F.silu(F.linear(h, gate[expert])) * F.linear(h, up[expert]), down[expert])
        out.index_add_(0, token, y * topk_weights[token, slot, None])
    return out
