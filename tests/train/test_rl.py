"""GRPO with checkable rewards (llada.train.rl, `llada rl`): advantages, the estimators against
direct computations, the clipped objective, the KL term, rewards, the CLI, checkpoints, resume."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llada
from llada.cli.main import main
from llada.likelihood import get_log_likelihood
from llada.train.checkpointing import checkpoint_problem, latest_checkpoint, list_checkpoints
from llada.train.rl import (
    RLConfig,
    answer_weights,
    clipped_objective,
    elbo_inputs,
    elbo_log_probs,
    group_advantages,
    one_step_inputs,
    one_step_log_probs,
    train_rl,
)


@pytest.fixture(scope="module")
def tiny(chat_checkpoint):
    model = llada.load_model(chat_checkpoint, dtype=torch.float32)
    return model


def _batch(model, lengths=(5, 3), answer=4, seed=0):
    """Left-padded prompts of `lengths` plus `answer` tokens: (sequences, attention_mask, Lp)."""
    g = torch.Generator().manual_seed(seed)
    tokens = model.special_tokens
    prompt_length = max(lengths)
    rows, masks = [], []
    for n in lengths:
        ids = torch.randint(10, 300, (n + answer,), generator=g)
        pad = torch.full((prompt_length - n,), tokens.pad_id)
        rows.append(torch.cat([pad, ids]))
        masks.append(torch.cat([torch.zeros(prompt_length - n), torch.ones(n + answer)]))
    return torch.stack(rows), torch.stack(masks).long(), prompt_length


def test_group_advantages_match_a_direct_computation():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.2, 0.9, 0.4, 0.4, 0.0], [1.0] * 5])
    got = group_advantages(rewards)
    for row, out in zip(rewards.tolist(), got.tolist(), strict=True):
        mean, std = statistics.mean(row), statistics.stdev(row)
        expected = [(r - mean) / (std + 1e-4) for r in row]
        assert out == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got[2].abs().max() == 0  # equal rewards: no advantage


def test_one_step_inputs_mask_the_answer_and_prompt_tokens_at_rate_p(tiny):
    sequences, attention_mask, lp = _batch(tiny, lengths=(40, 25), answer=6)
    mask_id = tiny.special_tokens.mask_id
    noisy = one_step_inputs(
        sequences, attention_mask, lp, mask_id, 0.15, torch.Generator().manual_seed(3)
    )
    assert (noisy[:, lp:] == mask_id).all()
    draws = torch.rand(sequences.shape, generator=torch.Generator().manual_seed(3))
    expected = (draws < 0.15) & attention_mask.bool()
    expected[:, lp:] = False
    prompt_masked = noisy[:, :lp] == mask_id
    assert torch.equal(prompt_masked, expected[:, :lp])
    assert not prompt_masked[attention_mask[:, :lp] == 0].any()  # padding stays padding
    assert 0 < int(prompt_masked.sum()) < 65


def test_one_step_log_probs_match_a_direct_computation(tiny):
    sequences, attention_mask, lp = _batch(tiny)
    mask_id = tiny.special_tokens.mask_id
    noisy = one_step_inputs(
        sequences, attention_mask, lp, mask_id, 0.5, torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        got = one_step_log_probs(tiny, noisy, sequences, attention_mask, lp)
        assert got.shape == (2, 4)
        for row in range(2):
            real = attention_mask[row].bool()
            # The row alone, without its padding: log_softmax of the answer positions.
            logits = tiny(noisy[row][real][None]).logits[0]
            answer_logits = logits[-4:]
            expected = torch.log_softmax(answer_logits, -1).gather(-1, sequences[row, lp:, None])[
                :, 0
            ]
            torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-4)


def test_elbo_matches_the_likelihood_estimator(tiny):
    """Per answer token, the ELBO of a row equals llada.likelihood's estimate with the same
    draws (same seed, one batch of mc_num copies) divided by the answer length."""
    sequences, attention_mask, lp = _batch(tiny, lengths=(6,), answer=5)
    mask_id = tiny.special_tokens.mask_id
    torch.manual_seed(7)
    noisy, p_mask = elbo_inputs(sequences, lp, mask_id, mc_num=4)
    with torch.no_grad():
        got = elbo_log_probs(tiny, noisy, p_mask, sequences, attention_mask, lp, mask_id)
    torch.manual_seed(7)
    expected = get_log_likelihood(
        tiny, sequences[0, :lp], sequences[0, lp:], mc_num=4, batch_size=4
    )
    assert got.shape == (1, 1)
    assert float(got[0, 0]) * 5 == pytest.approx(expected, rel=1e-5)


def test_answer_weights_count_through_the_first_stop_token():
    stop = (1, 9)
    answers = torch.tensor([[5, 6, 1, 1, 1], [5, 9, 7, 1, 1], [4, 4, 4, 4, 4]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]).float()
    assert torch.equal(answer_weights(answers, stop), expected)


def _grad(log_prob, old, advantage, clip=0.2):
    x = torch.tensor([[log_prob]], requires_grad=True)
    loss, _ = clipped_objective(
        x, torch.tensor([[old]]), None, torch.tensor([advantage]), torch.ones(1, 1), clip, 0.0
    )
    loss.backward()
    return float(x.grad)


def test_clipped_objective_gradient_signs():
    # Ratio 1: the loss falls by raising a positive-advantage answer's log-probability.
    assert _grad(0.0, 0.0, 1.0) == pytest.approx(-1.0)
    assert _grad(0.0, 0.0, -2.0) == pytest.approx(2.0)
    # Ratio above 1 + clip with A > 0: clipped, no gradient; below 1 - clip: the unclipped
    # term is the minimum, gradient -ratio * A.
    assert _grad(0.5, 0.0, 1.0) == 0.0
    assert _grad(-0.5, 0.0, 1.0) == pytest.approx(-torch.exp(torch.tensor(-0.5)).item())
    # Ratio below 1 - clip with A < 0: clipped; above 1 + clip: gradient -ratio * A > 0.
    assert _grad(-0.5, 0.0, -1.0) == 0.0
    assert _grad(0.5, 0.0, -1.0) == pytest.approx(torch.exp(torch.tensor(0.5)).item())


def test_kl_term_is_zero_when_policy_is_reference_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(3, 4, generator=g) * 3
    weights = torch.ones(3, 4)
    advantages = torch.tensor([1.0, -0.5, 0.2])
    plain, _ = clipped_objective(log_probs, log_probs, None, advantages, weights, 0.2, 0.0)
    same, stats = clipped_objective(log_probs, log_probs, log_probs, advantages, weights, 0.2, 0.5)
    assert stats["kl"] == 0.0
    assert float(same) == float(plain)
    other = log_probs + 0.3 * torch.randn(3, 4, generator=g)
    _, moved = clipped_objective(log_probs, log_probs, other, advantages, weights, 0.2, 0.5)
    delta = other - log_probs
    assert moved["kl"] == pytest.approx(float((torch.exp(delta) - delta - 1).mean()), rel=1e-5)


# Runs on the tiny chat checkpoint ---------------------------------------------------------


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A user reward module on sys.path: `length` scores a reply by its length (so a group's
    answers differ) and records every call; `fails_later` raises from the third step on."""
    module = tmp_path / "user_rewards_rl.py"
    module.write_text(
        textwrap.dedent(
            """
            calls = []

            def length(prompt, reply, example):
                calls.append((prompt, reply, example))
                return float(len(reply) % 5)

            def fails_later(prompt, reply, example):
                calls.append(prompt)
                if len(calls) > 2 * 2 * 2:
                    raise KeyError("no score for this reply")
                return float(len(reply) % 3)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import user_rewards_rl

    importlib.reload(user_rewards_rl)
    return user_rewards_rl


def _config(chat_checkpoint, out_dir, **changes):
    settings = dict(
        model=str(chat_checkpoint),
        out_dir=str(out_dir),
        tasks="arithmetic,sort",
        reward="user_rewards_rl:length",
        group_size=2,
        prompts_per_step=2,
        steps=3,
        lr=1e-3,
        gen_length=8,
        block_length=8,
        sampler_steps=8,
    )
    settings.update(changes)
    return RLConfig(**settings)


def test_user_reward_by_import_path(chat_checkpoint, tmp_path, reward_module):
    result = train_rl(_config(chat_checkpoint, tmp_path / "run", steps=2))
    calls = reward_module.calls
    assert len(calls) == 2 * 2 * 2
    # Each call gets the question's prompt, the reply and the example; the metrics' reward is
    # the mean of what the function returned.
    for prompt, reply, example in calls:
        assert prompt == example.prompt and example.task in ("arithmetic", "sort")
        assert isinstance(reply, str)
    first = [float(len(r) % 5) for _, r, _ in calls[:4]]
    assert result.metrics[0]["reward"] == pytest.approx(sum(first) / 4)
    # Group members share their question.
    assert calls[0][0] == calls[1][0] and calls[2][0] == calls[3][0]
    # At step 1 the policy is the reference: the KL term is exactly zero.
    assert result.metrics[0]["kl"] == 0.0


def test_cli_runs_and_saves_a_loadable_checkpoint(chat_checkpoint, tmp_path, reward_module):
    out = tmp_path / "run"
    code = main(
        [
            "--threads", "1", "rl", "--model", str(chat_checkpoint), "--out-dir", str(out),
            "--tasks", "arithmetic", "--reward", "user_rewards_rl:length", "--group-size", "4",
            "--prompts-per-step", "2", "--steps", "3", "--lr", "1e-3", "--gen-length", "8",
            "--block-length", "8", "--sampler-steps", "8", "--inner-updates", "2",
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    folder = latest_checkpoint(out)
    assert folder is not None and folder.name == "step-0000003"
    assert checkpoint_problem(folder) is None
    trained = llada.load_model(folder, dtype=torch.float32)
    start = llada.load_model(chat_checkpoint, dtype=torch.float32)
    moved = [
        not torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), start.state_dict().values(), strict=True)
    ]
    assert any(moved)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    # A second run into the same folder is refused without --resume / --overwrite.
    assert main(["rl", "--model", str(chat_checkpoint), "--out-dir", str(out)]) == 2


def test_failing_reward_names_the_function_and_keeps_the_last_checkpoint(
    chat_checkpoint, tmp_path, reward_module, capsys
):
    out = tmp_path / "run"
    code = main(
        [
            "rl", "--model", str(chat_checkpoint), "--out-dir", str(out), "--tasks", "sort",
            "--reward", "user_rewards_rl:fails_later", "--group-size", "2",
            "--prompts-per-step", "2", "--steps", "5", "--save-every", "1", "--gen-length",
            "8", "--block-length", "8", "--sampler-steps", "8", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 3
    err = capsys.readouterr().err
    assert "user_rewards_rl:fails_later" in err and "KeyError" in err
    assert "step-0000002" in err  # the last good checkpoint
    assert [c.name for c in list_checkpoints(out)] == ["step-0000001", "step-0000002"]
    assert checkpoint_problem(out / "checkpoints" / "step-0000002") is None
    llada.load_model(out / "checkpoints" / "step-0000002")


def test_bad_reward_path_is_one_clear_line(chat_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="module:function"):
        RLConfig(model=str(chat_checkpoint), reward="no_colon_here")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        train_rl(_config(chat_checkpoint, tmp_path / "run", reward="json:nope"))


@pytest.mark.parametrize("estimator", ["one-step", "elbo"])
def test_resume_is_exact(chat_checkpoint, tmp_path, reward_module, estimator):
    kw = dict(estimator=estimator, inner_updates=2, mc_num=2)
    # Every draw of a step comes from (seed, step): the global generator's state does not count.
    torch.manual_seed(123)
    whole = train_rl(_config(chat_checkpoint, tmp_path / "whole", steps=4, **kw))
    torch.manual_seed(456)
    train_rl(_config(chat_checkpoint, tmp_path / "parts", steps=2, **kw))
    torch.manual_seed(789)
    resumed = train_rl(_config(chat_checkpoint, tmp_path / "parts", steps=4, resume=True, **kw))
    assert resumed.step == 4 and [r["step"] for r in resumed.metrics] == [3, 4]
    for key in ("reward", "loss", "kl"):
        assert [r[key] for r in resumed.metrics] == [r[key] for r in whole.metrics[2:]]
    a = llada.load_model(whole.checkpoint, dtype=torch.float32).state_dict()
    b = llada.load_model(resumed.checkpoint, dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]


def test_moe_model_trains(moe_chat_checkpoint, tmp_path, reward_module):
    result = train_rl(_config(moe_chat_checkpoint, tmp_path / "moe", steps=2))
    assert result.checkpoint is not None and result.metrics[0]["kl"] == 0.0
    trained = llada.load_model(result.checkpoint, dtype=torch.float32).state_dict()
    start = llada.load_model(moe_chat_checkpoint, dtype=torch.float32).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)


# LLaDA 2.x ----------------------------------------------------------------------------------


def test_block_elbo_of_padded_groups_matches_the_likelihood(llada2_chat_checkpoint):
    """Two groups with prompts of different lengths, left-padded into one batch: each row's
    estimate is llada.likelihood's LLaDA 2.x ELBO (same draws) divided by the answer length,
    blocks counted from the row's own first token (blocks of 4 straddle prompt and answer)."""
    from types import SimpleNamespace

    from llada.train.rl import RLTrainer

    model = llada.load_model(llada2_chat_checkpoint, dtype=torch.float32)
    mask_id = model.special_tokens.mask_id
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 300, (n,), generator=g) for n in (9, 6)]
    answers = [torch.randint(10, 300, (5,), generator=g) for _ in prompts]
    width = 9 + 5
    rows, masks = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        pad = 9 - len(prompt)
        rows.append(torch.cat([torch.full((pad,), model.special_tokens.pad_id), prompt, answer]))
        masks.append(torch.cat([torch.zeros(pad), torch.ones(width - pad)]).long())
    sequences, attention_mask = torch.stack(rows), torch.stack(masks)
    noisy, p_mask = [], []
    for i, seed in enumerate((11, 12)):
        torch.manual_seed(seed)
        x, p = elbo_inputs(sequences[i : i + 1], 9, mask_id, mc_num=4)
        noisy.append(x)
        p_mask.append(p)
    trainer = RLTrainer.__new__(RLTrainer)
    trainer.config = SimpleNamespace(group_size=1)
    trainer.block_length = 4
    trainer.special_tokens = model.special_tokens
    with torch.no_grad():
        got = trainer._block_estimates(
            model, torch.cat(noisy, 1), sequences, attention_mask, 9, torch.cat(p_mask, 1)
        )
    assert got.shape == (2, 1)
    for i, seed in enumerate((11, 12)):
        torch.manual_seed(seed)
        expected = get_log_likelihood(
            model, prompts[i], answers[i], mc_num=4, batch_size=4, block_length=4
        )
        assert float(got[i, 0]) * 5 == pytest.approx(expected, rel=1e-5)


