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
    if attention_mask.dim() == 2 and attention_mask.shape[1]:
        empty = torch.nonzero(~(attention_mask == 1).any(dim=-1)).flatten().tolist()
        if empty:
            raise ValueError(
                f"attention_mask row {empty[0]} has no 1: that prompt is all padding. Give every "
                "row at least one real token (1), or leave the row out of the batch"
            )
    return attention_mask


def check_prompt(prompt: object, vocab_size: int | None) -> torch.Tensor:
    """A (batch, length) prompt with at least one row and one token, as a LongTensor."""
    ids = check_token_ids("prompt", prompt, 2, vocab_size)
    if ids.shape[0] == 0:
        raise ValueError(
            f"prompt has no rows (shape {tuple(ids.shape)}); pass at least one prompt, e.g. "
            "torch.tensor([ids])"
        )
    if ids.shape[1] == 0:
        raise ValueError(
            f"prompt is empty (shape {tuple(ids.shape)}): the answer needs at least one token "
            "to follow; for an unconditional sample pass one token, e.g. the tokenizer's BOS"
        )
    return ids


def check_mask_id(mask_id: int, vocab_size: int | None) -> None:
    if vocab_size is not None and not 0 <= mask_id < vocab_size:
        raise ValueError(
            f"mask_id {mask_id} lies outside the model's vocabulary [0, {vocab_size}); pass "
            "mask_id=None to use the model's own mask token"
        )


def context_of(model: object) -> tuple[int | None, str]:
    """(the model's context in tokens or None, the config.json key that sets it).

    Every family's config answers `max_sequence_length`; the key a user edits is the family's
    own: LLaDA-8B's `max_sequence_length`, LLaDA-MoE's `max_position_embeddings` (its config
    exposes `max_sequence_length` as an alias only)."""
    config = getattr(model, "config", None)
    official = hasattr(type(config), "max_position_embeddings")
    key = "max_position_embeddings" if official else "max_sequence_length"
    context = getattr(config, key, None)
    if isinstance(context, int) and not isinstance(context, bool):
        return context, key
    return None, key


def check_context(model: object, length: int, prompt_length: int, gen_length: int) -> None:
    """The canvas (prompt + answer) must fit the model's context (`context_of`): RoPE runs past
    it without an error, but on positions the model was never trained on."""
    context, key = context_of(model)
    if context is not None and length > context:
        raise ValueError(
            f"prompt ({prompt_length} tokens) + gen_length ({gen_length}) = {length} tokens "
            f"exceeds the model's context of {context} ({key} in its config.json); "
            "shorten the prompt or lower gen_length"
        )


def vocab_size_of(model: object) -> int | None:
    config = getattr(model, "config", None)
    size = getattr(config, "padded_vocab_size", None) or getattr(config, "vocab_size", None)
    return int(size) if size is not None else None


def device_of(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
