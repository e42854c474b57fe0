"""Sampler settings as validated, frozen dataclasses."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Literal

from ..settings import require_positive_ints

Remasking = Literal["low_confidence", "random"]
REMASKING_CHOICES = ("low_confidence", "random")

# Bounds of the float settings. Beyond them the arithmetic leaves its range rather than doing
# anything useful: guidance scales the logits' difference by cfg_scale + 1, which overflows
# float32 from about 3.4e38 (and float16 far earlier) into inf/NaN logits; the Gumbel trick
# divides by (-log u) ** temperature, which underflows to 0 in float64 from temperature ~20.
# The published settings use cfg_scale 0-3 and temperature 0-1.
MAX_CFG_SCALE = 100.0
MAX_TEMPERATURE = 10.0
MAX_FACTOR = 1000.0
MAX_ENTROPY_BOUND = 1000.0


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or +inf logits: its answer would be noise (or, before this check,
    the fast loop waited forever for a confidence it could rank). Raised by the samplers at the
    first step where it happens."""


def nonfinite_logits_message(
    block: int, step: int, forward_pass: int, cfg_scale: float, dtype: object
) -> str:
    return (
        f"the model produced NaN/inf logits at block {block}, step {step} (forward pass "
        f"{forward_pass}); check the checkpoint's weights for NaN/inf (a failed conversion or a "
        f"diverged training run), its dtype ({dtype}; float16 overflows where bfloat16 and "
        f"float32 do not), and cfg_scale ({cfg_scale:g}; guidance multiplies the logits by "
        "cfg_scale + 1)"
    )


