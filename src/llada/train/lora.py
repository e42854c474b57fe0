"""LoRA fine-tuning through peft, and merging adapters back into official checkpoints.

Adapters go on every linear layer of the blocks named in TARGET_MODULES. On LLaDA-MoE that is
the attention projections, the MLPs of dense layers and the shared expert: the routed experts
are stacked (E, F, D) parameters, not linear layers, and stay frozen with the routers (a
fine-tune that leaves the routing as trained). A checkpoint holds the merged weights
(W + B A * alpha / r) in the official layout, so any LLaDA loader reads it, and the adapter
tensors in the trainer state, so that a resumed run rebuilds exactly the same model from the
unchanged base weights.
"""

from __future__ import annotations

import torch
from torch import nn

TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_BASE = ".base_layer.weight"


def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Inject LoRA adapters in place; only the adapters stay trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ImportError(
            "LoRA fine-tuning needs peft: pip install 'llada-kit[train]' or pip install peft"
        ) from None
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(TARGET_MODULES), lora_dropout=0.0
    )
    return inject_adapter_in_model(config, model)


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in state.items() if ".lora_" in name}


def merged_state_dict(
    state: dict[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> plain parameter names with the adapters merged in."""
    merged: dict[str, torch.Tensor] = {}
    scale = alpha / rank
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if name.endswith(_BASE):
            prefix = name[: -len(_BASE)]
            a = state[f"{prefix}.lora_A.default.weight"].float()
            b = state[f"{prefix}.lora_B.default.weight"].float()
            merged[f"{prefix}.weight"] = (tensor.float() + (b @ a) * scale).to(tensor.dtype)
        else:
            merged[name] = tensor
    return merged
