"""Every inference command on a tiny random LLaDA-MoE, as on the dense model: `llada generate`
(every preset), `llada chat`, `llada serve`, the demo's handler, `llada eval tasks`, the lm-eval
model and the library calls. Each answer is compared with the library's for the same settings;
the ids and the `<role>` chat template come from the checkpoint's llada-moe tokenizer files."""

from __future__ import annotations

import copy
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llada.api import ChatSession, generate_texts, load
from llada.cli.main import main
from llada.likelihood import get_log_likelihood
from llada.model.llada_moe import LLaDAMoEModel
from llada.sampling.config import GenerateConfig, decode_preset
from llada.sampling.fast import sample
from llada.tokenizer import encode_chat

sys.path.insert(0, str(Path(__file__).parent / "serve"))

PRESETS = ("reference", "fast", "fastest", "fastdllm-prefix", "fastdllm-dual")
PROMPTS = ["To be, or not", "What is 2 + 3?"]
SMALL = GenerateConfig(steps=8, gen_length=16, block_length=8)
SMALL_ARGS = ["--gen-length", "16", "--steps", "8", "--block-length", "8"]


@pytest.fixture(scope="module")
def loaded(moe_chat_checkpoint):
    model, tokenizer, is_random = load(moe_chat_checkpoint)
    assert not is_random
    return model, tokenizer


@pytest.fixture(scope="module")
def stopper(loaded):
    """The tiny MoE made to propose one stop token everywhere: a large constant feature in every
    embedding (dim 0 dominates the final RMSNorm) read only by the stop token's output row."""

    def make(token_id: int) -> LLaDAMoEModel:
        model = copy.deepcopy(loaded[0])
        with torch.no_grad():
            model.embed.weight[:, 0] += 100.0
            model.lm_head.weight[token_id, 0] = 10.0
        return model

    return make


def test_the_checkpoint_is_a_moe_with_the_role_tokens(loaded):
    model, tokenizer = loaded
    assert isinstance(model, LLaDAMoEModel)
    tokens = model.special_tokens
    ids = tokenizer.convert_tokens_to_ids
    assert tokens.mask_id == ids("<|mask|>") and tokens.eot_id == ids("<|role_end|>")
    assert tokens.eos_id == ids("<|endoftext|>")
    assert tokens.stop_ids == (ids("<|endoftext|>"), ids("<|role_end|>"))


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_command_answers_as_the_library(moe_chat_checkpoint, loaded, preset, capsys):
    model, tokenizer = loaded
    code = main(["generate", "--model", str(moe_chat_checkpoint), "--preset", preset])
    assert code == 2  # no prompt: the usage error, not a crash on the family
    capsys.readouterr()
    args = ["generate", "--model", str(moe_chat_checkpoint), "--preset", preset, *SMALL_ARGS]
    assert main([*args, "--jsonl", *PROMPTS]) == 0
    printed = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    assert printed == generate_texts(model, tokenizer, PROMPTS, SMALL, decode=preset)
    assert any(printed)


def test_a_left_padded_batch_answers_as_each_prompt_alone(loaded):
    """What the server's batcher and `--batch-size` rely on: padding changes no MoE answer."""
    model, tokenizer = loaded
    prompts = [*PROMPTS, "hi", "The answer is the question of being or not being"]
    config = GenerateConfig(steps=16, gen_length=16, block_length=8)
    for preset in ("fast", "fastdllm-dual"):
        alone = [generate_texts(model, tokenizer, [p], config, decode=preset)[0] for p in prompts]
        assert generate_texts(model, tokenizer, prompts, config, decode=preset) == alone


