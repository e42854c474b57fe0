"""The `llada` model of lm-evaluation-harness.

    python -m llada.eval --model llada --model_args pretrained=PATH --tasks ... --batch_size 8
    lm_eval --model llada ...    (lm-eval releases that read `lm_eval.models` entry points)
    llada eval lm-eval --tasks ... --model-args pretrained=PATH

Importing this module registers `llada` beside lm-eval's built-in models (`register`); the
package also declares it as an `lm_eval.models` entry point (pyproject.toml), the plugin
mechanism of lm-eval after 0.4.13 (EleutherAI/lm-evaluation-harness pull request 4013), which
needs no import. `python -m llada.eval` is lm-eval's own command line with the model
registered, for lm-eval <= 0.4.13, which reads no entry points.

Batch sizes: lm-eval's `--batch_size` (`simple_evaluate(batch_size=...)`) is requests per batch,
as for lm-eval's other models (`request_batch_size`); the model arg `batch_size` is the
reference's Monte Carlo mini-batch (masked copies per stratified draw), so both may be given.

It is the reference `eval_llada.py` (ML-GSAI/LLaDA) made batched, data-parallel and complete:

* `loglikelihood`: the Monte Carlo ELBO of paper Eq. 6 / Appendix B.5, exactly as
  `llada.likelihood.get_log_likelihood` computes it (same stratified masks, same 1 / p_mask
  weights, same averaging), with the masked copies of several requests of equal length packed
  into one forward pass. Each request draws its masks from its own seed, derived from `seed` and
  its token ids (`request_seed`), so a score depends neither on batching nor on the process
  that computes it: `torch.manual_seed(request_seed(...))` followed by `get_log_likelihood`
  gives the same number. The optional greedy check (`is_check_greedy`) decodes the answer one
  most-confident token per step, as the reference, batched over requests of equal shape.
* `loglikelihood_rolling`: the document is split into windows of at most `max_length` tokens;
  each window's new tokens are scored as the answer to the tokens before them (the first
  window's prompt is the prefix token, BOS by default). The sum of ELBOs is a lower bound on
  log p(document), so the reported perplexities are upper bounds.
* `generate_until`: left-padded batches through the fast sampling loop (`llada.sampling.fast`)
  with a decoding preset ('reference' by default, token for token the published sampler);
  `max_gen_toks` sets gen_length (rounded up to whole blocks, the answer cut back), `until`
  strings cut the text, and the 'fast' presets stop a row once its answer has ended.

LLaDA 2.x models (block diffusion, `model.block_diffusion`):

* `generate_until` runs the block sampler with its exact KV cache (`sample` with a LLaDA 2.x
  preset: `llada.block_sample`'s answers). The preset defaults to the family's rule
  (`llada.api.default_decode`: 'llada2.1-quality' for a checkpoint named 2.1, else
  'llada2.0'); the model args threshold, editing_threshold, max_post_steps, minimal_topk,
  num_to_transfer, top_k, top_p and eos_early_stop override its values. block_length defaults
  to the preset's (32) and steps to one step per position at least (the authors' 32 per block
  of 32). The LLaDA-8B sampler settings (cfg, remasking, logits_eos_inf,
  confidence_eos_eot_inf) are refused.
* `loglikelihood` / `loglikelihood_rolling` score the block-diffusion ELBO
  (`llada.likelihood`, module docstring): the chain rule over blocks of block_length positions
  counted from the prompt's first token, each block's masked-diffusion bound given the clean
  blocks before it, all blocks in one forward of [x_t ; x_0] per draw; the draws, weights,
  seeds and packing are the ones above. The greedy check decodes one most-confident token per
  step inside the first block that still holds a mask, under the block-causal mask.

Under `torchrun` / `accelerate launch` every process loads the model on its own device; the
harness shards the documents by `rank` and gathers the metrics through `all_gather`,
`gather_object` and `barrier` (lm-eval >= 0.4.12) or through `accelerator` (<= 0.4.11).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "llada.eval.lm_eval needs lm-evaluation-harness: pip install 'llada-kit[eval]' "
        "(or pip install lm_eval)"
    ) from error

from ..diffusion import block_masked_logits, stratified_masking
from ..inputs import context_of
from ..likelihood import LikelihoodConfig
from ..model.llada2 import block_attention_mask
from ..sampling.config import (
    BLOCK_PRESETS,
    PRESETS,
    REMASKING_CHOICES,
    BlockDecodeConfig,
    GenerateConfig,
    check_block_options,
    coerce_setting,
    coerce_value,
    decode_preset,
    profile,
)
from ..settings import require_non_negative_numbers, require_positive_ints

logger = logging.getLogger(__name__)

PREFIX_CHOICES = ("bos", "eos", "none")
PAIR_SPLIT_CHOICES = ("auto", "reference", "separate")
# The reference eval_llada.py's sampler defaults (LLaDA-8B, LLaDA-MoE): the harness profile.
_HARNESS = profile("harness").config()
REFERENCE_STEPS = _HARNESS.steps
REFERENCE_BLOCK_LENGTH = _HARNESS.block_length
# The LLaDA 2.x block sampler's options a model arg may set over its preset's.
BLOCK_OPTIONS = (
    "threshold",
    "editing_threshold",
    "max_post_steps",
    "minimal_topk",
    "num_to_transfer",
    "top_k",
    "top_p",
    "eos_early_stop",
)
# LLaDA-8B sampler settings (with their defaults) that LLaDA 2.x's block sampler does not have.
LLADA8B_ONLY = {
    "cfg": 0.0,
    "remasking": "low_confidence",
    "logits_eos_inf": False,
    "confidence_eos_eot_inf": False,
}


@dataclass(frozen=True)
class HarnessSettings:
    """The model_args of the `llada` lm-eval model (besides pretrained, dtype, device).

    Defaults are the reference eval_llada.py's (ML-GSAI/LLaDA) unless said otherwise.

    mc_num: Monte Carlo samples per likelihood (128 in the paper; 1 for single-token answers).
    batch_size: samples per stratified draw (the reference's MC mini-batch, its model arg
        batch_size); mc_num must be a multiple of it (or smaller: one draw of mc_num). Not
        lm-eval's --batch_size, which is requests per batch (`LLaDAEvalLM`).
    cfg: classifier-free guidance scale for likelihoods and generation (0 = off).
    is_check_greedy: also report whether greedy one-token-at-a-time decoding reproduces the
        answer (lm-eval's is_greedy, used by e.g. LAMBADA's acc); costs one forward per token.
    max_length: longest sequence scored or generated (None: the model's context, its config's
        max_sequence_length or, for LLaDA-MoE, max_position_embeddings; 4096 for LLaDA-8B as
        the reference); longer prompts lose their oldest tokens.
    steps: sampler forward passes for gen_length tokens (scaled with max_gen_toks); None: the
        family's default (1024; LLaDA 2.x: block_length per block, the authors' 32 for blocks of
        32, or the preset's steps per block if fewer).
    gen_length: answer tokens when a request names no max_gen_toks.
    block_length: semi-autoregressive block size of the sampler; None: the family's default
        (1024; LLaDA 2.x: the preset's, 32). For LLaDA 2.x it is also the block size of the
        likelihood's chain over blocks.
    temperature: sampling temperature; None takes the request's (0 unless do_sample).
    remasking: 'low_confidence' or 'random'.
    logits_eos_inf: forbid EOS during generation (the published HumanEval setting).
    confidence_eos_eot_inf: unmask EOS/EoT last (the published GSM8K/Math/GPQA/MBPP setting).
    preset: decoding preset of llada.sampling ('reference' is the published sampler token for
        token; 'fast' and 'fastest' add caches, parallel decoding and early stop; LLaDA 2.x:
        'llada2.0', 'llada2.1-quality', 'llada2.1-speed'). None: the model's default
        (`llada.api.default_decode` for evaluation: 'reference'; LLaDA 2.x 'llada2.1-quality'
        for a checkpoint named 2.1, else 'llada2.0').
    threshold, editing_threshold, max_post_steps, minimal_topk, num_to_transfer, top_k, top_p,
        eos_early_stop: LLaDA 2.x only, the `BlockDecodeConfig` fields they name, over the
        preset's values (None: the preset's).
    gen_batch_size: generation requests per batch (left-padded); None: lm-eval's batch size
        (`request_batch_size`) when it gives one, else 8.
    token_budget: most tokens (rows x length, both CFG halves) in one likelihood forward; the
        masked copies of several requests share a forward up to it (ours; the reference runs
        one request's batch_size copies at a time).
    seed: base seed of the per-request Monte Carlo draws (ours).
    rolling_stride: new tokens per window after the first in loglikelihood_rolling (None:
        max_length // 2); each window's remaining positions hold the preceding context.
    prefix_token: the prompt of a document's first window: 'bos' (EOS in a vocabulary without
        one), 'eos' or 'none' (empty).
    pair_split: how a (context, continuation) request becomes token ids. 'reference': the
        reference's split (the context's trailing whitespace moves to the continuation, which
        is tokenized together with the context); 'separate': each tokenized on its own, as a
        chat model meets its answer after the rendered prompt; 'auto' (ours, the default):
        'separate' when the context ends with the chat template's assistant header (a
        rendered chat, whose "\n\n" would otherwise be scored and re-tokenized with the
        answer), else 'reference'.
    """

    mc_num: int = 128
    batch_size: int = 32
    cfg: float = 0.0
    is_check_greedy: bool = True
    max_length: int | None = None
    steps: int | None = None
    gen_length: int = _HARNESS.gen_length
    block_length: int | None = None
    temperature: float | None = None
    remasking: str = "low_confidence"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    preset: str | None = None
    gen_batch_size: int | None = None
    token_budget: int = 32768
    seed: int = 1234
    rolling_stride: int | None = None
    prefix_token: str = "bos"
    pair_split: str = "auto"
    threshold: float | None = None
    editing_threshold: float | None = None
    max_post_steps: int | None = None
    minimal_topk: int | None = None
    num_to_transfer: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    eos_early_stop: bool | None = None

    def __post_init__(self) -> None:
        require_positive_ints(self, "mc_num", "batch_size", "token_budget")
        for name in ("max_length", "rolling_stride", "steps", "block_length", "gen_batch_size"):
            if getattr(self, name) is not None:
                require_positive_ints(self, name)
        if self.batch_size < self.mc_num and self.mc_num % self.batch_size:
            raise ValueError(
                f"mc_num ({self.mc_num}) must be a multiple of batch_size ({self.batch_size}), "
                "as in the reference; e.g. mc_num=128 with batch_size 8, 16 or 32"
            )
        require_non_negative_numbers(self, "cfg")
        if self.temperature is not None:
            require_non_negative_numbers(self, "temperature")
        if self.remasking not in REMASKING_CHOICES:
            raise ValueError(
                f"remasking must be one of {REMASKING_CHOICES}, got {self.remasking!r}"
            )
        if self.prefix_token not in PREFIX_CHOICES:
            raise ValueError(
                f"prefix_token must be one of {PREFIX_CHOICES}, got {self.prefix_token!r}"
            )
        if self.pair_split not in PAIR_SPLIT_CHOICES:
            raise ValueError(
                f"pair_split must be one of {PAIR_SPLIT_CHOICES}, got {self.pair_split!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.preset is not None:
            decode_preset(self.preset)
        given = self.block_options()
        check_block_options(**{k: v for k, v in given.items() if k != "eos_early_stop"})
        if not isinstance(given.get("eos_early_stop", False), bool):
            raise ValueError(f"eos_early_stop must be true or false, got {self.eos_early_stop!r}")
        if self.block_length is not None:
            # steps: the given, or a valid stand-in until the family's default is known.
            steps = self.steps or max(1, self.gen_length // self.block_length)
            self.generate_config(steps=steps)  # validates steps, gen_length and block_length

    def block_options(self) -> dict[str, Any]:
        """The LLaDA 2.x sampler options given (not None)."""
        return {n: getattr(self, n) for n in BLOCK_OPTIONS if getattr(self, n) is not None}

    def for_model(self, block_diffusion: bool, default_preset: str) -> HarnessSettings:
        """These settings with the family's defaults filled in (preset, steps, block_length),
        or one ValueError for a setting of the other family. default_preset: the model's
        (`llada.api.default_decode(model, interactive=False)`)."""
        preset = self.preset or default_preset
        if not block_diffusion:
            if preset in BLOCK_PRESETS:
                raise ValueError(
                    f"preset={preset} is a LLaDA 2.x preset; this model decodes with one of "
                    f"{', '.join(PRESETS)}"
                )
            if self.block_options():
                raise ValueError(
                    f"{', '.join(self.block_options())}: LLaDA 2.x block-sampler model args; "
                    "this model's sampler has no such options (remove them from --model-args)"
                )
            return replace(
                self,
                preset=preset,
                steps=REFERENCE_STEPS if self.steps is None else self.steps,
                block_length=(
                    REFERENCE_BLOCK_LENGTH if self.block_length is None else self.block_length
                ),
            )
        if preset in PRESETS:
            raise ValueError(
                f"preset={preset} is a LLaDA-8B / LLaDA-MoE preset; this LLaDA 2.x model "
                f"(block diffusion) decodes with one of {', '.join(BLOCK_PRESETS)}"
            )
        eight_b = [
            f"{n}={getattr(self, n)!r}" for n, d in LLADA8B_ONLY.items() if getattr(self, n) != d
        ]
        if eight_b:
            raise ValueError(
                f"{', '.join(eight_b)}: LLaDA-8B sampler settings; a LLaDA 2.x model's block "
                "sampler and likelihood have none (remove them from --model-args)"
            )
        fixed = BLOCK_PRESETS[preset][1]
        block_length = fixed["block_length"] if self.block_length is None else self.block_length
        steps = self.steps
        if steps is None:
            per_block = min(fixed.get("steps_per_block", block_length), block_length)
            steps = per_block * max(1, self.gen_length // block_length)
        return replace(self, preset=preset, block_length=block_length, steps=steps)

    def decoding(self) -> str | BlockDecodeConfig:
        """The sampler's decoding: the preset's name, or (LLaDA 2.x options given) its
        `BlockDecodeConfig` with them."""
        if self.preset is None:
            raise ValueError("the preset is not resolved yet: call for_model first")
        given = self.block_options()
        if not given:
            return self.preset
        return replace(decode_preset(self.preset), **given)

    def likelihood_config(self) -> LikelihoodConfig:
        return LikelihoodConfig(mc_num=self.mc_num, batch_size=self.batch_size, cfg_scale=self.cfg)

    def generate_config(self, temperature: float = 0.0, steps: int | None = None) -> GenerateConfig:
        """The sampler settings (steps: these settings' unless given)."""
        if self.block_length is None or (steps is None and self.steps is None):
            raise ValueError("steps and block_length are not resolved yet: call for_model first")
        return GenerateConfig(
            steps=self.steps if steps is None else steps,
            gen_length=self.gen_length,
            block_length=self.block_length,
            temperature=temperature,
            cfg_scale=self.cfg,
            remasking=self.remasking,  # type: ignore[arg-type]
            logits_eos_inf=self.logits_eos_inf,
            confidence_eos_eot_inf=self.confidence_eos_eot_inf,
        )

    @classmethod
    def from_model_args(cls, args: dict[str, Any]) -> HarnessSettings:
        """Settings from lm-eval's parsed model_args (strings, numbers or booleans), through
        the one coercion of every command (`llada.sampling.config.coerce_setting`)."""
        return cls(**{name: coerce_setting(cls, name, value) for name, value in args.items()})


def request_seed(seed: int, prompt: Sequence[int], answer: Sequence[int]) -> int:
    """The seed of one likelihood request's Monte Carlo draws: a hash of the base seed and the
    token ids, so that a score does not depend on batching, order or process."""
    text = f"{seed}|{','.join(map(str, prompt))}|{','.join(map(str, answer))}"
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def rolling_windows(
    tokens: Sequence[int], max_length: int, stride: int, prefix: Sequence[int] = ()
) -> list[tuple[list[int], list[int]]]:
    """(context, answer) windows that score every token of a document exactly once.

    The first window predicts the first `max_length - len(prefix)` tokens from `prefix`; each
    later one predicts the next `stride` tokens (fewer at the end) from as many preceding tokens
    as fit, so every window holds at most `max_length` tokens.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must lie in [1, max_length={max_length}], got {stride}")
    first = max_length - len(prefix)
    if first <= 0:
        raise ValueError(f"max_length ({max_length}) leaves no room after the prefix")
    full = list(prefix) + list(tokens)
    offset = len(prefix)
    windows: list[tuple[list[int], list[int]]] = []
    start, end = 0, min(len(tokens), first)
    while start < len(tokens):
        context_start = max(0, offset + end - max_length)
        windows.append((full[context_start : offset + start], list(tokens[start:end])))
        start, end = end, min(len(tokens), end + stride)
    return windows


def answer_generation(
    config: GenerateConfig, max_gen_toks: int | None
) -> tuple[GenerateConfig, int]:
    """The sampler settings for a request's max_gen_toks, and how many tokens to keep.

    gen_length becomes max_gen_toks rounded up to whole blocks, with the steps per block kept;
    the answer is then cut back to max_gen_toks tokens.
    """
    if max_gen_toks is None:
        return config, config.gen_length
    keep = coerce_value("max_gen_toks", max_gen_toks, int)
    if keep <= 0:
        raise ValueError(f"max_gen_toks must be a positive integer, got {max_gen_toks!r}")
    blocks = math.ceil(keep / config.block_length)
    longer = replace(
        config, gen_length=blocks * config.block_length, steps=blocks * config.steps_per_block
    )
    return longer, keep


def cut_at_stops(text: str, until: Iterable[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


@dataclass
class _Unit:
    """One stratified draw of `size` masked copies of a request's sequence."""

    request: int
    size: int
    clean: torch.Tensor  # (size, L)
    noisy: torch.Tensor  # (size, L)
    p_mask: torch.Tensor  # (size, L)
    prompt_index: torch.Tensor  # (size, L) bool


@dataclass
class _Accumulator:
    """Per-request running sums of the ELBO (as get_log_likelihood keeps them)."""

    loss: list[float]
    samples: list[int]
    units_left: list[int]
    done: Callable[[int], None]  # told how many requests are complete


class _Accelerator:
    """The part of `accelerate.Accelerator` that lm-eval <= 0.4.11 calls on `lm.accelerator`."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.process_index = rank
        self.num_processes = world_size
        self.device = device

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return _all_gather(tensor, self.num_processes)

    def wait_for_everyone(self) -> None:
        torch.distributed.barrier()


def _all_gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0 (0-d tensors become one entry each)."""
    local = tensor.reshape(1) if tensor.dim() == 0 else tensor
    parts = [torch.empty_like(local) for _ in range(world_size)]
    torch.distributed.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=0)