def require_number_in(settings: object, name: str, low: float, high: float) -> None:
    """`name` must be a finite real number in [low, high] (bools are not numbers here)."""
    value = getattr(settings, name)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], got {value!r}")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of the reference sampler, with the reference's names (ML-GSAI/LLaDA generate.py).

    steps: forward passes in total, split evenly over the blocks (the reference's schedule;
        the threshold, factor and entropy rules of `DecodeConfig` take as many as they need,
        at most one per masked position). It must be a multiple of the number of blocks. More
        steps than gen_length is accepted, as the reference accepts it, with a warning: the
        extra steps commit nothing (the `reference` preset still runs them).
    gen_length: answer tokens to generate (all start as the mask token).
    block_length: semi-autoregressive block size, at most gen_length; gen_length must be a
        multiple of it.
    temperature: 0 is greedy; > 0 samples with Gumbel noise (in float64, as the reference);
        at most 10.
    cfg_scale: classifier-free guidance strength; 0 turns it off; at most 100.
    remasking: which predictions are kept each step: 'low_confidence' keeps the most probable,
        'random' keeps random ones.
    logits_eos_inf: forbid EOS (its logit is set to -inf before sampling).
    confidence_eos_eot_inf: the reference flag meant to unmask EOS/EoT last. By default it does
        exactly what the reference does, quirks included (ML-GSAI/LLaDA generate.py): at
        temperature > 0 only EoT is
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
        if self.block_length > self.gen_length:
            raise ValueError(
                f"block_length ({self.block_length}) must be at most gen_length "
                f"({self.gen_length}); e.g. block_length={self.gen_length} for a single block."
            )
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
        if self.steps > self.gen_length:
            warnings.warn(
                f"steps ({self.steps}) exceeds gen_length ({self.gen_length}): each block gets "
                f"{self.steps_per_block} steps for {self.block_length} tokens, so "
                f"{self.steps - self.gen_length} steps commit nothing (the reference preset "
                f"still runs them); steps={self.gen_length} gives the same answers with less work",
                UserWarning,
                stacklevel=3,
            )
        require_number_in(self, "temperature", 0, MAX_TEMPERATURE)
        require_number_in(self, "cfg_scale", 0, MAX_CFG_SCALE)
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
    fastdllm_numerics: Fast-dLLM's arithmetic and loop (NVlabs/Fast-dLLM llada/generate.py):
        confidences from a float64 softmax, and with source='prefix' or 'dual' a block that the
        cache-filling pass decoded completely still runs the next (cached) forward, which
        commits nothing, since Fast-dLLM checks whether a block is full only after that pass.
        The 'fastdllm-*' presets set it, so that they give Fast-dLLM's tokens and forward-pass
        counts; without it the loop leaves a full block at once (one pass fewer per such block).
    batch_invariant: in a left-padded batch, run the rows of each prompt length as their own
        batch without padding, so each row gets exactly what it gets alone at temperature 0
        in any dtype. Without it that holds in float32, but in bfloat16 the padding shifts a
        row's keys and its attention sums round differently (on the shipped instruct model,
        a few rows in 64 change; README). Costs one forward per distinct prompt length per
        step. Random draws (temperature > 0, random remasking) differ from a row alone either
        way, as they follow the batch's shape.
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
    fastdllm_numerics: bool = False
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.source not in LOGITS_SOURCES:
            raise ValueError(f"source must be one of {LOGITS_SOURCES}, got {self.source!r}")
        if self.commit not in COMMIT_RULES:
            raise ValueError(f"commit must be one of {COMMIT_RULES}, got {self.commit!r}")
        require_number_in(self, "factor", 0, MAX_FACTOR)
        require_number_in(self, "entropy_bound", 0, MAX_ENTROPY_BOUND)
        threshold = self.threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0 < threshold <= 1
        ):
            raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
        for name in ("vicinity", "refresh"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in (
            "eos_in_order",
            "early_stop",
            "reference_numerics",
            "fastdllm_numerics",
            "batch_invariant",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.reference_numerics and self.fastdllm_numerics:
            raise ValueError(
                "reference_numerics (LLaDA's sampler) and fastdllm_numerics (Fast-dLLM's) "
                "exclude each other; choose one"
            )


# Named decoding presets, for every command and the Python API.
PRESETS: dict[str, DecodeConfig] = {
    # The published sampler, token for token.
    "reference": DecodeConfig(source="full", early_stop=False, reference_numerics=True),
    # Fast-dLLM's published methods (threshold 0.9), for comparisons.
    "fastdllm-prefix": DecodeConfig(
        source="prefix", commit="threshold", early_stop=False, fastdllm_numerics=True
    ),
    "fastdllm-dual": DecodeConfig(
        source="dual", commit="threshold", early_stop=False, fastdllm_numerics=True
    ),
    # Ours: confidence 0.99, not Fast-dLLM's 0.9, and an answer's end decided after its text.
    # On the shipped instruct model at gen_length 256 (800 questions, BENCHMARKS.md): the
    # reference 54.5%, threshold 0.9 44.2%, 0.99 52.6%, 0.99 with eos_in_order 56.2%.
    "fast": DecodeConfig(source="dual", commit="threshold", threshold=0.99, eos_in_order=True),
    "fastest": DecodeConfig(source="block", commit="threshold", threshold=0.99, eos_in_order=True),
}


# What may differ between the rows of one call of LLaDA-8B's sampler loop: how each row draws
# its proposals (temperature, remasking; its seed is an argument of `denoise`), the commit
# rule's parameter, and the answer canvas's length in whole blocks (gen_length, with steps
# following it: the steps per block are shared). Everything else shapes the forward passes or
# the block loop, which the rows share. A server batches requests that agree on the rest
# (`shared_settings`).
ROW_GENERATE_FIELDS = ("temperature", "remasking", "gen_length", "steps")
ROW_DECODE_FIELDS = ("threshold", "factor", "entropy_bound")


def _shared_values(config: GenerateConfig, decode: DecodeConfig) -> list[tuple[str, object]]:
    """(name, value) of every setting the rows of one call share."""
    shared = [
        (f"GenerateConfig.{f.name}", getattr(config, f.name))
        for f in fields(config)
        if f.name not in ROW_GENERATE_FIELDS
    ]
    shared.append(("GenerateConfig.steps_per_block", config.steps_per_block))
    shared += [
        (f"DecodeConfig.{f.name}", getattr(decode, f.name))
        for f in fields(decode)
        if f.name not in ROW_DECODE_FIELDS
    ]
    return shared


def shared_settings(config: GenerateConfig, decode: DecodeConfig | BlockDecodeConfig) -> tuple:
    """A hashable key: the settings that rows must share to run in one sampler call. LLaDA
    2.x's block sampler takes one setting for all rows, so there the key is every setting."""
    if not isinstance(decode, DecodeConfig):
        return (config, decode)
    return tuple(value for _, value in _shared_values(config, decode))


def check_shared_settings(configs: list[GenerateConfig], decodes: list[DecodeConfig]) -> None:
    """ValueError naming the first setting that differs between rows but must not."""
    first = _shared_values(configs[0], decodes[0])
    for row, (config, decode) in enumerate(zip(configs, decodes, strict=True)):
        for (name, expected), (_, value) in zip(first, _shared_values(config, decode), strict=True):
            if value != expected:
                raise ValueError(
                    f"the rows of one sampler call must share {name} (row 0: {expected!r}, "
                    f"row {row}: {value!r}); only {', '.join(ROW_GENERATE_FIELDS)} (in whole "
                    f"blocks, with the same steps per block), {', '.join(ROW_DECODE_FIELDS)} "
                    "and the seed may differ per row: run the others as separate calls"
                )


def max_steps(config: GenerateConfig, decode: DecodeConfig) -> int:
    """The most steps (= forward passes) the fast loop can take for one request: the schedule's
    `steps`, or one per answer position for the rules that decode until a block is full (every
    step commits at least one token of each unfinished row). For servers that bound work."""
    if decode.commit == "schedule":
        return config.steps
    # Fast-dLLM's cached loop runs at least two passes per block (fastdllm_numerics).
    return config.num_blocks * max(config.block_length, 2 if decode.fastdllm_numerics else 1)


BLOCK_VERSIONS = ("2.0", "2.1")


def check_block_options(**options: object) -> None:
    """The options of LLaDA 2.x's block samplers (`block_generate`, `block_sample`): one
    ValueError naming the first wrong one and what it accepts. Options not given are not
    checked."""
    if "version" in options and options["version"] not in BLOCK_VERSIONS:
        raise ValueError(
            f"version must be one of {', '.join(BLOCK_VERSIONS)} (the LLaDA 2.0 or 2.1 sampler), "
            f"got {options['version']!r}"
        )
    for name in ("gen_length", "block_length", "steps", "minimal_topk", "num_to_transfer"):
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if "max_post_steps" in options:
        value = options["max_post_steps"]
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"max_post_steps must be a non-negative integer, got {value!r}")
    for name in ("threshold", "editing_threshold", "temperature"):
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, Real) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
    if "temperature" in options and not 0.0 <= options["temperature"] < float("inf"):
        raise ValueError(
            f"temperature must be finite and >= 0 (0 = greedy), got {options['temperature']!r}"
        )
    top_k = options.get("top_k")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0
    ):
        raise ValueError(f"top_k must be None or a non-negative integer (0 = off), got {top_k!r}")
    top_p = options.get("top_p")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p must be None or in (0, 1] (1 = off), got {top_p!r}")


