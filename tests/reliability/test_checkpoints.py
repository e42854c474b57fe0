"""Hostile and broken checkpoint folders: one clear line naming the file, in bounded time,
before the model is built; shipped models found from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_checkpoints import CASES, SHIPPED, build

import llada.model.checkpoint as checkpoint
from llada.model.checkpoint import CheckpointError, load_model, resolve_checkpoint
from llada.tokenizer import load_tokenizer

SECONDS_PER_CASE = 5.0


@pytest.fixture
def no_model_construction(monkeypatch):
    """Fail the test if the model is built: every check must come before any allocation."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was constructed before the folder was refused")

    monkeypatch.setattr(checkpoint, "LLaDAModel", refuse)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_folder_is_refused_with_one_line_before_allocation(
    case, tmp_path, no_model_construction
):
    folder = build(case, tmp_path)
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        load_model(folder)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed < SECONDS_PER_CASE, f"took {elapsed:.1f} s"
    assert "\n" not in message
    assert case.culprit in message, message
    assert "--model" in message or "fix" in message, message
    assert "Traceback" not in message


def test_the_generator_reproduces_the_issues_cases():
    names = {case.name for case in CASES}
    assert len(CASES) == len(names) >= 33
    for expected in (
        "two-million-layers",
        "template-nested-loops",
        "weights-4-bytes",
        "header-not-json",
        "negative-shape",
        "four-terabyte-shape",
        "int64-weights",
        "tokenizer-json-garbage",
        "config-not-json",
        "d-model-a-string",
        "mask-id-out-of-vocab",
    ):
        assert expected in names


def test_intact_copy_of_the_shipped_model_loads(tmp_path):
    """The generator's base folder is sound: each failure above comes from its one edit."""
    from hostile_checkpoints import Case

    folder = build(Case("intact", "", lambda folder: None), tmp_path)
    model = load_model(folder)
    assert model.config.n_layers == 8
    assert load_tokenizer(folder).chat_template


def test_a_folder_whose_weights_exceed_memory_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: 1_000_000)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was constructed")

    monkeypatch.setattr(checkpoint, "LLaDAModel", refuse)
    with pytest.raises(CheckpointError, match="--dtype") as info:
        load_model(SHIPPED)
    assert "only 1000000 bytes is available" in str(info.value)


def test_memory_is_estimated_in_the_requested_dtype(monkeypatch):
    # The shipped weights are bf16 (about 15 MB); loaded as float32 they take twice that.
    monkeypatch.setattr(checkpoint, "available_memory", lambda device: 20_000_000)
    load_model(SHIPPED)
    with pytest.raises(CheckpointError, match="need"):
        load_model(SHIPPED, dtype="float32")


# --model resolution (issue item 11) ---------------------------------------------------------


def test_shipped_model_path_as_the_readme_writes_it_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("models/llada-tiny-instruct") == SHIPPED
    assert resolve_checkpoint("./models/llada-tiny-instruct") == SHIPPED
    assert resolve_checkpoint("llada-tiny-instruct") == SHIPPED


@pytest.mark.parametrize(
    "text", ["./no-such-model", "/nonexistent/folder", "~/no-such-llada", "models/llada-typo"]
)
def test_a_missing_local_path_is_not_looked_up_on_the_hub(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/llada-typo` is then plainly a local path
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(FileNotFoundError, match="no such folder") as info:
        resolve_checkpoint(text)
    assert "--model" in str(info.value)
    assert "llada-tiny-instruct" in str(info.value)  # the shipped names are offered


def test_hub_id_offline_says_the_hub_could_not_be_reached(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded\nwith url: https://huggingface.co/...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint("someone/some-model")
    message = str(info.value)
    assert "could not be reached" in message
    assert "--model /path/to/some-model" in message
    assert "\n" not in message


# The CLI: one line on stderr, exit status 2 -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["two-million-layers", "header-not-json", "template-nested-loops"])
def test_cli_prints_one_error_line_for_a_hostile_folder(name, tmp_path):
    case = next(case for case in CASES if case.name == name)
    folder = build(case, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llada.cli.main", "generate", "--model", str(folder), "x"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    elapsed = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("llada: error: ")
    assert case.culprit in lines[0]
    assert result.stdout == ""
    assert elapsed < 60


@pytest.mark.slow
def test_cli_finds_the_shipped_model_outside_the_repo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada.cli.main",
            "generate",
            "--model",
            "models/llada-tiny-instruct",
            "--gen-length",
            "4",
            "--steps",
            "2",
            "--block-length",
            "4",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(tmp_path),
        check=False,
    )
    assert result.returncode == 0, result.stderr
