"""The LLaDA 2.0 and 2.1 samplers (block diffusion), the oracle: `LLaDA2MoeModelLM.generate` of
the official remote code, 2.0 and 2.1 versions (modeling_llada2_moe.py on the HF hub, as copied
in ZHZisZZ/dllm, dllm/pipelines/llada2/models/ and dllm/pipelines/llada21/models/).

The canvas is the prompt followed by [MASK] up to a whole number of blocks. Blocks are decoded
left to right, starting with the first block that is not all prompt; each step feeds only the
window up to the end of the current block, positions 0..end-1, under the block-diffusion mask
(bidirectional inside a block, causal between blocks; the prompt too is read block-causally).
Each step proposes a token and its probability for every position of the block, then:
- 2.0: commits the [MASK] positions whose probability exceeds `threshold`, or, when fewer than
  the step's quota do, the quota's most probable ones. `steps` is per block; the quotas split
  block_length over the steps (the first block_length % steps steps take one more).
- 2.1: commits the confident [MASK] positions (at least `num_to_transfer` per forward), and
  also rewrites already decoded, non-prompt positions whose new proposal differs and exceeds
  `editing_threshold` (token-to-token editing); a block ends after a forward that found no
  [MASK] and edited nothing, or after `max_post_steps` such forwards.
The answer is the first gen_length tokens after the prompt, cut just after the first EOS.

Kept from the reference, because it returns these results: `steps` capped at gen_length //
minimal_topk; 2.0's early stop (`eos_early_stop`) looks for the first EOS in the WHOLE window,
prompt included, so a prompt holding EOS returns an empty answer, and its early return is not
cut to gen_length (an EOS committed in the canvas padding past prompt + gen_length returns a
longer answer); 2.0 stops after any block whose answer holds an EOS, 2.1 only with
eos_early_stop; seeded sampling draws with one `torch.multinomial` call per forward over all the
block's positions, masked or not, from the global generator, as the reference does.
Fixed by construction: the reference builds the block mask in bfloat16, which SDPA refuses for a
float32 or float64 model; here it is boolean and runs in every dtype. Logits are read as float32
(the LLaDA 2.x model returns them so). Batch 1 only, as the reference.

Deliberately plain and uncached: each step recomputes the whole window. Faster paths (a cache of
the finished blocks) are to be tested against this.
"""

from __future__ import annotations

from numbers import Integral
from typing import Literal

import torch
import torch.nn.functional as F

from ..inputs import check_context, check_mask_id, check_prompt, device_of, vocab_size_of
from ..model.llada2 import block_attention_mask
from ..tokens import special_tokens_of
from .config import BLOCK_VERSIONS, NonFiniteLogitsError, check_block_options

Version = Literal["2.0", "2.1"]
VERSIONS: tuple[str, ...] = BLOCK_VERSIONS


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """2.0's tokens to commit at each step of every block: block_length // steps each, the first
    block_length % steps steps one more (`_get_num_transfer_tokens`; zeros when steps exceeds
    block_length)."""
    if steps == 0:
        return []
    base, remainder = divmod(block_length, steps)
    return [base + (1 if step < remainder else 0) for step in range(steps)]


