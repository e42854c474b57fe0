"""LLaDA-MoE: its config, family detection, name map, and the checks of its checkpoint folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada.model.checkpoint import CheckpointError, inspect_checkpoint, load_model
from llada.model.config import LLaDAConfig
from llada.model.families import DENSE, LLADA_MOE, detect_family
from llada.model.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from llada.model.transformer import LLaDAModel

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "reference"
MOE_TINY = REFERENCE / "moe-tiny"
MOE_OPTS = REFERENCE / "moe-tiny-opts"


def raw_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def copy_folder(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for item in source.iterdir():
        shutil.copyfile(item, dest / item.name)
    return dest


def logits_of(model) -> torch.Tensor:
    ids = torch.arange(0, 2 * 9).reshape(2, 9) * 29 % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def opts_model() -> LLaDAMoEModel:
    return load_model(MOE_OPTS)


# Config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [MOE_TINY, MOE_OPTS], ids=lambda f: f.name)
def test_config_round_trips_config_json_with_unknown_keys(folder):
    raw = raw_config(folder) | {"some_future_key": [1, 2]}
    config = LLaDAMoEConfig.from_hf_dict(raw)
    assert config.extra["some_future_key"] == [1, 2]
    assert config.to_hf_dict() == raw


def test_defaults_are_the_7b_a1b_sizes():
    config = LLaDAMoEConfig()
    assert config.num_parameters() == pytest.approx(7.36e9, rel=2e-3)
    assert config.head_dim == 128 and config.rotary_dim == 128


@pytest.mark.parametrize(
    "change, key",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"moe_layer_freq": [1]}, "moe_layer_freq"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
        ({"num_experts": "4"}, "num_experts"),
        ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_unsupported_or_invalid_keys_are_refused_by_name(change, key):
    with pytest.raises(ValueError, match=key):
        LLaDAMoEConfig.from_hf_dict(raw_config(MOE_TINY) | change)


def test_missing_sizes_are_refused_by_name():
    raw = raw_config(MOE_TINY)
    del raw["expert_intermediate_size"]
    with pytest.raises(ValueError, match="expert_intermediate_size"):
        LLaDAMoEConfig.from_hf_dict(raw)


# Family detection -------------------------------------------------------------------------------


def test_family_is_told_by_architectures_or_keys_never_model_type():
    raw = raw_config(MOE_TINY)
    assert raw["model_type"] == "llada"
    assert detect_family(raw) is LLADA_MOE
    without_architectures = {k: v for k, v in raw.items() if k != "architectures"}
    assert detect_family(without_architectures) is LLADA_MOE
    dense = raw_config(REFERENCE / "tiny-gqa")
    assert detect_family(dense) is DENSE


def test_a_config_mixing_families_is_refused_naming_the_keys(tmp_path):
    raw = raw_config(MOE_TINY) | {"d_model": 64, "n_layers": 2}
    with pytest.raises(ValueError, match="d_model, n_layers.*num_experts"):
        detect_family(raw)
    dense_with_moe_key = raw_config(REFERENCE / "tiny-gqa") | {"num_experts": 4}
    with pytest.raises(ValueError, match="num_experts"):
        detect_family(dense_with_moe_key)
    folder = copy_folder(MOE_TINY, tmp_path / "mixed")
    (folder / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(CheckpointError, match="d_model"):
        load_model(folder)


def test_architectures_against_the_keys_is_refused():
    raw = raw_config(MOE_TINY) | {"architectures": ["LLaDAModelLM"]}
    with pytest.raises(ValueError, match="architectures.*num_experts"):
        detect_family(raw)


# Name map -----------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", [MOE_TINY, MOE_OPTS], ids=lambda f: f.name)
def test_name_map_stacks_experts_and_round_trips(folder):
    state = load_file(folder / "model.safetensors")
    ours = LLADA_MOE.from_official(state)
    config = LLaDAMoEConfig.from_hf_dict(raw_config(folder))
    model = LLaDAMoEModel(config)
    assert set(ours) == set(model.state_dict())
    last = config.num_hidden_layers - 1
    stacked = ours[f"blocks.{last}.mlp.gate_proj"]
    assert stacked.shape == (4, 32, 64)
    assert torch.equal(stacked[3], state[f"model.layers.{last}.mlp.experts.3.gate_proj.weight"])
    back = LLADA_MOE.to_official(ours)
    assert set(back) == set(state)
    assert all(torch.equal(back[name], state[name]) for name in state)


# Loading and saving --------------------------------------------------------------------------


def test_loaded_model_is_materialised_frozen_with_the_bias_as_a_buffer(opts_model):
    assert type(opts_model) is LLaDAMoEModel
    for name, tensor in opts_model.state_dict(keep_vars=True).items():
        assert not tensor.is_meta, name
        assert not tensor.requires_grad, name
    parameters = dict(opts_model.named_parameters())
    assert "blocks.1.mlp.expert_bias" not in parameters
    assert "blocks.1.mlp.expert_bias" in dict(opts_model.named_buffers())
    assert not opts_model.blocks[0].is_moe and opts_model.blocks[0].shared_expert is None
    assert opts_model.blocks[1].shared_expert is not None


def test_save_then_load_is_identical(opts_model, tmp_path):
    saved = opts_model.save_pretrained(tmp_path / "saved", max_shard_size="200KB")
    assert (saved / "model.safetensors.index.json").is_file()
    # auto_map is written only with the remote-code files it names, which this folder lacks.
    official = {k: v for k, v in raw_config(MOE_OPTS).items() if k != "auto_map"}
    assert raw_config(saved) == official
    reloaded = load_model(saved)
    assert type(reloaded) is LLaDAMoEModel
    original = opts_model.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    torch.testing.assert_close(logits_of(reloaded), logits_of(opts_model), atol=0, rtol=0)


def test_bfloat16_load_gives_bfloat16_logits():
    model = load_model(MOE_TINY, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert logits_of(model).dtype == torch.bfloat16


def test_inspection_counts_every_tensor_and_its_bytes():
    plan = inspect_checkpoint(MOE_OPTS)
    assert plan.family is LLADA_MOE
    assert plan.weight_bytes == (MOE_OPTS / "model.safetensors").stat().st_size - (
        8 + int.from_bytes((MOE_OPTS / "model.safetensors").read_bytes()[:8], "little")
    )
    assert plan.weight_bytes == 4 * plan.config.num_parameters()


def _rewrite_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_missing_expert_tensor_is_named(tmp_path):
    folder = copy_folder(MOE_TINY, tmp_path / "missing")
    _rewrite_weights(folder, lambda s: s.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj"):
        load_model(folder)


@pytest.mark.parametrize("num_experts", [2, 8])
def test_an_expert_count_that_does_not_match_the_tensors_is_refused(tmp_path, num_experts):
    folder = copy_folder(MOE_TINY, tmp_path / "count")
    config = raw_config(folder) | {"num_experts": num_experts}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"num_experts = {num_experts}") as error:
        load_model(folder)
    assert "model.layers." in str(error.value)


def test_a_dense_folder_still_loads_the_dense_model():
    assert type(load_model(REFERENCE / "tiny-gqa")) is LLaDAModel


def test_a_random_moe_trains_a_step_and_saves(tmp_path):
    config = LLaDAMoEConfig.from_hf_dict(raw_config(MOE_OPTS))
    model = LLaDAMoEModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 500, (2, 10))
    logits = model(ids, logits_at=(ids > 250).flatten().nonzero().squeeze(1)).logits
    assert logits.shape == (int((ids > 250).sum()), 512)
    logits.float().logsumexp(-1).sum().backward()
    assert model.blocks[1].mlp.gate_proj.grad is not None
    assert model.blocks[1].mlp.expert_bias.grad is None
    model.save_pretrained(tmp_path / "random")
    torch.testing.assert_close(
        logits_of(load_model(tmp_path / "random")), logits_of(model), atol=0, rtol=0
    )


def test_losses_and_activation_checkpointing_give_the_same_gradients():
    from llada.losses import pretraining_loss
    from llada.train.activation_checkpointing import apply_activation_checkpointing

    model = load_model(MOE_OPTS).train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    x0 = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            apply_activation_checkpointing(model)
        model.zero_grad()
        loss = pretraining_loss(model, x0, 511, generator=torch.Generator().manual_seed(2))
        loss.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert loss.loss.item() > 0
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_other_shapes_mqa_tied_no_qk_norm_partial_rope(tmp_path):
    """Options the shipped vectors do not cover: MQA, tied embeddings, no QK-norm, a quarter of
    each head rotated, clip_qkv, 8 experts top-3 with a shared expert on every layer."""
    config = LLaDAMoEConfig.from_hf_dict(
        raw_config(MOE_TINY)
        | {
            "num_key_value_heads": 1,
            "tie_word_embeddings": True,
            "qk_layernorm": False,
            "partial_rotary_factor": 0.25,
            "clip_qkv": 0.05,
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "shared_expert_intermediate_size": 24,
        }
    )
    model = LLaDAMoEModel(config).eval()
    model.init_weights(torch.Generator().manual_seed(3))
    ids = torch.tensor([[509, 509, 5, 17, 300, 42], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        sdpa = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, 2:]).logits
        model.attn_implementation = "eager"
        eager = model(ids, attention_mask=mask).logits
        model.attn_implementation = "sdpa"
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa[:1, 2:], alone, atol=1e-5, rtol=0)
    saved = model.save_pretrained(tmp_path / "other")
    assert "lm_head.weight" not in load_file(saved / "model.safetensors")
    torch.testing.assert_close(logits_of(load_model(saved)), logits_of(model), atol=0, rtol=0)


def test_the_router_picks_top_k_of_the_biased_probabilities_without_renormalising():
    config = LLaDAMoEConfig.from_hf_dict(raw_config(MOE_OPTS))
    moe = LLaDAMoEModel(config).blocks[1].mlp
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4, 64))
        moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    x = torch.zeros(1, 64)
    x[0, :4] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    _, ids, weights = moe.route(x)
    probs = torch.softmax(x[0, :4], -1)
    # Expert 3 has the lowest probability but the bias lifts it above expert 1.
    assert ids[0].tolist() == [0, 3]
    torch.testing.assert_close(weights[0], torch.stack([probs[0], probs[3] + 0.5]))


def test_the_dense_config_class_refuses_a_moe_config():
    # Before: every dense key took its GPT-2-like default, building a wrong 768-wide model.
    with pytest.raises(ValueError, match="LLaDA-MoE.*num_experts"):
        LLaDAConfig.from_hf_dict(raw_config(MOE_TINY))
