"""The shipped LLaDA-MoE (models/llada-tiny-moe-base): it loads by name as the MoE family with its
own tokens, every command runs on it and answers as the library does, and it has learnt."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import llada
from llada.api import generate_texts, load
from llada.cli.main import main
from llada.likelihood import get_log_likelihood
from llada.model.llada_moe import LLaDAMoEModel
from llada.sampling.config import GenerateConfig

NAME = "llada-tiny-moe-base"
FOLDER = Path(__file__).parents[1] / "models" / NAME
pytestmark = pytest.mark.skipif(not FOLDER.is_dir(), reason=f"{NAME} is not shipped here")

SMALL = GenerateConfig(steps=16, gen_length=32, block_length=16)
SMALL_ARGS = ["--gen-length", "32", "--steps", "16", "--block-length", "16"]
# Lines of the kind it was trained on (from the training part of the corpus), against the same
# words shuffled: a model that learnt English word order scores the line higher.
LINES = [
    "HAMLET. To be, or not to be, that is the question:",
    "KING. Now, Hamlet, where is Polonius?",
    "OPHELIA. Good my lord, how does your honour for this many a day?",
    "ROMEO. But soft, what light through yonder window breaks?",
]


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer, is_random = load(NAME)
    assert not is_random
    return model, tokenizer


def test_loads_by_name_as_the_moe_family_with_its_tokens(loaded):
    model, tokenizer = loaded
    assert isinstance(model, LLaDAMoEModel) and model.dtype == torch.bfloat16
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    ids = tokenizer.convert_tokens_to_ids
    tokens = model.special_tokens
    assert tokens.mask_id == ids("<|mask|>") and tokens.eot_id == ids("<|role_end|>")
    assert tokens.eos_id == ids("<|endoftext|>")
    assert (FOLDER / "README.md").is_file()
    assert llada.load_model(f"models/{NAME}").config == model.config


@pytest.mark.parametrize("preset", ["reference", "fast", "fastest"])
def test_generate_command_answers_as_the_library_in_shakespeares_manner(loaded, preset, capsys):
    model, tokenizer = loaded
    prompt = "ROMEO.\nBut soft, what light"
    args = ["generate", "--model", NAME, "--raw", "--preset", preset, *SMALL_ARGS, "--jsonl"]
    assert main([*args, prompt]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    text = json.loads(line)["answer"]
    assert text == generate_texts(model, tokenizer, [prompt], SMALL, chat=False, decode=preset)[0]
    # A trained model writes words, not byte noise.
    assert len(text) >= 16
    assert sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text)


def test_it_prefers_shakespeares_word_order_to_a_shuffled_one(loaded):
    model, tokenizer = loaded
    torch.manual_seed(0)
    wins = 0
    for line in LINES:
        words = line.split()
        shuffled = words[:1] + random.Random(0).sample(words[1:], len(words) - 1)
        scores = []
        for text in (line, " ".join(shuffled)):
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            scores.append(get_log_likelihood(model, ids[:0], ids, mc_num=64, batch_size=32))
        wins += scores[0] > scores[1]
    assert wins == len(LINES)


def test_chat_command_uses_the_role_template_and_answers_as_the_library(
    loaded, monkeypatch, capsys
):
    import io

    from llada.api import ChatSession

    model, tokenizer = loaded
    monkeypatch.setattr("sys.stdin", io.StringIO("Who art thou?\n/quit\n"))
    assert main(["chat", "--model", NAME, "--preset", "fast", *SMALL_ARGS]) == 0
    printed = capsys.readouterr().out
    reply = ChatSession(model, tokenizer, SMALL, decode="fast").reply("Who art thou?")
    assert reply and printed == reply + "\n"


def test_server_answers_as_the_library(loaded):
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).parent / "serve"))
    from serve_helpers import live_server

    from llada.serve.app import create_app
    from llada.serve.config import ServeConfig

    model, tokenizer = loaded
    messages = [{"role": "user", "content": "Speak of the moon."}]
    with live_server(create_app(model, tokenizer, ServeConfig())) as url:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": NAME, "messages": messages, "max_tokens": 32},
            timeout=120,
        ).json()
    # max_tokens 32: one block of 32, 32 steps, the server's 'fast' preset.
    config = GenerateConfig(steps=32, gen_length=32, block_length=32)
    expected = generate_texts(model, tokenizer, ["Speak of the moon."], config, decode="fast")[0]
    assert reply["choices"][0]["message"]["content"] == expected


def test_eval_tasks_command_runs_on_it(tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["eval", "tasks", "--model", NAME, "--no-lines", "--per-task", "2", "--tasks", "copy"]
    assert main([*args, *SMALL_ARGS, "--json", str(out)]) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())
    assert results["results"]["copy"]["n"] == 2


def test_train_command_fine_tunes_it_and_export_gives_an_official_moe_folder(tmp_path, capsys):
    from llada.tokenizer import load_tokenizer
    from llada.train.data import write_token_file

    tokenizer = load_tokenizer(FOLDER)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = write_token_file(LINES * 8, tokenizer, tmp_path / "corpus", eos_id=eos)
    run = tmp_path / "run"
    args = ["train", "--model", NAME, "--data", str(tokens), "--out-dir", str(run)]
    args += ["--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--save-every", "2"]
    assert main([*args, "--eval-every", "0", "--no-progress"]) == 0
    assert main(["export", str(run), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    tuned = llada.load_model(tmp_path / "out")
    base = llada.load_model(NAME)
    assert isinstance(tuned, LLaDAMoEModel) and tuned.config == base.config
    changed = [
        name
        for name, p in tuned.state_dict().items()
        if not torch.equal(p, base.state_dict()[name])
    ]
    assert any(name.endswith("mlp.gate.weight") for name in changed)  # a router
    assert any(name.endswith("mlp.gate_proj") for name in changed)  # the stacked experts


def test_demo_streams_its_steps_and_answers_as_the_library(loaded):
    pytest.importorskip("gradio")
    from llada.demo.app import make_respond

    model, tokenizer = loaded
    prompt = "Speak of the moon."
    respond = make_respond(model, tokenizer, max_gen_length=64)
    frames = list(respond(prompt, [], 16, 8, 8, 0.0, 0.0, "low_confidence", "reference", ""))
    assert len(frames) == 9  # one frame per step of the 2 blocks x 4 steps, then the answer
    *_, (_, _, history, _) = frames
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    expected = generate_texts(model, tokenizer, [prompt], config, decode="reference")[0]
    assert history[-1] == {"role": "assistant", "content": expected}
