"""LoRA fine-tuning through peft, and merging adapters back into official checkpoints.

Adapters go on every linear layer of the blocks named in TARGET_MODULES. On LLaDA-MoE that is
the attention projections, the MLPs of dense layers and the shared expert: the routed experts
are stacked (E, F, D) parameters, not linear layers, and stay frozen with the routers (a
fine-tune that leaves the routing as trained). A checkpoint holds the merged weights
(W + B A * alpha / r) in the official layout, so any LLaDA loader reads it; the adapters in
peft's own format beside them (adapter_config.json, adapter_model.safetensors: what
`PeftModel.save_pretrained` writes), so that `PeftModel.from_pretrained(base, checkpoint)` on
the base model gives the trained model; and the adapter tensors in the sharded trainer state, so
that a resumed run rebuilds exactly the same model from the unchanged base weights.
"""

from __future__ import annotations

import os
from pathlib import Path

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
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The prefix PeftModel puts before the wrapped model's names (PeftModel -> LoraModel -> model).
_PEFT_PREFIX = "base_model.model."


def add_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Inject LoRA adapters in place; only the adapters stay trainable."""
    config = lora_config(rank, alpha)
    from peft import inject_adapter_in_model

    return inject_adapter_in_model(config, model)


def lora_config(rank: int, alpha: float, base: str | None = None):
    """The peft LoraConfig of llada's LoRA runs; `base`: the base model's folder or hub id."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError(
            "LoRA fine-tuning needs peft: pip install 'llada-kit[train]' or pip install peft"
        ) from None
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        base_model_name_or_path=base,
    )


def save_peft_adapter(
    folder: str | os.PathLike,
    model: nn.Module,
    state: dict[str, torch.Tensor],
    base: str | None,
) -> None:
    """Write the adapters of `state` (a full state dict of `model`, which holds injected
    adapters) into `folder` as PeftModel.save_pretrained does: peft's own config and state-dict
    functions, under the names a PeftModel wrapping the base model gives them."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    config = model.peft_config["default"]
    config = lora_config(config.r, config.lora_alpha, base)
    adapters = get_peft_model_state_dict(model, state_dict=state, adapter_name="default")
    tensors = {_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    config.save_pretrained(str(folder))
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def base_model_reference(model: str) -> str | None:
    """How adapter_config.json names the base: a local folder as an absolute path (the run may
    be read from elsewhere), a hub id as given, None for a model trained from scratch."""
    if not model:
        return None
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def merge_peft_adapter(base: torch.nn.Module, adapter_folder: str | os.PathLike) -> torch.nn.Module:
    """`base` with the peft adapter of `adapter_folder` merged in by peft itself
    (PeftModel.from_pretrained, then merge_and_unload): the plain model, merged weights."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError("merging LoRA adapters needs peft: pip install peft") from None
    return PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()


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
