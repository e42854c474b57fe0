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


@pytest.mark.parametrize(
    "config, match",
    [
        ({"mask_token_id": 600, "eos_token_id": 509}, "mask_token_id"),
        ({"mask_token_id": 511, "eos_token_id": 512}, "eos_token_id"),
        ({"mask_token_id": "511", "eos_token_id": 509}, "integer"),
    ],
)
def test_out_of_vocabulary_ids_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        resolve_special_tokens(config, None, 512)


def test_out_of_vocabulary_tokenizer_id_names_the_file(chat_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(chat_checkpoint, folder)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for entry in data["added_tokens"]:
        if entry["content"] == "<|eot_id|>":
            entry["id"] = 10_000
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(
        ValueError, match="eot_id 10000 from the token <\\|eot_id\\|> in .*tokenizer.json"
    ):
        resolve_special_tokens({}, folder, 320)


@pytest.mark.parametrize("content", ["[]", "{not json", '{"added_tokens": [{"id": 3}]}'])
def test_malformed_tokenizer_json_is_named(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer file"):
        resolve_special_tokens({"mask_token_id": 1, "eos_token_id": 2}, tmp_path, 100)
