"""LLaDA 2.0 / 2.1 against the reference vectors (the official modeling_llada2_moe.py of both
versions, as copied in ZHZisZZ/dllm, with their `generate` samplers), loaded through the
family-detecting `llada.load_model`; plus the family's config, detection, name map and the
block sampler's own checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llada
from conftest import PARITY_DEVICE, PARITY_DTYPES, REFERENCE, assert_logits_match, parity_model
from llada.model.checkpoint import CheckpointError, inspect_checkpoint
from llada.model.families import DENSE, LLADA2, LLADA_MOE, detect_family
from llada.model.llada2 import LLaDA2Config, LLaDA2Model, block_attention_mask
from llada.sampling.block import block_generate, propose, top_p_logits, transfer_schedule
from llada.tokens import LLADA_MOE as MOE_TOKENS
from llada.tokens import SpecialTokens, resolve_special_tokens

LLADA2_TINY = REFERENCE / "llada2-tiny"
MOE_TINY = REFERENCE / "moe-tiny"
SHARED_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "vectors"
MASK, EOS = 511, 509


def _cases(mode: str | None = None) -> list[dict]:
    with open(REFERENCE / "llada2-cases.json", encoding="utf-8") as f:
        cases = json.load(f)
    return [c for c in cases if mode is None or c["request"]["mode"] == mode]


def _raw_config(folder: Path = LLADA2_TINY) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model() -> LLaDA2Model:
    return llada.load_model(LLADA2_TINY, dtype=torch.float32)


# The reference vectors ----------------------------------------------------------------------


def test_every_case_is_covered():
    assert len(_cases("logits")) == 3
    assert len(_cases("llada2_generate")) == 14
    assert len(_cases()) == 17


def test_the_copied_vectors_are_the_shared_ones():
    if not SHARED_VECTORS.is_dir():
        pytest.skip(f"the shared reference vectors are not here ({SHARED_VECTORS})")
    assert (SHARED_VECTORS / "llada2-cases.json").read_bytes() == (
        REFERENCE / "llada2-cases.json"
    ).read_bytes()
    for name in ("config.json", "model.safetensors"):
        assert (SHARED_VECTORS / "llada2-tiny" / name).read_bytes() == (
            LLADA2_TINY / name
        ).read_bytes()


@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", _cases("logits"), ids=lambda c: c["name"])
def test_logits_match_reference(model, case, implementation, dtype):
    on_device = parity_model(model, dtype)
    request = case["request"]
    ids = torch.tensor(request["input_ids"], device=PARITY_DEVICE)
    block = request.get("block_length")
    mask = None if block is None else block_attention_mask(ids.shape[1], block).to(PARITY_DEVICE)
    on_device.attn_implementation = implementation
    try:
        with torch.no_grad():
            logits = on_device(ids, attention_mask=mask).logits
    finally:
        on_device.attn_implementation = "sdpa"
    assert logits.dtype == torch.float32  # LLaDA 2.x's head gives float32 logits in any dtype
    assert_logits_match(logits, case["expected"], dtype)


@pytest.mark.parametrize("case", _cases("llada2_generate"), ids=lambda c: c["name"])
def test_block_generate_matches_reference(model, case):
    arguments = {k: v for k, v in case["request"].items() if k not in ("mode", "seed")}
    arguments["prompt"] = torch.tensor(arguments["prompt"])
    torch.manual_seed(case["request"].get("seed", 0))
    output = llada.block_generate(model, **arguments)
    assert output.tolist() == case["expected"]["output"]


def test_the_block_mask_is_the_reference_construction():
    blocks, block_length = 3, 4
    # The samplers' own construction: log of a block lower-triangular 0/1 matrix.
    tril = torch.tril(torch.ones(blocks, blocks))
    reference = tril.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1).log()
    allowed = block_attention_mask(blocks * block_length, block_length)
    assert allowed.shape == (1, 1, 12, 12) and allowed.dtype == torch.bool
    assert torch.equal(allowed[0, 0], reference == 0)


# Family, config, name map -------------------------------------------------------------------


def test_the_family_is_told_by_architectures_or_its_keys(model):
    raw = _raw_config()
    assert type(model) is LLaDA2Model and model.dtype == torch.float32
    assert detect_family(raw) is LLADA2
    assert detect_family({k: v for k, v in raw.items() if k != "architectures"}) is LLADA2
    # model_type is not what tells it: another one changes nothing, and model_type alone on a
    # dense config does not make it LLaDA 2.x.
    assert detect_family(raw | {"model_type": "llada"}) is LLADA2
    dense = _raw_config(REFERENCE / "tiny-gqa") | {"model_type": "llada2_moe"}
    assert detect_family(dense) is DENSE
    # num_experts still marks LLaDA-MoE when no LLaDA 2.x key accounts for it.
    assert detect_family(_raw_config(MOE_TINY)) is LLADA_MOE
    with pytest.raises(ValueError, match="num_experts: LLaDA and LLaDA-MoE"):
        detect_family(_raw_config(REFERENCE / "tiny-gqa") | {"num_experts": 4})


def test_a_config_mixing_llada2_and_llada_moe_keys_is_refused_by_name(tmp_path):
    raw = _raw_config() | {"expert_intermediate_size": 32}
    with pytest.raises(ValueError, match="expert_intermediate_size.*first_k_dense_replace"):
        detect_family(raw)
    with pytest.raises(ValueError, match="LLaDAMoEModelLM.*first_k_dense_replace"):
        detect_family(_raw_config() | {"architectures": ["LLaDAMoEModelLM"]})
    folder = tmp_path / "mixed"
    shutil.copytree(LLADA2_TINY, folder)
    (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(CheckpointError, match="expert_intermediate_size"):
        llada.load_model(folder)


def test_config_round_trips_config_json_with_unknown_keys():
    raw = _raw_config() | {"some_future_key": [1, 2]}
    config = LLaDA2Config.from_hf_dict(raw)
    assert config.extra["some_future_key"] == [1, 2]
    assert config.to_hf_dict() == raw


def test_defaults_are_llada21_mini():
    config = LLaDA2Config()
    assert config.num_parameters() == pytest.approx(16.26e9, rel=1e-3)
    assert config.num_parameters(active=True) == pytest.approx(1.43e9, rel=1e-2)
    assert config.dim_per_head == 128 and config.rope_dim == 64 and config.n_kv_heads == 4


def test_missing_keys_take_the_reference_class_defaults():
    raw = {k: v for k, v in _raw_config().items() if k not in ("rope_theta", "use_bias")}
    with pytest.raises(ValueError, match="use_bias"):  # the official class defaults it to true
        LLaDA2Config.from_hf_dict(raw)
    config = LLaDA2Config.from_hf_dict(raw | {"use_bias": False})
    assert config.rope_theta == 10000.0
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        LLaDA2Config.from_hf_dict({k: v for k, v in raw.items() if k != "moe_intermediate_size"})


@pytest.mark.parametrize(
    "change, key",
    [
        ({"use_qkv_bias": True}, "use_qkv_bias"),
        ({"use_bias": True}, "use_bias"),
        ({"use_qk_norm": False}, "use_qk_norm"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"num_experts": None}, "num_experts"),
        ({"n_group": 3}, "n_group"),
        ({"n_group": 4}, "n_group"),  # one expert per group: the router needs two
        ({"topk_group": 3}, "topk_group"),
        ({"num_experts_per_tok": 3}, "num_experts_per_tok"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
        ({"intermediate_size": None}, "intermediate_size"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ],
)
def test_unsupported_or_invalid_keys_are_refused_by_name(change, key):
    with pytest.raises(ValueError, match=key):
        LLaDA2Config.from_hf_dict(_raw_config() | change)


def test_name_map_stacks_experts_and_round_trips():
    state = load_file(LLADA2_TINY / "model.safetensors")
    ours = LLADA2.from_official(state)
    assert ours["blocks.1.mlp.gate_proj"].shape == (4, 32, 64)
    assert ours["blocks.2.mlp.down_proj"].shape == (4, 64, 32)
    assert torch.equal(
        ours["blocks.1.mlp.up_proj"][3], state["model.layers.1.mlp.experts.3.up_proj.weight"]
    )
    back = LLADA2.to_official(ours)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_inspection_expects_every_official_tensor():
    plan = inspect_checkpoint(LLADA2_TINY)
    assert plan.family is LLADA2
    assert set(plan.tensors) == set(load_file(LLADA2_TINY / "model.safetensors"))


def test_save_then_load_is_identical(model, tmp_path):
    folder = model.save_pretrained(tmp_path / "saved")
    # auto_map is written only with the remote-code files it names, which this folder lacks.
    official = {k: v for k, v in _raw_config().items() if k != "auto_map"}
    assert _raw_config(folder) == official
    saved, official = (
        load_file(folder / "model.safetensors"),
        load_file(LLADA2_TINY / "model.safetensors"),
    )
    assert saved.keys() == official.keys()
    assert all(torch.equal(saved[k], official[k]) for k in official)
    again = llada.load_model(folder)
    assert type(again) is LLaDA2Model
    ids = torch.tensor([[5, 17, 300, 42, 8, 99]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_token_family_is_llada_moe():
    raw = _raw_config() | {"vocab_size": 157184, "pad_token_id": 156892}
    assert resolve_special_tokens(raw, None, 157184) == MOE_TOKENS
    assert (MOE_TOKENS.mask_id, MOE_TOKENS.eos_id) == (156895, 156892)


# The model's own checks ---------------------------------------------------------------------


def test_grouped_experts_equal_the_loop(model):
    ids = torch.arange(0, 3 * 11).reshape(3, 11) * 37 % 512
    try:
        model.set_experts_impl("loop")
        with torch.no_grad():
            loop = model(ids).logits
        model.set_experts_impl("grouped")
        with torch.no_grad():
            grouped = model(ids).logits
    finally:
        model.set_experts_impl("auto")
    torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=0)


def test_the_router_chooses_by_biased_scores_and_weighs_by_unbiased_ones(model):
    moe = model.blocks[1].mlp
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ids, weights = moe.route(x)
        scores = torch.sigmoid(x @ moe.gate.weight.T)
    biased = scores + moe.gate.expert_bias
    # The bias changes the choice for some of these tokens (so ignoring it would fail here).
    assert not torch.equal(
        biased[:, 2:].sum(1) > biased[:, :2].sum(1), scores[:, 2:].sum(1) > scores[:, :2].sum(1)
    )
    for t in range(5):
        # topk_group 1 of 2 groups of 2: both experts of the group with the larger biased sum.
        group = int(biased[t, 2:].sum() > biased[t, :2].sum())
        assert sorted(ids[t].tolist()) == [2 * group, 2 * group + 1]
        chosen = scores[t, ids[t]]
        torch.testing.assert_close(weights[t], 2.5 * chosen / chosen.sum())


def test_left_padded_batch_equals_each_row_alone(model):
    """A 2-D attention_mask is key padding here, bidirectional (the reference would make the
    model causal); each row of a left-padded batch gives its logits alone."""
    rows = [[5, 17, 300, 42, 8, 99, 7], [250, 3, 77]]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[EOS] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(batch[i, width - len(row) :], alone, atol=1e-4, rtol=0)


def test_kv_cache_window_equals_the_full_forward(model):
    ids = torch.tensor([[5, 17, 300, 42, 8, 99, 7, MASK, MASK, MASK, MASK, 12]])
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_kv_cache(*ids.shape)
        filled = model(ids, kv_cache=cache).logits
        window = model(ids[:, 7:11], kv_cache=cache, window_start=7).logits
    torch.testing.assert_close(filled, full, atol=0, rtol=0)
    torch.testing.assert_close(window, full[:, 7:11], atol=1e-5, rtol=0)


def test_routers_give_float32_logits_to_hooks(model):
    from llada.losses import recording_router_logits

    assert len(model.routers()) == 2  # layer 0 is dense
    with recording_router_logits(model) as recorded, torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert [tuple(r.shape) for r in recorded] == [(3, 4), (3, 4)]
    assert all(r.dtype == torch.float32 for r in recorded)


def test_bfloat16_runs_and_still_gives_float32_logits():
    bf16 = llada.load_model(LLADA2_TINY, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert bf16(torch.tensor([[1, 2, 3]])).logits.dtype == torch.float32
    # The reference sampler's bfloat16 mask fails on a float32 model; the boolean one runs in
    # any dtype.
    out = block_generate(
        bf16, torch.tensor([[62, 229, 276]]), gen_length=8, block_length=4, steps=4,
        eos_id=EOS, mask_id=MASK,
    )  # fmt: skip
    assert out.shape[0] == 1 and 1 <= out.shape[1] <= 8 and not (out == MASK).any()


def test_a_random_model_initialises_as_the_reference():
    config = LLaDA2Config.from_hf_dict(_raw_config())
    random = LLaDA2Model(config).requires_grad_(False)
    random.init_weights(torch.Generator().manual_seed(0))
    assert torch.equal(random.embed.weight[config.pad_token_id], torch.zeros(64))
    assert all(torch.equal(r.expert_bias, torch.zeros(4)) for r in random.routers())
    # The routers keep kaiming-uniform (a = sqrt(5)): |w| <= 1 / sqrt(hidden_size).
    assert all(r.weight.abs().max() <= 64**-0.5 for r in random.routers())
    assert float(random.blocks[0].attn.qkv_proj.weight.std()) == pytest.approx(0.02, rel=0.1)
    with torch.no_grad():
        assert torch.isfinite(random(torch.tensor([[1, 2, 3]])).logits).all()


# The block sampler's quirks and checks ------------------------------------------------------


def test_transfer_schedule_and_top_p():
    assert transfer_schedule(8, 3) == [3, 3, 2]
    assert transfer_schedule(4, 6) == [1, 1, 1, 1, 0, 0]
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])  # probabilities .64 .24 .09 .03
    kept = top_p_logits(logits, 0.7)
    assert torch.isfinite(kept).tolist() == [[True, True, False, False]]


def test_greedy_ties_follow_each_version():
    """At temperature 0, 2.0 takes the argmax of the softmax and 2.1 that of the logits: they
    part where two logits differ by less than the probabilities resolve."""
    logits = torch.tensor([[0.0, 1e-8, -5.0]])
    probs = torch.softmax(logits, dim=-1)
    assert probs[0, 0] == probs[0, 1]
    assert propose(logits, "2.0", 0.0, None, None)[0].tolist() == [0]
    assert propose(logits, "2.1", 0.0, None, None)[0].tolist() == [1]


def test_llada20_early_stop_finds_eos_in_the_prompt(model):
    """The reference's eos_early_stop searches the whole window, prompt included: a prompt
    holding EOS ends the answer empty at the first committed EOS."""
    prompt = torch.tensor([[1, 2, EOS, 4, 5]])
    options = dict(gen_length=16, block_length=4, steps=4, threshold=0.6, eos_id=EOS, mask_id=MASK)
    stopped = block_generate(model, prompt, eos_early_stop=True, **options)
    assert stopped.shape == (1, 0)
    assert block_generate(model, prompt, eos_early_stop=False, **options).shape[1] > 0


class _Scripted(torch.nn.Module):
    """A model that proposes token 7 everywhere and EOS past `eos_from`, all with probability
    near 1: an EOS lands in the canvas padding after prompt + gen_length."""

    def __init__(self, eos_from: int) -> None:
        super().__init__()
        self.eos_from = eos_from
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = type("Config", (), {"padded_vocab_size": 16, "eos_token_id": 9})()
        self.special_tokens = None

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 16)
        logits[..., 7] = 30.0
        logits[:, self.eos_from :, 7] = 0.0
        logits[:, self.eos_from :, 9] = 30.0
        return type("Output", (), {"logits": logits})()


def test_llada20_early_return_is_not_cut_to_gen_length():
    prompt = torch.tensor([[1, 2, 3]])
    model = _Scripted(eos_from=6)  # prompt 3 + gen_length 3 = 6; the canvas pads to 8
    options = dict(gen_length=3, block_length=4, steps=4, threshold=0.5, mask_id=15)
    assert block_generate(model, prompt, **options).tolist() == [[7, 7, 7]]
    early = block_generate(model, prompt, eos_early_stop=True, **options)
    assert early.tolist() == [[7, 7, 7, 9]]  # EOS id from the config; one past gen_length


@pytest.mark.parametrize(
    "change, name",
    [
        ({"version": "2.2"}, "version"),
        ({"gen_length": 0}, "gen_length"),
        ({"block_length": 2.0}, "block_length"),
        ({"num_to_transfer": 0}, "num_to_transfer"),
        ({"max_post_steps": -1}, "max_post_steps"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 600}, "top_k"),
        ({"mask_id": 512}, "mask_id"),
        ({"prompt": torch.tensor([[1, 2], [3, 4]])}, "one prompt"),
    ],
)
def test_bad_sampler_options_are_refused_by_name(model, change, name):
    arguments = dict(prompt=torch.tensor([[1, 2, 3]]), gen_length=4, eos_id=EOS, mask_id=MASK)
    with pytest.raises(ValueError, match=name):
        block_generate(model, **(arguments | change))


def test_ids_default_from_the_model_and_are_required_without_them(model):
    with pytest.raises(ValueError, match="mask_id"):
        block_generate(model, torch.tensor([[1, 2, 3]]), gen_length=4)
    model.special_tokens = SpecialTokens(mask_id=MASK, eos_id=EOS, pad_id=EOS)
    try:
        by_default = block_generate(model, torch.tensor([[1, 2, 3]]), gen_length=4)
    finally:
        model.special_tokens = None
    given = block_generate(model, torch.tensor([[1, 2, 3]]), gen_length=4, eos_id=EOS, mask_id=MASK)
    assert torch.equal(by_default, given)
