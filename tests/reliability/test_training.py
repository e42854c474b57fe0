"""Training under faults: kill -9 at random moments and inside saves, a full disk, a hostile or
truncated trainer state, a folder that already holds a run. The model is tiny (~13k parameters)
and keeps the reference's 0.1 dropout (its config leaves the dropout keys out), so an exact
resume needs the dropout draws to be reproduced too."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llada
from llada.cli.main import main
from llada.train.checkpointing import checkpoint_problem, latest_checkpoint, list_checkpoints
from llada.train.loop import read_metrics

pytestmark = pytest.mark.slow

# Runs `llada train` after an optional hook that SIGKILLs the process inside the save of one
# step: "STEP:state" with half of trainer_state.pt written in the staging folder, "STEP:pointer"
# after the new checkpoint folder is in place but before `latest` names it.
RUNNER = r"""
import os, signal, sys
hook = os.environ.get("KILL_DURING_SAVE")
if hook:
    import torch
    step, point = hook.split(":")
    name = "step-%07d" % int(step)
    if point == "state":
        real_save = torch.save
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == int(step):
                with open(f, "wb") as out:
                    out.write(b"PK\x03\x04 half of a trainer state")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *args, **kwargs)
        torch.save = save
    else:
        real_replace = os.replace
        def replace(src, dst, **kwargs):
            if str(dst).endswith("latest") and open(src).read().strip() == name:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, **kwargs)
        os.replace = replace
