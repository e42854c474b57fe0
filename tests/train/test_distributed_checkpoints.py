"""Checkpoints with the trainer state in torch.distributed.checkpoint's sharded format: what a
checkpoint folder holds, exact resume from it with the same or another number of processes,
earlier single-file checkpoints, damage and a full disk."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import train_config

import llada
from llada.train.checkpointing import (
    BrokenCheckpoint,
    CheckpointWriteError,
    checkpoint_problem,
    latest_checkpoint,
)
from llada.train.loop import Trainer, read_metrics, train
from llada.train.parallel import full_state_dicts


def _losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir)}


def _roll_back(run: Path, step: int) -> None:
    """Pretend the run died after the checkpoint of `step`: later checkpoints go."""
    for folder in (run / "checkpoints").glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (run / "checkpoints" / "latest").write_text(f"step-{step:07d}\n")


def _shard_contents(folder: Path) -> dict:
    """The shards of a checkpoint read back whole, by torch's own converter (not llada's)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = folder.parent / f"{folder.name}.whole.pt"
    dcp_to_torch_save(folder / "trainer_state", target)
    return torch.load(target, weights_only=False)


def test_a_checkpoint_holds_the_official_folder_the_shards_and_a_small_state(
    training_setup, tmp_path
):
    run = tmp_path / "run"
    train(train_config(training_setup, run, max_steps=3, eval_every=0), progress=False)
    folder = run / "checkpoints" / "step-0000003"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "trainer_state.pt", "trainer_state"} <= names
    assert sorted(p.name for p in (folder / "trainer_state").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
    ]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert state["format"] == 2 and state["step"] == 3
    assert "optimizer" not in state and "adapter" not in state
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    # The shards hold the model (the same weights as the official folder, under llada's
    # names) and AdamW's moments and step counts.
    shards = _shard_contents(folder)
    model = llada.load_model(folder)
    official = load_file(folder / "model.safetensors")
    assert len(official) == len(shards["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(shards["model"][name], tensor), name
    moments = shards["optimizer"]["state"]["blocks.0.attn.q_proj.weight"]
    assert int(moments["step"]) == 3 and moments["exp_avg"].abs().sum() > 0
    assert checkpoint_problem(folder) is None


def _write_earlier_format(training_setup, run: Path, step: int) -> None:
    """Rewrite checkpoint `step` of `run` as an earlier llada wrote it: the whole optimizer
    state inside trainer_state.pt, no shards."""
    folder = run / "checkpoints" / f"step-{step:07d}"
    trainer = Trainer(train_config(training_setup, run, max_steps=8, resume_from=str(folder)))
    _, optimizer = full_state_dicts(trainer.model, trainer.optimizer)
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    earlier = {k: state[k] for k in ("step", "config", "val_history", "rng")}
    torch.save(dict(earlier, optimizer=optimizer), folder / "trainer_state.pt")
    shutil.rmtree(folder / "trainer_state")


def test_an_earlier_single_file_checkpoint_is_still_resumed_exactly(training_setup, tmp_path):
    settings = dict(max_steps=8, save_every=4, eval_every=0)
    whole = tmp_path / "whole"
    train(train_config(training_setup, whole, **settings), progress=False)
    parts = tmp_path / "parts"
    train(train_config(training_setup, parts, **settings), progress=False)
    _roll_back(parts, 4)
    _write_earlier_format(training_setup, parts, 4)
    assert checkpoint_problem(parts / "checkpoints" / "step-0000004") is None
    lines: list[str] = []
    train(
        train_config(training_setup, parts, resume=True, **settings),
        progress=False,
        say=lines.append,
    )
    assert any(line.startswith("resumed from step 4") for line in lines), lines
    assert _losses(parts) == _losses(whole)
    # The checkpoint it writes next is in the sharded format.
    assert (parts / "checkpoints" / "step-0000008" / "trainer_state" / ".metadata").is_file()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["hostile index", "truncated shard", "missing shard"])
def test_damaged_shards_are_refused_and_the_last_good_checkpoint_named(
    training_setup, tmp_path, damage
):
    run = tmp_path / "run"
    settings = dict(max_steps=4, save_every=2, eval_every=0)
    train(train_config(training_setup, run, **settings), progress=False)
    before = _losses(run)
    broken = run / "checkpoints" / "step-0000004"
    shards = broken / "trainer_state"
    if damage == "hostile index":
        (shards / ".metadata").write_bytes(pickle.dumps(_Payload(tmp_path / "pwned")))
        expected = f"{shards / '.metadata'} is not a llada trainer state index"
    elif damage == "truncated shard":
        shard = shards / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        expected = f"{shard} is truncated or corrupt"
    else:
        (shards / "__0_0.distcp").unlink()
        expected = f"{shards / '__0_0.distcp'} is missing"
    assert expected in checkpoint_problem(broken)
    with pytest.raises(BrokenCheckpoint) as caught:
        train(train_config(training_setup, run, resume=True, **settings), progress=False)
    assert expected in str(caught.value)
    good = run / "checkpoints" / "step-0000002"
    assert str(caught.value).endswith(f"resume from it with --resume-from {good}")
    assert not (tmp_path / "pwned").exists()
    # Following the advice redoes the steps exactly and replaces the broken checkpoint.
    train(train_config(training_setup, run, resume_from=str(good), **settings), progress=False)
    assert _losses(run) == before
    assert checkpoint_problem(broken) is None


def test_a_full_disk_while_writing_shards_keeps_the_previous_checkpoint(
    training_setup, tmp_path, monkeypatch
):
    from torch.distributed.checkpoint import FileSystemWriter

    settings = dict(max_steps=6, save_every=2, eval_every=0)
    reference = tmp_path / "reference"
    train(train_config(training_setup, reference, **settings), progress=False)
    real = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        if "step-0000004" in str(self.path):
            (Path(self.path) / "__0_0.distcp").write_bytes(b"the start of a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError) as caught:
        train(train_config(training_setup, run, **settings), progress=False)
    previous = run / "checkpoints" / "step-0000002"
    assert str(caught.value) == (
        f"no space left on the device of {run / 'checkpoints'} while saving checkpoint step 4; "
        f"the previous checkpoint (step 2, {previous}) is intact; free space and resume with "
        "--resume"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    assert latest_checkpoint(run) == previous and checkpoint_problem(previous) is None
    monkeypatch.undo()
    train(train_config(training_setup, run, resume=True, **settings), progress=False)
    assert _losses(run) == _losses(reference)


def _torchrun(config_file: Path, *flags: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "llada.cli.main", "train", "--no-progress"]
    command += ["--config", str(config_file), *flags]
    run = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return llada.load_model(folder).state_dict()


@pytest.mark.slow
def test_resume_across_one_and_two_processes(training_setup, tmp_path):
    """2 processes (FSDP2, gloo) with batch B are 1 process with batch B and 2x accumulation:
    each resumes from the other's sharded checkpoint and follows the other's curve; 2 -> 2
    resumes exactly."""
    settings = dict(max_steps=8, save_every=4, eval_every=0)
    one = train_config(training_setup, tmp_path / "one", grad_accum=2, **settings)
    train(one, progress=False)
    two_config = tmp_path / "two.json"
    two_settings = dict(one.to_dict(), grad_accum=1, parallel="fsdp")
    two_config.write_text(json.dumps(dict(two_settings, out_dir=str(tmp_path / "two"))))
    _torchrun(two_config)
    two = tmp_path / "two"
    # Each process wrote its own part of the sharded state.
    shards = two / "checkpoints" / "step-0000008" / "trainer_state"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert all(p.stat().st_size > 10_000 for p in shards.glob("*.distcp"))

    # 2 -> 2: exact.
    again = tmp_path / "two-again"
    shutil.copytree(two, again)
    _roll_back(again, 4)
    again_config = tmp_path / "again.json"
    again_config.write_text(json.dumps(dict(two_settings, out_dir=str(again))))
    _torchrun(again_config, "--resume")
    assert _losses(again) == _losses(two)
    final = "checkpoints/step-0000008"
    for name, tensor in _weights(two / final).items():
        assert torch.equal(_weights(again / final)[name], tensor), name

    # 2 -> 1 and 1 -> 2: the same curve and weights, up to the order of the sums.
    to_one = tmp_path / "to-one"
    shutil.copytree(two, to_one)
    _roll_back(to_one, 4)
    train(train_config(training_setup, to_one, grad_accum=2, resume=True, **settings))
    to_two = tmp_path / "to-two"
    shutil.copytree(tmp_path / "one", to_two)
    _roll_back(to_two, 4)
    to_two_config = tmp_path / "to-two.json"
    to_two_config.write_text(json.dumps(dict(two_settings, out_dir=str(to_two))))
    _torchrun(to_two_config, "--resume")
    reference = _losses(tmp_path / "one")
    for resumed in (to_one, to_two):
        losses = _losses(resumed)
        assert sorted(losses) == list(range(1, 9))
        for step in range(5, 9):
            assert losses[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-5), step
        expected = _weights(tmp_path / "one" / final)
        for name, tensor in _weights(resumed / final).items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5)
