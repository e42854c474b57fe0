"""Checks of user-supplied token tensors, with errors that say what to change."""

from __future__ import annotations

import torch


def check_token_ids(name: str, ids: object, ndim: int, vocab_size: int | None) -> torch.Tensor:
    """Return `ids` as a LongTensor after checking its type, rank and range."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.LongTensor of token ids, got {type(ids).__name__}; "
            f"e.g. torch.tensor([...])" + ("[None]" if ndim == 2 else "")
        )
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != ndim:
        shape = "(batch, length)" if ndim == 2 else "(length,)"
        hint = (
            " Use ids.unsqueeze(0) for a single sequence." if ndim == 2 and ids.dim() == 1 else ""
        )
        raise ValueError(f"{name} must have shape {shape}, got {tuple(ids.shape)}.{hint}")
    if ids.numel() and (
        int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)
    ):
        raise ValueError(
            f"{name} holds ids outside the model's vocabulary [0, {vocab_size}): "
            f"min {int(ids.min())}, max {int(ids.max())}"
        )
    return ids.long()


def check_attention_mask(attention_mask: object, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor of 1/0, got {type(attention_mask).__name__}"
        )
    if tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"attention_mask must have the prompt's shape {shape} (1 = token, 0 = padding), "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.numel() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 1 (token) and 0 (padding)")
    return attention_mask


def vocab_size_of(model: object) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "padded_vocab_size", None) or getattr(config, "vocab_size", None)
    return int(size) if size is not None else None


def device_of(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
