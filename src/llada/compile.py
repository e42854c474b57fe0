"""`torch.compile` applied to a model from outside, as gpt-fast and torchtitan apply it.

The model classes are untouched: `compile_model` replaces the instance's `forward` with a
compiled version of itself, so `model(...)` (and every sampler, the likelihood, the server)
runs the compiled forward while `type(model).forward` stays the eager one. What makes this
work is a forward that never reads a tensor back to the host (tests/model/test_no_host_sync.py)
and takes its KV cache as explicit preallocated buffers (`model.new_kv_cache`): the whole
forward is one graph, for every family (dense LLaDA, LLaDA-MoE, LLaDA 2.x), with or without a
cache window and `logits_at` (tests/model/test_compile.py checks `fullgraph=True`).

Shapes. The samplers call the forward with a few kinds of arguments (no cache; a whole-canvas
cache fill; a cache window with `logits_at`), and the window's length, its start, the number
of `logits_at` positions and the batch (rows leave when their answer ends) change from step to
step. `dynamic=None` (the default here) is torch's automatic dynamic shapes: a kind of call is
first compiled for its exact sizes, and when a size changes it is compiled once more with that
size as a symbol, which later sizes reuse. Only sizes that do change become symbols (head
counts and head size stay constants; with `dynamic=True` the KV cache's head count would be a
symbol too, and SDPA's `enable_gqa` flag cannot take one). Measured with torch._dynamo's
counters on llada-tiny-base (`llada.sample(..., "fast")`, 128 tokens, blocks of 32, batch 1):
4 graphs in the first call (cache fill; window; window once the LM head's position count
leaves 1; fill once the RoPE table is cached), 4 more in the first call at another canvas
length (the canvas length becomes a symbol), no graph break. Dynamo compiles at most 8 graphs
per function (torch._dynamo.config.recompile_limit); past that, further new shapes run that
call eagerly (same results, uncompiled). The reference sampler (one full forward per step)
compiles 2 graphs.

Modes, by device (`mode=None`):
- CUDA: "max-autotune-no-cudagraphs": Triton kernels with autotuned matmul templates, without
  CUDA graphs. CUDA graphs ("reduce-overhead") replay fixed shapes and fixed input addresses,
  but the sampler's windows change length every block, the KV cache is an input written in
  place, and rows leaving the batch reallocate it: each would record a new graph.
  Pass mode="reduce-overhead" to try them for a fixed-shape workload.
- CPU and others: inductor's default mode (C++/OpenMP kernels; needs a C++ compiler).
Compiling takes time once per kind of call (tens of seconds on a small CPU); it pays off for
long generations and servers, not for one short call.
"""

from __future__ import annotations

import torch

CUDA_MODE = "max-autotune-no-cudagraphs"


def default_mode(device: torch.device) -> str | None:
    """The compile mode `compile_model` picks for a model on `device` (None: inductor's default)."""
    return CUDA_MODE if torch.device(device).type == "cuda" else None


def compile_model(
    model: torch.nn.Module,
    mode: str | None = None,
    *,
    dynamic: bool | None = None,
    backend: str = "inductor",
    fullgraph: bool = False,
) -> torch.nn.Module:
    """Compile `model`'s forward in place and return the model.

    mode: a `torch.compile` mode; None picks one for the model's device (`default_mode`:
        "max-autotune-no-cudagraphs" on CUDA, the default elsewhere).
    dynamic: None (default): torch's automatic dynamic shapes (static first, a size that
        changes becomes a symbol; see the module docstring); True makes every size a symbol
        from the first call (fine without a KV cache: bench/forward_efficiency.py uses it);
        False specialises every size.
    backend: "inductor" (default) generates kernels; "aot_eager" or "eager" only capture the
        graph (for checking capture where no compiler is available).
    fullgraph: raise on any graph break instead of falling back to eager for that part.

    The model's class, parameters and state dict are unchanged (the compiled forward reads the
    same parameters, so later weight updates are seen); `model.forward` is now the compiled
    function, and calling `compile_model` again recompiles the eager forward with the new
    settings rather than wrapping the compiled one. Undo with `del model.forward`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"compile_model takes a torch.nn.Module, got {type(model).__name__}")
    if backend == "inductor" and mode is None:
        mode = default_mode(_device_of(model))
    if backend != "inductor" and mode is not None:
        raise ValueError(
            f"mode={mode!r} is an inductor setting; with backend={backend!r} pass mode=None"
        )
    # The bound eager forward of the class, even when this instance was compiled before.
    eager_forward = type(model).forward.__get__(model)
    model.forward = torch.compile(
        eager_forward, mode=mode, dynamic=dynamic, backend=backend, fullgraph=fullgraph
    )
    return model


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `compile_model` compiled this model's forward (and it was not undone since)."""
    return "forward" in vars(model)


def _device_of(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
