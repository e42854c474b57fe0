"""`llada generate` and `llada serve` with --tensor-parallel under torchrun (2 gloo processes on
CPU): the same answers as one process, written once; the server's other rank follows rank 0's
sampler calls and every process ends on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llada.api import generate_texts, load
from llada.sampling.config import GenerateConfig

PROMPTS = ["To be, or not", "What is 2 + 3?"]
SMALL_ARGS = ["--gen-length", "16", "--steps", "8", "--block-length", "8"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoint(llada2_varied_checkpoint) -> Path:
    return llada2_varied_checkpoint


def test_generate_splits_the_model_and_prints_once(checkpoint):
    command = [*TORCHRUN, "-m", "llada.cli.main", "generate", "--tensor-parallel"]
    command += ["--model", str(checkpoint), *SMALL_ARGS, "--jsonl", *PROMPTS]
    out = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode == 0, out.stderr
    printed = [json.loads(line)["answer"] for line in out.stdout.splitlines()]
    model, tokenizer, _ = load(checkpoint)
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    assert printed == generate_texts(model, tokenizer, PROMPTS, config)  # once, not per rank
    assert any(printed)


def test_torchrun_without_the_flag_and_stdin_prompts_are_one_line(checkpoint):
    base = [*TORCHRUN, "-m", "llada.cli.main", "generate", "--model", str(checkpoint)]
    out = subprocess.run([*base, "hi"], capture_output=True, text=True, env=ENV, timeout=180)
    assert out.returncode != 0
    assert "pass --tensor-parallel to split a LLaDA 2.x model over them" in out.stderr
    out = subprocess.run(
        [*base, "--tensor-parallel"], capture_output=True, text=True, env=ENV, timeout=180,
        input="hi\n",
    )  # fmt: skip
    assert out.returncode != 0
    assert "--tensor-parallel takes its prompts as arguments or from --file" in out.stderr


def test_serve_follows_rank_0_and_stops_on_ctrl_c(checkpoint, tmp_path):
    command = [*TORCHRUN, "-m", "llada.cli.main", "serve", "--tensor-parallel", "--port", "0"]
    command += ["--model", str(checkpoint), *SMALL_ARGS]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=ENV, stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "llada serve: model" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        url = log.read_text().split(" on ", 1)[1].split()[0]
        answers = []
        for prompt in PROMPTS:  # two sampler calls in a row: the follower keeps in step
            body = {"prompt": prompt, "max_tokens": 16, "block_length": 8, "steps": 8}
            reply = httpx.post(f"{url}/completions", json=body, timeout=120).json()
            answers.append(reply["choices"][0]["text"])
        body = {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 4}
        body |= {"block_length": 8, "steps": 8}  # answered after 4 tokens: closed early
        short = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
        assert short["usage"]["completion_tokens"] <= 4
        body = {"prompt": PROMPTS[0], "max_tokens": 16, "block_length": 8, "steps": 8}
        again = httpx.post(f"{url}/completions", json=body, timeout=120).json()
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail("torchrun did not stop on Ctrl-C:\n" + log.read_text())
    model, tokenizer, _ = load(checkpoint)
    config = GenerateConfig(steps=8, gen_length=16, block_length=8)
    expected = generate_texts(model, tokenizer, PROMPTS, config, chat=False)
    assert answers == expected
    assert again["choices"][0]["text"] == expected[0]  # still in step after the early close