from llada.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny(training_setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-train")
    model_config = folder / "model.json"
    model_config.write_text(
        json.dumps(
            {
                "d_model": 16,
                "n_heads": 2,
                "n_kv_heads": 1,
                "n_layers": 1,
                "mlp_hidden_size": 32,
                "rope": True,
                "block_type": "llama",
                "activation_type": "silu",
                "layer_norm_type": "rms",
                "weight_tying": False,
                "max_sequence_length": 64,
            }
        )
    )
    settings = dict(
        model_config=str(model_config),
        tokenizer=str(training_setup["tokenizer"]),
        data=str(training_setup["tokens"]),
        seq_len=16,
        batch_size=4,
        max_steps=8,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        save_every=2,
        keep_checkpoints=2,
        log_every=1,
        val_fraction=0.1,
    )
    return {"folder": folder, "settings": settings}


def _write_config(tiny, path: Path, out_dir: Path, **changes) -> Path:
    path.write_text(json.dumps(dict(tiny["settings"], out_dir=str(out_dir), **changes)))
    return path


def _cli(config: Path, *flags: str) -> list[str]:
    return ["train", "--no-progress", "--config", str(config), *flags]


def _losses(out_dir: Path) -> dict[int, float]:
    records = read_metrics(out_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicate or unordered metrics lines: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return llada.load_model(checkpoint).state_dict()


def _assert_same_weights(a: Path, b: Path) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def _one_error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "weights_only" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tiny):
    """The uninterrupted in-process run of the settings (8 steps)."""
    out = tiny["folder"] / "reference"
    assert main(_cli(_write_config(tiny, tiny["folder"] / "reference.json", out))) == 0
    return out


def test_kill_9_at_random_moments_and_inside_saves_resumes_bit_exact(tiny, tmp_path):
    steps = 40
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("KILL_DURING_SAVE", None)
    changes = dict(max_steps=steps, save_every=1)

    def start(config: Path, *flags: str, hook: str | None = None) -> subprocess.Popen:
        run_env = dict(env, KILL_DURING_SAVE=hook) if hook else env
        command = [sys.executable, "-c", RUNNER, *_cli(config, *flags)]
        with open(tmp_path / "log.txt", "a") as log:
            return subprocess.Popen(command, stdout=log, stderr=log, env=run_env)

    # The uninterrupted run goes alongside the interrupted one (same settings and threads).
    whole = tmp_path / "whole"
    uninterrupted = start(_write_config(tiny, tmp_path / "whole.json", whole, **changes))

    out = tmp_path / "run"
    config = _write_config(tiny, tmp_path / "run.json", out, **changes)
    rng = random.Random(12)
    # Two kills at seeded random moments (the first one in a fresh run), one inside the write
    # of a trainer state, one between a checkpoint and its `latest` pointer, a third random one.
    plan = [("random", None), ("hook", "state"), ("hook", "pointer"), ("random", None)]
    reached = 0
    for number, (kind, point) in enumerate(plan):
        flags = () if number == 0 else ("--resume",)
        if kind == "hook":
            target = reached + 3
            process = start(config, *flags, hook=f"{target}:{point}")
        else:
            target = reached + rng.randint(2, 6)
            process = start(config, *flags)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and max(_losses(out), default=0) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.03))
            process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=120) == -signal.SIGKILL, (tmp_path / "log.txt").read_text()
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None and checkpoint_problem(checkpoint) is None
        reached = int(checkpoint.name.split("-")[1])
        assert reached < steps, "the run ended before it was killed"
    process = start(config, "--resume")
    assert process.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()
    log = (tmp_path / "log.txt").read_text()
    assert log.count("resumed from step") == len(plan), log
    assert uninterrupted.wait(timeout=120) == 0, log
    assert _losses(out) == _losses(whole)
    assert sorted(_losses(out)) == list(range(1, steps + 1))
    _assert_same_weights(latest_checkpoint(out), latest_checkpoint(whole))


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream")],
    ids=["ENOSPC", "torch-iostream"],
)
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tiny, reference, tmp_path, monkeypatch, capsys, failure
):
    import llada.train.checkpointing as checkpointing

    out = tmp_path / "run"
    config = _write_config(tiny, tmp_path / "run.json", out)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            with open(f, "wb") as partial:
                partial.write(b"PK\x03\x04 the start of a trainer state")
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    if isinstance(failure, RuntimeError):
        # torch does not say the disk is full: the free space does.
        usage = checkpointing.shutil.disk_usage(tmp_path)._replace(free=1000)
        monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage)
    assert main(_cli(config)) == 3
    line = _one_error_line(capsys.readouterr())
    previous = out / "checkpoints" / "step-0000002"
    assert line == (
        f"llada: training stopped: no space left on the device of {out / 'checkpoints'} while "
        f"saving checkpoint step 4; the previous checkpoint (step 2, {previous}) is intact; "
        "free space and resume with --resume"
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["latest", "step-0000002"]
    assert latest_checkpoint(out) == previous and checkpoint_problem(previous) is None
    monkeypatch.undo()
    assert main(_cli(config, "--resume")) == 0
    assert _losses(out) == _losses(reference)
    _assert_same_weights(latest_checkpoint(out), latest_checkpoint(reference))


class _Payload:
    """Pickles to a call of os.system: what a hostile trainer_state.pt would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _broken_latest(tiny, tmp_path, damage: str) -> tuple[Path, Path]:
    out = tmp_path / "run"
    config = _write_config(tiny, tmp_path / "run.json", out, max_steps=4)
    assert main(_cli(config)) == 0
    broken = out / "checkpoints" / "step-0000004"
    if damage == "hostile":
        payload = {"step": 4, "optimizer": _Payload(tmp_path / "pwned")}
        torch.save(payload, broken / "trainer_state.pt")
    elif damage == "config.json":  # whole files that do not belong together
        config = json.loads((broken / damage).read_text())
        (broken / damage).write_text(json.dumps(dict(config, mlp_hidden_size=48)))
    else:
        file = broken / damage
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return out, broken


@pytest.mark.parametrize(
    "damage", ["hostile", "model.safetensors", "trainer_state.pt", "config.json"]
)
def test_a_broken_checkpoint_names_the_last_good_one(tiny, reference, tmp_path, capsys, damage):
    out, broken = _broken_latest(tiny, tmp_path, damage)
    capsys.readouterr()
    config = _write_config(tiny, tmp_path / "resume.json", out)
    assert main(_cli(config, "--resume")) == 2
    line = _one_error_line(capsys.readouterr())
    good = out / "checkpoints" / "step-0000002"
    file = broken / ("trainer_state.pt" if damage == "hostile" else damage)
    if damage == "hostile":
        assert (
            f"{file} is not a llada trainer state (it holds objects that cannot be loaded " in line
        )
        assert "it was not loaded. Resume from another checkpoint or start a new run" in line
        assert not (tmp_path / "pwned").exists()
    elif damage == "config.json":
        assert "config.json implies" in line
    else:
        assert f"{file} is truncated or corrupt" in line
    assert line.startswith(f"llada: error: cannot resume from {broken}: ")
    assert line.endswith(
        f"The last good checkpoint is {good} (step 2): resume from it with --resume-from {good}"
    )
    # Following the advice continues the run exactly.
    assert main(_cli(config, "--resume-from", str(good))) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert _losses(out) == _losses(reference)
    _assert_same_weights(latest_checkpoint(out), latest_checkpoint(reference))


def test_a_folder_holding_a_run_is_refused_without_resume(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    config = _write_config(tiny, tmp_path / "run.json", out, max_steps=4)
    assert main(_cli(config)) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_cli(config)) == 2
    assert _one_error_line(capsys.readouterr()) == (
        f"llada: error: {out} already holds a run (step 4): pass --resume to continue it, or "
        "--overwrite to start it over, or a new --out-dir"
    )
    assert (out / "metrics.jsonl").read_text() == before
    assert latest_checkpoint(out).name == "step-0000004"
    assert main(_cli(config, "--overwrite", "--max-steps", "2")) == 0
    assert sorted(_losses(out)) == [1, 2]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]