@dataclass(frozen=True)
class BlockDecodeConfig:
    """How a LLaDA 2.x model decodes (block diffusion: `block_sample`, with the exact block KV
    cache). The `GenerateConfig` still says what to generate: gen_length, block_length,
    temperature, and steps (the total, as for every family: 2.0 takes steps / blocks per
    block). The LLaDA-8B settings cfg_scale, remasking and the EOS flags are not part of this
    sampler and must keep their defaults.

    version: '2.0' (a per-block quota of steps plus a confidence threshold) or '2.1' (the
        threshold with at least num_to_transfer per step, token editing and post steps).
    threshold: commit the [MASK] positions whose probability exceeds it.
    editing_threshold: 2.1: rewrite a decoded answer token whose new proposal differs and is
        more probable than this (1.0 turns editing off).
    max_post_steps: 2.1: forwards a block may take after it holds no [MASK] (editing only).
    minimal_topk: 2.0: steps are capped at gen_length // minimal_topk, as the reference.
    num_to_transfer: 2.1: tokens committed at least per step.
    top_k: keep the k most probable tokens before sampling (None or 0: off).
    top_p: nucleus sampling (None or 1: off).
    eos_early_stop: stop once the answer holds an EOS (2.0: right after the step that commits
        it; 2.1: after the block, when nothing before it is [MASK]).
    """

    version: str = "2.0"
    threshold: float = 0.95
    editing_threshold: float = 0.9
    max_post_steps: int = 16
    minimal_topk: int = 1
    num_to_transfer: int = 1
    top_k: int | None = None
    top_p: float | None = None
    eos_early_stop: bool = False

    def __post_init__(self) -> None:
        options = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "eos_early_stop"}
        check_block_options(**options)
        if not isinstance(self.eos_early_stop, bool):
            raise ValueError(f"eos_early_stop must be True or False, got {self.eos_early_stop!r}")

    def sampler_options(self, config: GenerateConfig) -> dict[str, object]:
        """`block_sample`'s keyword arguments for this decoding and `config`; a ValueError for
        a LLaDA-8B setting that this sampler does not have."""
        for name, default in (
            ("cfg_scale", 0.0),
            ("remasking", "low_confidence"),
            ("logits_eos_inf", False),
            ("confidence_eos_eot_inf", False),
            ("fix_confidence_eos_eot", False),
        ):
            if getattr(config, name) != default:
                raise ValueError(
                    f"{name}={getattr(config, name)!r} is a LLaDA-8B sampler setting; LLaDA 2.x's "
                    f"block sampler has no such option (leave it at {default!r})"
                )
        options = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return options | dict(
            gen_length=config.gen_length,
            block_length=config.block_length,
            steps=config.steps_per_block,
            temperature=config.temperature,
        )