def test_chat_command_sends_the_role_template_and_answers_as_the_library(
    moe_chat_checkpoint, loaded, monkeypatch, capsys
):
    model, tokenizer = loaded
    import llada.api

    sent = []
    real = llada.api.sample

    def recording(model_, prompt, *args, **kwargs):
        sent.append(prompt[0].tolist())
        return real(model_, prompt, *args, **kwargs)

    monkeypatch.setattr(llada.api, "sample", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/quit\n"))
    args = ["chat", "--model", str(moe_chat_checkpoint), "--preset", "fast", *SMALL_ARGS]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()

    session = ChatSession(model, tokenizer, SMALL, decode="fast")
    assert printed == [session.reply("hello"), session.reply("again")]
    role, role_end = tokenizer.convert_tokens_to_ids(["<role>", "<|role_end|>"])
    first = tokenizer.decode(sent[0])
    assert sent[0][0] == role and first.startswith("<role>SYSTEM</role>")
    assert "<role>HUMAN</role>hello<|role_end|>" in first
    assert first.endswith("<role>ASSISTANT</role>")
    # The second prompt is the first turn (its EoT kept) followed by the new one.
    second = tokenizer.decode(sent[1])
    assert second.count("<role>HUMAN</role>") == 2 and sent[1].count(role_end) >= 3
    assert second.endswith("<role>HUMAN</role>again<|role_end|><role>ASSISTANT</role>")


def test_server_answers_as_the_library(moe_chat_checkpoint, loaded):
    import httpx
    from serve_helpers import library_answer, live_server

    from llada.serve.app import create_app
    from llada.serve.config import ServeConfig

    model, tokenizer = loaded
    name = moe_chat_checkpoint.name
    app = create_app(model, tokenizer, ServeConfig())
    # max_tokens 32: a canvas of one block of 32, 32 steps, the server's 'fast' preset.
    config = GenerateConfig(steps=32, gen_length=32, block_length=32)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    with live_server(app) as url:
        chat = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": name, "messages": messages, "max_tokens": 32},
            timeout=60,
        ).json()
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": name, "prompt": PROMPTS[0], "max_tokens": 32},
            timeout=60,
        ).json()
        chunks = []
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={"model": name, "messages": messages, "max_tokens": 32, "stream": True},
            timeout=60,
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    chunks.append(delta.get("content") or "")

    expected = generate_texts(model, tokenizer, [PROMPTS[1]], config, decode="fast")[0]
    assert chat["choices"][0]["message"]["content"] == expected
    prompt_ids = encode_chat(tokenizer, messages)
    assert prompt_ids[0] == tokenizer.convert_tokens_to_ids("<role>")
    assert chat["usage"]["prompt_tokens"] == len(prompt_ids)
    assert "".join(chunks) == expected
    ids = tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    text, tokens = library_answer(model, tokenizer, ids, config, "fast", 32)
    assert completion["choices"][0]["text"] == text
    assert completion["usage"]["completion_tokens"] == tokens


