"""The samplers under broken models and hostile settings: they end (never spin), with one clear
error, and the commit rules stay total when confidences are NaN."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import warnings
from pathlib import Path

import pytest
import torch

import llada
from conftest import make_random_model
from llada.sampling import fast
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig, NonFiniteLogitsError
from llada.sampling.decoding import (
    commit_entropy,
    commit_factor,
    commit_schedule,
    commit_threshold,
)
from llada.sampling.fast import denoise, sample

PROMPT = torch.tensor([[5, 9, 11, 2]])


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) when the body runs longer than `seconds`."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: the sampler spins")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def nan_weight_model() -> torch.nn.Module:
    model = make_random_model(seed=1)
    with torch.no_grad():
        # One bad weight in the residual stream poisons every later position and layer.
        model.blocks[0].mlp.down_proj.weight[0, 0] = torch.nan
    return model


DECODES = {
    **PRESETS,
    "factor": DecodeConfig(source="dual", commit="factor"),
    "entropy": DecodeConfig(source="block", commit="entropy"),
}


@pytest.mark.parametrize("name", sorted(DECODES))
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_nan_weights_give_one_clear_error_on_every_preset(name, cfg_scale):
    model = nan_weight_model()
    config = GenerateConfig(steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale)
    with deadline(20), pytest.raises(NonFiniteLogitsError) as raised:
        sample(model, PROMPT, None, config, DECODES[name])
    message = str(raised.value)
    assert "NaN/inf logits at block 0, step 0 (forward pass 1)" in message
    assert "weights" in message and "dtype" in message and "cfg_scale" in message
    assert isinstance(raised.value, ValueError)  # the CLI and server treat it as a bad input


def test_nan_weights_in_the_reference_sampler():
    with pytest.raises(NonFiniteLogitsError, match="block 0, step 0"):
        llada.generate(nan_weight_model(), PROMPT, steps=4, gen_length=8, block_length=8)


class InfAtStepModel(torch.nn.Module):
    """A model whose logits overflow to +inf from its `bad_call`-th forward on."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.inner = make_random_model(seed=2)
        self.config = self.inner.config
        self.special_tokens = self.inner.special_tokens
        self.bad_call = bad_call
        self.calls = 0

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def new_kv_cache(self, *args, **kwargs):
        return self.inner.new_kv_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = self.inner(*args, **kwargs)
        if self.calls >= self.bad_call:
            out.logits[..., 3] = torch.inf
        return out


@pytest.mark.parametrize("preset", ["reference", "fast", "fastest"])
def test_overflowing_logits_are_reported_at_their_step(preset):
    config = GenerateConfig(steps=8, gen_length=8, block_length=8)
    events = []
    with deadline(20), pytest.raises(NonFiniteLogitsError, match=r"step 2 \(forward pass 3\)"):
        for event in denoise(InfAtStepModel(bad_call=3), PROMPT, None, config, preset):
            events.append(event)
    # The broken step is never shown to a stream: only the two good steps came out.
    assert len(events) == 2


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("cfg_scale", 1e39, r"\[0, 100\]"),
        ("cfg_scale", float("nan"), r"\[0, 100\]"),
        ("cfg_scale", -1.0, r"\[0, 100\]"),
        ("temperature", float("inf"), r"\[0, 10\]"),
        ("temperature", 1e6, r"\[0, 10\]"),
    ],
)
def test_generate_settings_out_of_range_name_the_field(field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{field} must be a finite number in {allowed}"):
        GenerateConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", True),
        ("factor", 1e300),
        ("entropy_bound", 1e300),
        ("early_stop", "no"),
    ],
)
def test_decode_settings_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        DecodeConfig(**{field: value})


def test_cfg_scale_that_overflowed_float32_is_refused_before_any_work():
    # 1e39 made the guided logits inf - inf = NaN and the fast loop spin forever.
    with deadline(20), pytest.raises(ValueError, match="cfg_scale"):
        sample(make_random_model(), PROMPT, None, GenerateConfig(cfg_scale=1e39), "fast")


