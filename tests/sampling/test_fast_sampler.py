"""The fast loop: exact against the reference sampler and Fast-dLLM's vectors; batches, early
stop, caches, commit rules and streaming behave as documented."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import llada
from conftest import REFERENCE, make_random_model, reference_cases
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig
from llada.sampling.decoding import commit_entropy, commit_factor, commit_threshold
from llada.sampling.fast import denoise, sample

FASTDLLM_SOURCES = {
    "generate": "full",
    "generate_with_prefix_cache": "prefix",
    "generate_with_dual_cache": "dual",
}


def _fastdllm_cases() -> list[dict]:
    with open(REFERENCE / "fastdllm-cases.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("case", reference_cases("generate"), ids=lambda c: c["name"])
def test_reference_preset_equals_the_reference_sampler(tiny_model, case):
    request = dict(case["request"])
    request.pop("mode")
    seed = request.pop("seed", 0)
    prompt = torch.tensor(request.pop("prompt"))
    attention_mask = request.pop("attention_mask", None)
    if attention_mask is not None:
        attention_mask = torch.tensor(attention_mask)
    mask_id = request.pop("mask_id", None)
    torch.manual_seed(seed)
    result = sample(
        tiny_model, prompt, attention_mask, GenerateConfig(**request), "reference", mask_id=mask_id
    )
    assert result.tokens.tolist() == case["expected"]["output"]
    assert result.forward_passes == GenerateConfig(**request).steps


@pytest.mark.parametrize("case", _fastdllm_cases(), ids=lambda c: c["name"])
def test_fastdllm_modes_match_fastdllm(tiny_model, case):
    args = case["args"]
    config = GenerateConfig(
        steps=args["steps"],
        gen_length=args["gen_length"],
        block_length=args["block_length"],
        temperature=args["temperature"],
        remasking=args["remasking"],
    )
    threshold = args["threshold"]
    decode = DecodeConfig(
        source=FASTDLLM_SOURCES[case["function"]],
        commit="schedule" if threshold is None else "threshold",
        threshold=threshold or 0.9,
        early_stop=False,
    )
    result = sample(tiny_model, torch.tensor(case["prompt"]), None, config, decode, case["mask_id"])
    assert result.tokens.tolist() == case["expected"]["output"]
    assert result.forward_passes == case["expected"]["nfe"]


def test_reference_preset_matches_generate_on_bf16_eos_options():
    model = make_random_model(seed=5)
    prompt = torch.tensor([[5, 9, 11, 2, 7]])
    for options in (
        dict(logits_eos_inf=True),
        dict(confidence_eos_eot_inf=True),
        dict(confidence_eos_eot_inf=True, fix_confidence_eos_eot=True),
        dict(confidence_eos_eot_inf=True, temperature=0.7),
    ):
        kwargs = dict(steps=8, gen_length=16, block_length=8, **options)
        torch.manual_seed(1)
        expected = llada.generate(model, prompt, **kwargs)
        torch.manual_seed(1)
        got = sample(model, prompt, None, GenerateConfig(**kwargs), "reference").tokens
        assert got.tolist() == expected.tolist(), options


def test_window_forward_over_a_cache_equals_a_full_forward():
    ids = torch.tensor([[5, 9, 11, 2, 7, 8, 1, 3, 4, 6]])
    changed = ids.clone()
    changed[0, 4:7] = torch.tensor([10, 12, 13])
    # One layer: the keys outside the window depend only on their own tokens, so after the
    # window's slots are rewritten every key is current and the logits are a full forward's.
    model = make_random_model(seed=2, n_layers=1)
    cache = model.new_kv_cache(1, 10)
    model(ids, kv_cache=cache)
    windowed = model(changed[:, 4:7], kv_cache=cache, window_start=4).logits
    torch.testing.assert_close(windowed, model(changed).logits[:, 4:7], atol=1e-5, rtol=1e-5)
    # Deeper: an unchanged window over the cache reproduces the full forward; a changed one
    # reads stale keys elsewhere (the approximation the caches make), so it differs.
    model = make_random_model(seed=2)
    cache = model.new_kv_cache(1, 10)
    full = model(ids, kv_cache=cache).logits
    again = model(ids[:, 4:7], kv_cache=cache, window_start=4).logits
    torch.testing.assert_close(again, full[:, 4:7], atol=1e-5, rtol=1e-5)
    stale = model(changed[:, 4:7], kv_cache=cache, window_start=4).logits
    assert not torch.allclose(stale, model(changed).logits[:, 4:7], atol=1e-3)
    with pytest.raises(ValueError, match="outside the cached sequence"):
        model(changed[:, 4:7], kv_cache=cache, window_start=8)


@pytest.mark.parametrize("preset", ["fast", "fastest", "fastdllm-dual", "fastdllm-prefix"])
def test_batch_rows_equal_single_rows(preset):
    model = make_random_model(seed=3)
    pad = model.special_tokens.pad_id
    prompts = [[5, 9, 11, 2, 7, 8, 1], [4, 6, 3], [7, 7, 2, 9]]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerateConfig(steps=8, gen_length=16, block_length=4, cfg_scale=0.5)
    batched = sample(model, ids, attention_mask, config, preset).tokens
    for row, prompt in enumerate(prompts):
        alone = sample(model, torch.tensor([prompt]), None, config, preset).tokens
        assert batched[row, width:].tolist() == alone[0, len(prompt) :].tolist(), row


class EndsAtModel(torch.nn.Module):
    """Wraps a model so that answer position `end[last prompt token]` strongly predicts EOS and
    the others a fixed token: answers end where we say, and calls are counted. Full-canvas
    forwards only (the row is recognised by its prompt)."""

    def __init__(self, model, prompt_length: int, end: dict[int, int]) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        self.special_tokens = model.special_tokens
        self.prompt_length = prompt_length
        self.end = end
        self.rows_seen: list[int] = []

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def device(self):
        return self.inner.device

    def forward(self, x, attention_mask=None, logits_at=None, **kwargs):
        full = torch.full((*x.shape, self.config.padded_vocab_size), -10.0)
        full[..., 7] = 10.0
        for row in range(x.shape[0]):
            column = self.prompt_length + self.end[int(x[row, self.prompt_length - 1])]
            if 0 <= column < x.shape[1]:
                full[row, column, 7] = -10.0
                full[row, column, self.special_tokens.eos_id] = 20.0
        self.rows_seen.append(x.shape[0])
        logits = full if logits_at is None else full.flatten(0, 1)[logits_at]
        return type("Out", (), {"logits": logits})()


def test_early_stop_drops_finished_rows_and_fills_eos():
    base = make_random_model(seed=0)
    model = EndsAtModel(base, prompt_length=3, end={7: 1, 8: 9})
    prompt = torch.tensor([[5, 6, 7], [5, 6, 8]])
    config = GenerateConfig(steps=16, gen_length=16, block_length=4)
    result = sample(model, prompt, None, config, DecodeConfig(source="full", early_stop=True))
    eos, mask_id = base.special_tokens.eos_id, base.special_tokens.mask_id
    answers = result.tokens[:, 3:]
    assert answers[0, :2].tolist() == [7, eos] and answers[1, :10].tolist() == [7] * 9 + [eos]
    assert not (answers == mask_id).any()
    # Row 0 ends within the first block (4 steps); from then on only row 1 is computed, and it
    # stops inside its third block, before the 16 scheduled steps.
    rows_seen = model.rows_seen
    first_alone = rows_seen.index(1)
    assert 2 <= first_alone <= 4 and set(rows_seen[first_alone:]) == {1}
    assert result.forward_passes == len(rows_seen) < 16
    without = sample(model, prompt, None, config, DecodeConfig(source="full", early_stop=False))
    assert without.forward_passes == 16


class ConfidentEndModel(EndsAtModel):
    """Answer positions 0 and 1 propose token 7 with middling confidence; every later position
    proposes EOS with near certainty, so a threshold commits the EOS tail first."""

    def forward(self, x, attention_mask=None, logits_at=None, **kwargs):
        full = torch.zeros((*x.shape, self.config.padded_vocab_size))
        full[:, :, self.special_tokens.eos_id] = 30.0
        full[:, self.prompt_length : self.prompt_length + 2, self.special_tokens.eos_id] = 0.0
        full[:, self.prompt_length : self.prompt_length + 2, 7] = 3.0
        self.rows_seen.append(x.shape[0])
        logits = full if logits_at is None else full.flatten(0, 1)[logits_at]
        return type("Out", (), {"logits": logits})()


def test_eos_in_order_decides_the_end_after_the_text():
    model = ConfidentEndModel(make_random_model(seed=0), prompt_length=3, end={})
    eos = model.special_tokens.eos_id
    prompt = torch.tensor([[5, 6, 7]])
    config = GenerateConfig(steps=16, gen_length=16, block_length=8)
    plain = DecodeConfig(source="full", commit="threshold", threshold=0.99)
    events = list(denoise(model, prompt, None, config, plain))
    # The whole EOS tail of the block at the first step, before the text: the answer is decided
    # to end at position 2 before positions 0 and 1 are.
    assert events[0].committed[0, 5:11].all() and not events[0].committed[0, 3:5].any()

    ordered = dataclasses.replace(plain, eos_in_order=True)
    events = list(denoise(model, prompt, None, config, ordered))
    mask_id = model.special_tokens.mask_id
    before = prompt.new_full((1, 19), mask_id)
    before[0, :3] = prompt
    for event in events:
        for column in torch.nonzero(event.committed[0]).flatten().tolist():
            if event.tokens[0, column] == eos:
                assert not (before[0, 3:column] == mask_id).any(), "EOS before the text"
        before = event.tokens
    # Text first (one token a step: neither reaches the threshold), then one EOS, then the row
    # has ended: three forwards, the tail never decoded.
    assert len(events) == 3
    assert events[-1].tokens[0, 3:].tolist() == [7, 7] + [eos] * 14
    for rule in ("schedule", "factor", "entropy"):
        other = dataclasses.replace(ordered, commit=rule)
        events = list(denoise(model, prompt, None, config, other))
        assert events[0].committed[0, 3:5].any() and not (events[0].tokens[0] == eos).any(), rule
        assert events[-1].tokens[0, 3:5].tolist() == [7, 7], rule


def test_streaming_events_show_every_commit():
    model = make_random_model(seed=4)
    prompt = torch.tensor([[5, 9, 11]])
    config = GenerateConfig(steps=8, gen_length=8, block_length=4)
    events = list(denoise(model, prompt, None, config, DecodeConfig(early_stop=False)))
    assert len(events) == 8
    assert sum(int(e.committed.sum()) for e in events) == 8
    mask_id = model.special_tokens.mask_id
    assert [int((e.tokens == mask_id).sum()) for e in events] == list(range(7, -1, -1))
    assert events[-1].finished.all() and not events[0].finished.any()
    final = sample(model, prompt, None, config, DecodeConfig(early_stop=False)).tokens
    assert torch.equal(events[-1].tokens, final)
    # More steps than masks: the block fills early, the loop leaves it, and says it finished.
    with pytest.warns(UserWarning, match="steps commit nothing"):
        config = GenerateConfig(steps=8, gen_length=4, block_length=4)
    events = list(denoise(model, prompt, None, config, DecodeConfig(early_stop=False)))
    assert len(events) == 4 and events[-1].finished.all()
    reference = DecodeConfig(early_stop=False, reference_numerics=True)
    events = list(denoise(model, prompt, None, config, reference))
    assert len(events) == 8 and events[-1].finished.all() and not events[3].finished.any()


def test_commit_rules():
    inf = torch.inf
    confidence = torch.tensor([[0.95, 0.5, -inf, 0.92, 0.3], [0.2, 0.1, -inf, -inf, -inf]])
    assert commit_threshold(confidence, 0.9).tolist() == [
        [True, False, False, True, False],
        [True, False, False, False, False],
    ]
    # factor 1: thresholds -1, 2/3, 3/4, 4/5, ...; sorted 0.95, 0.92, 0.5 -> fails at the
    # third (0.5 < 0.75): two taken. Row 2 reaches its last candidate: all taken (quirk).
    assert commit_factor(confidence, 1.0).tolist() == [
        [True, False, False, True, False],
        [True, True, False, False, False],
    ]
    entropy = torch.tensor([[0.1, 0.3, 0.0, 0.2, 2.0], [1.0, 0.5, 0.0, 0.0, 0.0]])
    assert commit_entropy(confidence, entropy, 0.35).tolist() == [
        [True, False, False, True, False],
        [False, True, False, False, False],
    ]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_decodes_every_position(preset):
    model = make_random_model(seed=6)
    config = GenerateConfig(steps=4, gen_length=16, block_length=8, temperature=0.5)
    decode = PRESETS[preset]
    result = sample(model, torch.tensor([[5, 9, 11]]), None, config, decode)
    assert not (result.tokens == model.special_tokens.mask_id).any()


@pytest.mark.parametrize("source", ["prefix", "dual", "block"])
def test_refresh_after_every_commit_is_the_full_forward(source):
    """refresh=1 refills the cache after every step that commits: each step then sees exactly
    what a full forward sees, so the tokens are the full forward's; larger refresh values fill
    less often (fewer query positions run) and still decode everything."""
    model = make_random_model(seed=8)
    prompt = torch.tensor([[5, 9, 11, 4], [3, 3, 8, 2]])
    config = GenerateConfig(steps=8, gen_length=16, block_length=8, cfg_scale=0.5)
    full = sample(model, prompt, None, config, DecodeConfig(source="full", early_stop=False))
    decode = DecodeConfig(source=source, refresh=1, early_stop=False)
    refreshed = sample(model, prompt, None, config, decode)
    assert torch.equal(refreshed.tokens, full.tokens)
    assert refreshed.forward_passes == full.forward_passes

    def query_positions(refresh: int) -> int:
        events = list(
            denoise(model, prompt, None, config, dataclasses.replace(decode, refresh=refresh))
        )
        assert not (events[-1].tokens == model.special_tokens.mask_id).any()
        return events[-1].work["query_positions"]

    assert query_positions(1) > query_positions(3) > query_positions(0)


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="source must be one of"):
        DecodeConfig(source="paged")
    with pytest.raises(ValueError, match="threshold must lie in"):
        DecodeConfig(threshold=1.5)
    with pytest.raises(ValueError, match="refresh must be an integer"):
        DecodeConfig(refresh=1.5)
    with pytest.raises(ValueError, match="unknown preset"):
        sample(make_random_model(), torch.tensor([[1, 2]]), decode="warp")


@pytest.mark.parametrize("preset", ["reference", "fast", "fastest"])
def test_fixed_answer_tokens_are_kept_and_only_free_positions_decoded(preset):
    model = make_random_model(seed=7)
    mask_id = model.special_tokens.mask_id
    config = GenerateConfig(steps=8, gen_length=8, block_length=4, cfg_scale=1.0)
    answer = torch.full((2, 8), mask_id)
    answer[0, 1], answer[0, 5], answer[1, 2] = 20, 21, 22
    decode = dataclasses.replace(PRESETS[preset], early_stop=False)
    prompt = torch.tensor([[5, 9, 11], [6, 9, 12]])
    events = list(denoise(model, prompt, None, config, decode, answer=answer))
    out = events[-1].tokens[:, 3:]
    assert out[0, 1] == 20 and out[0, 5] == 21 and out[1, 2] == 22
    assert not (out == mask_id).any()
    committed = sum(e.committed for e in events)
    assert committed[:, 3:].tolist() == (answer == mask_id).long().tolist()
    with pytest.raises(ValueError, match="answer must have shape"):
        sample(model, prompt, None, config, decode, answer=answer[:, :4])


@pytest.mark.parametrize("preset", ["fast", "fastest", "reference"])
def test_abandoned_rows_leave_and_the_others_are_unchanged(preset):
    model = make_random_model(seed=8)
    pad = model.special_tokens.pad_id
    config = GenerateConfig(steps=8, gen_length=8, block_length=4)
    decode = dataclasses.replace(PRESETS[preset], early_stop=False)
    ids = torch.tensor([[5, 9, 11], [pad, 6, 12]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    alone = sample(model, ids[1:, 1:], None, config, decode).tokens
    gone: set[int] = set()
    events = []
    for event in denoise(model, ids, mask, config, decode, abandoned=lambda: gone):
        events.append(event)
        gone.add(0)  # row 0's client leaves after the first step
    assert torch.equal(events[-1].tokens[1, 1:], alone[0])
    assert not bool(events[0].finished[0]) and bool(events[1].finished[0])
    assert not bool(events[1].finished[1])
    # After the second step only row 1 is computed: at most 4 candidates per step.
    late = events[-1].work["head_positions"] - events[1].work["head_positions"]
    assert 0 < late <= (len(events) - 2) * 4