@pytest.mark.slow
def test_llada_serve_command_answers_the_openai_client_as_the_library(
    moe_chat_checkpoint, loaded, tmp_path
):
    """`llada serve` as a user runs it (a process of its own), through the openai client."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    openai = pytest.importorskip("openai")
    model, tokenizer = loaded
    command = [sys.executable, "-m", "llada.cli.main", "serve", "--model", str(moe_chat_checkpoint)]
    command += ["--port", "0", "--served-model-name", "moe", "--gen-length", "16", "--steps", "16"]
    command += ["--block-length", "8"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while "llada serve: model" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = log.read_text().split(" on ", 1)[1].split()[0]  # http://127.0.0.1:PORT/v1
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": PROMPTS[1]}]
        reply = client.chat.completions.create(model="moe", messages=messages)
        stream = client.chat.completions.create(model="moe", messages=messages, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    config = GenerateConfig(steps=16, gen_length=16, block_length=8)
    expected = generate_texts(model, tokenizer, [PROMPTS[1]], config, decode="fast")[0]
    assert reply.choices[0].message.content == streamed == expected
    assert reply.usage.prompt_tokens == len(encode_chat(tokenizer, messages))


def test_server_stops_at_the_role_end_and_names_the_context_key(stopper, loaded):
    from fastapi.testclient import TestClient

    from llada.serve.app import create_app
    from llada.serve.config import ServeConfig

    model = stopper(loaded[0].special_tokens.eot_id)
    app = create_app(model, loaded[1], ServeConfig())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["usage"]["completion_tokens"] == 0
        body = {"prompt": "To be " * 200, "max_tokens": 256}  # 402 + 256 tokens > 512
        too_long = client.post("/v1/completions", json=body)
        assert too_long.status_code == 400
        assert "max_position_embeddings" in too_long.json()["error"]["message"]


@pytest.mark.parametrize("stop", ["eos_id", "eot_id"])
def test_answers_end_at_the_moe_stop_tokens_and_stop_early(stopper, loaded, stop):
    from llada.demo.session import DemoSettings, stream_turn

    tokenizer = loaded[1]
    model = stopper(getattr(loaded[0].special_tokens, stop))
    stop_id = getattr(model.special_tokens, stop)
    config = GenerateConfig(steps=16, gen_length=32, block_length=8)
    prompt = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": "hi"}])])
    fast = decode_preset("fast")
    assert fast.early_stop
    stopped = sample(model, prompt, None, config, fast)
    full = sample(model, prompt, None, config, replace(fast, early_stop=False))
    assert full.tokens[0, prompt.shape[1] :].tolist() == [stop_id] * 32
    # The answer ended in its first block: the other three are not denoised.
    assert stopped.forward_passes < full.forward_passes
    assert generate_texts(model, tokenizer, ["hi"], config, decode="fast") == [""]
    # The demo cuts its answer at the first stop token, not only drops special tokens: words
    # placed after it (a constraint at position 12) are not part of the answer.
    settings = DemoSettings(
        gen_length=16, steps=8, block_length=8, preset="reference", constraints="0:question, 12:be"
    )
    frames = list(stream_turn(model, tokenizer, [{"role": "user", "content": "hi"}], settings))
    assert stop_id in frames[-1].tokens
    assert frames[-1].answer == " question"


def test_forbidding_eos_uses_the_moe_eos_id(stopper, loaded):
    tokenizer = loaded[1]
    model = stopper(loaded[0].special_tokens.eos_id)
    eos = model.special_tokens.eos_id
    prompt = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": "hi"}])])
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    for preset in ("reference", "fast"):
        plain = sample(model, prompt, None, config, preset).tokens[0, prompt.shape[1] :]
        assert plain.tolist() == [eos] * 16
        forbidden = replace(config, logits_eos_inf=True)
        answer = sample(model, prompt, None, forbidden, preset).tokens[0, prompt.shape[1] :]
        assert eos not in answer.tolist() and model.special_tokens.mask_id not in answer.tolist()


def test_demo_handler_answers_as_the_library(loaded):
    pytest.importorskip("gradio")
    from llada.demo.app import make_respond

    model, tokenizer = loaded
    respond = make_respond(model, tokenizer, max_gen_length=64)
    frames = list(respond(PROMPTS[1], [], 16, 8, 8, 0.0, 0.0, "low_confidence", "reference", ""))
    assert len(frames) == 9  # one frame per step of the 2 blocks x 4 steps, then the answer
    *_, (chat, _, history, _) = frames
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    expected = generate_texts(model, tokenizer, [PROMPTS[1]], config, decode="reference")[0]
    assert history == [
        {"role": "user", "content": PROMPTS[1]},
        {"role": "assistant", "content": expected},
    ]


def test_demo_command_builds_the_page_for_the_moe(moe_chat_checkpoint, monkeypatch):
    gr = pytest.importorskip("gradio")
    import llada.demo.app as app_module

    launched = {}
    monkeypatch.setattr(
        app_module, "launch", lambda app, host, port, block: launched.update(app=app, port=port)
    )
    args = ["demo", "--model", str(moe_chat_checkpoint), "--port", "0", "--max-gen-length", "32"]
    assert main(args) == 0
    assert isinstance(launched["app"], gr.Blocks) and launched["port"] == 0


def test_eval_tasks_command_answers_through_the_library(
    moe_chat_checkpoint, loaded, monkeypatch, tmp_path, capsys
):
    import llada.api

    model, tokenizer = loaded
    calls = []
    real = llada.api.generate_texts

    def recording(model_, tokenizer_, prompts, config, **kwargs):
        answers = real(model_, tokenizer_, prompts, config, **kwargs)
        calls.append((type(model_), list(prompts), config, kwargs["decode"], answers))
        return answers

    monkeypatch.setattr(llada.api, "generate_texts", recording)
    out = tmp_path / "results.json"
    args = ["eval", "tasks", "--model", str(moe_chat_checkpoint), "--no-lines", "--per-task", "2"]
    args += ["--tasks", "arithmetic,copy", *SMALL_ARGS, "--json", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())
    assert {task: r["n"] for task, r in results["results"].items()} == {"arithmetic": 2, "copy": 2}
    assert calls and all(kind is LLaDAMoEModel for kind, *_ in calls)
    for _, prompts, config, decode, answers in calls:
        assert config == SMALL and decode == "reference"
        assert real(model, tokenizer, prompts, config, decode=decode) == answers


def test_library_likelihood_and_context_error(loaded):
    model, tokenizer = loaded
    prompt = torch.tensor(tokenizer("What is 2 + 3?", add_special_tokens=False)["input_ids"])
    answer = torch.tensor(tokenizer(" The answer is 5.", add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    first = get_log_likelihood(model, prompt, answer, mc_num=8, batch_size=4)
    torch.manual_seed(0)
    again = get_log_likelihood(model, prompt, answer, mc_num=8, batch_size=4)
    assert first == again and first < 0
    too_long = GenerateConfig(steps=512, gen_length=512, block_length=512)
    with pytest.raises(ValueError, match=r"context of 512 \(max_position_embeddings in its config"):
        generate_texts(model, tokenizer, ["hi"], too_long)


LM_EVAL_DATA = Path(__file__).parent / "eval" / "data" / "lm_eval"
LM_EVAL_ARGS = {
    "dtype": "float32",
    "mc_num": 8,
    "batch_size": 4,
    "is_check_greedy": False,
    "steps": 2,
    "gen_length": 4,
    "block_length": 4,
    "max_length": 32,
    "gen_batch_size": 2,
    "seed": 1234,
}


def test_lm_eval_model_scores_and_generates_as_the_library(loaded, moe_chat_checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from conftest import go_offline
    from llada.eval.lm_eval import LLaDAEvalLM, request_seed

    model, tokenizer = loaded
    # Without max_length the model's context: max_position_embeddings for the family.
    assert LLaDAEvalLM(pretrained=str(moe_chat_checkpoint), device="cpu").max_length == 512

    def data(name: str) -> dict:
        files = {"test": str(LM_EVAL_DATA / f"{name}.jsonl")}
        return {"data_files": files, "cache_dir": str(tmp_path / "hf-cache")}

    tasks = {
        "moe_test_choice": {
            "dataset_kwargs": data("choice"),
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc"}],
        },
        "moe_test_generate": {
            "dataset_kwargs": data("generate"),
            "output_type": "generate_until",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 4},
            "metric_list": [{"metric": "exact_match"}],
        },
    }
    for name, config in tasks.items():
        task = {"task": name, "dataset_path": "json", "test_split": "test", **config}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(task))
    with pytest.MonkeyPatch.context() as monkeypatch:
        go_offline(monkeypatch)
        results = lm_eval.simple_evaluate(
            model="llada",
            model_args={"pretrained": str(moe_chat_checkpoint), **LM_EVAL_ARGS},
            tasks=list(tasks),
            task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
            device="cpu",
            log_samples=True,
            bootstrap_iters=0,
        )
    choice = results["samples"]["moe_test_choice"]
    assert choice
    for sample_ in choice:
        for (context, continuation), ((score, _),) in zip(
            sample_["arguments"], sample_["resps"], strict=True
        ):
            # The contexts end without a space and the choices start with one: a plain split.
            assert not context.endswith(" ")
            ids = tokenizer(context)["input_ids"]
            rest = tokenizer(context + continuation)["input_ids"][len(ids) :]
            torch.manual_seed(request_seed(LM_EVAL_ARGS["seed"], ids, rest))
            expected = get_log_likelihood(
                model, torch.tensor(ids), torch.tensor(rest), mc_num=8, batch_size=4
            )
            assert score == pytest.approx(expected, rel=1e-5, abs=1e-6)
    config = GenerateConfig(steps=2, gen_length=4, block_length=4)
    for sample_ in results["samples"]["moe_test_generate"]:
        ((context, gen_kwargs),) = sample_["arguments"]
        prompt = tokenizer(context)["input_ids"]
        out = sample(model, torch.tensor([prompt]), None, config, "reference").tokens
        text = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=False)
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        text = tokenizer.decode(
            tokenizer(text, add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        assert sample_["resps"] == [[text]]


# `llada eval lm-eval`, `llada eval reverse` and `llada export` on the MoE ----------------------

LM_EVAL_CLI_TASKS = ("moe_cli_choice", "moe_cli_generate", "moe_cli_text")


def _write_lm_eval_tasks(folder: Path) -> Path:
    """The dense tests' three local tasks (tests/eval/test_lm_eval.py) under MoE names."""
    import yaml

    def data(name: str) -> dict:
        files = {"test": str(LM_EVAL_DATA / f"{name}.jsonl")}
        return {"data_files": files, "cache_dir": str(folder / "hf-cache")}

    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "moe_cli_choice": {
            "dataset_kwargs": data("choice"),
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc"}],
        },
        "moe_cli_generate": {
            "dataset_kwargs": data("generate"),
            "output_type": "generate_until",
            "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n", "Q:"], "max_gen_toks": 4},
            "metric_list": [{"metric": "exact_match"}],
        },
        "moe_cli_text": {
            "dataset_kwargs": data("text"),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, config in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **common, **config}))
    return folder


