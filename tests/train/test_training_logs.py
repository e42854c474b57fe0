"""The training log: the loss of a line is the mean of the steps it covers, tokens are counted
as trained, tokens/s and MFU are related by the model's FLOPs per token."""

from __future__ import annotations

import pytest
import torch
from train_helpers import train_config

import llada
from llada.losses import maybe_crop
from llada.train.loop import _mixed_seed, read_metrics, train

PEAK = 1e9  # FLOP/s: given, so that no matmul is timed and MFU is a fixed multiple


def _expected_tokens(config, step: int) -> int:
    """Tokens trained on in `step` (1-based): batch x length per micro-batch, of the sequence
    as the 1% random-length crop (seeded per step, LLaDA paper §2.3) leaves it."""
    crop = torch.Generator().manual_seed(_mixed_seed(config.seed, step - 1, -1))
    length = maybe_crop(torch.zeros(config.batch_size, config.seq_len), crop).shape[1]
    return config.batch_size * length * config.grad_accum


def test_logged_loss_is_the_mean_of_the_interval_and_tokens_are_counted(training_setup, tmp_path):
    settings = dict(max_steps=8, grad_accum=2, eval_every=0, peak_flops=PEAK, seed=3)
    every_step = train_config(training_setup, tmp_path / "each", log_every=1, **settings)
    train(every_step, progress=False)
    lines: list[str] = []
    train(
        train_config(training_setup, tmp_path / "four", log_every=4, **settings),
        progress=False,
        say=lines.append,
    )
    per_step = {r["step"]: r for r in read_metrics(tmp_path / "each")}
    assert sorted(per_step) == list(range(1, 9))
    for step, record in per_step.items():
        assert record["tokens"] == _expected_tokens(every_step, step)
        assert record["interval_steps"] == 1
    grouped = read_metrics(tmp_path / "four")
    assert [r["step"] for r in grouped] == [4, 8]
    for record in grouped:
        covered = range(record["step"] - 3, record["step"] + 1)
        losses = [per_step[s]["loss"] for s in covered]
        assert record["loss"] == pytest.approx(sum(losses) / 4, rel=1e-12)
        # The losses do differ from step to step: the last one alone is not the mean.
        assert record["loss"] != pytest.approx(losses[-1], rel=1e-6)
        assert record["tokens"] == sum(_expected_tokens(every_step, s) for s in covered)
        assert record["interval_steps"] == 4 and record["tokens_per_s"] > 0
        assert f"step {record['step']}: loss {record['loss']:.4f}, lr " in " ".join(lines)


def test_mfu_is_the_model_flops_of_the_tokens_per_second_over_the_peak(training_setup, tmp_path):
    out = tmp_path / "run"
    config = train_config(training_setup, out, max_steps=3, eval_every=0, peak_flops=PEAK)
    lines: list[str] = []
    train(config, progress=False, say=lines.append)
    assert "MFU against a peak of 0.001 TFLOP/s per process (--peak-flops)" in lines
    # Independently of llada.train.throughput: every parameter but the embedding (the blocks,
    # the final norm and the LM head; 6 FLOPs each per token, forward and backward; PaLM
    # appendix B) and the attention scores and values over the whole (non-causal) sequence
    # (12 * layers * width * length).
    model = llada.load_model(out / "checkpoints" / "step-0000003")
    weights = sum(p.numel() for name, p in model.named_parameters() if name != "embed.weight")
    records = read_metrics(out)
    # With this seed the random-length crop cuts step 3, whose attention is then shorter.
    assert [r["tokens"] // config.batch_size for r in records][:2] == [config.seq_len] * 2
    assert records[2]["tokens"] < config.batch_size * config.seq_len
    for record in records:
        length = record["tokens"] // config.batch_size
        per_token = 6 * weights + 12 * 2 * 32 * length
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * per_token / PEAK)


def test_without_peak_flops_the_cpu_peak_is_measured_and_said(training_setup, tmp_path):
    lines: list[str] = []
    train(
        train_config(training_setup, tmp_path / "run", max_steps=1, eval_every=0),
        progress=False,
        say=lines.append,
    )
    said = [line for line in lines if line.startswith("MFU against a peak of")]
    assert len(said) == 1
    assert "measured: one 2048x2048 float32 matmul on cpu" in said[0], said
    assert 0 < read_metrics(tmp_path / "run")[0]["mfu"] < 1


def test_bad_peak_flops_is_refused(training_setup, tmp_path):
    with pytest.raises(ValueError, match="peak_flops must be > 0"):
        train_config(training_setup, tmp_path, peak_flops=0.0)