# LLaDA 2.x's block samplers: the settings their authors publish, as (decoding, the
# GenerateConfig fields they fix). 2.0: SGLang's LowConfidence (threshold 0.95, block 32) and
# the model card's 32 steps per block. 2.1: diffusers' LLaDA2 pipeline docs, "quality"
# (threshold 0.7, editing 0.5, 16 post steps) and "speed" (threshold 0.5, editing off: a
# probability is never above 1, so nothing is edited).
BLOCK_PRESETS: dict[str, tuple[BlockDecodeConfig, dict[str, int]]] = {
    "llada2.0": (
        BlockDecodeConfig(version="2.0", threshold=0.95),
        dict(block_length=32, steps_per_block=32),
    ),
    "llada2.1-quality": (
        BlockDecodeConfig(version="2.1", threshold=0.7, editing_threshold=0.5, max_post_steps=16),
        dict(block_length=32),
    ),
    "llada2.1-speed": (
        BlockDecodeConfig(version="2.1", threshold=0.5, editing_threshold=1.0),
        dict(block_length=32),
    ),
}


def block_preset(name: str) -> dict[str, object]:
    """The keyword arguments of a LLaDA 2.x block-sampler preset (a copy), e.g.
    `llada.block_sample(model, prompts, gen_length=256, **block_preset("llada2.1-quality"))`."""
    if name not in BLOCK_PRESETS:
        raise ValueError(f"unknown LLaDA 2.x preset {name!r}; choose from {sorted(BLOCK_PRESETS)}")
    decode, fixed = BLOCK_PRESETS[name]
    options: dict[str, object] = dict(
        version=decode.version, block_length=fixed["block_length"], threshold=decode.threshold
    )
    if decode.version == "2.0":
        options["steps"] = fixed["steps_per_block"]
    else:
        options |= dict(
            editing_threshold=decode.editing_threshold, max_post_steps=decode.max_post_steps
        )
    return options


# The decoding preset of LLaDA-8B / LLaDA-MoE commands that talk to people (chat, generate,
# serve, demo): `fast` holds the reference sampler's task accuracy on the shipped model
# (BENCHMARKS.md). Evaluation keeps `reference`, the published setting. LLaDA 2.x models take
# their authors' settings in both cases (`default_preset`).
INTERACTIVE_PRESET = "fast"
EVALUATION_PRESET = "reference"


@dataclass(frozen=True)
class Profile:
    """The sampler defaults of one kind of use: the `GenerateConfig` fields it sets (the rest
    keep the dataclass defaults), whether it talks to people (its preset is then 'fast', else
    'reference', for LLaDA-8B / LLaDA-MoE; LLaDA 2.x models take their authors' preset either
    way, `default_preset`), and where the values come from."""

    generate: dict[str, object]
    interactive: bool
    source: str

    def config(self, **changes: object) -> GenerateConfig:
        """The profile's `GenerateConfig`, with `changes` on top."""
        return GenerateConfig(**(self.generate | changes))

    @property
    def preset(self) -> str:
        return INTERACTIVE_PRESET if self.interactive else EVALUATION_PRESET