def _init_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the process group under a launcher."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if world_size > 1 and resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size <= 1:
        return 0, 1, resolved
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), resolved


def parse_request_batch_size(value: Any) -> int | None:
    """lm-eval's batch size as requests per batch: a positive integer, or None for 'auto' /
    'auto:N' / None (no cap on requests: likelihood forwards are bounded by token_budget
    alone, generation batches by gen_batch_size or 8)."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "auto" or text.startswith("auto:"):
        return None
    if isinstance(value, bool) or not text.isdigit() or int(text) <= 0:
        raise ValueError(
            f"batch size (lm-eval's --batch_size: requests per batch) must be a positive "
            f"integer or auto, got {value!r}"
        )
    return int(text)


class LLaDAEvalLM(LM):
    """LLaDA (any checkpoint `llada.api.load` reads) as an lm-evaluation-harness model.

    model_args: pretrained (checkpoint folder or hub id; default: the shipped model),
    dtype (float32 | bfloat16; default: the checkpoint's), device (default: cuda when
    available), and every field of `HarnessSettings`.

    request_batch_size: requests per batch, which lm-eval's `--batch_size` (or
    `simple_evaluate(batch_size=...)`) sets through `create_from_arg_string` /
    `create_from_arg_obj`: at most this many requests have their masked copies in one
    likelihood forward (which also holds at most token_budget tokens) and in one forward of
    the greedy check, and it is the generation batch unless gen_batch_size is given. 'auto' or
    None: no cap on requests. Scores do not depend on it beyond float rounding (each request
    draws its masks from its own seed).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        model_path: str | None = None,
        max_batch_size: int | None = None,
        request_batch_size: int | str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        del max_batch_size  # lm-eval's automatic batch sizing; batches here are token budgets
        known = {f.name for f in fields(HarnessSettings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            accepted = sorted(
                known | {"pretrained", "model_path", "dtype", "device", "request_batch_size"}
            )
            raise TypeError(f"unknown llada model_args {unknown}; accepted: {accepted}")
        if settings.get("batch_size") == "auto":
            raise ValueError(
                "model arg batch_size is the Monte Carlo samples per stratified draw (an "
                "integer, default 32); for lm-eval's automatic batch size pass --batch_size auto"
            )
        self.request_batch_size = parse_request_batch_size(request_batch_size)
        self.settings = HarnessSettings.from_model_args(settings)
        self.generation_batch_size = self.settings.gen_batch_size or self.request_batch_size or 8
        self._rank, self._world_size, self._device = _init_distributed(device)
        self.accelerator = (
            _Accelerator(self._rank, self._world_size, self._device)
            if self._world_size > 1
            else None
        )
        from ..api import default_decode, load

        if dtype in ("auto", ""):
            dtype = None
        self.model, self.tokenizer, is_random = load(
            pretrained or model_path, dtype=dtype, device=self._device
        )
        if is_random:
            logger.warning("no model given and none shipped: scoring the random stand-in")
        self.block_diffusion = bool(getattr(self.model, "block_diffusion", False))
        self.settings = self.settings.for_model(
            self.block_diffusion, default_decode(self.model, interactive=False)
        )
        self.decode = self.settings.decoding()
        self.tokens = self.model.special_tokens
        self.max_length = self.settings.max_length or context_of(self.model)[0]
        stride = self.settings.rolling_stride or max(1, self.max_length // 2)
        self.rolling_stride = min(stride, self.max_length)
        self._warned: set[str] = set()

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> LLaDAEvalLM:
        """lm-eval's way in: the model args plus lm-eval's own options (batch_size,
        max_batch_size, device). lm-eval's batch_size becomes `request_batch_size`, so it
        never collides with the model arg batch_size (the Monte Carlo mini-batch). A device
        given in the model args wins over lm-eval's --device; lm-eval's default (cuda:0) on a
        machine without CUDA becomes cpu."""
        args = dict(arg_dict)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in extra:
            args["request_batch_size"] = extra.pop("batch_size")
        device = extra.pop("device", None)
        if device is not None and "device" not in args:
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                logger.warning("device %s: no CUDA device here; running on cpu", device)
                device = "cpu"
            args["device"] = device
        args.update(extra)
        return cls(**args)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> LLaDAEvalLM:
        """`create_from_arg_obj` for lm-eval's 'key=value,key=value' model args."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- distributed primitives (lm-eval >= 0.4.12) --------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def device(self) -> torch.device:
        return self._device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size <= 1:
            return tensor
        return _all_gather(tensor, self._world_size)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size <= 1:
            return [obj]
        result = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self._world_size > 1:
            torch.distributed.barrier()

    # -- tokenizer and chat template ------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        from ..tokenizer import chat_template_of

        return chat_template_of(self.tokenizer)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat rendered with the checkpoint's template (LLaDA's when it has none).

        LLaDA's template always ends with the assistant header, whatever add_generation_prompt
        says (GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json); it is passed on for templates
        that honour it.
        """
        from ..tokenizer import render_chat

        # Our sandboxed, time-bounded renderer: a checkpoint's template is untrusted input.
        return render_chat(self.tokenizer, chat_history, add_generation_prompt)

    @property
    def eot_token_id(self) -> int:
        return self.tokens.eos_id

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_checkpoint": str(getattr(self.model, "checkpoint_folder", "")),
            "model_dtype": str(self.model.dtype),
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "llada_settings": dataclasses.asdict(self.settings),
        }

    def _encode(self, text: str) -> list[int]:
        """Token ids as the reference tokenizes (default special tokens), without a second
        BOS when the text already starts with one (a rendered chat)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    @functools.cached_property
    def _assistant_header(self) -> str | None:
        """What the chat template writes after a user turn's text (LLaDA's: the end of turn and
        the assistant header); None when there is no usable template."""
        sentinel = "\x00llada-sentinel\x00"
        try:
            rendered = self.apply_chat_template([{"role": "user", "content": sentinel}])
        except Exception:  # a tokenizer whose template cannot render a lone user turn
            return None
        if sentinel not in rendered:
            return None
        return rendered.split(sentinel)[-1] or None

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Prompt and answer ids of a request (see HarnessSettings.pair_split). The reference's
        split: trailing spaces of the context move to the continuation, and the continuation's
        ids are what tokenizing the whole adds after the context's."""
        split = self.settings.pair_split
        if split == "auto":
            header = self._assistant_header
            split = "separate" if header and context.endswith(header) else "reference"
        if split == "separate":
            answer = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            return self._encode(context), answer
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self._encode(context + continuation)
        prompt = self._encode(context)
        return prompt, whole[len(prompt) :]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _fit(self, prompt: list[int], answer: list[int]) -> list[int]:
        """The prompt, left-truncated so that prompt + answer fit in max_length."""
        if len(answer) > self.max_length:
            raise ValueError(
                f"an answer of {len(answer)} tokens exceeds max_length={self.max_length}; "
                "raise max_length in --model-args"
            )
        room = self.max_length - len(answer)
        if len(prompt) > room:
            self._warn_once(
                "truncate", f"prompts longer than max_length={self.max_length} lose their start"
            )
            prompt = prompt[len(prompt) - room :]
        return prompt

    # -- likelihood ----------------------------------------------------------------------------
    def _masked_logits(
        self, x: torch.Tensor, prompt_index: torch.Tensor, is_masked: torch.Tensor
    ) -> torch.Tensor:
        """Logits (N, V) at the N masked positions of x (B, L), row-major, guided with cfg > 0
        as `llada.guidance.predict_logits` (the unconditional copy masks the prompt). LLaDA
        2.x: under the samplers' block-causal mask (`block_attention_mask`)."""
        if self.block_diffusion:
            mask = block_attention_mask(x.shape[1], self.settings.block_length, x.device)
            flat = is_masked.flatten().nonzero().squeeze(1)
            return self.model(x, mask, logits_at=flat).logits
        cfg = self.settings.cfg
        if cfg <= 0:
            return self.model(x, logits_at=is_masked.flatten().nonzero().squeeze(1)).logits
        unconditional = x.masked_fill(prompt_index, self.tokens.mask_id)
        both = torch.cat([x, unconditional], dim=0)
        both_masked = torch.cat([is_masked, is_masked], dim=0)
        logits = self.model(both, logits_at=both_masked.flatten().nonzero().squeeze(1)).logits
        conditional, unconditional_logits = torch.chunk(logits, 2, dim=0)
        return unconditional_logits + (cfg + 1) * (conditional - unconditional_logits)

    def _rows_per_forward(self, length: int) -> int:
        # Guidance runs two copies; LLaDA 2.x's likelihood reads [x_t ; x_0], twice the length.
        copies = 2 if self.settings.cfg > 0 or self.block_diffusion else 1
        return max(1, self.settings.token_budget // (length * copies))

    def _draw_units(self, index: int, prompt: list[int], answer: list[int]) -> list[_Unit]:
        """The request's masked copies, drawn as get_log_likelihood draws them after
        `torch.manual_seed(request_seed(seed, prompt, answer))`."""
        device = self._device
        sequence = torch.tensor(prompt + answer, dtype=torch.long, device=device)
        prompt_index = torch.arange(len(sequence), device=device) < len(prompt)
        fork_devices = [device] if device.type == "cuda" else []
        units = []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(request_seed(self.settings.seed, prompt, answer))
            for size in self.settings.likelihood_config().batch_sizes():
                clean = sequence[None, :].repeat((size, 1))
                noisy, p_mask = stratified_masking(clean, prompt_index, self.tokens.mask_id)
                units.append(
                    _Unit(index, size, clean, noisy, p_mask, prompt_index.expand(size, -1))
                )
        return units

    @torch.no_grad()
    def _score_units(self, units: list[_Unit], totals: _Accumulator) -> None:
        noisy = torch.cat([u.noisy for u in units])
        clean = torch.cat([u.clean for u in units])
        p_mask = torch.cat([u.p_mask for u in units])
        prompt_index = torch.cat([u.prompt_index for u in units])
        is_masked = noisy == self.tokens.mask_id
        if self.block_diffusion:
            block_length = self.settings.block_length
            logits = block_masked_logits(self.model, noisy, clean, is_masked, block_length)
        else:
            logits = self._masked_logits(noisy, prompt_index, is_masked)
        token_loss = F.cross_entropy(logits, clean[is_masked], reduction="none") / p_mask[is_masked]
        counts = is_masked.sum(dim=1).split([u.size for u in units])
        parts = token_loss.split([int(c.sum()) for c in counts])
        for unit, part in zip(units, parts, strict=True):
            # As get_log_likelihood: the mean over the draw's copies, weighted by their number.
            totals.loss[unit.request] += (part.clone().sum() / unit.size).item() * unit.size
            totals.samples[unit.request] += unit.size
            totals.units_left[unit.request] -= 1
            if totals.units_left[unit.request] == 0:
                totals.done(1)

    def _score_first_units(
        self, pending: list[_Unit], limit: int, cap: int | None, totals: _Accumulator
    ) -> list[_Unit]:
        """Scores the longest run of `pending` that fits one forward (at most `limit` rows,
        at least one unit; units of at most `cap` requests) and returns the rest."""
        take, rows, requests = 0, 0, set()
        while take < len(pending):
            unit = pending[take]
            new_request = unit.request not in requests
            if take and (
                rows + unit.size > limit
                or (new_request and cap is not None and len(requests) >= cap)
            ):
                break
            rows += unit.size
            requests.add(unit.request)
            take += 1
        self._score_units(pending[:take], totals)
        return pending[take:]

    def elbo_scores(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        progress: Callable[[int], None] | None = None,
    ) -> list[float]:
        """Monte Carlo ELBO estimates of log p(answer | prompt) for (prompt, answer) id lists;
        masked copies of requests with the same total length share forward passes (at most
        token_budget tokens and `request_batch_size` requests in one)."""
        if any(not answer for _, answer in pairs):
            raise ValueError("an answer is empty: there is nothing to score")
        draws = len(self.settings.likelihood_config().batch_sizes())
        totals = _Accumulator(
            loss=[0.0] * len(pairs),
            samples=[0] * len(pairs),
            units_left=[draws] * len(pairs),
            done=progress or (lambda count: None),
        )
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, (prompt, answer) in enumerate(pairs):
            by_length[len(prompt) + len(answer)].append(i)
        cap = self.request_batch_size
        for length in sorted(by_length, reverse=True):
            limit = self._rows_per_forward(length)
            pending: list[_Unit] = []
            for i in by_length[length]:
                pending += self._draw_units(i, *pairs[i])
                # Forward once a full batch waits: limit rows, or more than cap requests.
                while pending and (
                    sum(u.size for u in pending) >= limit
                    or (cap is not None and len({u.request for u in pending}) > cap)
                ):
                    pending = self._score_first_units(pending, limit, cap, totals)
            while pending:
                pending = self._score_first_units(pending, limit, cap, totals)
        return [-loss / n for loss, n in zip(totals.loss, totals.samples, strict=True)]

    @torch.no_grad()
    def greedy_matches(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[bool]:
        """Whether unmasking the single most confident prediction per step, starting from the
        prompt and len(answer) masks, reproduces the answer (the reference's greedy check).
        LLaDA 2.x: block by block (blocks counted from the prompt's first token), the most
        confident prediction inside the first block that still holds a mask."""
        mask_id = self.tokens.mask_id
        results = [False] * len(pairs)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (prompt, answer) in enumerate(pairs):
            groups[(len(prompt), len(answer))].append(i)
        for (prompt_length, answer_length), members in groups.items():
            length = prompt_length + answer_length
            limit = min(self._rows_per_forward(length), self.request_batch_size or len(members))
            for start in range(0, len(members), limit):
                chunk = members[start : start + limit]
                x = torch.full((len(chunk), length), mask_id, dtype=torch.long)
                for row, i in enumerate(chunk):
                    x[row, :prompt_length] = torch.tensor(pairs[i][0], dtype=torch.long)
                x = x.to(self._device)
                prompt_index = (torch.arange(length, device=self._device) < prompt_length).expand(
                    len(chunk), -1
                )
                rows = torch.arange(len(chunk), device=self._device)
                blocks = torch.arange(length, device=self._device) // (
                    self.settings.block_length if self.block_diffusion else length
                )
                for _ in range(answer_length):
                    is_masked = x == mask_id
                    logits = self._masked_logits(x, prompt_index, is_masked)
                    prediction = logits.argmax(dim=-1)
                    confidence = torch.softmax(logits.float(), dim=-1)
                    confidence = confidence.gather(-1, prediction[:, None]).squeeze(-1)
                    dense = torch.full(x.shape, -torch.inf, device=self._device)
                    dense[is_masked] = confidence
                    # Only the first block with a mask is being decoded (one block: all of it).
                    first_masked = is_masked.long().argmax(dim=-1)  # (rows,)
                    current = blocks[None, :] == blocks[first_masked][:, None]
                    dense = dense.masked_fill(~current, -torch.inf)
                    dense_prediction = torch.full_like(x, mask_id)
                    dense_prediction[is_masked] = prediction
                    best = dense.argmax(dim=-1)
                    has_mask = is_masked.any(dim=-1)
                    x[rows[has_mask], best[has_mask]] = dense_prediction[rows, best][has_mask]
                answers = torch.tensor([pairs[i][1] for i in chunk], device=self._device)
                matches = (x[:, prompt_length:] == answers).all(dim=-1).tolist()
                for i, match in zip(chunk, matches, strict=True):
                    results[i] = bool(match)
        return results

    def _progress(self, total: int, description: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=description, disable=self._rank != 0)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            prompt, answer = self._encode_pair(*request.args)
            pairs.append((self._fit(prompt, answer), answer))
        scored = [i for i, (_, answer) in enumerate(pairs) if answer]
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # empty answer: log 1
        with self._progress(len(scored), "llada loglikelihood") as bar:
            scores = self.elbo_scores([pairs[i] for i in scored], progress=bar.update)
        greedy = [False] * len(scored)
        if self.settings.is_check_greedy:
            greedy = self.greedy_matches([pairs[i] for i in scored])
        for i, score, is_greedy in zip(scored, scores, greedy, strict=True):
            results[i] = (score, is_greedy)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def _prefix(self) -> list[int]:
        choice = self.settings.prefix_token
        if choice == "bos" and self.tokens.bos_id is not None:
            return [self.tokens.bos_id]
        if choice in ("bos", "eos"):
            return [self.tokens.eos_id]
        return []

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ELBO of whole documents over windows (see `rolling_windows`): a lower bound on
        log p(document), so word/byte perplexity and bits per byte are upper bounds."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, request in enumerate(requests):
            text = request.args[0]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for window in rolling_windows(
                ids, self.max_length, self.rolling_stride, self._prefix()
            ):
                windows.append(window)
                owner.append(i)
        with self._progress(len(windows), "llada loglikelihood_rolling") as bar:
            scores = self.elbo_scores(windows, progress=bar.update)
        totals = [0.0] * len(requests)
        for i, score in zip(owner, scores, strict=True):
            totals[i] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ----------------------------------------------------------------------------
    def _request_generation(self, gen_kwargs: dict[str, Any]) -> tuple[GenerateConfig, int]:
        known = {"until", "max_gen_toks", "do_sample", "temperature"}
        ignored = sorted(set(gen_kwargs) - known)
        if ignored:
            self._warn_once(
                "gen_kwargs", f"generation kwargs {ignored} have no LLaDA meaning; ignored"
            )
        temperature = self.settings.temperature
        if temperature is None:
            temperature = (
                float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample") else 0.0
            )
        config = self.settings.generate_config(temperature)
        return answer_generation(config, gen_kwargs.get("max_gen_toks"))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..sampling.fast import sample
        from ..tokenizer import left_pad

        jobs: dict[GenerateConfig, list[tuple[int, list[int], int, list[str]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            config, keep = self._request_generation(gen_kwargs)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            prompt = self._encode(context)
            room = self.max_length - config.gen_length
            if room <= 0:
                raise ValueError(
                    f"gen_length {config.gen_length} leaves no room for a prompt in "
                    f"max_length={self.max_length}"
                )
            if len(prompt) > room:
                self._warn_once(
                    "truncate", f"prompts longer than max_length={self.max_length} lose their start"
                )
                prompt = prompt[len(prompt) - room :]
            jobs[config].append((i, prompt, keep, until))
        results: list[str] = [""] * len(requests)
        with self._progress(len(requests), "llada generate_until") as bar:
            for config, items in jobs.items():
                items.sort(key=lambda item: -len(item[1]))
                size = self.generation_batch_size
                for start in range(0, len(items), size):
                    chunk = items[start : start + size]
                    ids, attention_mask = left_pad([p for _, p, _, _ in chunk], self.tokens.pad_id)
                    if bool(attention_mask.all()):
                        attention_mask = None  # no padding: exactly the reference's call
                    else:
                        attention_mask = attention_mask.to(self._device)
                    out = sample(
                        self.model,
                        ids.to(self._device),
                        attention_mask,
                        config,
                        self.decode,
                    ).tokens
                    answers = out[:, ids.shape[1] :].tolist()
                    for (i, _, keep, until), answer in zip(chunk, answers, strict=True):
                        results[i] = self._answer_text(answer[:keep], until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                    bar.update(len(chunk))
        return results

    def _answer_text(self, answer: list[int], until: list[str]) -> str:
        """As the reference: decode with special tokens, cut at the stop strings, then drop
        the special tokens (EOS padding, EoT) by re-encoding and decoding without them."""
        text = cut_at_stops(self.tokenizer.decode(answer, skip_special_tokens=False), until)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


MODEL_NAME = "llada"
# The class as lm-eval names a lazy model ("module:attribute"); pyproject.toml's entry point
# in the group lm_eval.models has this value.
MODEL_TARGET = f"{LLaDAEvalLM.__module__}:{LLaDAEvalLM.__qualname__}"


def register() -> None:
    """Adds `llada` to lm-eval's model registry, beside lm-eval's built-in models; idempotent.

    lm-eval >= 0.4.10 fills its registry lazily: `get_model` imports `lm_eval.models`, which
    lists the built-in models, only while the registry is empty, so a model registered before
    that import is the only one the process would ever see (`hf`, `dummy`, ... unknown).
    Importing `lm_eval.models` first keeps them. An entry that already names this class (a
    second call, or the entry-point placeholder of lm-eval releases that read
    `lm_eval.models` entry points) is left as it is; another model of that name is an error.
    """
    import lm_eval.models  # noqa: F401 - the built-in models first (see above)
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    current = dict(MODEL_REGISTRY.items()).get(MODEL_NAME)
    if current is None:
        register_model(MODEL_NAME)(LLaDAEvalLM)
        return
    if isinstance(current, type):
        target = f"{current.__module__}:{current.__qualname__}"
    else:  # a lazy placeholder: "module:attribute", or an entry point whose value is that
        target = str(getattr(current, "value", current))
    if target.replace(" ", "") != MODEL_TARGET:
        raise ValueError(
            f"lm-eval already has a model named '{MODEL_NAME}' ({target}); uninstall the "
            f"package that registers it to use {MODEL_TARGET}"
        )


register()
