"""Throughput figures of a training run: tokens per second and model FLOP utilisation (MFU).

MFU follows PaLM's definition (Chowdhery et al. 2022, appendix B): the FLOPs the model needs
per token for a forward and a backward pass, 6 N + 12 L H T (N: the parameters one token
uses but the embedding, L layers, H the attention width, T the sequence length the network sees), times the
tokens per second, over the peak FLOP/s of the hardware. Recomputation (activation
checkpointing) is not counted: MFU measures the model's work, not the hardware's. With LoRA the
frozen weights need no gradient, so 6 N overstates the work a little; the figure stays the
convention's.

The peak: on a GPU whose datasheet value is known (bfloat16 runs), that value; otherwise (any
CPU, float32 runs, other GPUs) it is measured once at the start with a large matmul in the
training dtype, and the run says so. `--peak-flops` sets it instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Dense bfloat16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
_DATASHEET_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def matmul_parameters(config: Any) -> int:
    """N of 6 N: the parameters one token goes through, but the embedding lookup (Kaplan et al.
    2020's non-embedding count: blocks, norms, top-k routed experts only) plus the LM head."""
    try:
        inner = config.num_parameters(include_embeddings=False, active=True)
    except TypeError:  # the dense family has no experts, so no `active`
        inner = config.num_parameters(include_embeddings=False)
    vocab = getattr(config, "padded_vocab_size", None) or config.vocab_size
    width = getattr(config, "d_model", None) or config.hidden_size
    return inner + vocab * width


def attention_width(config: Any) -> tuple[int, int]:
    """(layers, heads * head dimension) of the attention score and value matmuls."""
    layers = getattr(config, "n_layers", None) or config.num_hidden_layers
    if hasattr(config, "dim_per_head"):  # LLaDA 2.x
        return layers, config.num_attention_heads * config.dim_per_head
    if hasattr(config, "n_heads"):  # dense LLaDA
        return layers, config.n_heads * (config.d_model // config.n_heads)
    return layers, config.hidden_size


def sequence_flops(config: Any, length: int) -> float:
    """Forward plus backward FLOPs of one sequence of `length` tokens as the network sees it
    (block diffusion: the [x_t ; x_0] input, twice the text), with full (non-causal) attention."""
    layers, width = attention_width(config)
    return 6.0 * matmul_parameters(config) * length + 12.0 * layers * width * length * length


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _DATASHEET_BF16 if key in name), None)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """FLOP/s of the best of a few (size x size) @ (size x size) matmuls in `dtype`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(4):  # the first one warms the kernels up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, given: float | None) -> tuple[float, str]:
    """The peak FLOP/s of one process's device and a phrase saying where it comes from."""
    if given:
        return given, "--peak-flops"
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        return sheet, f"the datasheet's dense bfloat16 peak of {torch.cuda.get_device_name(device)}"
    name = str(dtype).removeprefix("torch.")
    return measure_peak(device, dtype), (
        f"measured: one 2048x2048 {name} matmul on {device.type} (no datasheet peak; "
        "--peak-flops sets it)"
    )


@dataclass
class Interval:
    """The steps since the last metrics line: their losses are averaged, their tokens, FLOPs
    and training seconds (the steps themselves, not validation or saving) summed."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, record: dict[str, float], seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        for key in ("loss", "aux_loss", "grad_norm", "targets", "tokens", "flops"):
            if key in record:
                self.sums[key] = self.sums.get(key, 0.0) + record[key]

    def summary(self, peak: float | None, processes: int) -> dict[str, float]:
        """loss, aux_loss and grad_norm: means over the steps; targets and tokens: sums (all
        processes); tokens_per_s and mfu over the training seconds."""
        out: dict[str, float] = {"interval_steps": self.steps}
        for key in ("loss", "aux_loss", "grad_norm"):
            if key in self.sums:
                out[key] = self.sums[key] / self.steps
        out["targets"] = self.sums.get("targets", 0.0)
        out["tokens"] = int(self.sums.get("tokens", 0))
        if self.seconds > 0:
            out["tokens_per_s"] = out["tokens"] / self.seconds
            if peak:
                out["mfu"] = self.sums.get("flops", 0.0) / self.seconds / (peak * processes)
        return out
