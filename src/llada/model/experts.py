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

`experts_grouped` sorts the (token, slot) pairs by expert once and then either runs each
projection as one grouped matmul over all experts (`torch._grouped_mm`: no host
synchronisation; the GPU path, and the CPU's for training and small batches) or walks the
experts' contiguous slices of the sorted pairs (the CPU's for large inference batches, where
it keeps pace with the loop and grouped_mm does not). `pick_backend` holds the rule.
`experts_forward` is the entry point the models call. The loop is for reading, not training:
its per-expert indexing of the stacked weights costs a full-size gradient per expert.

Expert parallelism (llada.parallel): a rank holds a contiguous slice of the experts, and
`experts_forward(..., first_expert=...)` computes only the (token, slot) pairs routed to that
slice; the other pairs contribute nothing (the other ranks add them).
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
# Above this many bytes of grouped_mm intermediates a CPU runs the experts by slices
# (`pick_backend`; measured on a 2-core AVX-512/AMX Xeon, BENCHMARKS.md).
CPU_GROUPED_MM_BYTES = 16 << 20


def experts_loop(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * SwiGLU_{topk_ids[t, j]}(x[t]) for every token t.

    x (T, D); topk_ids (T, k) int64 expert ids; topk_weights (T, k); gate, up (E, F, D);
    down (E, D, F). The expert outputs (x's dtype) are weighted and summed in topk_weights'
    dtype: returns (T, D) in that dtype. Pairs whose id lies outside [0, E) match no expert and
    contribute nothing.
    """
    out = torch.zeros(x.shape, dtype=topk_weights.dtype, device=x.device)
    for expert in range(gate.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        h = x[token]
        y = F.linear(F.silu(F.linear(h, gate[expert])) * F.linear(h, up[expert]), down[expert])
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(out.dtype))
    return out


def experts_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    impl: ExpertsImpl = "auto",
    *,
    accumulate_dtype: torch.dtype | None = None,
    first_expert: int | None = None,
) -> torch.Tensor:
    """The routed experts' weighted sum, (T, D) in x's dtype, by the chosen implementation.

    topk_weights may come in the router's dtype (float32). accumulate_dtype None: they are cast
    to x's dtype first and the outputs are weighted and summed in it, as LLaDA-MoE's reference
    does before its expert loop; torch.float32: weighted and summed in float32 and the sum cast
    to x's dtype, as LLaDA 2.x's reference does (the same in float32). impl "loop" is the
    reference path; "grouped" and "auto" sort the tokens by expert (`experts_grouped`, whose
    backend is picked per device).

    first_expert: None when gate, up and down hold every expert (topk_ids index them); an int
    when they hold experts [first_expert, first_expert + E) of a larger set (one rank's share
    under expert parallelism): the pairs routed to other experts are skipped, and the result is
    this share's part of the sum.
    """
    if impl not in EXPERTS_IMPLS:
        raise ValueError(f"experts impl must be one of {', '.join(EXPERTS_IMPLS)}, got {impl!r}")
    topk_weights = topk_weights.to(accumulate_dtype or x.dtype)
    partial = first_expert is not None
    if partial:
        topk_ids = topk_ids - first_expert  # outside [0, E): an expert another rank holds
    if impl == "loop":
        out = experts_loop(x, topk_ids, topk_weights, gate, up, down)
    else:
        out = experts_grouped(x, topk_ids, topk_weights, gate, up, down, partial=partial)
    return out.to(x.dtype)


def experts_grouped(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    backend: Literal["auto", "grouped_mm", "slices"] = "auto",
    *,
    partial: bool = False,
) -> torch.Tensor:
    """`experts_loop`'s result computed over the (token, slot) pairs sorted by expert.

    Same arguments and result as `experts_loop`; partial: some ids may lie outside [0, E)
    (experts another rank holds), and those pairs are skipped as the loop skips them. backend:
    - "grouped_mm": the tokens gathered once into (T*k, D), each projection one
      `torch._grouped_mm` over all experts, one `index_add_` back. No host synchronisation.
    - "slices": expert by expert over its contiguous slice of the sorted pairs: gather, SwiGLU,
      weight and add back while the slice is in cache. The loop's arithmetic exactly (bit for
      bit), without its boolean scan of all T*k pairs per expert; one host synchronisation.
    - "auto": `pick_backend`.
    """
    num_tokens, k = topk_ids.shape
    num_experts = gate.shape[0]
    if num_tokens == 0:
        return torch.zeros(x.shape, dtype=topk_weights.dtype, device=x.device)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # What F.linear does under autocast, so the loop's (and the reference's) arithmetic: the
        # matmuls in the autocast dtype, the weighting and the sum in x's dtype. grouped_mm is not
        # an autocast op: without this it would run in float32.
        mm_dtype = torch.get_autocast_dtype(device_type)
        gate, up, down = (w.to(mm_dtype) for w in (gate, up, down))
        xm = x.to(mm_dtype)
    else:
        xm = x
    if backend == "auto":
        backend = pick_backend(xm, topk_ids, gate, up, down)
    if backend not in ("grouped_mm", "slices"):
        raise ValueError(f"experts backend must be auto, grouped_mm or slices, got {backend!r}")
    flat = topk_ids.reshape(-1)  # (T*k,) expert of each (token, slot) pair, token-major
    foreign = None
    if partial:
        # Another rank's pairs go to an extra last bucket E: sorted after every expert's slice,
        # so neither backend reaches them.
        foreign = (flat < 0) | (flat >= num_experts)  # (T*k,)
        flat = flat.masked_fill(foreign, num_experts)
    # Stable: within an expert the pairs keep token order, as torch.where gives them to the loop,
    # and adding back in sorted order gives every token its experts' outputs in expert order.
    order = torch.argsort(flat, stable=True)  # (T*k,)
    token = order // k  # (T*k,) the token of each sorted pair
    weights = topk_weights.reshape(-1)[order, None]  # (T*k, 1)
    # (E,) pairs per expert; scatter_add_ keeps the shape static where bincount would read the
    # largest id back to the host on CUDA.
    buckets = num_experts + 1 if partial else num_experts
    counts = torch.zeros(buckets, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:num_experts]
    out = torch.zeros(x.shape, dtype=topk_weights.dtype, device=x.device)  # (T, D)
    if backend == "grouped_mm":
        h = xm[token]  # (T*k, D) each token once per expert that it is routed to
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        # gate.transpose(1, 2) is (E, D, F): the weights are read in place, never copied.
        g = torch._grouped_mm(h, gate.transpose(1, 2), offs=offsets)  # (T*k, F)
        u = torch._grouped_mm(h, up.transpose(1, 2), offs=offsets)  # (T*k, F)
        y = torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offsets)  # (T*k, D)
        if foreign is not None:
            # The rows past the last offset are left unwritten by grouped_mm (any bits at all).
            y = y.masked_fill(foreign[order, None], 0.0)
        return out.index_add_(0, token, (y * weights).to(out.dtype))
    # Host synchronisation: the slice bounds must be Python ints (free on CPU, which has no
    # queue of kernels to drain).
    # unbind, not gate[expert]: the backward of one indexing per expert writes a zero-filled
    # (E, F, D) gradient each time (3 x E full-size tensors a layer); unbind's stacks once.
    gates, ups, downs = gate.unbind(0), up.unbind(0), down.unbind(0)
    start = 0
    for expert, size in enumerate(counts.tolist()):
        if size == 0:
            continue
        rows = token[start : start + size]
        h = xm[rows]  # (size, D)
        y = F.linear(F.silu(F.linear(h, gates[expert])) * F.linear(h, ups[expert]), downs[expert])
        out.index_add_(0, rows, (y * weights[start : start + size]).to(out.dtype))
        start += size
    return out


def pick_backend(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> Literal["grouped_mm", "slices"]:
    """`experts_grouped`'s backend for these operands, from their shapes only (no sync).

    "slices" when `torch._grouped_mm` does not take the operands. Off the CPU, "grouped_mm":
    no host synchronisation and three kernels instead of about eight per expert. On CPU:
    "grouped_mm" when autograd records (training: its backward is one grouped matmul per
    projection), else by the size of its intermediates, (T*k, D) gathered rows and two (T*k, F)
    projections: up to `CPU_GROUPED_MM_BYTES` grouped_mm is the faster (bf16 1.06-1.28x the
    loop at T <= 256 of LLaDA-MoE-7B's layer), beyond it the intermediates fall out of cache
    and it is slower than "slices" in every measurement, which keeps pace with the loop
    (BENCHMARKS.md, "LLaDA-MoE experts").
    """
    if not grouped_mm_applies(x, gate, up, down):
        return "slices"
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        # Compiled, the slices' sizes (read back to the host) would break the graph; in
        # bfloat16 grouped_mm keeps it whole (other dtypes take the slices, with a break).
        return "grouped_mm"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, up, down)):
        # Forward and backward, grouped_mm measured 1.02-1.6x "slices" at every size.
        return "grouped_mm"
    rows = topk_ids.numel()
    intermediate_bytes = rows * (gate.shape[2] + 2 * gate.shape[1]) * x.element_size()
    return "grouped_mm" if intermediate_bytes <= CPU_GROUPED_MM_BYTES else "slices"


def grouped_mm_applies(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> bool:
    """Whether `torch._grouped_mm` takes these operands (device, dtype, layout, 16-byte rows)."""
    # Traced, grouped_mm's shape rules (its meta kernel) are CUDA's: bfloat16 only.
    on_cpu = x.device.type == "cpu" and not torch.compiler.is_compiling()
    dtypes = _GROUPED_MM_CPU_DTYPES if on_cpu else (torch.bfloat16,)
    if not hasattr(torch, "_grouped_mm") or x.dtype not in dtypes:
        return False
    if not all(w.dtype == x.dtype and w.is_contiguous() for w in (gate, up, down)):
        return False
    size = x.element_size()
    widths_aligned = (gate.shape[1] * size) % 16 == 0 and (gate.shape[2] * size) % 16 == 0
    if not widths_aligned:
        return False
    if torch.compiler.is_compiling():
        # Neither data_ptr() nor storage_offset() can be traced; the model's stacked weights
        # are whole allocations (aligned far beyond 16 bytes), and grouped_mm checks again.
        return True
    # Allocations are aligned far beyond 16 bytes, so a view's offset decides.
    return all((w.storage_offset() * size) % 16 == 0 for w in (gate, up, down))
