"""The trainer settings the trainer tests start from (tests/conftest.py's `training_setup`)."""

from __future__ import annotations

from llada.train.config import TrainConfig


def train_config(setup: dict, out_dir, **changes) -> TrainConfig:
    """A short run on the tiny synthetic corpus, with `changes` on top."""
    settings = dict(
        model_config=str(setup["model_config"]),
        tokenizer=str(setup["tokenizer"]),
        data=str(setup["tokens"]),
        out_dir=str(out_dir),
        seq_len=32,
        batch_size=8,
        max_steps=40,
        lr=3e-3,
        warmup_steps=5,
        eval_every=20,
        eval_batches=4,
        save_every=0,
        log_every=1,
        val_fraction=0.1,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def assert_same_curve(one_dir, two_dir) -> None:
    """The runs in `one_dir` and `two_dir` logged the same steps with the same losses and
    validation losses (a torchrun run against the 1-process run it must follow)."""
    import pytest

    from llada.train.loop import read_metrics

    one, two = read_metrics(one_dir), read_metrics(two_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
