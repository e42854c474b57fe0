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


LOGITS_SOURCES = ("full", "prefix", "dual", "block")
COMMIT_RULES = ("schedule", "threshold", "factor", "entropy")


@dataclass(frozen=True)
class DecodeConfig:
    """How the fast loop decodes (the `GenerateConfig` says what to generate).

    source: how logits are obtained: 'full' (every step runs the whole canvas, as the
        reference), 'prefix' / 'dual' (Fast-dLLM's prefix and dual KV caches), 'block' (ours:
        no step after the first runs the prompt or the rest of the canvas again).
    commit: which proposals are committed each step: 'schedule' (the reference's top-k per
        step), 'threshold' (all with confidence >= threshold, at least one), 'factor'
        (Fast-dLLM's factor rule), 'entropy' (EB-sampler: lowest-entropy proposals while their
        summed entropy <= entropy_bound). With every rule but 'schedule' a block takes as many
        steps as it needs; `steps` then only sets the schedule's table.
    vicinity: with source='block', also refresh this many positions after the current block.
    refresh: with a cache ('prefix', 'dual', 'block'), run a full forward that refills the
        cache once this many tokens were committed in a row since the last fill (0: never
        within a block, as Fast-dLLM). Bounds how stale the cached keys and values of the
        prompt and the rest of the canvas get as the block fills in.
    eos_in_order: EOS/EoT proposals where an earlier answer position is still masked rank
        below every other proposal and below any threshold, so an answer's end is decided
        after its text (ours). Parallel commits otherwise fix a confident EOS tail in one step
        and cut answers short, notably when gen_length is much longer than the answers; with
        early stop the row then ends one step after its text, without decoding the tail.
    early_stop: a row stops once its answer has ended (EOS/EoT committed with no mask before
        it); its remaining masks become EOS. The text is unchanged; the work is not done.
    reference_numerics: confidences from a full softmax in the logits' dtype and every
        scheduled step run even when its block is already full, so that source='full' with
        commit='schedule' repeats the reference sampler bit for bit (random draws included).
    """

    source: str = "full"
    commit: str = "schedule"
    threshold: float = 0.9
    factor: float = 1.0
    entropy_bound: float = 0.5
    vicinity: int = 0
    refresh: int = 0
    eos_in_order: bool = False
    early_stop: bool = True
    reference_numerics: bool = False

    def __post_init__(self) -> None:
        if self.source not in LOGITS_SOURCES:
            raise ValueError(f"source must be one of {LOGITS_SOURCES}, got {self.source!r}")
        if self.commit not in COMMIT_RULES:
            raise ValueError(f"commit must be one of {COMMIT_RULES}, got {self.commit!r}")
        require_non_negative_numbers(self, "factor", "entropy_bound", "vicinity", "refresh")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        for name in ("vicinity", "refresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")


# Named decoding presets, for every command and the Python API.
PRESETS: dict[str, DecodeConfig] = {
    # The published sampler, token for token.
    "reference": DecodeConfig(source="full", early_stop=False, reference_numerics=True),
    # Fast-dLLM's published methods (threshold 0.9), for comparisons.
    "fastdllm-prefix": DecodeConfig(source="prefix", commit="threshold", early_stop=False),
    "fastdllm-dual": DecodeConfig(source="dual", commit="threshold", early_stop=False),
    # Ours: confidence 0.99, not Fast-dLLM's 0.9, and an answer's end decided after its text.
    # On the shipped instruct model at gen_length 256 (800 questions, BENCHMARKS.md): the
    # reference 54.5%, threshold 0.9 44.2%, 0.99 52.6%, 0.99 with eos_in_order 56.2%.
    "fast": DecodeConfig(source="dual", commit="threshold", threshold=0.99, eos_in_order=True),
    "fastest": DecodeConfig(source="block", commit="threshold", threshold=0.99, eos_in_order=True),
}


def decode_preset(name: str) -> DecodeConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
