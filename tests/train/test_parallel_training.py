"""Gradient accumulation under torchrun: the gradients are reduced across processes once per
optimizer step (FSDP2: `set_requires_gradient_sync`; DDP: `no_sync`), FSDP2's mixed precision
under --precision bf16, and the loss curve of 2 processes with accumulation against 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import assert_same_curve, train_config

from llada.train.loop import train

PROBE = Path(__file__).with_name("gradient_sync_probe.py")


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + list(args),
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel,precision", [("fsdp", "fp32"), ("fsdp", "bf16"), ("ddp", "fp32")]
)
def test_accumulation_reduces_gradients_once_per_step(
    training_setup, tmp_path, parallel, precision
):
    """A step of 2 micro-batches makes as many gradient reductions as a step of 1: the first
    micro-batch's backward reduces nothing. FSDP2 under bf16 computes with bfloat16 weights,
    and the optimizer state stays float32."""
    config = train_config(
        training_setup, tmp_path / "run", parallel=parallel, precision=precision, max_steps=1
    )
    config_file, report_file = tmp_path / "config.json", tmp_path / "report.json"
    config_file.write_text(json.dumps(config.to_dict()))
    run = torchrun(str(PROBE), str(config_file), str(report_file))
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["reductions_accum1"] > 0
    assert report["reductions_accum2"] == report["reductions_accum1"]
    expected = "torch.bfloat16" if (parallel, precision) == ("fsdp", "bf16") else "torch.float32"
    assert report["forward_weight_dtype"] == expected
    assert report["optimizer_state_dtype"] == "torch.float32"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_torchrun_with_accumulation_follows_the_single_process_curve(
    training_setup, tmp_path, parallel
):
    """2 processes with grad_accum 2 (one reduction per step) at the same global batch as 1
    process with grad_accum 4: the same losses, within the tolerance of the 1-accumulation
    test in test_trainer.py."""
    # 3 validation batches on 2 processes: one process runs an uncounted fourth (FSDP2 needs
    # every process in every forward), and the validation loss is still the 1-process one.
    single = train_config(
        training_setup, tmp_path / "one", max_steps=6, grad_accum=4, eval_every=3, eval_batches=3
    )
    train(single, progress=False)
    config_file = tmp_path / "two.json"
    config_file.write_text(
        json.dumps(
            dict(single.to_dict(), out_dir=str(tmp_path / "two"), grad_accum=2, parallel=parallel)
        )
    )
    run = torchrun("-m", "llada.cli.main", "train", "--no-progress", "--config", str(config_file))
    assert run.returncode == 0, run.stderr[-4000:]
    assert_same_curve(tmp_path / "one", tmp_path / "two")
