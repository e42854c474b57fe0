"""LLaDA-MoE / LLaDA 2.x token ids and `<role>` chat format, read from the checkpoint's files."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import llada
from llada.sampling.config import GenerateConfig
from llada.sampling.decoding import propose
from llada.tokenizer import (
    ChatTemplateError,
    encode_chat,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)
from llada.tokens import (
    LLADA_8B,
    UnknownSpecialTokenError,
    resolve_special_tokens,
    token_family,
)

VOCAB = 300

# config.json of the reference's tiny LLaDA-MoE (vectors/moe-tiny, written by the official
# configuration class: `"model_type": "llada"` as LLaDA-8B's, no mask id), vocabulary and EOS
# set to those of the tokenizer trained below.
MOE_CONFIG = {
    "architectures": ["LLaDAMoEModelLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_lladamoe.LLaDAConfig",
        "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
        "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
    },
    "bos_token_id": None,
    "clip_qkv": None,
    "dense_intermediate_size": 128,
    "eos_token_id": 1,
    "expert_intermediate_size": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "max_position_embeddings": 8192,
    "model_type": "llada",
    "moe_layer_freq": [1, 1],
    "moe_router_enable_expert_bias": False,
    "moe_router_score_function": "softmax",
    "norm_topk_prob": False,
    "num_attention_heads": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "pad_token_id": 1,
    "partial_rotary_factor": 1.0,
    "qk_layernorm": True,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 50000,
    "routed_scaling_factor": 1,
    "router_aux_loss_coef": 0.01,
    "router_num_group": None,
    "router_topk_group": None,
    "shared_expert_intermediate_size": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": VOCAB,
}

# The chat format of LLaDA-MoE-7B-A1B-Instruct and LLaDA 2.x, written out by hand.
ONE_TURN = (
    "<role>SYSTEM</role>detailed thinking off<|role_end|>"
    "<role>HUMAN</role>What is 2 + 3?<|role_end|><role>ASSISTANT</role>"
)
SEVERAL_TURNS = (
    "<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|>"
    "<role>HUMAN</role>Hi<|role_end|><role>ASSISTANT</role>Hello<|role_end|>"
    "<role>HUMAN</role> What is 2 + 3?\n<|role_end|><role>ASSISTANT</role>"
)


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A LLaDA-MoE-shaped folder: the MoE config.json and a tokenizer with the MoE specials."""
    folder = tmp_path_factory.mktemp("moe-tokens")
    text = ["To be, or not to be, that is the question. " * 20, "What is 2 + 3? It is 5. " * 20]
    train_tokenizer(text, vocab_size=VOCAB, output_dir=folder, family="llada-moe")
    (folder / "config.json").write_text(json.dumps(MOE_CONFIG), encoding="utf-8")
    return folder


def added_ids(folder) -> dict[str, int]:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    return {entry["content"]: entry["id"] for entry in data["added_tokens"]}


def without_template(folder, destination):
    """A copy of `folder` whose tokenizer_config.json has no chat_template."""
    shutil.copytree(folder, destination)
    path = destination / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["chat_template"]
    path.write_text(json.dumps(data), encoding="utf-8")
    return destination


def test_moe_ids_are_resolved_by_content_from_the_tokenizer_files(moe_folder, tmp_path):
    ids = added_ids(moe_folder)
    assert "<|mdm_mask|>" not in ids and "<|eot_id|>" not in ids
    config = json.loads((moe_folder / "config.json").read_text(encoding="utf-8"))
    tokens = resolve_special_tokens(config, moe_folder, VOCAB)
    assert tokens.mask_id == ids["<|mask|>"]
    assert tokens.eos_id == tokens.pad_id == ids["<|endoftext|>"]
    assert tokens.bos_id == ids["<|startoftext|>"]
    assert tokens.eot_id == ids["<|role_end|>"]
    assert tokens.start_header_id is None and tokens.end_header_id is None
    assert tokens.stop_ids == (ids["<|endoftext|>"], ids["<|role_end|>"])
    # The same ids from tokenizer_config.json alone, and with no EOS in config.json.
    shutil.copy(moe_folder / "tokenizer_config.json", tmp_path)
    no_eos = {k: v for k, v in config.items() if k not in ("eos_token_id", "pad_token_id")}
    assert resolve_special_tokens(no_eos, tmp_path, VOCAB) == tokens


