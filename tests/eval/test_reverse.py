"""The reversal-curse evaluation: the reference's data format and prompts, batched replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llada import load_model, load_tokenizer
from llada.eval import reverse
from llada.eval.reverse import LinePair, evaluate_reversal, load_pairs, question
from llada.sampling.config import GenerateConfig

# Three classical couplets in the format of the reference's data/poem_data.json (ML-GSAI/LLaDA):
# a JSON list of {"first", "second", "source"}.
SAMPLE = Path(__file__).parent / "data" / "poem_pairs_sample.json"
# The reference's own file (469 pairs) is not ours to ship; it is checked when it lies beside
# the repository.
POEMS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "data" / "poem_data.json"


def test_reference_format_pairs_and_prompts():
    pairs = load_pairs(SAMPLE)
    assert [(p.first, p.second) for p in pairs][:1] == [("床前明月光", "疑是地上霜")]
    assert len(pairs) == 3
    prompt, target = question(pairs[0], "ftb", "reference")
    assert prompt == "床前明月光的下一句是什么？ 直接输出句子即可。"
    assert target == "疑是地上霜"
    prompt, target = question(pairs[0], "btf", "reference")
    assert prompt.startswith("疑是地上霜的上一句是什么？") and target == "床前明月光"


def test_the_reference_poem_file_loads_whole():
    if not POEMS.is_file():
        pytest.skip(f"the reference's poem_data.json is not beside the repo ({POEMS})")
    pairs = load_pairs(POEMS)
    assert len(pairs) == 469 and all(p.first and p.second for p in pairs)


def test_bad_pair_files_are_explained(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"first": "a"}]))
    with pytest.raises(ValueError, match="item 0 must be an object"):
        load_pairs(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_pairs(bad)
    with pytest.raises(ValueError, match="direction must be one of"):
        question(LinePair("a", "b"), "up", "reference")


def test_accuracy_counts_replies_that_contain_the_target(monkeypatch):
    pairs = [LinePair(f"line {i}", f"next {i}") for i in range(5)]

    def knows_forward_only(model, tokenizer, prompts, config, decode="reference"):
        # Answers forward questions with extra words around the line, backward ones wrongly.
        return [
            f'It is "{p.split(chr(34))[1].replace("line", "next")}".'
            if p.startswith("Which line follows")
            else "no idea"
            for p in prompts
        ]

    monkeypatch.setattr("llada.api.generate_texts", knows_forward_only)
    config = GenerateConfig(steps=4, gen_length=4, block_length=4)
    forward = evaluate_reversal(None, None, pairs, "ftb", config, style="english", batch_size=2)
    backward = evaluate_reversal(None, None, pairs, "btf", config, style="english")
    assert (forward.accuracy, forward.n) == (1.0, 5) and backward.accuracy == 0.0
    assert forward.replies[3]["target"] == "next 3"


def test_batched_replies_equal_one_at_a_time(chat_checkpoint):
    model, tokenizer = load_model(chat_checkpoint), load_tokenizer(chat_checkpoint)
    pairs = [LinePair("To be, or not to be", "that is the question"), LinePair("ay", "me")]
    pairs += [LinePair("Now is the winter", "of our discontent")]
    config = GenerateConfig(steps=8, gen_length=8, block_length=8, logits_eos_inf=True)
    one = evaluate_reversal(model, tokenizer, pairs, "btf", config, batch_size=1)
    batched = evaluate_reversal(model, tokenizer, pairs, "btf", config, batch_size=3)
    assert [r["reply"] for r in one.replies] == [r["reply"] for r in batched.replies]


def test_corpus_pairs_are_written_in_the_reference_format(tmp_path):
    from test_tasks import _corpus

    corpus = _corpus(tmp_path)
    taught = load_pairs(
        reverse.corpus_pairs_json(corpus, tmp_path / "taught.json", count=20, num_recall_pairs=50)
    )
    other = load_pairs(
        reverse.corpus_pairs_json(
            corpus, tmp_path / "other.json", count=20, taught=False, num_recall_pairs=50
        )
    )
    assert len(taught) == 20 and len(other) == 20
    taught_lines = {line for p in taught for line in (p.first, p.second)}
    assert not taught_lines & {line for p in other for line in (p.first, p.second)}


def test_cli_reports_both_directions_and_writes_replies(chat_checkpoint, tmp_path, capsys):
    from llada.cli.main import main

    data = tmp_path / "pairs.json"
    data.write_text(
        json.dumps([{"first": "To be", "second": "or not"}, {"first": "a b", "second": "c d"}])
    )
    out = tmp_path / "result.json"
    args = ["eval", "reverse", "--data", str(data), "--model", str(chat_checkpoint)]
    args += ["--gen-length", "8", "--steps", "8", "--block-length", "8", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "forward (ftb)" in printed and "backward (btf)" in printed
    result = json.loads(out.read_text())
    assert result["style"] == "reference" and result["sampler"]["logits_eos_inf"] is True
    replies = result["results"]["btf"]["replies"]
    assert [r["target"] for r in replies] == ["To be", "a b"]
    assert result["results"]["btf"]["accuracy"] == sum(r["correct"] for r in replies) / 2

    from test_tasks import _corpus

    (tmp_path / "corpus").mkdir()
    corpus = _corpus(tmp_path / "corpus")
    lines = ["--corpus", str(corpus), "--count", "3", "--type", "ftb", "--json", str(out)]
    assert main([*args[:2], *args[4:-2], *lines]) == 0
    result = json.loads(out.read_text())
    assert result["style"] == "english" and result["results"]["ftb"]["n"] == 3
    assert result["results"]["ftb"]["replies"][0]["prompt"].startswith("Which line follows")
    assert main([*args[:2], "--corpus", str(tmp_path / "nowhere"), "--type", "ftb"]) == 2
    assert "no .txt files" in capsys.readouterr().err