# Every command's sampler defaults, in one place (CLI flags, chat, the server, the demo, the
# evaluations read them from here).
PROFILES: dict[str, Profile] = {
    "chat": Profile(
        dict(steps=128, gen_length=128, block_length=32),
        True,
        "the reference chat.py (ML-GSAI/LLaDA): 128 tokens in blocks of 32, one per step",
    ),
    "generate": Profile(dict(steps=128, gen_length=128, block_length=32), True, "as chat"),
    "serve": Profile(
        dict(steps=64, gen_length=64, block_length=32),
        True,
        "ours: one step per token in blocks of 32; a request's max_tokens sets the canvas",
    ),
    "demo": Profile(
        dict(steps=32, gen_length=64, block_length=32),
        True,
        "the reference app.py (ML-GSAI/LLaDA): 64 tokens, 32 steps, blocks of 32",
    ),
    "tasks": Profile(
        dict(steps=32, gen_length=32, block_length=32),
        False,
        "ours: the generated tasks' answers are short (one block of 32, one token per step)",
    ),
    "preferences": Profile(
        dict(steps=32, gen_length=32, block_length=32, temperature=1.0),
        False,
        "the tasks profile sampled at temperature 1, so that repeated answers differ",
    ),
    "reverse": Profile(
        dict(steps=28, gen_length=28, block_length=28, logits_eos_inf=True),
        False,
        "the reference eval_reverse.py (ML-GSAI/LLaDA): 28 tokens, 28 steps, EOS forbidden",
    ),
    "harness": Profile(
        dict(steps=1024, gen_length=1024, block_length=1024),
        False,
        "the reference eval_llada.py (ML-GSAI/LLaDA): 1024 tokens, 1024 steps, one block",
    ),
}


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[name]


def coerce_setting(cls: type, name: str, value: object) -> object:
    """`value` for the field `name` of the settings dataclass `cls` (GenerateConfig,
    DecodeConfig, BlockDecodeConfig, ...): from a string (CLI flags, chat's /set, lm-eval's
    model_args), a JSON value or a UI number (a whole float for an int field). One ValueError
    that names the field and the kind it takes; the dataclass then checks the range."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    if name not in hints:
        fields = sorted(f for f in hints if not f.startswith("_"))
        raise ValueError(f"unknown setting {name!r}; one of {', '.join(fields)}")
    hint = hints[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    optional = union and type(None) in typing.get_args(hint)
    kind = next(k for k in typing.get_args(hint) if k is not type(None)) if union else hint
    return coerce_value(name, value, kind, optional)


def coerce_value(name: str, value: object, kind: object, optional: bool = False) -> object:
    """`value` as `kind` (bool, int, float, str or a Literal), the rules of `coerce_setting`;
    optional: None (or "none"/"null"/"") is allowed."""
    import typing

    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("none", "null", ""):
            return None
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{name} must be true or false, got {value!r}")
        if kind is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"{name} must be a whole number, got {value!r}") from None
        if kind is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value!r}") from None
        return text
    if value is None and optional:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # lm-eval parses "1" to 1
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind is str:
        return str(value)
    if kind is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value != int(value)
        ):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    return value


def default_preset(block_diffusion: bool, interactive: bool, name: str = "") -> str:
    """The preset a command uses when none is named. LLaDA-8B and LLaDA-MoE: 'fast' for
    interactive commands, 'reference' for evaluation. LLaDA 2.x (block_diffusion): the authors'
    setting for the checkpoint, 'llada2.1-quality' when its folder or hub id (`name`) says 2.1
    (LLaDA2.1-mini, LLaDA2.1-flash), else 'llada2.0' (2.0 and 2.1 checkpoints have the same
    architecture and config keys; only the name tells them apart)."""
    if block_diffusion:
        return "llada2.1-quality" if "2.1" in name else "llada2.0"
    return INTERACTIVE_PRESET if interactive else EVALUATION_PRESET


def decode_preset(name: str) -> DecodeConfig | BlockDecodeConfig:
    """The decoding of a preset name: LLaDA-8B / LLaDA-MoE presets (`PRESETS`) give a
    `DecodeConfig`, LLaDA 2.x presets (`BLOCK_PRESETS`) a `BlockDecodeConfig`."""
    if name in PRESETS:
        return PRESETS[name]
    if name in BLOCK_PRESETS:
        return BLOCK_PRESETS[name][0]
    raise ValueError(
        f"unknown preset {name!r}; choose from {sorted(PRESETS) + sorted(BLOCK_PRESETS)}"
    )
