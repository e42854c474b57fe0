"""LLaDA 2.x through the one sampler entry (`llada.denoise` / `llada.sample` with a
`BlockDecodeConfig` or a LLaDA 2.x preset): the same answers as `block_sample`, step events on
the LLaDA-8B canvas layout, the family checks, and rows that leave when abandoned."""

from __future__ import annotations

import pytest
import torch

import llada
from conftest import REFERENCE
from llada.sampling.config import BlockDecodeConfig, GenerateConfig, block_preset
from llada.tokenizer import left_pad
from llada.tokens import SpecialTokens

MASK, EOS = 511, 509
PROMPTS = [[406, 189, 464, 191, 18], [5, 6, 7], list(range(20, 31))]
CONFIG = GenerateConfig(gen_length=16, block_length=8, steps=4)
DECODINGS = {
    "2.0": BlockDecodeConfig(),
    "2.0-early-stop": BlockDecodeConfig(eos_early_stop=True, threshold=0.5),
    "2.1-editing": BlockDecodeConfig(version="2.1", threshold=0.5, editing_threshold=0.3),
}


@pytest.fixture(scope="module")
def tiny():
    model = llada.load_model(REFERENCE / "llada2-tiny", dtype=torch.float32)
    model.special_tokens = SpecialTokens(mask_id=MASK, eos_id=EOS, pad_id=EOS)
    return model


@pytest.mark.parametrize("name", DECODINGS)
def test_denoise_gives_block_sample_answers(tiny, name):
    decode = DECODINGS[name]
    ids, attention_mask = left_pad(PROMPTS, EOS)
    events = list(llada.denoise(tiny, ids, attention_mask, CONFIG, decode))
    expected = llada.block_sample(tiny, PROMPTS, **decode.sampler_options(CONFIG)).answers
    last = events[-1]
    assert last.finished.all()
    assert last.forward_passes == len([e for e in events if e.committed.any() or e.edited.any()])
    width = ids.shape[1]
    for row, answer in enumerate(expected):
        n = min(len(answer), CONFIG.gen_length)
        assert last.tokens[row, width : width + n].tolist() == answer[:n].tolist()
        assert (last.tokens[row, width + n :] == EOS).all()
        assert torch.equal(last.tokens[row, :width], ids[row])
    if name == "2.1-editing":
        assert any(e.edited.any() for e in events)
    else:  # without editing a decided position never changes again
        assert not any(e.edited.any() for e in events)
        for before, after in zip(events, events[1:], strict=False):
            decided = (before.tokens != MASK) & ~after.finished[:, None]
            assert torch.equal(before.tokens[decided], after.tokens[decided])


def test_sample_with_a_preset_name_equals_block_sample(tiny):
    ids, attention_mask = left_pad(PROMPTS[:2], EOS)
    config = GenerateConfig(gen_length=32, block_length=32, steps=32)
    out = llada.sample(tiny, ids, attention_mask, config, "llada2.1-quality")
    expected = llada.block_sample(
        tiny, PROMPTS[:2], gen_length=32, **block_preset("llada2.1-quality")
    ).answers
    for row, answer in enumerate(expected):
        got = out.tokens[row, ids.shape[1] :][: len(answer)]
        assert got.tolist() == answer.tolist()


def test_family_mismatches_are_one_clear_error(tiny, tiny_model):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="LLaDA 2.x model .block diffusion.*llada2.0"):
        llada.sample(tiny, ids, None, CONFIG, "fast")
    with pytest.raises(ValueError, match="for LLaDA 2.x models"):
        llada.sample(tiny_model, torch.tensor([[1, 2, 3]]), None, CONFIG, "llada2.0")
    with pytest.raises(ValueError, match="cfg_scale=1.0 is a LLaDA-8B sampler setting"):
        llada.sample(tiny, ids, None, GenerateConfig(8, 8, 8, cfg_scale=1.0), "llada2.0")
    with pytest.raises(ValueError, match="top_p must be None or in"):
        BlockDecodeConfig(top_p=1.5)
    with pytest.raises(ValueError, match="unknown preset 'llada2.2'"):
        llada.sample(tiny, ids, None, CONFIG, "llada2.2")


def test_an_abandoned_row_leaves_and_the_others_are_unchanged(tiny):
    ids, attention_mask = left_pad(PROMPTS, EOS)
    decode = DECODINGS["2.1-editing"]
    alone = list(llada.denoise(tiny, ids, attention_mask, CONFIG, decode))[-1]
    seen = []

    def abandoned():
        seen.append(1)
        return {1} if len(seen) >= 2 else set()

    events = list(llada.denoise(tiny, ids, attention_mask, CONFIG, decode, abandoned=abandoned))
    assert events[1].finished[1] and not events[0].finished[1]
    for later in events[2:]:  # the abandoned row is no longer run
        assert not later.committed[1].any() and not later.edited[1].any()
    for row in (0, 2):
        assert torch.equal(events[-1].tokens[row], alone.tokens[row])
