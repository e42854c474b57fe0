"""The LLaDA 2.x block sampler with the block KV cache (`block_sample`) against the plain one
(`block_generate`, itself equal to the reference vectors): token for token on every reference
case and on random settings, batched rows against each row alone, and its work; plus the
cached forward under a 4-D mask that it relies on."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager

import pytest
import torch

import llada
from conftest import REFERENCE, make_random_model
from llada.model.llada2 import LLaDA2Config, LLaDA2Model, block_attention_mask
from llada.sampling.block import block_generate
from llada.sampling.block_cached import block_generate_cached, block_sample

LLADA2_TINY = REFERENCE / "llada2-tiny"
MASK, EOS = 511, 509
IDS = dict(eos_id=EOS, mask_id=MASK)


def _cases() -> list[dict]:
    with open(REFERENCE / "llada2-cases.json", encoding="utf-8") as f:
        return [c for c in json.load(f) if c["request"]["mode"] == "llada2_generate"]


@pytest.fixture(scope="module")
def tiny() -> LLaDA2Model:
    return llada.load_model(LLADA2_TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def deeper() -> LLaDA2Model:
    """A random LLaDA 2.x of the tiny checkpoint's shape with five layers (one dense)."""
    raw = json.loads((LLADA2_TINY / "config.json").read_text(encoding="utf-8"))
    model = LLaDA2Model(LLaDA2Config.from_hf_dict(raw | {"num_hidden_layers": 5}))
    model.requires_grad_(False).init_weights(torch.Generator().manual_seed(0))
    return model


