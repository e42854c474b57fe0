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


def test_a_runaway_chat_template_fails_in_bounded_time(chat_checkpoint, monkeypatch):
    import time

    import llada.tokenizer as tokenizer_module
    from llada.tokenizer import ChatTemplateError

    monkeypatch.setattr(tokenizer_module, "CHAT_TEMPLATE_SECONDS", 0.3)
    tokenizer = load_tokenizer(chat_checkpoint)
    # A template that passes the load-time trial (short messages) but loops over the content.
    tokenizer.chat_template = (
        "{% for m in messages %}{% for a in m['content'] %}{% for b in m['content'] %}"
        "{% for c in m['content'] %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}ok"
    )
    assert render_chat(tokenizer, [{"role": "user", "content": "abc"}]) == "ok"
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="did not finish"):
        render_chat(tokenizer, [{"role": "user", "content": "x" * 5000}])
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ messages.__class__.__mro__ }}", "unsafe"),
        ("{{ 'ab' * 100000000 }}", "builds a sequence"),
        (
            "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}",
            "one turn",
        ),
    ],
)
def test_chat_templates_are_sandboxed_and_bounded(chat_checkpoint, template, match):
    from llada.tokenizer import ChatTemplateError

    tokenizer = load_tokenizer(chat_checkpoint)
    tokenizer.chat_template = template
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(tokenizer, messages)


def test_garbage_tokenizer_files_are_named(chat_checkpoint, tmp_path):
    import shutil

    for name, content in (
        ("tokenizer.json", '{"model": {"type": "Unknown"}}'),
        ("tokenizer_config.json", "not json"),
    ):
        folder = tmp_path / name
        shutil.copytree(chat_checkpoint, folder)
        (folder / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=name) as info:
            load_tokenizer(folder)
        assert "\n" not in str(info.value)
