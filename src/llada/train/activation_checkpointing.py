"""Activation checkpointing, applied from outside the model (as torchtitan's `apply_ac`): each
block recomputes its activations in the backward pass instead of keeping them, trading compute
for memory in training.

The block's own forward is replaced on the instance, so the model's modules, parameter names and
state_dict keys stay as they are (checkpoints, LoRA and FSDP see the same model).
"""

from __future__ import annotations

import types

import torch
import torch.utils.checkpoint
from torch import nn


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    """The block's class forward, recomputed in the backward pass while training with grad."""
    forward = type(block).forward
    if block.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            forward, block, *args, use_reentrant=False, **kwargs
        )
    return forward(block, *args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Make every block of `model.blocks` (both families name their block list so) recompute
    its activations in the backward pass (torch.utils.checkpoint, non-reentrant) while the
    model trains; evaluation and no-grad forwards run as before. Applied in place, before any
    DDP/FSDP wrapping; returns the model."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"apply_activation_checkpointing needs a model with a `blocks` ModuleList (LLaDAModel, "
            f"LLaDAMoEModel), got {type(model).__name__}; pass the unwrapped model"
        )
    for block in blocks:
        # A method bound to the block itself: a deep copy of the model rebinds it to the copy.
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model
