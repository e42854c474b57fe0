"""--quantize and --compile on the commands: applied to the loaded model from outside, the same
answers as the library's quantized / compiled model."""

from __future__ import annotations

import json

import pytest

from llada.api import generate_texts, load
from llada.cli.main import main
from llada.sampling.config import GenerateConfig

ARGS = ["--gen-length", "8", "--steps", "8", "--block-length", "8", "--jsonl"]
PROMPTS = ["What is 2 + 3?", "Sort: 3 1 2"]
CONFIG = GenerateConfig(steps=8, gen_length=8, block_length=8)


def _printed(capsys) -> list[str]:
    return [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]


def test_quantize_flag_answers_as_the_quantized_library_model(chat_checkpoint, capsys):
    pytest.importorskip("torchao")
    from llada.quantization import is_quantized, quantize

    args = ["generate", "--model", str(chat_checkpoint), "--quantize", "int8-weight", *ARGS]
    assert main([*args, *PROMPTS]) == 0
    printed = _printed(capsys)
    model, tokenizer, _ = load(chat_checkpoint)
    model = quantize(model, "int8-weight")
    assert is_quantized(model)
    assert printed == generate_texts(model, tokenizer, PROMPTS, CONFIG, decode="fast")


def test_compile_flag_compiles_the_loaded_model(chat_checkpoint, monkeypatch, capsys):
    import llada.compile as compile_module

    compiled = []
    real = compile_module.compile_model

    def recording(model, mode=None, **options):
        compiled.append(type(model).__name__)
        return real(model, mode, backend="eager")  # graph capture only: quick on any machine

    monkeypatch.setattr(compile_module, "compile_model", recording)
    assert main(["generate", "--model", str(chat_checkpoint), "--compile", *ARGS, *PROMPTS]) == 0
    printed = _printed(capsys)
    assert compiled == ["LLaDAModel"]
    model, tokenizer, _ = load(chat_checkpoint)
    assert printed == generate_texts(model, tokenizer, PROMPTS, CONFIG, decode="fast")


def test_quantize_with_tensor_parallel_is_one_line(chat_checkpoint, capsys):
    args = ["generate", "--model", str(chat_checkpoint), "--quantize", "int8-weight"]
    assert main([*args, "--tensor-parallel", "hi"]) == 2
    assert "--quantize with --tensor-parallel is not supported yet" in capsys.readouterr().err
