"""Shared fixtures: the reference vectors, the tiny official-layout checkpoint, and small random
models with a real tokenizer."""

from __future__ import annotations

import json
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
