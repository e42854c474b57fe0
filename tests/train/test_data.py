"""Token files, packed sequences, chat records and the deterministic sample order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llada.tokenizer import load_tokenizer
from llada.tokens import resolve_special_tokens
from llada.train.data import (
    ChatRecords,
    PackedSequences,
    SampleOrder,
    TokenFile,
    iter_corpus,
    split_token_file,
    write_token_file,
)


def test_token_file_round_trip(tmp_path, chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint)
    path = write_token_file(["To be", "or not"], tokenizer, tmp_path / "tok", eos_id=1)
    file = TokenFile(path)
    expected = tokenizer("To be", add_special_tokens=False)["input_ids"] + [1]
    expected += tokenizer("or not", add_special_tokens=False)["input_ids"] + [1]
    assert file.tokens.tolist() == expected
    assert file.meta["dtype"] == "uint16"


def test_corpus_reader_handles_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json text"}) + "\n")
    assert list(iter_corpus([tmp_path])) == ["line one\nline two\n", "json text"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="'text'"):
        list(iter_corpus([tmp_path / "c.jsonl"]))


def test_packed_sequences_and_split():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = split_token_file(
        type("F", (), {"tokens": tokens, "__len__": lambda self: 100})(), 0.1, 8
    )
    assert len(train) + len(val) == 100 and len(val) == 10
    packed = PackedSequences(train, 8)
    assert len(packed) == 90 // 8
    assert packed.batch([0, 2])["input_ids"].tolist() == [list(range(8)), list(range(16, 24))]


def test_sample_order_same_global_batch_at_any_world_size():
    order = SampleOrder(50, seed=3)
    one_process = [i for m in range(2) for i in order.micro_batch(5, m, 0, 1, 4, 2)]
    two_processes = [i for r in range(2) for i in order.micro_batch(5, 0, r, 2, 4, 1)]
    assert sorted(one_process) == sorted(two_processes)
    assert len(set(one_process)) == 8
    # Every item is visited once per epoch.
    epoch = [i for s in range(5) for i in order.micro_batch(s, 0, 0, 1, 10, 1)]
    assert sorted(epoch) == list(range(50))


def test_chat_records_prompt_lengths_and_padding(tmp_path, chat_checkpoint):
    tokenizer = load_tokenizer(chat_checkpoint)
    tokens = resolve_special_tokens({}, chat_checkpoint, len(tokenizer))
    path = tmp_path / "sft.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data = ChatRecords(path, tokenizer, tokens, seq_len=128)
    batch = data.batch([0, 1])
    ids, prompt_lengths = batch["input_ids"], batch["prompt_lengths"]
    for row in range(2):
        prompt = tokenizer.decode(ids[row, : prompt_lengths[row]])
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        answer = ids[row, prompt_lengths[row] :].tolist()
        assert tokens.eot_id in answer and answer[-1] == tokens.eos_id  # EoT, then EOS padding
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="assistant"):
        ChatRecords(bad, tokenizer, tokens, seq_len=128)


def test_length_groups_cover_every_record_once(tmp_path, chat_checkpoint):
    from llada.train.data import LengthGroups

    tokenizer = load_tokenizer(chat_checkpoint)
    tokens = resolve_special_tokens({}, chat_checkpoint, len(tokenizer))
    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        for n in range(23):
            answer = " ".join(["word"] * (n % 7 + 1))
            messages = [
                {"role": "user", "content": f"q{n}"},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    records = ChatRecords(path, tokenizer, tokens, seq_len=128)
    groups = LengthGroups(records, batch_size=4)
    assert len(groups) == 6
    assert sorted(i for g in groups.groups for i in g) == list(range(23))
    widths = [groups.batch([g])["input_ids"].shape[1] for g in range(len(groups))]
    assert widths == sorted(widths)  # groups are by length, so padding stays small
