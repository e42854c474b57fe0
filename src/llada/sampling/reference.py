"""The reference sampler: LLaDA's `generate()` (paper Algorithm 4/5; ML-GSAI/LLaDA generate.py),
the oracle.

Reverse process of the masked diffusion: the answer starts as `gen_length` mask tokens; it is
split into semi-autoregressive blocks of `block_length`; within a block, a linear schedule says
how many tokens to commit at each of `steps_per_block` steps; at each step the mask predictor
proposes a token for every position, and the proposals with the highest confidence (or random
ones) are committed while the rest stay masked ("low-confidence remasking").

This file is deliberately plain. It reproduces the published code token for token, including
its random draws from the global torch generator, so that every fast sampler can be tested
against it. Known reference bugs are reproduced where the reference returns a result and fixed
where it crashes: CFG without an attention mask works here. Inputs the reference would run into
noise are refused with a ValueError instead: an empty prompt or an all-padding row, a mask id
outside the vocabulary, a canvas longer than the model's context, and NaN/inf logits (a broken
checkpoint; `NonFiniteLogitsError`).
"""

from __future__ import annotations

import torch

from ..guidance import predict_logits
from ..inputs import (
    check_attention_mask,
    check_context,
    check_mask_id,
    check_prompt,
    device_of,
    vocab_size_of,
)
from ..tokens import special_tokens_of
from .config import GenerateConfig, NonFiniteLogitsError, Remasking, nonfinite_logits_message
from .sources import padding_mask_or_none


def add_gumbel_noise(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Perturb logits so that their argmax is a sample from softmax(logits / temperature).

    exp(l) / (-log u)^T has the same argmax as l/T + Gumbel noise. The reference computes it in
    float64 because low-precision Gumbel noise degrades generation (paper, Appendix B.2). At
    temperature 0 the very same tensor is returned (the reference's EOS quirk depends on it).
    generator: where the uniform draws come from (default: torch's global generator, as the
    reference); the draws are the same either way for the same generator state.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    gumbel_noise = (-torch.log(noise)) ** temperature
    return logits.exp() / gumbel_noise


def get_num_transfer_tokens(block_is_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each step of a block: the linear schedule, (B, steps) int64.

    With n masks and s steps, every step commits n // s tokens and the first n % s steps one
    more, so the expected fraction of masks falls linearly in time (paper §2.4).
    """
    mask_num = block_is_masked.sum(dim=1, keepdim=True)  # (B, 1)
    base = mask_num // steps
    remainder = mask_num % steps
    counts = (
        torch.zeros(mask_num.size(0), steps, device=block_is_masked.device, dtype=torch.int64)
        + base
    )
    for row in range(mask_num.size(0)):
        counts[row, : remainder[row]] += 1
    return counts


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: Remasking = "low_confidence",
    mask_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    *,
    fix_confidence_eos_eot: bool = False,
) -> torch.Tensor:
    """Generate `gen_length` tokens after each row of `prompt`, as the reference `generate`.

    prompt: (B, Lp) token ids, left-padded for batches, with `attention_mask` (B, Lp) marking
    real tokens with 1. mask_id: None takes the model's own. Other arguments: see
    `GenerateConfig`. Returns (B, Lp + gen_length) ids; the answer is `[:, Lp:]`.
    """
    config = GenerateConfig(
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        temperature=temperature,
        cfg_scale=cfg_scale,
        remasking=remasking,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        fix_confidence_eos_eot=fix_confidence_eos_eot,
    )
    tokens = special_tokens_of(model, mask_id)
    mask_id = tokens.mask_id
    check_mask_id(mask_id, vocab_size_of(model))
    device = device_of(model)
    prompt = check_prompt(prompt, vocab_size_of(model)).to(device)
    batch, prompt_length = prompt.shape
    check_context(model, prompt_length + config.gen_length, prompt_length, config.gen_length)

    x = torch.full(
        (batch, prompt_length + config.gen_length), mask_id, dtype=torch.long, device=device
    )
    x[:, :prompt_length] = prompt.clone()
    if attention_mask is not None:
        attention_mask = check_attention_mask(attention_mask, (batch, prompt_length)).to(device)
        answer_ones = torch.ones(
            (batch, config.gen_length), dtype=attention_mask.dtype, device=device
        )
        attention_mask = torch.cat([attention_mask, answer_ones], dim=-1)
        attention_mask = padding_mask_or_none(attention_mask)  # the model always applies a mask
    # Mask tokens inside the prompt are infilled like answer positions (a quirk of the
    # reference generate.py, kept).
    prompt_index = x != mask_id

    for block in range(config.num_blocks):
        block_start = prompt_length + block * config.block_length
        block_end = block_start + config.block_length
        schedule = get_num_transfer_tokens(
            x[:, block_start:block_end] == mask_id, config.steps_per_block
        )
        for step in range(config.steps_per_block):
            is_masked = x == mask_id
            logits = predict_logits(
                model,
                x,
                prompt_index=prompt_index,
                mask_id=mask_id,
                cfg_scale=config.cfg_scale,
                attention_mask=attention_mask,
            )
            if not bool((logits.amax(dim=-1) < torch.inf).all()):  # NaN or +inf somewhere
                raise NonFiniteLogitsError(
                    nonfinite_logits_message(
                        block,
                        step,
                        block * config.steps_per_block + step + 1,
                        config.cfg_scale,
                        logits.dtype,
                    )
                )
            if config.logits_eos_inf:
                logits[:, :, tokens.eos_id] = -torch.inf

            logits_with_noise = add_gumbel_noise(logits, config.temperature)
            x0 = torch.argmax(logits_with_noise, dim=-1)  # (B, L) proposals

            if config.confidence_eos_eot_inf and not config.fix_confidence_eos_eot:
                # The reference's chained assignment, after x0 is already chosen:
                # `logits_with_noise[:, :, EOS] = logits[:, :, EOT] = -inf`. At temperature 0
                # both names are one tensor, so EOS and EoT both vanish from the softmax.
                logits_with_noise[:, :, tokens.eos_id] = -torch.inf
                if tokens.eot_id is not None:
                    logits[:, :, tokens.eot_id] = -torch.inf

            if config.remasking == "low_confidence":
                p = torch.softmax(logits, dim=-1)
                x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)  # (B, L)
            else:
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            x0_p[:, block_end:] = -torch.inf  # later blocks wait their turn

            if config.confidence_eos_eot_inf and config.fix_confidence_eos_eot:
                # Confidences lie in [0, 1]; shifting stop-token proposals to [-2, -1] ranks them
                # after every other candidate, and still before committed positions (-inf).
                proposes_stop = torch.isin(x0, torch.tensor(tokens.stop_ids, device=device))
                x0_p = torch.where(proposes_stop, x0_p - 2, x0_p)

            x0 = torch.where(is_masked, x0, x)
            confidence = torch.where(is_masked, x0_p, -torch.inf)

            commit = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(confidence.shape[0]):
                _, chosen = torch.topk(confidence[row], k=int(schedule[row, step]))
                commit[row, chosen] = True
            x[commit] = x0[commit]
    return x