def test_family_follows_the_tokenizer_and_the_architecture_only_without_one(chat_checkpoint):
    official = dict(MOE_CONFIG, vocab_size=157184)
    del official["eos_token_id"], official["pad_token_id"]
    tokens = resolve_special_tokens(official, None)
    assert (tokens.mask_id, tokens.eos_id, tokens.pad_id) == (156895, 156892, 156892)
    assert tokens.eot_id is None and tokens.start_header_id is None
    # By architecture alone (LLaDA 2.x), and by the MoE keys alone.
    assert resolve_special_tokens({"architectures": ["LLaDA2MoeModelLM"]}, None, 157184) == tokens
    assert resolve_special_tokens({"num_experts": 64}, None, 157184) == tokens
    # The dense family keeps LLaDA-8B's ids in the same vocabulary size.
    assert resolve_special_tokens({}, None, 157184).mask_id == LLADA_8B.mask_id
    # A MoE model with LLaDA's tokenizer (e.g. one trained here) keeps that tokenizer's ids.
    ids = added_ids(chat_checkpoint)
    moe_with_llada_tokenizer = resolve_special_tokens(
        dict(MOE_CONFIG, eos_token_id=None, pad_token_id=None), chat_checkpoint, 320
    )
    assert moe_with_llada_tokenizer.mask_id == ids["<|mdm_mask|>"]
    assert moe_with_llada_tokenizer.eot_id == ids["<|eot_id|>"]


def test_moe_folder_without_mask_is_an_explained_unknown():
    # The reference's tiny MoE: no tokenizer files, no mask key, a vocabulary too small for
    # the official ids.
    config = dict(MOE_CONFIG, vocab_size=512, eos_token_id=509, pad_token_id=509)
    with pytest.raises(UnknownSpecialTokenError, match=r"mask_token_id.*<\|mask\|>") as info:
        resolve_special_tokens(config, None, 512)
    assert info.value.key == "mask_token_id"
    assert resolve_special_tokens(dict(config, mask_token_id=511), None, 512).mask_id == 511


def test_markers_of_both_families_are_refused_unless_config_says(tmp_path):
    added = {
        "<|endoftext|>": 1,
        "<|mdm_mask|>": 2,
        "<|eot_id|>": 3,
        "<|mask|>": 4,
        "<|role_end|>": 5,
    }
    decoder = {str(i): {"content": token, "special": True} for token, i in added.items()}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": decoder}), encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"<\|mdm_mask\|> \(id 2\), <\|mask\|> \(id 4\)"):
        resolve_special_tokens({}, tmp_path, 100)
    chosen = resolve_special_tokens({"mask_token_id": 4}, tmp_path, 100)
    assert (chosen.mask_id, chosen.eot_id, chosen.start_header_id) == (4, 5, None)
    chosen = resolve_special_tokens({"mask_token_id": 2}, tmp_path, 100)
    assert (chosen.mask_id, chosen.eot_id) == (2, 3)
    # End-of-turn markers decide when no mask token is declared.
    assert token_family({"<|role_end|>": 7}) == "llada-moe"
    with pytest.raises(ValueError, match="end-of-turn markers"):
        token_family({"<|role_end|>": 7, "<|eot_id|>": 8})


@pytest.mark.parametrize("template", ["shipped", "built-in"])
def test_moe_chat_renders_the_role_format(moe_folder, tmp_path, template):
    folder = moe_folder if template == "shipped" else without_template(moe_folder, tmp_path / "m")
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.chat_template is None) == (template == "built-in")
    one = [{"role": "user", "content": "What is 2 + 3?"}]
    assert render_chat(tokenizer, one) == ONE_TURN
    several = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": " What is 2 + 3?\n"},
    ]
    assert render_chat(tokenizer, several) == SEVERAL_TURNS
    # A history without generation prompt ends at the last turn's end.
    assert render_chat(tokenizer, several[:3], add_generation_prompt=False).endswith(
        "<role>ASSISTANT</role>Hello<|role_end|>"
    )
    # The markers are single special tokens, and no BOS is written.
    ids = added_ids(moe_folder)
    encoded = encode_chat(tokenizer, one)
    assert encoded[0] == ids["<role>"] and encoded[-1] == ids["</role>"]
    assert encoded.count(ids["<|role_end|>"]) == 2 and encoded.count(ids["<role>"]) == 3
    assert ids["<|startoftext|>"] not in encoded
    with pytest.raises(ValueError, match="tool"):
        render_chat(tokenizer, [{"role": "tool", "content": "x"}])


