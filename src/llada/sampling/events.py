"""What a sampler shows while it runs: one event per denoising step, for every family."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepEvent:
    """One denoising step, as seen by a stream or a visualisation.

    tokens: (B, L) the whole canvas after this step (prompt + answer; mask id where undecided).
    committed: (B, L) bool, the positions committed at this step.
    confidence: (B, L) float32, each candidate's confidence at this step (NaN elsewhere).
    finished: (B,) bool, rows whose answer is final (ended early, or all blocks done).
    work: running totals of query positions, attended (query, key) pairs and LM-head positions.
    edited: (B, L) bool, decoded positions this step rewrote (LLaDA 2.1's token editing), or
        None for samplers that never rewrite.
    """

    block: int
    step: int
    forward_passes: int
    work: dict[str, int]
    tokens: torch.Tensor
    committed: torch.Tensor
    confidence: torch.Tensor
    finished: torch.Tensor
    edited: torch.Tensor | None = None
