"""Special ids are resolved from config.json and the tokenizer files."""

from __future__ import annotations

import json

import pytest

from llada.tokens import LLADA_8B, resolve_special_tokens


def test_llada_8b_defaults_apply_to_a_large_vocabulary_without_tokenizer():
    tokens = resolve_special_tokens(
        {"mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081}, None, 126464
    )
    assert tokens == LLADA_8B


def test_small_vocabulary_gets_no_out_of_range_defaults():
    tokens = resolve_special_tokens(
        {"mask_token_id": 511, "eos_token_id": 509, "pad_token_id": 509}, None, 512
    )
    assert (tokens.mask_id, tokens.eos_id, tokens.pad_id) == (511, 509, 509)
    assert tokens.eot_id is None and tokens.bos_id is None
    assert tokens.stop_ids == (509,)


def test_ids_come_from_tokenizer_files(chat_checkpoint):
    with open(chat_checkpoint / "tokenizer.json", encoding="utf-8") as f:
        added = {t["content"]: t["id"] for t in json.load(f)["added_tokens"]}
    tokens = resolve_special_tokens({}, chat_checkpoint, 320)
    assert tokens.mask_id == added["<|mdm_mask|>"]
    assert tokens.eot_id == added["<|eot_id|>"]
    assert tokens.bos_id == added["<|startoftext|>"]
    assert tokens.stop_ids == (added["<|endoftext|>"], added["<|eot_id|>"])


def test_missing_mask_id_is_explained(tmp_path):
    with pytest.raises(ValueError, match="mask_token_id"):
        resolve_special_tokens({"eos_token_id": 3}, tmp_path, 100)
