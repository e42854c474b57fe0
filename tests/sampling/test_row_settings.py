"""Rows with settings of their own in one sampler call: each row gets what it gets alone (its
temperature, remasking, commit parameter, seed and canvas length), while the rows share the
forward passes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import llada
from llada.sampling.config import PRESETS, GenerateConfig, shared_settings
from llada.sampling.decoding import commit_entropy, commit_factor, commit_threshold
from llada.sampling.fast import denoise, sample
from llada.tokenizer import left_pad, load_tokenizer, render_chat

INSTRUCT = Path(__file__).parents[2] / "models" / "llada-tiny-instruct"
pytestmark = pytest.mark.skipif(not INSTRUCT.is_dir(), reason="llada-tiny-instruct not shipped")

QUESTIONS = [
    "Copy: red blue green",
    "What is 12 + 7?",
    "Reverse: one two three four",
    "Sort: pear apple fig",
]


@pytest.fixture(scope="module")
def instruct():
    # float32: padded and unpadded rows then compute the same logits on this model.
    model = llada.load_model(INSTRUCT, dtype=torch.float32)
    tokenizer = load_tokenizer(model)
    prompts = [
        tokenizer(
            render_chat(tokenizer, [{"role": "user", "content": q}]), add_special_tokens=False
        )["input_ids"]
        for q in QUESTIONS
    ]
    assert len({len(p) for p in prompts}) > 1  # the batch is padded
    return model, prompts


def _mixed(preset: str, base: GenerateConfig, blocks: tuple[int, ...] = (0, 0, 0, 0)):
    """Four rows' settings; `blocks`: whole blocks added to each row's canvas (and steps)."""
    decode = PRESETS[preset]
    per_block = base.steps_per_block
    configs = [
        dataclasses.replace(
            base,
            gen_length=base.gen_length + more * base.block_length,
            steps=base.steps + more * per_block,
        )
        for more in blocks
    ]
    configs = [
        configs[0],
        dataclasses.replace(configs[1], temperature=0.8),
        dataclasses.replace(configs[2], temperature=0.5),
        dataclasses.replace(configs[3], temperature=1.0, remasking="random"),
    ]
    decodes = [
        decode,
        dataclasses.replace(decode, threshold=0.7),
        decode,
        dataclasses.replace(decode, threshold=0.5),
    ]
    return configs, decodes, [None, 5, 7, 3]


@pytest.mark.parametrize(
    ("preset", "base"),
    [
        ("fast", GenerateConfig(steps=32, gen_length=32, block_length=16)),
        ("fastest", GenerateConfig(steps=32, gen_length=32, block_length=16)),
        ("reference", GenerateConfig(steps=8, gen_length=16, block_length=8)),
    ],
)
def test_each_row_gets_what_it_gets_alone(instruct, preset, base):
    model, prompts = instruct
    pad = model.special_tokens.pad_id
    configs, decodes, seeds = _mixed(preset, base)
    ids, attention_mask = left_pad(prompts, pad)
    width = ids.shape[1]
    torch.manual_seed(123)  # the unseeded row draws nothing (greedy): any state will do
    mixed = sample(model, ids, attention_mask, configs, decodes, seeds=seeds).tokens[:, width:]
    uniform = sample(model, ids, attention_mask, base, PRESETS[preset]).tokens[:, width:]
    for row, prompt in enumerate(prompts):
        # Alone, seeded the way a caller seeds torch (the global generator).
        torch.manual_seed(seeds[row] or 0)
        alone = sample(model, torch.tensor([prompt]), None, configs[row], decodes[row])
        assert mixed[row].tolist() == alone.tokens[0, len(prompt) :].tolist(), row
    # The settings took effect: the sampled rows are not the greedy batch's answers.
    assert mixed[0].tolist() == uniform[0].tolist()
    assert any(mixed[row].tolist() != uniform[row].tolist() for row in (1, 2, 3))


@pytest.mark.parametrize("preset", ["fast", "fastest", "reference", "fastdllm-dual"])
def test_rows_with_canvases_of_their_own_get_what_they_get_alone(instruct, preset):
    model, prompts = instruct
    eos = model.special_tokens.eos_id
    base = GenerateConfig(steps=8, gen_length=16, block_length=8)
    configs, decodes, seeds = _mixed(preset, base, blocks=(0, 2, 1, 0))
    ids, attention_mask = left_pad(prompts, model.special_tokens.pad_id)
    width = ids.shape[1]
    mixed = sample(model, ids, attention_mask, configs, decodes, seeds=seeds).tokens[:, width:]
    assert mixed.shape[1] == max(c.gen_length for c in configs)
    for row, prompt in enumerate(prompts):
        gen_length = configs[row].gen_length
        torch.manual_seed(seeds[row] or 0)
        alone = sample(model, torch.tensor([prompt]), None, configs[row], decodes[row])
        assert mixed[row, :gen_length].tolist() == alone.tokens[0, len(prompt) :].tolist(), row
        assert set(mixed[row, gen_length:].tolist()) <= {eos}  # past its canvas: EOS only


def test_rows_in_batch_invariant_groups_keep_their_settings(instruct):
    model, prompts = instruct
    base = GenerateConfig(steps=32, gen_length=32, block_length=16)
    configs, decodes, seeds = _mixed("fast", base, blocks=(0, 1, 0, 1))
    decodes = [dataclasses.replace(d, batch_invariant=True) for d in decodes]
    ids, attention_mask = left_pad(prompts, model.special_tokens.pad_id)
    mixed = sample(model, ids, attention_mask, configs, decodes, seeds=seeds).tokens
    for row, prompt in enumerate(prompts):
        torch.manual_seed(seeds[row] or 0)
        alone = sample(model, torch.tensor([prompt]), None, configs[row], decodes[row])
        answer = mixed[row, ids.shape[1] : ids.shape[1] + configs[row].gen_length]
        assert answer.tolist() == alone.tokens[0, len(prompt) :].tolist()


def test_a_seeded_row_does_not_depend_on_its_neighbours(instruct):
    model, prompts = instruct
    base = GenerateConfig(steps=32, gen_length=32, block_length=32, temperature=0.9)
    ids, attention_mask = left_pad(prompts[:2], model.special_tokens.pad_id)
    answers = []
    for other in (11, 12):
        tokens = sample(model, ids, attention_mask, base, "fast", seeds=[other, 42]).tokens
        answers.append(tokens[:, ids.shape[1] :].tolist())
    assert answers[0][1] == answers[1][1]  # row 1: seed 42 both times
    assert answers[0][0] != answers[1][0]  # row 0 followed its own seed


def test_rows_must_share_what_shapes_the_forward(instruct):
    model, prompts = instruct
    ids, attention_mask = left_pad(prompts[:2], model.special_tokens.pad_id)
    short = GenerateConfig(steps=16, gen_length=16, block_length=16)
    other_block = GenerateConfig(steps=16, gen_length=32, block_length=32)
    with pytest.raises(ValueError, match="must share GenerateConfig.block_length"):
        next(denoise(model, ids, attention_mask, [short, other_block], "fast"))
    fewer_steps = GenerateConfig(steps=16, gen_length=32, block_length=16)
    with pytest.raises(ValueError, match="must share GenerateConfig.steps_per_block"):
        next(denoise(model, ids, attention_mask, [short, fewer_steps], "fast"))
    longer = GenerateConfig(steps=32, gen_length=32, block_length=16)
    with pytest.raises(ValueError, match="needs one gen_length for every row"):
        answer = torch.full((2, 32), model.special_tokens.mask_id)
        next(denoise(model, ids, attention_mask, [short, longer], "fast", answer=answer))
    fast, fastest = PRESETS["fast"], PRESETS["fastest"]
    with pytest.raises(ValueError, match="must share DecodeConfig.source"):
        next(denoise(model, ids, attention_mask, short, [fast, fastest]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2 rows"):
        next(denoise(model, ids, attention_mask, short, "fast", seeds=[1, 2, 3]))
    with pytest.raises(ValueError, match=r"seeds\[1\] must be an integer"):
        next(denoise(model, ids, attention_mask, short, "fast", seeds=[1, 2.5]))


def test_shared_settings_ignore_exactly_the_per_row_fields():
    base = GenerateConfig(steps=16, gen_length=16, block_length=16)
    fast = PRESETS["fast"]
    key = shared_settings(base, fast)
    assert shared_settings(dataclasses.replace(base, temperature=0.7), fast) == key
    assert shared_settings(base, dataclasses.replace(fast, threshold=0.5)) == key
    assert shared_settings(dataclasses.replace(base, steps=8), fast) != key
    longer = dataclasses.replace(base, gen_length=32, steps=32)  # one more block, same pace
    assert shared_settings(longer, fast) == key
    assert shared_settings(dataclasses.replace(base, cfg_scale=1.0), fast) != key
    assert shared_settings(base, PRESETS["fastest"]) != key


def test_commit_rules_take_one_parameter_per_row():
    torch.manual_seed(0)
    confidence = torch.rand(5, 12)
    confidence[:, 9:] = -torch.inf  # not candidates
    entropy = torch.rand(5, 12) * 0.4
    values = [0.3, 0.5, 0.9, 0.99, 0.5]
    for rule, args in (
        (commit_threshold, ()),
        (commit_factor, ()),
        (commit_entropy, (entropy,)),
    ):
        per_row = rule(confidence, *args, torch.tensor(values)[:, None])
        for row, value in enumerate(values):
            row_args = tuple(a[row : row + 1] for a in args)
            alone = rule(confidence[row : row + 1], *row_args, value)
            assert torch.equal(per_row[row], alone[0]), (rule.__name__, row)
        # The parameter matters on this input (the check above is not vacuous).
        assert not torch.equal(per_row[0], rule(confidence, *args, values[3])[0])
