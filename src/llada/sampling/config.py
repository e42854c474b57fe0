"""Sampler settings as one validated, frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..settings import require_non_negative_numbers, require_positive_ints

Remasking = Literal["low_confidence", "random"]
REMASKING_CHOICES = ("low_confidence", "random")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of the reference sampler, with the reference's names (SPEC §4).

    steps: forward passes in total, split evenly over the blocks.
    gen_length: answer tokens to generate (all start as the mask token).
    block_length: semi-autoregressive block size; gen_length must be a multiple of it.
    temperature: 0 is greedy; > 0 samples with Gumbel noise (in float64, as the reference).
    cfg_scale: classifier-free guidance strength; 0 turns it off.
    remasking: which predictions are kept each step: 'low_confidence' keeps the most probable,
        'random' keeps random ones.
    logits_eos_inf: forbid EOS (its logit is set to -inf before sampling).
    confidence_eos_eot_inf: the reference flag meant to unmask EOS/EoT last. By default it does
        exactly what the reference does, quirks included (SPEC §4): at temperature > 0 only EoT is
        deferred and the other probabilities are renormalised without it.
    fix_confidence_eos_eot: with confidence_eos_eot_inf, do what the flag says instead: any
        position whose prediction is EOS or EoT is committed after every other masked position
        of the step's candidates, at any temperature and with either remasking, and the other
        confidences are the model's unmodified probabilities.
    """

    steps: int = 128
    gen_length: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: Remasking = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    fix_confidence_eos_eot: bool = False

    def __post_init__(self) -> None:
        require_positive_ints(self, "steps", "gen_length", "block_length")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length "
                f"({self.block_length}); e.g. block_length={self.gen_length} for a single block."
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps ({self.steps}) must be a multiple of the number of blocks "
                f"(gen_length / block_length = {self.num_blocks}), so each block gets the same "
                f"number of steps; e.g. steps={self.num_blocks * max(1, self.steps // self.num_blocks)}."
            )
        require_non_negative_numbers(self, "temperature", "cfg_scale")
        if self.remasking not in REMASKING_CHOICES:
            raise ValueError(
                f"remasking must be one of {REMASKING_CHOICES}, got {self.remasking!r}"
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks
