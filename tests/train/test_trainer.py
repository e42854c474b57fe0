"""The trainer end to end: learning, exact resume, crash safety, divergence, torchrun FSDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_curve, train_config

import llada
from llada.train.checkpointing import latest_checkpoint, list_checkpoints
from llada.train.config import TrainConfig
from llada.train.loop import TrainingDiverged, learning_rate, read_metrics, train


def test_training_lowers_held_out_loss(training_setup, tmp_path):
    result = train(
        train_config(training_setup, tmp_path / "run", max_steps=60, eval_every=10), progress=False
    )
    first, last = result.val_history[0]["val_loss"], result.val_history[-1]["val_loss"]
    assert last < 0.7 * first, (first, last)
    # The final checkpoint is an official folder that load_model reads.
    model = llada.load_model(result.checkpoint)
    assert model.config.d_model == 32
    assert (Path(tmp_path / "run") / "loss.png").is_file()


def test_resume_is_exact(training_setup, tmp_path):
    whole = tmp_path / "whole"
    train(train_config(training_setup, whole, max_steps=12), progress=False)
    parts = tmp_path / "parts"
    train(train_config(training_setup, parts, max_steps=12, save_every=6), progress=False)
    # Pretend the run died after step 6: drop the final checkpoint and resume.
    shutil.rmtree(parts / "checkpoints" / "step-0000012")
    (parts / "checkpoints" / "latest").write_text("step-0000006\n")
    train(
        train_config(training_setup, parts, max_steps=12, save_every=6, resume=True), progress=False
    )
    # The metrics after step 6 were rewritten by the resumed run, not appended twice.
    assert [r["step"] for r in read_metrics(parts)] == list(range(1, 13))
    assert _losses(parts) == _losses(whole)


def test_divergence_stops_cleanly_and_says_how_to_resume(training_setup, tmp_path, monkeypatch):
    import llada.train.loop as loop

    real = loop.pretraining_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "pretraining_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="--resume --lr"):
        train(
            train_config(training_setup, tmp_path / "run", max_steps=10, save_every=2),
            progress=False,
        )
    assert latest_checkpoint(tmp_path / "run").name == "step-0000004"


@pytest.mark.slow
def test_kill_during_save_leaves_a_loadable_checkpoint(training_setup, tmp_path):
    # Save after every step, and kill -9 the process at staggered moments.
    out = tmp_path / "run"
    command = [sys.executable, "-m", "llada.cli.main", "train", "--no-progress"]
    settings = train_config(
        training_setup, out, max_steps=400, save_every=1, eval_every=0, keep_checkpoints=1
    ).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(settings))
    command += ["--config", str(tmp_path / "config.json")]
    previous_step = 0
    for delay in (0.0, 0.05, 0.13):
        log = open(tmp_path / f"log-{delay}.txt", "w")  # noqa: SIM115
        process = subprocess.Popen(command, stdout=log, stderr=log)
        # Wait until this process has written a checkpoint of its own (it saves every step),
        # then kill it a moment later, most likely in the middle of the next save.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            latest = latest_checkpoint(out)
            if latest is not None and int(latest.name.split("-")[1]) > previous_step:
                break
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        checkpoint = latest_checkpoint(out)
        assert checkpoint is not None, "no checkpoint was ever written"
        model = llada.load_model(checkpoint)
        llada.load_tokenizer(checkpoint)  # a checkpoint is a complete model folder
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        assert state["step"] > previous_step and isinstance(model, torch.nn.Module)
        previous_step = state["step"]
        settings["resume"] = True
        (tmp_path / "config.json").write_text(json.dumps(settings))
    assert len(list_checkpoints(out)) >= 1


def test_schedules():
    base = dict(model="m", data="d", max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    wsd = TrainConfig(**base, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(wsd, 0) == pytest.approx(0.1)
    assert learning_rate(wsd, 50) == 1.0 and learning_rate(wsd, 79) == 1.0
    assert learning_rate(wsd, 99) == pytest.approx(0.1)
    cosine = TrainConfig(**base, schedule="cosine")
    assert learning_rate(cosine, 10) == pytest.approx(1.0)
    assert learning_rate(cosine, 100) == pytest.approx(0.1)


def test_bad_settings_are_explained():
    with pytest.raises(ValueError, match="data is required"):
        TrainConfig(model="m")
    with pytest.raises(ValueError, match="--model-config"):
        TrainConfig(data="d")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(model="m", data="d", batch_size=0)
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"model": "m", "data": "d", "learning_rate": 1})


def test_sft_and_autoregressive_objectives_run(training_setup, tmp_path):
    records = tmp_path / "sft.jsonl"
    with open(records, "w") as f:
        for a in range(40):
            messages = [
                {"role": "user", "content": f"What is {a} + 1?"},
                {"role": "assistant", "content": str(a + 1)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    base = train(train_config(training_setup, tmp_path / "base", max_steps=4), progress=False)
    sft = train(
        train_config(
            training_setup,
            tmp_path / "sft",
            objective="sft",
            model=str(base.checkpoint),
            model_config="",
            data=str(records),
            val_data=str(records),
            max_steps=20,
            seq_len=64,
            eval_every=10,
        ),
        progress=False,
    )
    assert sft.val_history[-1]["val_loss"] < sft.val_history[0]["val_loss"]
    ar = train(
        train_config(
            training_setup, tmp_path / "ar", autoregressive=True, max_steps=20, eval_every=10
        ),
        progress=False,
    )
    assert ar.val_history[-1]["val_loss"] < ar.val_history[0]["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_torchrun_follows_the_single_process_curve(training_setup, tmp_path, parallel):
    """2 processes (gloo) at the same global batch as 1 process with 2x accumulation."""
    single = train_config(training_setup, tmp_path / "one", max_steps=8, grad_accum=2, eval_every=4)
    train(single, progress=False)
    config_file = tmp_path / "two.json"
    config_file.write_text(
        json.dumps(
            dict(single.to_dict(), out_dir=str(tmp_path / "two"), grad_accum=1, parallel=parallel)
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            # --standalone picks a free rendezvous port: a fixed one can still be held by
            # the previous parametrisation's run.
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "llada.cli.main",
            "train",
            "--no-progress",
            "--config",
            str(config_file),
        ],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert_same_curve(tmp_path / "one", tmp_path / "two")


def test_lora_fine_tuning_saves_merged_official_weights_and_resumes_exactly(
    training_setup, tmp_path
):
    pytest.importorskip("peft")
    base = train(train_config(training_setup, tmp_path / "base", max_steps=4), progress=False)
    lora = dict(model=str(base.checkpoint), model_config="", lora_rank=4, lora_alpha=8.0, lr=1e-2)
    whole = train(
        train_config(training_setup, tmp_path / "whole", max_steps=10, **lora), progress=False
    )
    merged = llada.load_model(whole.checkpoint)
    original = llada.load_model(base.checkpoint)
    # Only the block linears changed; embeddings and norms are frozen.
    assert torch.equal(merged.embed.weight, original.embed.weight)
    assert not torch.equal(
        merged.blocks[0].attn.q_proj.weight, original.blocks[0].attn.q_proj.weight
    )
    parts = tmp_path / "parts"
    train(train_config(training_setup, parts, max_steps=10, save_every=5, **lora), progress=False)
    shutil.rmtree(parts / "checkpoints" / "step-0000010")
    (parts / "checkpoints" / "latest").write_text("step-0000005\n")
    resumed = train(
        train_config(training_setup, parts, max_steps=10, save_every=5, resume=True, **lora),
        progress=False,
    )
    assert _losses(parts) == _losses(tmp_path / "whole")
    torch.testing.assert_close(
        llada.load_model(resumed.checkpoint).blocks[1].mlp.down_proj.weight,
        merged.blocks[1].mlp.down_proj.weight,
    )


def _dropout_config(setup, folder: Path) -> Path:
    """The tiny model's config without the dropout keys: the reference's 0.1 defaults apply."""
    settings = json.loads(Path(setup["model_config"]).read_text())
    for key in ("attention_dropout", "residual_dropout", "embedding_dropout"):
        del settings[key]
    path = folder / "dropout-model.json"
    path.write_text(json.dumps(settings))
    return path


def _losses(out_dir) -> dict[int, float]:
    records = read_metrics(out_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicate or unordered metrics lines: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_resume_with_dropout_is_exact_after_an_interruption(training_setup, tmp_path, monkeypatch):
    import llada.train.loop as loop

    dropout = dict(model_config=str(_dropout_config(training_setup, tmp_path)), max_steps=12)
    lines: list[str] = []
    whole = train(train_config(training_setup, tmp_path / "whole", **dropout), say=lines.append)
    assert any(
        line.startswith("dropout: attention 0.1, residual 0.1, embedding 0.1") and "to 0" in line
        for line in lines
    ), lines
    parts = tmp_path / "parts"
    real, calls = loop.pretraining_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 9:  # in step 9, after the checkpoint of step 8
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "pretraining_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(training_setup, parts, save_every=4, **dropout), progress=False)
    monkeypatch.setattr(loop, "pretraining_loss", real)
    # Something else drawing from the global generator in between must not matter either.
    torch.rand(1000)
    lines.clear()
    resumed = train(
        train_config(training_setup, parts, save_every=4, resume=True, **dropout), say=lines.append
    )
    assert f"resumed from step 8 (checkpoint {parts / 'checkpoints' / 'step-0000008'})" in lines
    assert _losses(parts) == _losses(tmp_path / "whole")
    for name, tensor in llada.load_model(whole.checkpoint).state_dict().items():
        assert torch.equal(tensor, llada.load_model(resumed.checkpoint).state_dict()[name]), name


def test_a_folder_holding_a_run_is_refused_without_resume(training_setup, tmp_path):
    out = tmp_path / "run"
    train(train_config(training_setup, out, max_steps=3, eval_every=0), progress=False)
    with pytest.raises(ValueError, match=r"run already holds a run \(step 3\): pass --resume"):
        train(train_config(training_setup, out, max_steps=2, eval_every=0), progress=False)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # untouched
    lines: list[str] = []
    train(
        train_config(training_setup, out, max_steps=2, overwrite=True, eval_every=0),
        say=lines.append,
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]
    assert latest_checkpoint(out).name == "step-0000002"
    assert any("--overwrite: removed the run" in line for line in lines)
    with pytest.raises(ValueError, match="pass only one"):
        train_config(training_setup, out, overwrite=True, resume=True)


def test_validations_checkpoints_and_warnings_are_said(training_setup, tmp_path):
    lines: list[str] = []
    out = tmp_path / "run"
    train(
        train_config(training_setup, out, max_steps=4, warmup_steps=10, eval_every=2, save_every=2),
        progress=False,
        say=lines.append,
    )
    assert lines[0].startswith(
        "warning: warmup_steps 10 > max_steps 4: the learning rate never reaches --lr"
    ), lines
    assert [line.split(":")[0] for line in lines if "bits/token" in line] == ["step 2", "step 4"]
    checkpoints = out / "checkpoints"
    assert f"checkpoint: {checkpoints / 'step-0000002'}" in lines
    assert f"checkpoint: {checkpoints / 'step-0000004'}" in lines
    assert "step 3: loss" in " ".join(lines)  # log_every lines without a progress bar
