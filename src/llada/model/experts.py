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

`experts_grouped` is the fast path: the (token, slot) pairs are sorted by expert once, the
tokens gathered once, each projection runs as one grouped matmul over the sorted rows, and the
weighted rows are added back with a single `index_add_`. Because the sort is stable and the
scatter follows the sorted order, every token still receives its experts' outputs in expert
order, as in the loop. `experts_forward` is the entry point the models call.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ExpertsImpl = Literal["auto", "loop", "grouped"]
EXPERTS_IMPLS: tuple[str, ...] = ("auto", "loop", "grouped")

# `torch._grouped_mm` takes int32 offsets and rows whose strides are multiples of 16 bytes; on
# CPU (torch 2.13) it takes these three dtypes, on CUDA (and the meta device, whose checks mirror
# CUDA's) bfloat16 only. Anything else runs per expert on contiguous slices.
_GROUPED_MM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def experts_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    impl: ExpertsImpl = "auto",
) -> torch.Tensor:
    """The routed experts' weighted sum, (T, D) in x's dtype, by the chosen implementation.

    topk_weights may come in the router's dtype (float32): they are cast to x's dtype first, as
    the reference does before its expert loop. impl "loop" is the reference path, "grouped" the
    sorted grouped-matmul path; "auto" is "grouped" on every device: on CPU it is as fast as the
    loop or faster (BENCHMARKS.md, "LLaDA-MoE experts") and it never synchronises with the host
    when `torch._grouped_mm` applies, where the loop's `torch.where` synchronises once per expert.
    """
    if impl not in EXPERTS_IMPLS:
        raise ValueError(f"experts impl must be one of {', '.join(EXPERTS_IMPLS)}, got {impl!r}")
    topk_weights = topk_weights.to(x.dtype)
    if impl == "loop":
        return experts_loop(x, topk_ids, topk_weights, gate, up, down)
    return experts_grouped(x, topk_ids, topk_weights, gate, up, down)


def experts_grouped(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    backend: Literal["auto", "grouped_mm", "slices"] = "auto",
) -> torch.Tensor:
    """`experts_loop`'s result from grouped matmuls over the tokens sorted by expert.

    Same arguments and result as `experts_loop`. backend "grouped_mm" runs each projection as
    one `torch._grouped_mm`; "slices" runs one matmul per expert on its contiguous slice of the
    sorted rows (needs the group sizes on the host: one synchronisation per call); "auto" takes
    "grouped_mm" whenever `grouped_mm_applies`.
    """
    num_tokens, k = topk_ids.shape
    num_experts = gate.shape[0]
    if num_tokens == 0:
        return torch.zeros_like(x)
    flat = topk_ids.reshape(-1)  # (T*k,) expert of each (token, slot) pair, token-major
    # Stable: within an expert the pairs keep token order, as torch.where gives them to the loop.
    order = torch.argsort(flat, stable=True)  # (T*k,)
    token = order // k  # (T*k,) the token of each sorted pair
    # (E,) rows per expert; scatter_add_ keeps the shape static where bincount would read the
    # largest id back to the host on CUDA.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    h = x[token]  # (T*k, D) each token once per expert that it is routed to
    if backend == "auto":
        backend = "grouped_mm" if grouped_mm_applies(h, gate, up, down) else "slices"
    if backend == "grouped_mm":
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        y = _swiglu_grouped_mm(h, offsets, gate, up, down)
    elif backend == "slices":
        y = _swiglu_slices(h, counts, gate, up, down)
    else:
        raise ValueError(f"experts backend must be auto, grouped_mm or slices, got {backend!r}")
    y = y * topk_weights.reshape(-1)[order, None]  # (T*k, D)
    return torch.zeros_like(x).index_add_(0, token, y)


def grouped_mm_applies(
    h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> bool:
    """Whether `torch._grouped_mm` takes these operands (dtype, layout and 16-byte strides)."""
    dtypes = _GROUPED_MM_CPU_DTYPES if h.device.type == "cpu" else (torch.bfloat16,)
    if not hasattr(torch, "_grouped_mm") or h.dtype not in dtypes:
        return False
    if not all(w.dtype == h.dtype and w.is_contiguous() for w in (gate, up, down)):
        return False
    size = h.element_size()
    widths_aligned = (gate.shape[1] * size) % 16 == 0 and (gate.shape[2] * size) % 16 == 0
    pointers_aligned = all(t.data_ptr() % 16 == 0 for t in (h, gate, up, down))
    return widths_aligned and pointers_aligned


def _swiglu_grouped_mm(
    h: torch.Tensor, offsets: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each row by its expert; rows sorted by expert, offsets (E,) int32 group ends."""
    # gate.transpose(1, 2) is (E, D, F): the weights are read in place, never copied.
    g = torch._grouped_mm(h, gate.transpose(1, 2), offs=offsets)  # (T*k, F)
    u = torch._grouped_mm(h, up.transpose(1, 2), offs=offsets)  # (T*k, F)
    return torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offsets)  # (T*k, D)


def _swiglu_slices(
    h: torch.Tensor, counts: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU of each row by its expert, one expert at a time over its contiguous slice."""
    # Host synchronisation: split sizes must be Python ints. Only for operands that
    # torch._grouped_mm refuses (float64, widths not a multiple of 16 bytes, old torch).
    sizes = counts.tolist()
    outs = [
        F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e])
        for e, rows in enumerate(h.split(sizes))
        if sizes[e]
    ]
    return torch.cat(outs)