def test_llada2_trains_by_its_block_sampler_and_elbo(
    llada2_chat_checkpoint, tmp_path, reward_module
):
    kw = dict(decode="llada2.0", estimator="elbo", mc_num=2, block_length=8, inner_updates=2)
    whole = train_rl(_config(llada2_chat_checkpoint, tmp_path / "whole", steps=3, **kw))
    assert whole.metrics[0]["rollout_forward_passes"] > 0
    trained = llada.load_model(whole.checkpoint, dtype=torch.float32).state_dict()
    start = llada.load_model(llada2_chat_checkpoint, dtype=torch.float32).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)
    assert whole.metrics[-1]["kl"] > 0
    train_rl(_config(llada2_chat_checkpoint, tmp_path / "parts", steps=2, **kw))
    resumed = train_rl(
        _config(llada2_chat_checkpoint, tmp_path / "parts", steps=3, resume=True, **kw)
    )
    for key in ("reward", "loss", "kl"):
        assert resumed.metrics[0][key] == whole.metrics[2][key]
    again = llada.load_model(resumed.checkpoint, dtype=torch.float32).state_dict()
    assert all(torch.equal(trained[k], again[k]) for k in trained)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(decode="llada2.0"), "d1's one-step estimate .* pass --estimator elbo"),
        (dict(estimator="elbo"), "pass --decode llada2.0 or"),
    ],
)
def test_llada2_settings_that_do_not_fit_are_one_line(
    llada2_chat_checkpoint, tmp_path, changes, message
):
    with pytest.raises(ValueError, match=message):
        train_rl(_config(llada2_chat_checkpoint, tmp_path / "run", **changes))


