"""The `llada` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llada.cli.main import main


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from llada.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_prints_one_answer_per_prompt(chat_checkpoint, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(chat_checkpoint),
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
            "To be",
            "What is 2 + 3?",
        ]
    )
    assert code == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2


def test_generate_reads_a_file(chat_checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\nsecond\nthird\n")
    code = main(
        [
            "generate",
            "--model",
            str(chat_checkpoint),
            "--file",
            str(prompts),
            "--gen-length",
            "4",
            "--steps",
            "4",
            "--block-length",
            "4",
            "--raw",
            "--batch-size",
            "2",
            "--jsonl",
            "--progress",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["prompt"] for r in records] == ["first", "second", "third"]
    assert all(isinstance(r["answer"], str) for r in records)
    assert "3/3" in captured.err  # the progress bar


def test_bad_settings_exit_with_a_message(chat_checkpoint, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(chat_checkpoint),
            "--gen-length",
            "10",
            "--block-length",
            "4",
            "hi",
        ]
    )
    assert code == 2
    assert "multiple of block_length" in capsys.readouterr().err


def test_missing_model_folder_is_explained(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nope"), "hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "--model" in err


def test_readme_porting_example_runs(chat_checkpoint, capsys):
    """The README's port of the reference main() runs as written (local folder, CPU)."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Porting from the reference", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"GSAI-ML/LLaDA-8B-Instruct"', repr(str(chat_checkpoint))).replace(
        '"cuda"', '"cpu"'
    )
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.count("-" * 50) == 3


def test_chat_keeps_history_as_the_reference(chat_checkpoint, monkeypatch, capsys):
    import io

    from llada import load_model, load_tokenizer
    from llada.api import ChatSession
    from llada.sampling.config import GenerateConfig

    model = load_model(chat_checkpoint)
    tokenizer = load_tokenizer(chat_checkpoint)
    session = ChatSession(model, tokenizer, GenerateConfig(steps=8, gen_length=8, block_length=8))
    session.reply("To be")
    first = list(session.history)
    assert first[0] == model.special_tokens.bos_id and model.special_tokens.eos_id not in first
    session.reply("or not")
    # The second turn follows the first without a second BOS.
    assert session.history[: len(first)] == first
    assert session.history.count(model.special_tokens.bos_id) == 1

    monkeypatch.setattr(
        "sys.stdin",
        io.StringIO(
            "hello\n/set steps=4\n/set bogus=1\n/set preset=fastest\n/set preset=warp\n"
            "again\n/quit\n"
        ),
    )
    code = main(
        [
            "chat",
            "--model",
            str(chat_checkpoint),
            "--gen-length",
            "4",
            "--steps",
            "4",
            "--block-length",
            "4",
        ]
    )
    out = capsys.readouterr()
    assert code == 0 and "bogus" not in out.out and "NAME one of" in out.err
    assert "preset: fastest" in out.out and "unknown preset 'warp'" in out.err


def test_live_chat_view_redraws_the_canvas_and_answers_as_plain_chat(
    chat_checkpoint, monkeypatch, capsys
):
    import io

    import torch

    from llada import load_model, load_tokenizer
    from llada.cli.live import MASK_GLYPH, answer_view
    from llada.sampling.config import GenerateConfig
    from llada.sampling.fast import denoise

    model = load_model(chat_checkpoint)
    tokenizer = load_tokenizer(chat_checkpoint)
    mask_id = model.special_tokens.mask_id
    config = GenerateConfig(steps=8, gen_length=8, block_length=4)
    events = list(denoise(model, torch.tensor([[5, 9, 11]]), None, config, "reference"))
    views = [answer_view(e, 8, tokenizer, mask_id) for e in events]
    masks = [int((e.tokens[0, 3:] == mask_id).sum()) for e in events]
    assert [v.plain.count(MASK_GLYPH) for v in views] == masks == list(range(7, -1, -1))
    # The token committed at each step is the highlighted span.
    for event, view in zip(events, views, strict=True):
        fresh = event.tokens[0, 3:][event.committed[0, 3:]].tolist()
        shown = "".join(view.plain[s.start : s.end] for s in view.spans if s.style == "bold green")
        assert shown == tokenizer.decode(fresh, skip_special_tokens=True)

    args = ["chat", "--model", str(chat_checkpoint), "--gen-length", "8", "--steps", "8"]
    args += ["--block-length", "4"]
    answers = []
    for live in ("--live", "--no-live"):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
        assert main([*args, live]) == 0
        answers.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert answers[0] == answers[1]


@pytest.mark.slow
def test_readme_python_blocks_compile_and_the_api_ones_run(capsys):
    """Every Python block of the README is valid Python; the "Python API" and "Fast sampling"
    blocks run in sequence, as a reader pastes them, on the shipped model (CPU)."""
    import re
    from pathlib import Path

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    blocks = {}
    for section in re.split(r"\n## ", readme)[1:]:
        title = section.split("\n", 1)[0]
        for number, code in enumerate(re.findall(r"```python\n(.*?)```", section, re.S)):
            compile(code, f"README.md ({title} #{number})", "exec")
            blocks.setdefault(title, []).append(code)
    assert len(sum(blocks.values(), [])) >= 5
    namespace: dict = {}
    for title in ("Python API", "Fast sampling"):
        code = blocks[title][0]  # the section's first block (later ones are other families')
        code = code.replace(
            '"/models/LLaDA-8B-Instruct"', repr(str(root / "models" / "llada-tiny-instruct"))
        )
        exec(compile(code.replace('"cuda"', '"cpu"'), f"README.md ({title})", "exec"), namespace)
    assert namespace["result"].tokens.shape[1] == namespace["prompt"].shape[1] + 256
    assert namespace["event"].finished.all()
    assert capsys.readouterr().out.strip()  # the Python API block prints its answer


def test_readme_command_lines_parse(capsys):
    """Every `llada ...` line of the README's bash blocks is accepted by the parser as written
    (lines with a `...` placeholder are skipped)."""
    import re
    import shlex
    from pathlib import Path

    from llada.cli.main import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" | ")[-1].split("&& ")[-1].strip()
            if line.startswith("llada ") and " ... " not in line + " ":
                commands.append(line)
    assert len(commands) >= 25
    parser = build_parser()
    for line in commands:
        line = re.sub(r"\$'([^']*)'", lambda m: shlex.quote(m.group(1)), line)
        argv = shlex.split(line, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as error:
            if error.code == 0:  # --help, --version
                continue
            raise AssertionError(f"README command does not parse: {line}") from error