@contextmanager
def counting(model: torch.nn.Module):
    """Every forward's input shape (rows, positions), seen from outside the samplers."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["input_ids"]).shape)),
        with_kwargs=True,
    )  # fmt: skip
    try:
        yield shapes
    finally:
        handle.remove()


# The cached forward under a 4-D mask --------------------------------------------------------


@pytest.mark.parametrize("family", ["dense", "llada2"])
def test_a_cached_forward_under_a_block_mask_equals_the_uncached_one(tiny, family):
    model = make_random_model(seed=3) if family == "dense" else tiny
    ids = torch.randint(0, 60, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :4] = 0  # row 1's first block is padding
    allowed = block_attention_mask(12, 4)  # (1, 1, 12, 12)
    with torch.no_grad():
        expected = model(ids, attention_mask=allowed & padding.bool()[:, None, None, :]).logits
        cache = model.new_kv_cache(2, 12, attention_mask=padding)
        # No whole-canvas forward first: the mask says which slots each query reads.
        first = model(ids[:, :8], attention_mask=allowed[:, :, :8], kv_cache=cache).logits
        keys = [k[:, :, :8].clone() for k in cache.keys]
        # The last block through a prefix of the cache: it reads slots 0..11 only.
        last = model(
            ids[:, 8:], attention_mask=allowed[:, :, 8:], kv_cache=cache.prefix(12), window_start=8
        ).logits
    torch.testing.assert_close(first[0], expected[0, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(first[1, 4:], expected[1, 4:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, expected[:, 8:], atol=1e-5, rtol=0)
    assert all(torch.equal(k[:, :, :8], before) for k, before in zip(cache.keys, keys, strict=True))
    assert all(torch.isfinite(k).all() for k in cache.keys)  # the padded block's queries too


def test_a_cache_prefix_shares_the_buffers_and_bad_masks_are_refused(tiny):
    cache = tiny.new_kv_cache(1, 8)
    prefix = cache.prefix(4)
    assert prefix.length == 4 and prefix.keys[0].data_ptr() == cache.keys[0].data_ptr()
    with torch.no_grad():
        tiny(
            torch.tensor([[1, 2, 3, 4]]), attention_mask=block_attention_mask(4, 2), kv_cache=prefix
        )
    assert cache.keys[0][:, :, :4].abs().sum() > 0 and cache.keys[0][:, :, 4:].abs().sum() == 0
    with pytest.raises(ValueError, match="length"):
        cache.prefix(9)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match=r"\(1 or 1, 1, 2, 8\)"):  # keys must be the cache's 8
        tiny(ids, attention_mask=block_attention_mask(2, 2), kv_cache=cache)
    with pytest.raises(ValueError, match="new_kv_cache"):
        tiny(ids, attention_mask=torch.ones(1, 2), kv_cache=cache)


# Equal to block_generate ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c["name"])
def test_every_reference_case(tiny, case):
    arguments = {k: v for k, v in case["request"].items() if k not in ("mode", "seed")}
    arguments["prompt"] = torch.tensor(arguments["prompt"])
    torch.manual_seed(case["request"].get("seed", 0))
    output = block_generate_cached(tiny, **arguments)
    assert output.tolist() == case["expected"]["output"]


def _random_settings(count: int, seed: int) -> list[dict]:
    """gen 64-128, blocks 8/16/32, both versions, greedy and seeded sampling with top-k/top-p,
    eos_early_stop on and off, editing on (editing_threshold below 1)."""
    rng = random.Random(seed)
    settings = []
    for index in range(count):
        version = ("2.0", "2.1")[index % 2]
        block = rng.choice([8, 16, 32])
        temperature = rng.choice([0.7, 1.0]) if index // 2 % 2 else 0.0
        settings.append(
            dict(
                version=version,
                gen_length=rng.choice([64, 96, 128]),
                block_length=block,
                steps=rng.choice([block // 2, block]),
                threshold=rng.choice([0.3, 0.6, 0.9]),
                temperature=temperature,
                top_k=rng.choice([None, 20]) if temperature else None,
                top_p=rng.choice([None, 0.9]) if temperature else None,
                eos_early_stop=bool(index // 4 % 2),
                editing_threshold=rng.choice([0.3, 0.6]),
                max_post_steps=rng.choice([2, 4]),
                num_to_transfer=rng.choice([1, 2]),
                prompt_length=rng.randint(3, 40),
                seed=rng.randint(0, 999),
            )
        )
    return settings


SETTINGS = _random_settings(16, seed=0)


def test_the_random_settings_cover_what_they_claim():
    covered = {(s["version"], s["temperature"] > 0, s["eos_early_stop"]) for s in SETTINGS}
    assert len(covered) == 8
    assert {s["block_length"] for s in SETTINGS} == {8, 16, 32}


@pytest.mark.parametrize("family", ["tiny", "deeper"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"{s['version']}-t{s['temperature']}")
def test_random_settings(request, family, setting):
    model = request.getfixturevalue(family)
    options = {k: v for k, v in setting.items() if k not in ("prompt_length", "seed")} | IDS
    prompt = torch.randint(0, 500, (1, setting["prompt_length"]), generator=torch.Generator().manual_seed(setting["seed"]))  # fmt: skip
    torch.manual_seed(setting["seed"])
    expected = block_generate(model, prompt, **options)
    torch.manual_seed(setting["seed"])
    assert block_generate_cached(model, prompt, **options).tolist() == expected.tolist()
    # A generator seeded as the global one draws the same.
    generator = torch.Generator().manual_seed(setting["seed"])
    result = block_sample(model, prompt, generator=generator, **options)
    assert result.answers[0].tolist() == expected[0].tolist()


# Batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["tiny", "deeper"])
@pytest.mark.parametrize(
    "version, temperature, eos_early_stop",
    [("2.0", 0.0, True), ("2.0", 0.8, False), ("2.1", 0.0, False), ("2.1", 0.8, True)],
)
def test_a_left_padded_batch_equals_each_row_alone(
    request, family, version, temperature, eos_early_stop
):
    model = request.getfixturevalue(family)
    options = dict(
        version=version, gen_length=48, block_length=8, steps=8, threshold=0.6,
        temperature=temperature, top_k=20 if temperature else None, eos_early_stop=eos_early_stop,
        editing_threshold=0.5, max_post_steps=3, **IDS,
    )  # fmt: skip
    lengths = [29, 1, 8, 14, 21]  # blocks of 8: first decoding blocks 3, 0, 1, 1, 2
    prompts = [
        torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths
    ]
    seeds = [11, 12, 13, 14, 15]
    with counting(model) as shapes:
        batch = block_sample(
            model, prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], **options
        )
    for prompt, seed, answer in zip(prompts, seeds, batch.answers, strict=True):
        alone = block_sample(
            model, [prompt], generator=torch.Generator().manual_seed(seed), **options
        )
        assert answer.tolist() == alone.answers[0].tolist()
        torch.manual_seed(seed)
        assert answer.tolist() == block_generate(model, prompt[None], **options)[0].tolist()
    # Rows leave as they finish: the batch only shrinks, and ends smaller than it began.
    rows = [r for r, _ in shapes]
    assert rows[0] == 5 and rows[-1] < 5 and rows == sorted(rows, reverse=True)


def test_a_tensor_of_equal_length_prompts_is_a_batch(tiny):
    prompts = torch.randint(0, 500, (3, 6), generator=torch.Generator().manual_seed(0))
    options = dict(gen_length=16, block_length=4, steps=4, threshold=0.6, **IDS)
    batch = block_sample(tiny, prompts, **options).answers
    assert [a.tolist() for a in batch] == [
        block_generate(tiny, p[None], **options)[0].tolist() for p in prompts
    ]


# Work ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_the_cache_runs_fewer_positions_and_counts_them_honestly(deeper, version):
    prompt = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(0))
    options = dict(version=version, gen_length=64, block_length=16, steps=16, threshold=0.9, **IDS)
    with counting(deeper) as plain:
        expected = block_generate(deeper, prompt, **options)
    with counting(deeper) as cached:
        result = block_sample(deeper, prompt, **options)
    assert result.answers[0].tolist() == expected[0].tolist()
    assert result.forward_passes == len(cached)
    assert result.work["query_positions"] == sum(r * t for r, t in cached)
    assert result.work["layer_positions"] == 5 * result.work["query_positions"]
    # One prefill with the first block; then at most the block just finished with the new one.
    assert cached[0] == (1, 32) and all(t in (16, 32) for _, t in cached[1:])
    # Every denoising step is one forward in both; the cache re-runs no earlier block.
    assert len(cached) == len(plain)
    plain_positions = sum(r * t for r, t in plain)
    assert result.work["query_positions"] < plain_positions / 2


# Bad input -----------------------------------------------------------------------------------


def test_bad_batches_are_refused_by_name(tiny):
    options = dict(gen_length=4, **IDS)
    with pytest.raises(ValueError, match="one per prompt"):
        block_sample(tiny, [[1, 2], [3]], generator=[torch.Generator()], **options)
    with pytest.raises(TypeError, match="prompts"):
        block_sample(tiny, "hello", **options)
    with pytest.raises(ValueError, match="version"):
        block_sample(tiny, [[1, 2]], version="3.0", **options)


# Step events and the published presets -----------------------------------------------------


def test_step_events_show_every_commit_and_change_nothing(tiny):
    prompt = torch.tensor([[406, 189, 464, 191, 18]])
    options = dict(version="2.0", gen_length=24, block_length=8, steps=4, threshold=0.9, **IDS)
    events = []
    watched = block_sample(tiny, prompt, on_step=events.append, **options)
    plain = block_sample(tiny, prompt, **options)
    assert torch.equal(watched.answers[0], plain.answers[0])
    assert len(events) == watched.forward_passes
    by_block: dict[tuple[int, int], list] = {}
    for event in events:
        by_block.setdefault(event.block, []).append(event)
        assert not event.edited.any()  # 2.0 never edits
    for (start, end), block_events in by_block.items():
        committed = torch.stack([e.committed for e in block_events]).sum(0)
        assert committed.max() <= 1  # a position is committed once
        last = block_events[-1].tokens
        assert not (last == MASK).any()  # 2.0 ends every block full
        # Every position that was not prompt was committed during the block.
        is_prompt = torch.arange(start, end) < prompt.shape[1]
        assert torch.equal(committed.bool(), ~is_prompt)
    # The answer is the blocks' final tokens after the prompt (cut at EOS, within gen_length).
    canvas = torch.cat([by_block[b][-1].tokens for b in sorted(by_block)])
    first = min(by_block)[0]
    answer = canvas[prompt.shape[1] - first :]
    n = len(watched.answers[0])
    assert torch.equal(answer[:n], watched.answers[0])


def test_step_events_show_editing_and_the_speed_preset_never_edits(tiny):
    from llada.sampling.config import block_preset

    prompt = torch.tensor([[406, 189, 464, 191, 18]])
    edits = []
    greedy_editing = dict(version="2.1", gen_length=16, block_length=8, threshold=0.5, **IDS)
    block_sample(tiny, prompt, editing_threshold=0.0, on_step=edits.append, **greedy_editing)
    edited = [e for e in edits if e.edited.any()]
    assert edited  # with editing_threshold 0 any changed prediction is written
    for event in edited:
        assert not (event.edited & event.committed).any()
    for name in ("llada2.0", "llada2.1-quality", "llada2.1-speed"):
        settings = block_preset(name) | dict(block_length=8)
        events = []
        out = block_sample(tiny, prompt, gen_length=16, on_step=events.append, **settings, **IDS)
        assert torch.equal(
            out.answers[0], block_generate(tiny, prompt, gen_length=16, **settings, **IDS)[0]
        )
        if name == "llada2.1-speed":
            assert not any(e.edited.any() for e in events)
    with pytest.raises(ValueError, match="unknown LLaDA 2.x preset"):
        block_preset("llada2.1-fast")