def test_block_sampler_on_a_dense_model_is_one_line(chat_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="--decode llada2.0 is LLaDA 2.x's block sampler"):
        train_rl(_config(chat_checkpoint, tmp_path / "run", decode="llada2.0"))


# Under torchrun ----------------------------------------------------------------------------


def _torchrun(config: RLConfig, config_file, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """`llada rl` on 2 gloo processes with `config` (and `flags`), the user reward module of
    tmp_path importable."""
    config_file.write_text(json.dumps(config.to_dict()))
    source = str(Path(llada.__file__).parents[1])
    path = os.pathsep.join(p for p in (str(tmp_path), source, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "llada.cli.main", "rl", "--no-progress", "--config", str(config_file),
            *flags,
        ],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path),
        timeout=300,
        capture_output=True,
        text=True,
    )  # fmt: skip


def _metrics(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_torchrun_follows_one_process(chat_checkpoint, tmp_path, reward_module, parallel):
    """3 questions per step on 2 processes (2 + 1 groups), 2 inner updates: the same rollouts
    (rewards equal exactly), the same losses and KL up to the order of the sums, and after a
    2-process save and resume, the same weights; the checkpoint holds both processes' shards."""
    kw = dict(prompts_per_step=3, inner_updates=2, steps=3, lr=1e-3, beta_kl=0.5)
    one = train_rl(_config(chat_checkpoint, tmp_path / "one", **kw))
    config = _config(chat_checkpoint, tmp_path / "two", parallel=parallel, **kw)
    run = _torchrun(config, tmp_path / "two.json", tmp_path, "--steps", "2")
    assert run.returncode == 0, run.stderr[-4000:]
    run = _torchrun(config, tmp_path / "two.json", tmp_path, "--resume")
    assert run.returncode == 0, run.stderr[-4000:]
    assert "resumed from step 2" in run.stdout
    two = _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]  # rank 0 alone writes the metrics
    for a, b in zip(one.metrics, two, strict=True):
        # Rewards are a function of the rollouts: equal only if every answer is the same.
        assert b["reward"] == a["reward"] and b["reward_std"] == a["reward_std"]
        assert b["answer_tokens"] == a["answer_tokens"]
        for key in ("loss", "kl", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert one.metrics[-1]["kl"] > 0  # the policy moved away from the reference
    folder = latest_checkpoint(tmp_path / "two")
    assert folder.name == "step-0000003" and checkpoint_problem(folder) is None
    assert sorted(p.name for p in (folder / "trainer_state").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    a = llada.load_model(one.checkpoint, dtype=torch.float32).state_dict()
    b = llada.load_model(folder, dtype=torch.float32).state_dict()
    start = llada.load_model(chat_checkpoint, dtype=torch.float32).state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_more_processes_than_questions_is_one_clear_line(chat_checkpoint, tmp_path, monkeypatch):
    from llada.train import rl
    from llada.train.parallel import Distributed

    monkeypatch.setattr(rl, "init_distributed", lambda: Distributed(rank=1, world_size=4))
    with pytest.raises(ValueError, match="4 processes but --prompts-per-step 3"):
        train_rl(_config(chat_checkpoint, tmp_path / "run", prompts_per_step=3))


def test_groups_are_shared_out_whole_and_contiguously():
    from llada.train.parallel import Distributed
    from llada.train.rl import group_share

    shares = [group_share(7, Distributed(rank=r, world_size=3)) for r in range(3)]
    assert shares == [(0, 2), (2, 4), (4, 7)]
    assert group_share(4, Distributed()) == (0, 4)


# LoRA ---------------------------------------------------------------------------------------


def test_adapters_disabled_is_the_base_model(tiny):
    pytest.importorskip("peft")
    import copy

    from llada.train.lora import add_lora
    from llada.train.rl import adapters_disabled

    model = add_lora(copy.deepcopy(tiny), rank=2, alpha=4.0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(len(name)))
    tokens = torch.randint(10, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny(tokens).logits
        with adapters_disabled(model):
            off = model(tokens).logits
        on = model(tokens).logits
    assert torch.equal(off, base)
    assert not torch.allclose(on, base, atol=1e-3)
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert adapters and all(p.requires_grad for p in adapters)  # trainable again afterwards


def test_lora_trains_only_the_adapters_and_peft_loads_them(
    chat_checkpoint, tmp_path, reward_module
):
    peft = pytest.importorskip("peft")
    from llada.train.lora import TARGET_MODULES
    from llada.train.rl import RLTrainer

    config = _config(
        chat_checkpoint, tmp_path / "run", lora_rank=4, lora_alpha=8.0, lr=1e-2, beta_kl=0.5
    )
    trainer = RLTrainer(config)
    assert trainer.reference is None  # the reference is the policy with its adapters off
    records = [trainer.train_step() for _ in range(3)]
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0
    folder = trainer.save()
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json"):
        assert (folder / name).is_file(), name
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["lora_alpha"] == 8
    assert settings["base_model_name_or_path"] == str(chat_checkpoint.resolve())
    start = llada.load_model(chat_checkpoint, dtype=torch.float32)
    merged_model = llada.load_model(folder, dtype=torch.float32)
    # Only the linears the adapters sit on moved; embeddings, norms and the LM head did not.
    merged = merged_model.state_dict()
    for name, tensor in start.state_dict().items():
        adapted = any(f".{t}." in name for t in TARGET_MODULES)
        if not adapted:
            assert torch.equal(merged[name], tensor), name
    assert any(not torch.equal(merged[k], start.state_dict()[k]) for k in merged)
    tokens = torch.randint(10, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer.policy(tokens).logits
        loaded = peft.PeftModel.from_pretrained(start, str(folder))
        torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_resume_is_exact(chat_checkpoint, tmp_path, reward_module):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    kw = dict(lora_rank=4, lora_alpha=8.0, lr=1e-2, inner_updates=2)
    whole = train_rl(_config(chat_checkpoint, tmp_path / "whole", steps=3, **kw))
    train_rl(_config(chat_checkpoint, tmp_path / "parts", steps=2, **kw))
    with pytest.raises(ValueError, match="pass --lora-rank 4"):
        train_rl(_config(chat_checkpoint, tmp_path / "parts", steps=3, resume=True))
    resumed = train_rl(_config(chat_checkpoint, tmp_path / "parts", steps=3, resume=True, **kw))
    for key in ("reward", "loss", "kl"):
        assert resumed.metrics[0][key] == whole.metrics[2][key]
    a = load_file(whole.checkpoint / "adapter_model.safetensors")
    b = load_file(resumed.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_model_without_adaptable_layers_is_one_clear_line(
    chat_checkpoint, tmp_path, monkeypatch
):
    pytest.importorskip("peft")
    monkeypatch.setattr("llada.train.lora.TARGET_MODULES", ("no_such_layer",))
    with pytest.raises(ValueError, match="--lora-rank 2: .* cannot take LoRA adapters"):
        train_rl(_config(chat_checkpoint, tmp_path / "run", lora_rank=2))


def test_llada2_needs_equal_shares_under_torchrun(
    llada2_chat_checkpoint, tmp_path, monkeypatch, reward_module
):
    from llada.train import rl
    from llada.train.parallel import Distributed

    monkeypatch.setattr(rl, "init_distributed", lambda: Distributed(rank=0, world_size=2))
    monkeypatch.setattr(rl, "barrier", lambda env: None)
    config = _config(
        llada2_chat_checkpoint, tmp_path / "run", decode="llada2.0", estimator="elbo",
        prompts_per_step=3,
    )  # fmt: skip
    with pytest.raises(ValueError, match="--prompts-per-step 3 must be a multiple of the 2"):
        train_rl(config)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_llada2_under_torchrun_follows_one_process(
    llada2_chat_checkpoint, tmp_path, reward_module, parallel
):
    """LLaDA 2.x on 2 processes, two questions each (one forward and backward per question,
    the gradients synchronised in the second): the block sampler's rollouts as in one process
    (rewards equal exactly), losses, KL and weights within the same tolerances."""
    kw = dict(
        decode="llada2.0", estimator="elbo", mc_num=2, block_length=8, inner_updates=2,
        steps=2, beta_kl=0.5, prompts_per_step=4,
    )  # fmt: skip
    one = train_rl(_config(llada2_chat_checkpoint, tmp_path / "one", **kw))
    config = _config(llada2_chat_checkpoint, tmp_path / "two", parallel=parallel, **kw)
    run = _torchrun(config, tmp_path / "two.json", tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    two = _metrics(tmp_path / "two")
    assert len(two) == 2
    for a, b in zip(one.metrics, two, strict=True):
        assert b["reward"] == a["reward"] and b["reward_std"] == a["reward_std"]
        for key in ("loss", "kl", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert one.metrics[-1]["kl"] > 0
    a = llada.load_model(one.checkpoint, dtype=torch.float32).state_dict()
    b = llada.load_model(latest_checkpoint(tmp_path / "two"), dtype=torch.float32).state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