def test_commit_rules_rank_nan_confidences_last_and_always_progress():
    nan, inf = torch.nan, torch.inf
    confidence = torch.tensor(
        [
            [0.5, nan, 0.95, -inf],  # NaN ranks after every finite confidence
            [nan, nan, -inf, -inf],  # only NaN candidates: one is still committed
        ]
    )
    candidates = confidence > -inf
    candidates |= confidence.isnan()
    threshold = commit_threshold(confidence, 0.9)
    assert threshold.tolist() == [[False, False, True, False], [True, False, False, False]]
    schedule = commit_schedule(confidence, torch.tensor([2, 1]))
    assert schedule[0].tolist() == [True, False, True, False]
    assert int(schedule[1, :2].sum()) == 1 and not schedule[1, 2:].any()
    assert commit_schedule(confidence, torch.tensor([3, 2]))[0, 1]  # NaN third of three
    factor = commit_factor(confidence, 1.0)
    assert (factor & candidates).sum(-1).min() >= 1 and not (factor & ~candidates).any()
    entropy = torch.tensor([[0.1, 0.0, nan, 0.0], [nan, nan, 0.0, 0.0]])
    committed = commit_entropy(confidence, entropy, 0.5)
    # Row 0: the finite entropies 0.0 and 0.1 fit the bound, the NaN one (col 2) ranks after
    # them; row 1: a NaN candidate, never a non-candidate (cols 2-3 have entropy 0 but are not
    # candidates).
    assert committed.tolist() == [[True, True, False, False], [True, False, False, False]]


def test_a_step_that_commits_nothing_ends_the_loop(monkeypatch):
    """The hard bound: threshold/factor/entropy blocks take at most block_length steps."""
    monkeypatch.setattr(fast, "commit_threshold", lambda c, t: torch.zeros_like(c, dtype=bool))
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    with deadline(20), pytest.raises(RuntimeError, match="still not full after 8 steps"):
        sample(make_random_model(), PROMPT, None, config, "fast")


