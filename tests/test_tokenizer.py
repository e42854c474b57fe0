"""Tokenizer loading, the official chat template and its quirks, left padding."""

from __future__ import annotations

import pytest
import torch

from llada.tokenizer import LLADA_CHAT_TEMPLATE, encode_chat, left_pad, load_tokenizer, render_chat


def test_chat_template_renders_as_the_official_one(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint)
    assert tokenizer.chat_template == LLADA_CHAT_TEMPLATE
    text = render_chat(tokenizer, [{"role": "user", "content": "  What is 2 + 3?\n"}])
    assert text == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_template_quirks_multi_turn_and_system(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = render_chat(tokenizer, messages)
    assert text.count("<|startoftext|>") == 1 and text.startswith(
        "<|startoftext|><|start_header_id|>system"
    )
    # The assistant header is appended even after an assistant turn (no add_generation_prompt check).
    assert text.endswith("Hello<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_encoded_chat_round_trips(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint)
    ids = encode_chat(tokenizer, [{"role": "user", "content": "To be"}])
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n\nTo beassistant\n\n"


def test_bad_messages_are_explained(chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint)
    with pytest.raises(ValueError, match="empty"):
        render_chat(tokenizer, [])
    with pytest.raises(ValueError, match="role"):
        render_chat(tokenizer, [{"content": "x"}])


def test_left_pad():
    ids, attention_mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == torch.long


def test_folder_without_tokenizer_is_explained(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
