"""One settings story: every command's sampler defaults come from the named profiles, then the
checkpoint's generation_config.json, then the flags given; one coercion turns strings, JSON
values and UI numbers into settings; --device/--dtype auto."""

from __future__ import annotations

import argparse
import json
import math
import shutil

import pytest
import torch

from llada.api import generate_texts, load
from llada.cli.main import build_parser, main
from llada.cli.options import check_device, check_dtype, sampler_config
from llada.sampling.config import (
    PROFILES,
    BlockDecodeConfig,
    DecodeConfig,
    GenerateConfig,
    coerce_setting,
    profile,
)

PROMPT = "What is 2 + 3?"


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (["generate"], "generate"),
        (["chat"], "chat"),
        (["serve"], "serve"),
        (["eval", "tasks"], "tasks"),
        (["eval", "reverse", "--corpus", "fetch"], "reverse"),
    ],
)
def test_each_command_takes_its_profile(command, name):
    args = build_parser().parse_args(command)
    assert sampler_config(args) == GenerateConfig(**PROFILES[name].generate)
    changed = build_parser().parse_args([*command, "--temperature", "0.5", "--cfg-scale", "1"])
    assert sampler_config(changed) == profile(name).config(temperature=0.5, cfg_scale=1.0)


def test_the_profiles_hold_the_published_settings():
    assert profile("chat").config() == GenerateConfig(steps=128, gen_length=128, block_length=32)
    assert profile("reverse").config().logits_eos_inf  # eval_reverse.py forbids EOS
    assert profile("harness").config().block_length == 1024
    assert (profile("chat").preset, profile("tasks").preset) == ("fast", "reference")
    from llada.demo.session import DemoSettings

    demo = DemoSettings()
    assert (demo.gen_length, demo.steps, demo.block_length) == (64, 32, 32)
    with pytest.raises(ValueError, match="unknown profile 'talk'"):
        profile("talk")


@pytest.mark.parametrize(
    ("cls", "name", "value", "expected"),
    [
        (GenerateConfig, "steps", "64", 64),
        (GenerateConfig, "steps", 64.0, 64),  # a UI slider's number
        (GenerateConfig, "temperature", "0.5", 0.5),
        (GenerateConfig, "logits_eos_inf", "yes", True),
        (GenerateConfig, "logits_eos_inf", "off", False),
        (GenerateConfig, "remasking", "random", "random"),
        (BlockDecodeConfig, "top_k", "none", None),
        (BlockDecodeConfig, "top_k", "5", 5),
        (DecodeConfig, "threshold", 1, 1.0),
    ],
)
def test_one_coercion_for_strings_json_and_ui_numbers(cls, name, value, expected):
    got = coerce_setting(cls, name, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("steps", "many", "steps must be a whole number"),
        ("steps", 2.5, "steps must be a whole number"),
        ("steps", math.inf, "steps must be a whole number"),
        ("steps", True, "steps must be a whole number"),
        ("temperature", "hot", "temperature must be a number"),
        ("logits_eos_inf", "maybe", "logits_eos_inf must be true or false"),
        ("remasking", "best", "remasking must be one of low_confidence, random"),
        ("stepz", "4", "unknown setting 'stepz'"),
    ],
)
def test_coercion_errors_name_the_setting(name, value, words):
    with pytest.raises(ValueError, match=words):
        coerce_setting(GenerateConfig, name, value)


@pytest.fixture(scope="module")
def stored_checkpoint(chat_checkpoint, tmp_path_factory):
    """The tiny chat model with sampler settings in its generation_config.json."""
    folder = tmp_path_factory.mktemp("stored-settings")
    for file in chat_checkpoint.iterdir():
        shutil.copy(file, folder / file.name)
    path = folder / "generation_config.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["llada"] = {"steps": 8, "gen_length": 8, "block_length": 8}
    path.write_text(json.dumps(data))
    return folder


def test_generate_reads_the_checkpoints_settings_and_flags_win(stored_checkpoint, capsys):
    model, tokenizer, _ = load(stored_checkpoint)
    base = ["generate", "--model", str(stored_checkpoint), "--jsonl", PROMPT]
    assert main(base) == 0
    printed = json.loads(capsys.readouterr().out)["answer"]
    stored = GenerateConfig(steps=8, gen_length=8, block_length=8)
    assert printed == generate_texts(model, tokenizer, [PROMPT], stored, decode="fast")[0]
    assert main([*base, "--gen-length", "16", "--steps", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)["answer"]
    flagged = GenerateConfig(steps=16, gen_length=16, block_length=8)
    assert printed == generate_texts(model, tokenizer, [PROMPT], flagged, decode="fast")[0]
    args = build_parser().parse_args(["chat", "--block-length", "4"])
    assert sampler_config(args, model) == GenerateConfig(steps=8, gen_length=8, block_length=4)


def test_device_and_dtype_auto():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert check_device("auto") == expected
    assert check_device("cpu") == "cpu"
    assert check_dtype("auto") is None and check_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="--dtype float8: "):
        check_dtype("float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: "):
            check_device("cuda")
    args = build_parser().parse_args(["generate"])
    assert isinstance(args, argparse.Namespace)
    assert (args.device, args.dtype) == ("auto", "auto")