def test_block_length_and_steps_relations():
    with pytest.raises(ValueError, match=r"block_length \(64\) must be at most gen_length \(32\)"):
        GenerateConfig(steps=32, gen_length=32, block_length=64)
    with pytest.raises(ValueError, match="must be a multiple of block_length"):
        GenerateConfig(steps=32, gen_length=32, block_length=12)
    with pytest.raises(ValueError, match="multiple of the number of blocks"):
        GenerateConfig(steps=5, gen_length=32, block_length=8)
    # More steps than answer tokens: the reference runs it (its extra steps commit nothing), so
    # it is accepted with a warning; the answers equal those with steps = gen_length.
    with pytest.warns(UserWarning, match=r"steps \(16\) exceeds gen_length \(8\)"):
        many = GenerateConfig(steps=16, gen_length=8, block_length=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enough = GenerateConfig(steps=8, gen_length=8, block_length=8)
    model = make_random_model(seed=3)
    for preset in ("reference", "fast"):
        assert torch.equal(
            sample(model, PROMPT, None, many, preset).tokens,
            sample(model, PROMPT, None, enough, preset).tokens,
        )


@pytest.mark.parametrize("entry", ["sample", "generate"])
def test_bad_library_calls_say_what_to_change(entry):
    model = make_random_model()
    vocab = model.config.padded_vocab_size
    config = GenerateConfig(steps=4, gen_length=8, block_length=8)

    def run(prompt, attention_mask=None, mask_id=None):
        if entry == "sample":
            return sample(model, prompt, attention_mask, config, "fast", mask_id=mask_id)
        return llada.generate(
            model, prompt, attention_mask, steps=4, gen_length=8, block_length=8, mask_id=mask_id
        )

    with pytest.raises(ValueError, match="prompt has no rows"):
        run(torch.zeros((0, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="prompt is empty"):
        run(torch.zeros((1, 0), dtype=torch.long))
    with pytest.raises(ValueError, match=rf"mask_id {vocab} lies outside .*\[0, {vocab}\)"):
        run(PROMPT, mask_id=vocab)
    with pytest.raises(ValueError, match="attention_mask row 1 has no 1"):
        run(torch.tensor([[4, 5], [6, 7]]), torch.tensor([[1, 1], [0, 0]]))
    context = model.config.max_sequence_length
    too_long = torch.full((1, context - 4), 5)
    with pytest.raises(ValueError, match=rf"= {context + 4} tokens exceeds the model's context"):
        run(too_long)
    run(torch.full((1, context - 8), 5))  # exactly the context: fine


def test_settings_of_the_wrong_type_say_how_to_build_them():
    model = make_random_model()
    with pytest.raises(TypeError, match=r"pass GenerateConfig\(\*\*your_dict\)"):
        sample(model, PROMPT, None, {"steps": 4, "gen_length": 8, "block_length": 8})
    with pytest.raises(TypeError, match=r"pass DecodeConfig\(\*\*your_dict\)"):
        sample(model, PROMPT, None, None, {"source": "dual"})


def test_answers_fixed_everywhere_or_nowhere():
    model = make_random_model(seed=4)
    mask_id = model.special_tokens.mask_id
    config = GenerateConfig(steps=8, gen_length=8, block_length=4)
    fixed = torch.full((1, 8), 7)
    with pytest.raises(ValueError, match="answer holds no mask id"):
        sample(model, PROMPT, None, config, "fast", answer=fixed)
    # Only mask ids: every position is free, exactly as without an answer (documented).
    free = torch.full((1, 8), mask_id)
    for preset in ("reference", "fast"):
        assert torch.equal(
            sample(model, PROMPT, None, config, preset, answer=free).tokens,
            sample(model, PROMPT, None, config, preset).tokens,
        )


def test_nonfinite_check_rides_on_the_one_sync_per_step(monkeypatch):
    """The NaN check rides on the sync the loop makes anyway: one `.tolist()` per step and no
    `bool()`/`int()`/`.item()` of a tensor inside the step beyond the block-done check."""
    calls = {"tolist": 0}
    original = torch.Tensor.tolist

    def counting(self):
        calls["tolist"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    config = GenerateConfig(steps=8, gen_length=8, block_length=8)
    decode = dataclasses.replace(PRESETS["fast"], early_stop=False)
    result = sample(make_random_model(seed=5), PROMPT, None, config, decode)
    # One per step, and one per block (its mask counts, from which the schedule follows).
    assert calls["tolist"] == result.steps + config.num_blocks


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, attention_mask


@pytest.mark.parametrize("preset", ["fast", "fastest", "reference"])
def test_batch_invariant_groups_rows_by_length_in_the_padded_layout(preset):
    model = make_random_model(seed=9, dtype=torch.bfloat16)
    prompts = [[5, 9, 11, 2, 7, 8, 1], [4, 6, 3], [7, 7, 2, 9], [8, 3, 5], [6, 2, 9, 4, 1]]
    ids, attention_mask = _left_padded(prompts, model.special_tokens.pad_id)
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    decode = dataclasses.replace(PRESETS[preset], batch_invariant=True)
    gone: set[int] = set()
    events = []
    for event in denoise(model, ids, attention_mask, config, decode, abandoned=lambda: gone):
        events.append(event)
        gone.add(3)  # row 3 (a group of two with row 1) leaves after the first step
    width = ids.shape[1]
    assert events[-1].finished.all()
    assert torch.equal(events[-1].tokens[:, :width], ids)  # prompts stay in the padded layout
    for row, prompt in enumerate(prompts):
        if row == 3:
            continue
        alone = sample(model, torch.tensor([prompt]), None, config, preset).tokens
        assert events[-1].tokens[row, width:].tolist() == alone[0, len(prompt) :].tolist(), row
    # Each event commits only answer positions; the events together decode every free one.
    committed = sum(event.committed.long() for event in events)
    assert not committed[:, :width].any() and committed[[0, 1, 2, 4], width:].eq(1).all()
    with pytest.raises(ValueError, match="batch_invariant needs left padding"):
        sample(model, ids, attention_mask.flip(-1), config, decode)


INSTRUCT = Path(__file__).parents[2] / "models" / "llada-tiny-instruct"
# Two prompts of bench/batch_invariance.py (rows 13 and the longest): the first one, padded by
# the second's length, gets another answer in bfloat16 than alone.
BF16_BATCH = [
    "Copy this: lamp tiger moon house green sword",
    "Reverse the order:\nocean river seven sword moon tiger cloud house",
]


@pytest.mark.slow
@pytest.mark.skipif(not INSTRUCT.is_dir(), reason="llada-tiny-instruct is not shipped here")
def test_bf16_rows_get_what_they_get_alone_with_batch_invariant():
    """On the shipped bf16 model, left padding changes some rows' answers (attention sums round
    differently); batch_invariant restores the row-alone answers. bench/batch_invariance.py
    measures it on 64 prompts."""
    from llada.api import generate_texts, load

    model, tokenizer, _ = load(INSTRUCT, dtype=torch.bfloat16)
    questions = BF16_BATCH
    config = GenerateConfig(steps=32, gen_length=32, block_length=32)
    for preset in ("fast", "fastest"):
        alone = [generate_texts(model, tokenizer, [q], config, decode=preset)[0] for q in questions]
        padded = generate_texts(model, tokenizer, questions, config, decode=preset)
        assert padded != alone, "the batch no longer shows the bf16 padding effect"
        decode = dataclasses.replace(PRESETS[preset], batch_invariant=True)
        assert generate_texts(model, tokenizer, questions, config, decode=decode) == alone


def test_generate_texts_refuses_a_string_or_no_prompts(chat_checkpoint):
    from llada.api import generate_texts, load

    model, tokenizer, _ = load(chat_checkpoint)
    config = GenerateConfig(steps=4, gen_length=4, block_length=4)
    with pytest.raises(TypeError, match=r"got one string; pass \[prompt\]"):
        generate_texts(model, tokenizer, "What is 2 + 3?", config)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_texts(model, tokenizer, [], config)