def test_eval_lm_eval_command_reports_what_the_model_class_reports(
    moe_chat_checkpoint, loaded, tmp_path, monkeypatch, capsys
):
    """`llada eval lm-eval` on the MoE: every sample and metric is the one of `LLaDAEvalLM`
    handed to the harness directly; the rolling scores are the library's window ELBOs."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("yaml")
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from conftest import go_offline
    from llada.eval.lm_eval import LLaDAEvalLM, request_seed, rolling_windows
    from llada.tokenizer import render_chat

    go_offline(monkeypatch)
    folder = _write_lm_eval_tasks(tmp_path / "tasks")
    seed = LM_EVAL_ARGS["seed"]
    model_args = {k: v for k, v in LM_EVAL_ARGS.items() if k != "seed"}
    model_args["rolling_stride"] = 8
    flags = ["--tasks", ",".join(LM_EVAL_CLI_TASKS), "--include-path", str(folder)]
    flags += ["--model", str(moe_chat_checkpoint), "--device", "cpu", "--seed", str(seed)]
    flags += ["--model-args", ",".join(f"{k}={v}" for k, v in model_args.items())]
    flags += ["--bootstrap-iters", "0", "--log-samples", "--output-path", str(tmp_path / "out")]
    assert main(["eval", "lm-eval", *flags]) == 0
    table = capsys.readouterr().out
    assert all(task in table for task in LM_EVAL_CLI_TASKS)
    (written,) = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["config"]["model_args"]["pretrained"] == str(moe_chat_checkpoint)
    printed = {}
    for task in LM_EVAL_CLI_TASKS:
        (samples_file,) = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        printed[task] = [json.loads(line) for line in samples_file.read_text().splitlines()]

    lm = LLaDAEvalLM(pretrained=str(moe_chat_checkpoint), device="cpu", seed=seed, **model_args)
    assert isinstance(lm.model, LLaDAMoEModel)
    direct = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(LM_EVAL_CLI_TASKS),
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    for task in LM_EVAL_CLI_TASKS:
        ours = sorted(direct["samples"][task], key=lambda s: s["doc_id"])
        theirs = sorted(printed[task], key=lambda s: s["doc_id"])
        # The samples file holds each response's numbers as text (lm-eval's JSON writer).
        assert [_as_text(s["resps"]) for s in ours] == [s["resps"] for s in theirs], task
        numbers = {k: v for k, v in direct["results"][task].items() if isinstance(v, float)}
        assert numbers
        for metric, value in numbers.items():
            assert results["results"][task][metric] == pytest.approx(value, rel=1e-9), metric

    # With --apply-chat-template the prompts are the MoE's `<role>` chat turns, and the answers
    # the model class's to them.
    chat = tmp_path / "chat"
    flags[flags.index("--output-path") + 1] = str(chat)
    flags[flags.index("--tasks") + 1] = "moe_cli_generate"
    assert main(["eval", "lm-eval", *flags, "--apply-chat-template", "--limit", "2"]) == 0
    capsys.readouterr()
    (samples_file,) = chat.rglob("samples_moe_cli_generate_*.jsonl")
    chat_samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(chat_samples) == 2
    for sample_ in chat_samples:
        context = sample_["arguments"]["gen_args_0"]["arg_0"]
        question = f"Q: {sample_['doc']['question']}\nA:"
        assert context == render_chat(loaded[1], [{"role": "user", "content": question}])
        assert context.startswith("<role>SYSTEM</role>")
        assert context.endswith(f"<role>HUMAN</role>{question}<|role_end|><role>ASSISTANT</role>")
        gen_kwargs = sample_["arguments"]["gen_args_0"]["arg_1"]
        request = Instance("generate_until", sample_["doc"], (context, gen_kwargs), 0)
        assert sample_["resps"] == [lm.generate_until([request])]

    # The documents' scores are the sums of the library's ELBOs of their windows.
    model, tokenizer = loaded
    prefix = [model.special_tokens.bos_id]
    assert prefix[0] is not None
    for sample_ in printed["moe_cli_text"]:
        ids = tokenizer(sample_["target"], add_special_tokens=False)["input_ids"]
        expected = 0.0
        for context, answer in rolling_windows(ids, 32, 8, prefix):
            torch.manual_seed(request_seed(seed, context, answer))
            expected += get_log_likelihood(
                model, torch.tensor(context), torch.tensor(answer), mc_num=8, batch_size=4
            )
        ((score,),) = sample_["resps"]
        assert float(score) == pytest.approx(expected, rel=1e-5)


def _as_text(value):
    """Nested lists and tuples as lists, their leaves as text."""
    if isinstance(value, (list, tuple)):
        return [_as_text(item) for item in value]
    return value if isinstance(value, str) else str(value)


def test_eval_reverse_command_answers_as_evaluate_reversal(moe_chat_checkpoint, loaded, tmp_path):
    """`llada eval reverse` on the MoE: the replies and accuracies of `evaluate_reversal` with
    the command's settings (eval_reverse.py's: --logits-eos-inf, one seed per direction)."""
    from llada.eval.reverse import evaluate_reversal, load_pairs

    model, tokenizer = loaded
    data = tmp_path / "pairs.json"
    pairs = [
        {"first": "To be, or not to be", "second": "that is the question"},
        {"first": "What is 2 + 3?", "second": "The answer is 5."},
        {"first": "床前明月光", "second": "疑是地上霜"},
    ]
    data.write_text(json.dumps(pairs, ensure_ascii=False))
    out = tmp_path / "result.json"
    args = ["eval", "reverse", "--data", str(data), "--model", str(moe_chat_checkpoint)]
    args += [*SMALL_ARGS, "--batch-size", "2", "--seed", "3", "--json", str(out)]
    for preset in ("reference", "fast"):
        assert main([*args, "--preset", preset]) == 0
        result = json.loads(out.read_text())
        assert result["model"] == str(moe_chat_checkpoint) and result["preset"] == preset
        assert result["style"] == "reference" and result["sampler"]["logits_eos_inf"] is True
        config = replace(SMALL, logits_eos_inf=True)
        # The command asks in batches of 2 (2 + 1 prompts), the library in one batch of 3: the
        # MoE's left-padded rows answer as alone.
        for direction in ("ftb", "btf"):
            torch.manual_seed(3)
            expected = evaluate_reversal(
                model, tokenizer, load_pairs(data), direction, config, decode=preset
            )
            written = result["results"][direction]
            assert written["replies"] == expected.replies
            assert (written["accuracy"], written["n"]) == (expected.accuracy, 3)
        targets = [r["target"] for r in result["results"]["btf"]["replies"]]
        assert targets == [p["first"] for p in pairs]


@pytest.fixture(scope="module")
def moe_run(moe_chat_checkpoint, tmp_path_factory) -> Path:
    """Two steps of pre-training from the tiny MoE (its llada-moe tokenizer), a checkpoint after
    each: the run folder `llada export` reads."""
    from llada.tokenizer import load_tokenizer
    from llada.train.config import TrainConfig
    from llada.train.data import write_token_file
    from llada.train.loop import train

    folder = tmp_path_factory.mktemp("moe-run")
    tokenizer = load_tokenizer(moe_chat_checkpoint)
    texts = ["To be, or not to be, that is the question.", "What is 2 + 3? The answer is 5."] * 20
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokens = write_token_file(texts, tokenizer, folder / "corpus", eos_id=eos)
    config = TrainConfig(
        model=str(moe_chat_checkpoint),
        data=str(tokens),
        out_dir=str(folder / "run"),
        seq_len=16,
        batch_size=4,
        max_steps=2,
        lr=1e-2,
        warmup_steps=1,
        eval_every=0,
        save_every=1,
        keep_checkpoints=2,
        log_every=1,
    )
    train(config, progress=False)
    return folder / "run"


def _official_moe_names() -> set[str]:
    """The official LLaDA-MoE tensors of `moe_chat_checkpoint` (inclusionAI/LLaDA-MoE-7B-A1B-Base
    model.safetensors.index.json names): a dense layer 0, a MoE layer 1 of 4 experts."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    names |= {f"model.layers.0.mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}
    names |= {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.expert_bias"}
    for e in range(4):
        names |= {f"model.layers.1.mlp.experts.{e}.{n}.weight" for n in ("gate_proj", "up_proj")}
        names.add(f"model.layers.1.mlp.experts.{e}.down_proj.weight")
    names |= {f"model.layers.1.shared_expert.{n}.weight" for n in ("gate_proj", "up_proj")}
    names.add("model.layers.1.shared_expert.down_proj.weight")
    return names


def test_export_command_writes_the_official_moe_folder(moe_run, moe_chat_checkpoint, tmp_path):
    from safetensors.torch import load_file

    import llada
    from llada.tokenizer import load_tokenizer
    from llada.train.checkpointing import latest_checkpoint, list_checkpoints

    first, last = list_checkpoints(moe_run)
    assert latest_checkpoint(moe_run) == last
    trained = llada.load_model(last)
    assert isinstance(trained, LLaDAMoEModel) and trained.dtype == torch.float32
    start = llada.load_model(moe_chat_checkpoint)
    assert not torch.equal(trained.blocks[1].mlp.up_proj, start.blocks[1].mlp.up_proj)

    exported = {"float32": tmp_path / "moe-fp32", "bfloat16": tmp_path / "moe-bf16"}
    assert main(["export", str(moe_run), str(exported["float32"])]) == 0
    assert main(["export", str(moe_run), str(exported["bfloat16"]), "--dtype", "bfloat16"]) == 0
    # A checkpoint folder is exported as it is (not the run's latest).
    assert main(["export", str(first), str(tmp_path / "step-1")]) == 0

    original_tokenizer = load_tokenizer(moe_chat_checkpoint)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    for dtype_name, folder in exported.items():
        dtype = getattr(torch, dtype_name)
        assert not (folder / "trainer_state.pt").exists()
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LLaDAMoEModelLM"] and config["model_type"] == "llada"
        assert config["torch_dtype"] == dtype_name
        assert (config["num_experts"], config["num_experts_per_tok"]) == (4, 2)
        assert config["moe_layer_freq"] == [0, 1] and config["moe_router_enable_expert_bias"]
        assert (config["expert_intermediate_size"], config["dense_intermediate_size"]) == (16, 64)
        assert config["shared_expert_intermediate_size"] == 24
        assert (config["qk_layernorm"], config["partial_rotary_factor"]) == (True, 0.5)

        tensors = load_file(folder / "model.safetensors")
        assert set(tensors) == _official_moe_names()
        assert {t.dtype for t in tensors.values()} == {dtype}
        for e in range(4):
            for projection in ("gate_proj", "up_proj", "down_proj"):
                stacked = getattr(trained.blocks[1].mlp, projection)
                name = f"model.layers.1.mlp.experts.{e}.{projection}.weight"
                assert torch.equal(tensors[name], stacked[e].to(dtype)), name

        model = llada.load_model(folder)
        assert isinstance(model, LLaDAMoEModel) and model.dtype == dtype
        assert model.config == trained.config
        reloaded, expected = model.state_dict(), trained.state_dict()
        assert reloaded.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(reloaded[name], tensor.to(dtype)), name

        # The llada-moe tokenizer family, whose ids the exported model resolves.
        tokenizer = load_tokenizer(folder)
        ids = tokenizer.convert_tokens_to_ids
        assert model.special_tokens == trained.special_tokens
        for field, token in (("mask_id", "<|mask|>"), ("eot_id", "<|role_end|>")):
            own = getattr(model.special_tokens, field)
            assert own == ids(token) == original_tokenizer.convert_tokens_to_ids(token)
        assert model.special_tokens.eos_id == ids("<|endoftext|>")
        assert encode_chat(tokenizer, messages) == encode_chat(original_tokenizer, messages)
        assert encode_chat(tokenizer, messages)[0] == ids("<role>")

    step_1 = llada.load_model(tmp_path / "step-1")
    assert torch.equal(step_1.blocks[1].mlp.up_proj, llada.load_model(first).blocks[1].mlp.up_proj)
    assert not torch.equal(step_1.blocks[1].mlp.up_proj, trained.blocks[1].mlp.up_proj)