def top_k_logits(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the logits at least as large as the k-th largest, -inf elsewhere (None or 0: all)."""
    if k is None or k <= 0:
        return logits
    kth = torch.topk(logits, k)[0][..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def top_p_logits(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: drop the tokens after the cumulative probability (in descending order)
    passes p; the most probable token always stays (None or p >= 1: all)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cumulative > p
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()  # keep the token that crosses p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, sorted_indices, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def propose(
    logits: torch.Tensor,
    version: Version,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A token and its probability for every row of logits (N, V): (x0 (N,), p (N,)).

    Temperature 0: the most probable token (2.0 takes the argmax of the softmax, 2.1 of the
    logits) and its softmax probability. Otherwise logits / temperature, top-k, top-p, softmax
    and one `torch.multinomial` draw per row in a single call, from `generator` (None: the
    global one, as the reference); p is the filtered probability.
    """
    if temperature == 0.0:
        probs = F.softmax(logits, dim=-1)
        token = torch.argmax(probs if version == "2.0" else logits, dim=-1, keepdim=True)
        return token.squeeze(-1), torch.gather(probs, -1, token).squeeze(-1)
    if temperature != 1.0:
        logits = logits / temperature
    logits = top_p_logits(top_k_logits(logits, top_k), top_p)
    probs = F.softmax(logits, dim=-1)
    token = torch.multinomial(probs, num_samples=1, generator=generator)  # (N, 1)
    return token.squeeze(-1), torch.gather(probs, -1, token).squeeze(-1)


@torch.no_grad()
def block_generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    *,
    version: Version = "2.0",
    gen_length: int,
    block_length: int = 32,
    steps: int = 32,
    threshold: float = 0.95,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    editing_threshold: float = 0.9,
    max_post_steps: int = 16,
    num_to_transfer: int = 1,
    eos_id: int | None = None,
    mask_id: int | None = None,
) -> torch.Tensor:
    """Generate after `prompt` (1, Lp) as LLaDA 2.0's or 2.1's `generate` (see the module
    docstring); returns the answer (1, n): at most gen_length tokens after the prompt, cut just
    after the first EOS.

    version "2.0" reads steps and minimal_topk; "2.1" reads editing_threshold, max_post_steps
    and num_to_transfer (and takes steps and minimal_topk without using them, as the reference).
    eos_id, mask_id: None takes the model's own (`model.special_tokens`).
    Randomness (temperature > 0) comes from the global torch generator, as in the reference:
    `torch.manual_seed(s)` before the call reproduces the reference's answer for seed s.
    """
    vocab_size, mask_id, eos_id, device = checked_setup(
        model,
        mask_id,
        eos_id,
        version=version,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        threshold=threshold,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        minimal_topk=minimal_topk,
        editing_threshold=editing_threshold,
        max_post_steps=max_post_steps,
        num_to_transfer=num_to_transfer,
    )
    prompt = check_prompt(prompt, vocab_size).to(device)
    if prompt.shape[0] != 1:
        raise ValueError(
            f"block_generate takes one prompt (1, Lp), as the LLaDA 2.x reference does; got "
            f"{prompt.shape[0]} rows: call it once per row"
        )
    prompt_length = prompt.shape[1]
    steps = min(steps, gen_length // minimal_topk)
    num_blocks = -(-(prompt_length + gen_length) // block_length)
    total_length = num_blocks * block_length
    check_context(model, total_length, prompt_length, gen_length)

    x = torch.full((1, total_length), mask_id, dtype=torch.long, device=device)  # the canvas
    x[:, :prompt_length] = prompt
    allowed = block_attention_mask(total_length, block_length, device)  # (1, 1, T, T)
    quotas = transfer_schedule(block_length, steps)
    sampling = (version, temperature, top_k, top_p)

    for block in range(prompt_length // block_length, num_blocks):
        start, end = block * block_length, (block + 1) * block_length
        # Each forward reads the window x[:, :end] only: later blocks are not in it.
        if version == "2.0":
            for quota in quotas:
                is_masked = x[0, start:end] == mask_id  # (block_length,)
                if not bool(is_masked.any()):
                    break
                x0, p = _block_proposals(model, x, end, allowed, block_length, sampling)
                confidence = torch.where(is_masked, p, -torch.inf)
                confident = confidence > threshold
                if int(confident.sum()) >= quota:
                    commit = confident
                else:
                    commit = torch.zeros_like(is_masked)
                    k = min(quota, int(is_masked.sum()))
                    commit[torch.topk(confidence, k=k)[1]] = True
                x[0, start:end][commit] = x0[commit]
                if eos_early_stop and bool((x0[commit] == eos_id).any()):
                    # The reference searches the whole window, prompt included.
                    eos_at = (x[0, :end] == eos_id).nonzero()
                    if len(eos_at):
                        first = int(eos_at[0, 0])
                        if bool((x[0, prompt_length:first] != mask_id).all()):
                            return x[:, prompt_length : first + 1]  # not cut to gen_length
            if bool((x[0, prompt_length:end] == eos_id).any()):
                break
        else:
            is_prompt = torch.arange(start, end, device=device) < prompt_length
            post_steps = 0
            while True:
                before = x[0, start:end].clone()
                is_masked = before == mask_id
                if not bool(is_masked.any()):
                    post_steps += 1
                if post_steps > max_post_steps:
                    break
                x0, p = _block_proposals(model, x, end, allowed, block_length, sampling)
                commit = torch.zeros_like(is_masked)
                if bool(is_masked.any()):
                    confidence = torch.where(is_masked, p, -torch.inf)
                    confident = (confidence > threshold) & is_masked
                    if int(confident.sum()) >= num_to_transfer:
                        commit = confident
                    else:
                        k = min(num_to_transfer, int(is_masked.sum()))
                        commit[torch.topk(confidence, k=k)[1]] = True
                editable = ~is_masked & ~is_prompt
                edit = editable & (p > editing_threshold) & (x0 != before)
                x[0, start:end][commit | edit] = x0[commit | edit]
                if not bool(is_masked.any()) and not bool(edit.any()):
                    break
            if eos_early_stop:
                answer = x[0, prompt_length:end]
                if not bool((answer == mask_id).any()) and bool((answer == eos_id).any()):
                    break

    answer = x[0, prompt_length : prompt_length + gen_length]
    eos_at = (answer == eos_id).nonzero()
    length = int(eos_at[0, 0]) + 1 if len(eos_at) else gen_length
    return x[:, prompt_length : prompt_length + length]


def _block_proposals(
    model: torch.nn.Module,
    x: torch.Tensor,
    end: int,
    allowed: torch.Tensor,
    block_length: int,
    sampling: tuple,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the window x[:, :end] (positions 0..end-1, block mask `allowed`) and
    the proposals (x0, p), each (block_length,), for the block that ends at `end`."""
    window_mask = allowed[:, :, :end, :end]
    logits = model(x[:, :end], attention_mask=window_mask).logits[0, -block_length:]
    if not bool((logits.amax(dim=-1) < torch.inf).all()):  # NaN or +inf somewhere
        raise NonFiniteLogitsError(
            f"the model produced NaN/inf logits for the block ending at position {end}; check "
            f"the checkpoint's weights for NaN/inf and its dtype ({logits.dtype})"
        )
    return propose(logits.float(), *sampling)


def token_ids(model: torch.nn.Module, mask_id: int | None, eos_id: int | None) -> tuple[int, int]:
    """The mask and EOS ids: the given ones, else the model's (`special_tokens`, or its config)."""
    for name, value in (("mask_id", mask_id), ("eos_id", eos_id)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, Integral) or value < 0
        ):
            raise ValueError(f"{name} must be a non-negative integer token id, got {value!r}")
    tokens = getattr(model, "special_tokens", None)
    if mask_id is None:
        mask_id = special_tokens_of(model).mask_id
    if eos_id is None:
        if tokens is not None:
            eos_id = tokens.eos_id
        else:
            eos_id = getattr(getattr(model, "config", None), "eos_token_id", None)
        if eos_id is None:
            raise ValueError(
                "this model carries no EOS id (no tokenizer files in its folder); pass eos_id=..."
            )
    return int(mask_id), int(eos_id)


def checked_setup(
    model: torch.nn.Module, mask_id: int | None, eos_id: int | None, **options: object
) -> tuple[int, int, int, torch.device]:
    """(vocabulary size, mask id, EOS id, device) for a block sampler's call, after checking its
    options (one ValueError naming the option) and ids against the model."""
    check_block_options(**options)
    vocab_size = vocab_size_of(model)
    mask_id, eos_id = token_ids(model, mask_id, eos_id)
    check_mask_id(mask_id, vocab_size)
    top_k = options["top_k"]
    if top_k is not None and top_k > vocab_size:
        raise ValueError(f"top_k ({top_k}) exceeds the model's vocabulary ({vocab_size})")
    return vocab_size, mask_id, eos_id, device_of(model)