def test_built_in_template_is_chosen_by_the_tokenizers_markers(chat_checkpoint, tmp_path):
    llada_tokenizer = load_tokenizer(without_template(chat_checkpoint, tmp_path / "dense"))
    assert render_chat(llada_tokenizer, [{"role": "user", "content": "Hi"}]).startswith(
        "<|startoftext|><|start_header_id|>user"
    )
    llada_tokenizer.add_special_tokens({"additional_special_tokens": ["<|mask|>"]})
    with pytest.raises(ChatTemplateError, match="both LLaDA-8B and LLaDA-MoE.*chat_template"):
        render_chat(llada_tokenizer, [{"role": "user", "content": "Hi"}])


class FixedLogits(torch.nn.Module):
    """A model whose logits are the same vector at every position."""

    def __init__(self, special_tokens, logits: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=logits.numel())
        self.special_tokens = special_tokens
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*ids.shape, -1).clone())


def test_sampler_eos_and_eot_flags_use_the_moe_ids(moe_folder):
    tokens = resolve_special_tokens(MOE_CONFIG, moe_folder, VOCAB)
    eos, eot, other = tokens.eos_id, tokens.eot_id, 100
    logits = torch.zeros(VOCAB)
    logits[[eos, eot, other]] = torch.tensor([6.0, 5.0, 4.0])
    model = FixedLogits(tokens, logits)
    prompt = torch.tensor([[other, other]])
    settings = dict(steps=4, gen_length=4, block_length=4)
    assert llada.generate(model, prompt, **settings)[0, 2:].tolist() == [eos] * 4
    forbidden = llada.generate(model, prompt, **settings, logits_eos_inf=True)
    assert forbidden[0, 2:].tolist() == [eot] * 4

    # Proposals of EOS / <|role_end|> are deferred: the reference quirk (probability 0 at
    # temperature 0) and the fixed rule (shifted below every other candidate).
    rows = torch.stack([logits, logits, torch.zeros(VOCAB)])
    rows[1, eos] = -10.0  # proposes <|role_end|>
    rows[2, [other, eot, eos]] = torch.tensor([4.0, 3.0, 2.0])  # proposes the plain token
    quirk = GenerateConfig(steps=1, gen_length=1, block_length=1, confidence_eos_eot_inf=True)
    proposal, confidence, _ = propose(rows, quirk, tokens)
    assert proposal.tolist() == [eos, eot, other]
    without_stops = rows[2].clone()
    without_stops[[eos, eot]] = -torch.inf
    assert confidence[:2].tolist() == [0.0, 0.0]
    assert confidence[2] == pytest.approx(torch.softmax(without_stops, 0)[other].item(), rel=1e-6)
    fixed = GenerateConfig(
        steps=1,
        gen_length=1,
        block_length=1,
        confidence_eos_eot_inf=True,
        fix_confidence_eos_eot=True,
    )
    _, confidence, _ = propose(rows, fixed, tokens)
    assert (confidence[:2] < -1).all()
    assert confidence[2] == pytest.approx(torch.softmax(rows[2], 0)[other].item(), rel=1e-6)


def test_train_tokenizer_refuses_an_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="family must be one of 'llada-8b', 'llada-moe'"):
        train_tokenizer([], vocab_size=300, output_dir=tmp_path, family="llada2")
    assert not (tmp_path / "tokenizer.json").exists()


@pytest.mark.parametrize("family,mask", [("llada-moe", "<|mask|>"), ("llada-8b", None)])
def test_data_train_tokenizer_command_takes_the_family(tmp_path, family, mask):
    from llada.cli.main import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["data", "train-tokenizer", str(corpus), "--vocab-size", "300",
                 "--family", family, "--out", str(out)]) == 0  # fmt: skip
    tokens = resolve_special_tokens({}, out, 300)
    added = added_ids(out)
    if mask is None:
        assert "<|mask|>" not in added and "<|mdm_mask|>" in added
        assert tokens.mask_id == added["<|mdm_mask|>"]
    else:
        assert tokens.mask_id == added[mask] and "<|role_end|>" in added
