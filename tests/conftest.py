"""Shared fixtures: the reference vectors, the tiny official-layout checkpoint, and small random
models with a real tokenizer."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from llada.model.config import LLaDAConfig
from llada.model.transformer import LLaDAModel
from llada.tokens import resolve_special_tokens

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "reference"
TINY_GQA = REFERENCE / "tiny-gqa"


def reference_cases(mode: str) -> list[dict]:
    with open(REFERENCE / "cases.json", encoding="utf-8") as f:
        cases = json.load(f)
    return [c for c in cases if c["request"]["mode"] == mode]


# The device of the reference-vector logits tests (test_reference_parity.py, test_moe_parity.py,
# test_llada2_parity.py): LLADA_TEST_DEVICE=cuda runs them on a GPU (bench/device_check.sh does);
# the CPU by default. The sampled-token cases stay on the CPU: the reference's draws come from
# the CPU generator, and a GPU's differ.
PARITY_DEVICE = torch.device(os.environ.get("LLADA_TEST_DEVICE", "cpu"))
PARITY_DTYPES = ("float32", "bfloat16")


def parity_model(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """`model` on PARITY_DEVICE in `dtype`: the fixture itself when it is already there (CPU,
    float32), else a copy, so that the shared fixture stays as the other tests expect it."""
    if PARITY_DEVICE.type == "cpu" and dtype == "float32":
        return model
    return copy.deepcopy(model).to(PARITY_DEVICE, getattr(torch, dtype))


def assert_logits_match(logits: torch.Tensor, expected: dict, dtype: str) -> None:
    """Logits against the reference vectors (computed in float32 by the published code).

    float32: within 1e-4 (about 8x the largest difference seen on CPUs) and the same argmax.
    bfloat16 (8 significant bits): the relative Frobenius error of the whole tensor under 0.25
    (seen on a CPU: 0.02-0.06 for dense and LLaDA-MoE, up to 0.13 for LLaDA 2.x, whose routing
    flips where two experts' scores tie within bfloat16's precision), and the same argmax wherever
    the reference's top two logits are more than 0.5 apart. A wrong forward misses both by far.
    """
    got = logits.detach().float().cpu()
    want = torch.tensor(expected["logits"])
    assert list(got.shape) == expected["shape"]
    if dtype == "float32":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert got.argmax(-1).tolist() == expected["argmax"]
        return
    relative = ((got - want).norm() / want.norm()).item()
    assert relative < 0.25, f"bfloat16 logits: relative error {relative:.3f}"
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.5
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


@pytest.fixture(scope="session")
def tiny_model():
    from llada import load_model

    return load_model(TINY_GQA)


def make_random_model(
    seed: int = 0, vocab_size: int = 64, n_kv_heads: int | None = 2, dtype=torch.float32, **changes
) -> LLaDAModel:
    """A small random LLaDA with ids mask = vocab-1, eos = vocab-3, eot = vocab-2."""
    config = LLaDAConfig(
        d_model=32,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        n_layers=2,
        mlp_hidden_size=48,
        vocab_size=vocab_size,
        embedding_size=vocab_size,
        max_sequence_length=256,
        mask_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 3,
        pad_token_id=vocab_size - 3,
    ).with_changes(**changes)
    model = LLaDAModel(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    model.special_tokens = resolve_special_tokens(
        {
            "mask_token_id": config.mask_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        },
        None,
        vocab_size,
    )
    from dataclasses import replace

    model.special_tokens = replace(model.special_tokens, eot_id=vocab_size - 2)
    return model.to(dtype).eval()


@pytest.fixture
def random_model():
    return make_random_model()


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A small random LLaDA folder with a trained byte-level BPE tokenizer and chat template."""
    from llada.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("chat-model")
    text = [
        "To be, or not to be, that is the question. " * 20,
        "What is 2 + 3? The answer is 5. " * 20,
    ]
    train_tokenizer(text, vocab_size=320, output_dir=folder)
    tokens = resolve_special_tokens({}, folder, vocab_size=320)
    config = LLaDAConfig(
        d_model=32,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=64,
        vocab_size=320,
        embedding_size=320,
        max_sequence_length=512,
        mask_token_id=tokens.mask_id,
        eos_token_id=tokens.eos_id,
        pad_token_id=tokens.pad_id,
    )
    model = LLaDAModel(config)
    model.init_weights(torch.Generator().manual_seed(1))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def moe_chat_checkpoint(tmp_path_factory) -> Path:
    """A small random LLaDA-MoE folder (official layout: 4 experts top-2 with the expert bias, a
    shared expert, a dense first layer, QK-norm, half RoPE) with a trained llada-moe tokenizer,
    so the ids and the `<role>` chat template come from the files."""
    from llada.model.llada_moe import LLaDAMoEConfig, LLaDAMoEModel
    from llada.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("moe-chat-model")
    text = [
        "To be, or not to be, that is the question. " * 20,
        "What is 2 + 3? The answer is 5. " * 20,
    ]
    train_tokenizer(text, vocab_size=320, output_dir=folder, family="llada-moe")
    tokens = resolve_special_tokens({}, folder, vocab_size=320)
    config = LLaDAMoEConfig(
        vocab_size=320,
        hidden_size=32,
        dense_intermediate_size=64,
        expert_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokens.pad_id,
        eos_token_id=tokens.eos_id,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        num_experts=4,
        num_experts_per_tok=2,
        qk_layernorm=True,
        moe_layer_freq=(0, 1),
        moe_router_enable_expert_bias=True,
    )
    model = LLaDAMoEModel(config)
    model.init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():  # a non-zero expert bias, so the biased top-k is exercised
        model.blocks[1].mlp.expert_bias.copy_(torch.tensor([0.05, -0.02, 0.0, 0.03]))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llada2_chat_checkpoint(tmp_path_factory) -> Path:
    """A small random LLaDA 2.x folder (the reference tiny checkpoint's shape: fused QKV,
    QK-norm, half RoPE, a dense first layer then 4 experts top-2 in 2 groups with the expert
    bias and a shared expert) with a trained llada-moe tokenizer, so the ids and the `<role>`
    chat template come from the files."""
    from llada.model.llada2 import LLaDA2Config, LLaDA2Model
    from llada.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("llada2-chat-model")
    text = [
        "To be, or not to be, that is the question. " * 20,
        "What is 2 + 3? The answer is 5. " * 20,
    ]
    train_tokenizer(text, vocab_size=320, output_dir=folder, family="llada-moe")
    tokens = resolve_special_tokens({}, folder, vocab_size=320)
    raw = json.loads((REFERENCE / "llada2-tiny" / "config.json").read_text(encoding="utf-8"))
    config = LLaDA2Config.from_hf_dict(
        raw | {"vocab_size": 320, "pad_token_id": tokens.pad_id, "num_hidden_layers": 2}
    )
    model = LLaDA2Model(config)
    model.init_weights(torch.Generator().manual_seed(2))
    with torch.no_grad():  # a non-zero expert bias, so the biased top-k is exercised
        model.blocks[1].mlp.gate.expert_bias.copy_(torch.tensor([0.05, -0.02, 0.0, 0.03]))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llada2_varied_checkpoint(llada2_chat_checkpoint, tmp_path_factory) -> Path:
    """`llada2_chat_checkpoint` with weights 10x the usual init (initializer_range 0.2): its
    proposals vary with position and their probabilities spread, so that every block-sampler
    setting shows in the answers."""
    import shutil
    from dataclasses import replace

    from llada import load_model
    from llada.model.llada2 import LLaDA2Model

    folder = tmp_path_factory.mktemp("llada2-varied")
    model = load_model(llada2_chat_checkpoint)
    model = LLaDA2Model(replace(model.config, initializer_range=0.2))
    model.init_weights(torch.Generator().manual_seed(2))
    model.save_pretrained(folder)
    for file in llada2_chat_checkpoint.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def training_setup(tmp_path_factory, chat_checkpoint):
    """A tokenised synthetic corpus (learnable patterns), a tiny model config, the tokenizer."""
    import random

    from llada.tokenizer import load_tokenizer
    from llada.train.data import write_token_file

    folder = tmp_path_factory.mktemp("train-data")
    rng = random.Random(0)
    animals = ["cat", "dog", "owl", "fox", "bee"]
    places = ["mat", "log", "hill", "tree", "sea"]
    texts = []
    for _ in range(400):
        animal, place = rng.choice(animals), rng.choice(places)
        texts.append(f"The {animal} sat on the {place}. The {place} held the {animal}.\n")
    tokenizer = load_tokenizer(chat_checkpoint)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = write_token_file(texts, tokenizer, folder / "corpus", eos_id=eos)
    model_config = folder / "model.json"
    model_config.write_text(
        json.dumps(
            {
                "d_model": 32,
                "n_heads": 4,
                "n_kv_heads": 2,
                "n_layers": 2,
                "mlp_hidden_size": 64,
                "rope": True,
                "block_type": "llama",
                "activation_type": "silu",
                "layer_norm_type": "rms",
                "weight_tying": False,
                "attention_dropout": 0.0,
                "residual_dropout": 0.0,
                "embedding_dropout": 0.0,
                "max_sequence_length": 512,
            }
        )
    )
    return {"tokens": tokens, "model_config": model_config, "tokenizer": chat_checkpoint}


OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def go_offline(monkeypatch) -> None:
    """No network: the environment for subprocesses, the already-read flags for this one."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    for module, names in (
        ("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
    ):
        loaded = sys.modules.get(module)
        for name in names:
            if loaded is not None and hasattr(loaded, name):
                monkeypatch.setattr(loaded, name, True)
