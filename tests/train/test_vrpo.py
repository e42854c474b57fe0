"""LLaDA 1.5's preference optimization (VRPO) and plain DPO on ELBO estimates: the loss, the
draws (allocation, antithetic sharing), and `llada train --objective vrpo` end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import llada
from llada.cli.main import main
from llada.losses import dpo_loss, elbo_draws, elbo_estimate, preference_loss
from llada.train.config import TrainConfig
from llada.train.loop import read_metrics, train


def test_dpo_loss_is_the_direct_formula():
    policy_chosen = torch.tensor([-10.0, -3.0, -50.0])
    policy_rejected = torch.tensor([-12.0, -1.0, -40.0])
    ref_chosen = torch.tensor([-11.0, -2.0, -45.0])
    ref_rejected = torch.tensor([-11.5, -2.5, -44.0])
    beta = 0.3
    expected = 0.0
    for w, lose, rw, rl in zip(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, strict=True
    ):
        score = (float(w) - float(rw)) - (float(lose) - float(rl))
        expected += -math.log(1 / (1 + math.exp(-beta * score)))
    expected /= 3
    loss = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # A huge score stays finite (logsigmoid, not log(sigmoid)).
    far = dpo_loss(
        torch.tensor([0.0]), torch.tensor([1e4]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0
    )
    assert float(far) == pytest.approx(1e4)


def test_timestep_allocation_gives_one_mask_per_distinct_timestep():
    x0 = torch.arange(40).reshape(2, 20)
    prompt_lengths = torch.tensor([5, 8])
    generator = torch.Generator().manual_seed(0)
    is_masked, p_mask = elbo_draws(x0, prompt_lengths, 8, "timesteps", generator=generator)
    assert is_masked.shape == (8, 2, 20) and p_mask.shape == (8, 2)
    # 8 draws per row, each with its own timestep: 8 distinct masking probabilities.
    for row in range(2):
        assert len(set(p_mask[:, row].tolist())) == 8
    assert not is_masked[:, 0, :5].any() and not is_masked[:, 1, :8].any()  # prompts clean
    naive_masks, naive_p = elbo_draws(x0, prompt_lengths, 8, "naive", generator=generator)
    # Naive: one timestep per row, 8 masks drawn at it (different masks, one probability).
    for row in range(2):
        assert len(set(naive_p[:, row].tolist())) == 1
    assert len({tuple(m.tolist()) for m in naive_masks[:, 0, 5:]}) > 1
    with pytest.raises(ValueError, match="allocation"):
        elbo_draws(x0, prompt_lengths, 8, "spread")


def test_elbo_estimate_is_the_direct_sum(chat_checkpoint):
    model = llada.load_model(chat_checkpoint).eval()
    mask_id = model.special_tokens.mask_id
    x0 = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    prompt_lengths = torch.tensor([4, 6, 2])
    is_masked, p_mask = elbo_draws(
        x0, prompt_lengths, 5, generator=torch.Generator().manual_seed(2)
    )
    got = elbo_estimate(model, x0, is_masked, p_mask, mask_id)
    expected = torch.zeros(3)
    with torch.no_grad():
        for j in range(5):
            for b in range(3):
                noisy = torch.where(is_masked[j, b], mask_id, x0[b])[None]
                log_p = F.log_softmax(model(noisy).logits[0].float(), dim=-1)
                picked = log_p[torch.arange(12), x0[b]][is_masked[j, b]]
                expected[b] += picked.sum() / p_mask[j, b] / 5
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-4)


class _Recording(torch.nn.Module):
    """A model that records the noisy inputs it is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.inputs = []

    def forward(self, input_ids, **kwargs):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, **kwargs)


def _pair_batch():
    tokens = torch.randint(3, 300, (4, 14), generator=torch.Generator().manual_seed(3))
    return tokens, torch.tensor([5, 6, 5, 6])  # pairs (0, 2) and (1, 3) share their prompt


@pytest.mark.parametrize("antithetic", [True, False])
def test_antithetic_sampling_shares_timesteps_and_masks(chat_checkpoint, antithetic):
    # Two separately loaded copies: the same weights, as policy and reference are at step 0.
    policy = _Recording(llada.load_model(chat_checkpoint).eval())
    reference = _Recording(llada.load_model(chat_checkpoint).eval())
    for parameter in policy.parameters():
        parameter.requires_grad_(True)
    x0, prompt_lengths = _pair_batch()
    out = preference_loss(
        policy,
        reference,
        x0,
        prompt_lengths,
        policy.model.special_tokens.mask_id,
        beta=0.1,
        budget=8,
        antithetic=antithetic,
        generator=torch.Generator().manual_seed(4),
    )
    same_draws = torch.equal(policy.inputs[0], reference.inputs[0])
    if antithetic:
        # Same timesteps and masks: the two estimates cancel exactly, the score is 0 and the
        # loss log 2.
        assert same_draws
        assert torch.equal(out.scores, torch.zeros(2))
        assert float(out.loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    else:
        assert not same_draws
        assert (out.scores != 0).all()
    out.loss.backward()  # the gradient reaches the policy only
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None for p in policy.parameters())


def _write_pairs(path, count=6):
    with open(path, "w", encoding="utf-8") as f:
        for a in range(count):
            pair = {"prompt": f"What is {a} + 3?", "chosen": f"{a + 3}", "rejected": f"{a + 4}."}
            if a % 2:  # both prompt forms
                pair = {"messages": [{"role": "user", "content": pair.pop("prompt")}], **pair}
            f.write(json.dumps(pair) + "\n")
    return path


def _config(chat_checkpoint, pairs, out_dir, **changes):
    settings = dict(
        objective="vrpo",
        model=str(chat_checkpoint),
        data=str(pairs),
        out_dir=str(out_dir),
        seq_len=64,
        batch_size=2,
        grad_accum=2,
        vrpo_budget=4,
        max_steps=6,
        lr=1e-2,
        warmup_steps=0,
        eval_every=0,
        save_every=0,
        log_every=1,
    )
    settings.update(changes)
    return TrainConfig(**settings)


def _losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


def test_vrpo_trains_saves_and_resumes_exactly(chat_checkpoint, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    whole = tmp_path / "whole"
    result = train(_config(chat_checkpoint, pairs, whole), progress=False)
    losses = _losses(whole)
    # Step 1: the policy is the reference and the draws are shared: the loss is exactly log 2.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-7)
    assert len(set(losses)) > 1  # and the policy moves away from it
    assert llada.load_model(result.checkpoint).config.d_model == 32

    parts = tmp_path / "parts"
    train(_config(chat_checkpoint, pairs, parts, save_every=3), progress=False)
    shutil.rmtree(parts / "checkpoints" / "step-0000006")
    (parts / "checkpoints" / "latest").write_text("step-0000003\n")
    train(_config(chat_checkpoint, pairs, parts, save_every=3, resume=True), progress=False)
    assert [r["step"] for r in read_metrics(parts)] == list(range(1, 7))
    assert _losses(parts) == losses


def test_dpo_and_lora_run_through_the_cli(chat_checkpoint, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    common = [
        "train", "--model", str(chat_checkpoint), "--data", str(pairs), "--val-data",
        str(pairs), "--seq-len", "64", "--batch-size", "2", "--max-steps", "2",
        "--warmup-steps", "0", "--vrpo-budget", "2", "--beta", "0.5", "--log-every", "1",
        "--no-progress",
    ]  # fmt: skip
    assert main([*common, "--objective", "dpo", "--out-dir", str(tmp_path / "dpo")]) == 0
    # Plain DPO draws the reference's masks apart: step 1 is not log 2.
    assert _losses(tmp_path / "dpo")[0] != pytest.approx(math.log(2), abs=1e-4)
    assert "val_preference_accuracy" in read_metrics(tmp_path / "dpo")[-1]
    lora = ["--objective", "vrpo", "--lora-rank", "2", "--precision", "bf16"]
    lora += ["--out-dir", str(tmp_path / "lora")]
    assert main([*common, *lora]) == 0
    assert _losses(tmp_path / "lora")[0] == pytest.approx(math.log(2), abs=1e-7)


def test_vrpo_on_llada2_scores_by_block_diffusion(llada2_chat_checkpoint, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    lines = []
    config = _config(llada2_chat_checkpoint, pairs, tmp_path / "run", max_steps=2, grad_accum=1)
    train(config, progress=False, say=lines.append)
    assert "objective: block diffusion (LLaDA 2.x), block length 32" in lines
    assert _losses(tmp_path / "run")[0] == pytest.approx(math.log(2), abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_vrpo_under_torchrun_follows_the_single_process_curve(chat_checkpoint, tmp_path, parallel):
    """2 processes (gloo) at the same global batch as 1 process with 2x accumulation: the same
    pairs and the same draws, so the same losses."""
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    single = _config(chat_checkpoint, pairs, tmp_path / "one", batch_size=1, grad_accum=2)
    train(single, progress=False)
    config_file = tmp_path / "two.json"
    two = dict(single.to_dict(), out_dir=str(tmp_path / "two"), grad_accum=1, parallel=parallel)
    config_file.write_text(json.dumps(two))
    run = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "llada.cli.main", "train", "--no-progress", "--config", str(config_file),
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Hi?", "chosen": "Yes.", "rejected": "Yes."}, "are the same answer"),
        ({"prompt": "Hi?", "chosen": "Yes.", "rejected": "  "}, "'rejected' must be a non-empty"),
        ({"prompt": "Hi?", "chosen": "", "rejected": "No."}, "'chosen' must be a non-empty"),
        ({"prompt": "Hi? " * 80, "chosen": "Yes.", "rejected": "No."}, "> seq_len 64"),
        ({"chosen": "Yes.", "rejected": "No."}, "needs a non-empty 'prompt'"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Yes"},
                ],
                "chosen": "Yes.",
                "rejected": "No.",
            },
            "not in a last assistant message",
        ),
    ],
)
def test_bad_pairs_are_refused_before_training(chat_checkpoint, tmp_path, record, message):
    pairs = _write_pairs(tmp_path / "pairs.jsonl", count=2)
    with open(pairs, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"pairs\.jsonl:3: .*{message}"):
        train(_config(chat_checkpoint, pairs, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_preference_settings_are_checked():
    with pytest.raises(ValueError, match="pass --model"):
        TrainConfig(objective="vrpo", model_config="c.json", tokenizer="t", data="d")
    with pytest.raises(ValueError, match="beta must be > 0"):
        TrainConfig(objective="vrpo", model="m", data="d", beta=0)
    with pytest.raises(ValueError, match="vrpo_budget"):
        TrainConfig(objective="vrpo", model="m", data="d", vrpo_budget=0)
    with pytest.raises(ValueError, match="vrpo_allocation"):
        TrainConfig(objective="vrpo", model="m", data="d", vrpo_allocation="spread")
    with pytest.raises(ValueError, match="drop --autoregressive"):
        TrainConfig(objective="dpo", model="m", data="d", autoregressive=True)
