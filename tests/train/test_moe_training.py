"""`llada train` on LLaDA-MoE: the routers' load-balancing loss, new and fine-tuned MoE models,
official checkpoints, exact resume, LoRA, and torchrun DDP/FSDP2 against one process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_helpers import train_config

import llada
from llada.losses import load_balancing_loss, recording_router_logits
from llada.model.llada_moe import LLaDAMoEModel, MoE
from llada.train.checkpointing import latest_checkpoint
from llada.train.config import TrainConfig
from llada.train.loop import Trainer, read_metrics, train

# 4 experts, top-2, every layer MoE; the vocabulary comes from the test tokenizer.
TINY_MOE = {
    "architectures": ["LLaDAMoEModelLM"],
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 32,
    "dense_intermediate_size": 64,
    "moe_layer_freq": [1, 1],
    "max_position_embeddings": 512,
    "output_router_logits": True,
    "router_aux_loss_coef": 0.01,
}


@pytest.fixture(scope="module")
def moe_setup(training_setup, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe-config") / "moe.json"
    path.write_text(json.dumps(TINY_MOE))
    return dict(training_setup, model_config=path)


def _config(setup, out_dir, **changes) -> TrainConfig:
    """Shorter than the dense tests' runs: 8 steps, no validation by default."""
    short = dict(max_steps=8, warmup_steps=2, eval_every=0, eval_batches=2)
    return train_config(setup, out_dir, **{**short, **changes})


def _records(out_dir) -> dict[int, tuple[float, float | None]]:
    return {r["step"]: (r["loss"], r.get("aux_loss")) for r in read_metrics(out_dir)}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


# The formula ------------------------------------------------------------------------------------


def test_load_balancing_loss_matches_a_hand_computation():
    # 2 layers x 2 tokens, 3 experts, top-2; the logits are log-probabilities plus a shift per
    # row (the softmax takes the shift away).
    probabilities = torch.tensor(
        [
            [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],  # layer 0: top-2 {0, 1} and {1, 2}
            [[0.25, 0.15, 0.6], [0.7, 0.2, 0.1]],  # layer 1: top-2 {2, 0} and {0, 1}
        ]
    )
    logits = [(p.log() + torch.tensor([[1.0], [-2.0]])).reshape(1, 2, 3) for p in probabilities]
    # f = (3/4, 3/4, 2/4), P = (1.55, 1.25, 1.2) / 4: 3 * (0.75*0.3875 + 0.75*0.3125 + 0.5*0.3)
    assert load_balancing_loss(logits, 3, 2).item() == pytest.approx(2.025, rel=1e-6)
    # Only the first token is real: f = (1, 1/2, 1/2), P = (0.375, 0.225, 0.4).
    mask = torch.tensor([[1, 0]])
    assert load_balancing_loss(logits, 3, 2, token_mask=mask).item() == pytest.approx(
        2.0625, rel=1e-6
    )
    # An even router gives top_k; the gradient flows to the logits (through P).
    even = torch.zeros(6, 4, requires_grad=True)
    loss = load_balancing_loss([even], 4, 2)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert even.grad is not None and even.grad.abs().sum() > 0


def test_per_layer_balancing_sees_what_pooling_the_layers_hides():
    # Two layers, 2 experts, top-1: layer 0 sends every token to expert 0, layer 1 to expert 1.
    # Pooled (the reference's formula) that is perfectly even; each layer alone is not.
    confident = torch.tensor([[4.0, 0.0]]).repeat(8, 1)
    layers = [confident, confident.flip(1)]
    assert load_balancing_loss(layers, 2, 1).item() == pytest.approx(1.0)  # top_k: "even"
    p = torch.softmax(torch.tensor([4.0, 0.0]), -1)[0].item()
    # Per layer: f = (1, 0), P = (p, 1 - p) -> 2 * p for each layer.
    per_layer = load_balancing_loss(layers, 2, 1, per_layer=True)
    assert per_layer.item() == pytest.approx(2 * p, rel=1e-6) and per_layer.item() > 1.9
    # One layer: the same either way.
    assert load_balancing_loss(layers[:1], 2, 1, per_layer=True).item() == pytest.approx(
        load_balancing_loss(layers[:1], 2, 1).item()
    )


def test_the_trainer_uses_the_per_layer_loss_when_told(moe_setup, tmp_path):
    trainer = Trainer(_config(moe_setup, tmp_path / "p", router_aux_loss="per-layer"))
    assert trainer.aux_loss_coef == 0.01 and trainer.aux_per_layer
    batch = trainer.train_data.batch(list(range(8)))
    with recording_router_logits(trainer.base_model) as recorded:
        out = trainer._loss(batch, torch.Generator().manual_seed(3), None, with_aux=True)
    assert len(recorded) == 2
    expected = load_balancing_loss(recorded, 4, 2, per_layer=True)
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.aux_loss.item() != pytest.approx(load_balancing_loss(recorded, 4, 2).item())


def test_the_trainer_adds_the_formula_of_its_routers_to_the_objective(
    moe_setup, tmp_path, monkeypatch
):
    trainer = Trainer(_config(moe_setup, tmp_path / "a", router_aux_loss="on"))
    assert trainer.aux_loss_coef == 0.01
    # The routing as the model does it, seen from inside MoE.route (not through the hooks).
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    route = MoE.route

    def watched(self, x):
        logits, ids, weights = route(self, x)
        seen.append((logits.detach(), ids))
        return logits, ids, weights

    monkeypatch.setattr(MoE, "route", watched)
    batch = trainer.train_data.batch(list(range(8)))
    out = trainer._loss(batch, torch.Generator().manual_seed(3), None, with_aux=True)
    monkeypatch.setattr(MoE, "route", route)
    assert len(seen) == 2  # one router per MoE layer
    rows = sum(ids.shape[0] for _, ids in seen)
    hand = 0.0
    for expert in range(4):
        f = sum(int((ids == expert).sum()) for _, ids in seen) / rows
        p = sum(float(torch.softmax(lg.float(), -1)[:, expert].sum()) for lg, _ in seen) / rows
        hand += f * p
    assert out.aux_loss.item() == pytest.approx(4 * hand, rel=1e-5)

    # One step with and without the aux loss: the same LLaDA loss, the same LM-head update
    # (the aux loss does not reach it), a different router update.
    def one_step(choice: str, out_dir: Path) -> tuple[dict, Trainer]:
        step_trainer = Trainer(
            _config(moe_setup, out_dir, router_aux_loss=choice, grad_clip=0.0, warmup_steps=0)
        )
        return step_trainer.train_step(), step_trainer

    with_aux, a = one_step("on", tmp_path / "on")
    without, b = one_step("off", tmp_path / "off")
    assert with_aux["loss"] == without["loss"] and "aux_loss" not in without
    assert with_aux["aux_loss"] > 0
    assert torch.equal(a.base_model.lm_head.weight, b.base_model.lm_head.weight)
    gate_a, gate_b = (t.base_model.blocks[0].mlp.gate.weight for t in (a, b))
    assert not torch.equal(gate_a, gate_b)


def test_activation_checkpointing_keeps_the_step_with_the_aux_loss(moe_setup, tmp_path):
    # The hooks are gone before the backward pass, whose recomputation must give the same step.
    steps = []
    for checkpointing in (False, True):
        trainer = Trainer(
            _config(
                moe_setup, tmp_path / str(checkpointing), activation_checkpointing=checkpointing
            )
        )
        steps.append((trainer.train_step(), trainer.base_model))
    (plain, a), (recomputed, b) = steps
    assert recomputed["aux_loss"] == plain["aux_loss"] and recomputed["loss"] == plain["loss"]
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], tensor, rtol=1e-5, atol=1e-7)


def test_the_aux_loss_follows_output_router_logits_unless_told(moe_setup, training_setup, tmp_path):
    off = dict(TINY_MOE, output_router_logits=False)
    path = tmp_path / "off.json"
    path.write_text(json.dumps(off))
    lines: list[str] = []
    trainer = Trainer(_config(moe_setup, tmp_path / "run", model_config=str(path)), lines.append)
    assert trainer.aux_loss_coef is None
    assert any("output_router_logits false" in line for line in lines), lines
    dense = _config(training_setup, tmp_path / "dense", router_aux_loss="on")
    with pytest.raises(ValueError, match="--router-aux-loss on: this model has no router"):
        Trainer(dense)
    # A MoE config without its sizes is refused naming the flag, the family and the key.
    path.write_text(json.dumps({k: v for k, v in TINY_MOE.items() if k != "num_experts"}))
    with pytest.raises(
        ValueError, match=r"--model-config .*off\.json \(LLaDA-MoE\).*'num_experts'"
    ):
        Trainer(_config(moe_setup, tmp_path / "bad", model_config=str(path)))


# Training, checkpoints, resume ------------------------------------------------------------------


def test_moe_pretraining_lowers_held_out_loss_and_saves_official_folders(moe_setup, tmp_path):
    result = train(
        _config(moe_setup, tmp_path / "run", max_steps=60, eval_every=10, warmup_steps=5),
        progress=False,
    )
    first, last = result.val_history[0]["val_loss"], result.val_history[-1]["val_loss"]
    assert last < 0.75 * first, result.val_history
    records = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["aux_loss"]) and r["aux_loss"] >= 1.0 for r in records)
    model = llada.load_model(result.checkpoint)
    assert isinstance(model, LLaDAMoEModel) and model.config.num_experts == 4
    with safe_open(str(result.checkpoint / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.mlp.gate.weight" in names
    assert not any(name.startswith("blocks.") for name in names)
    saved = json.loads((result.checkpoint / "config.json").read_text())
    assert saved["model_type"] == "llada" and saved["architectures"] == ["LLaDAMoEModelLM"]
    assert saved["output_router_logits"] is True and saved["router_aux_loss_coef"] == 0.01


def test_moe_save_then_load_gives_the_trained_weights(moe_setup, tmp_path):
    # A dense first layer, a shared expert and the router's expert bias (a buffer) as well.
    variant = dict(
        TINY_MOE,
        moe_layer_freq=[0, 1],
        shared_expert_intermediate_size=16,
        moe_router_enable_expert_bias=True,
    )
    path = tmp_path / "variant.json"
    path.write_text(json.dumps(variant))
    trainer = Trainer(_config(moe_setup, tmp_path / "run", model_config=str(path)))
    trainer.base_model.blocks[1].mlp.expert_bias.copy_(torch.tensor([0.1, 0.0, -0.1, 0.05]))
    for _ in range(2):
        trainer.train_step()
    folder = trainer.save()
    loaded = llada.load_model(folder)
    assert isinstance(loaded, LLaDAMoEModel) and loaded.config == trainer.base_model.config
    _assert_same_weights(loaded, trainer.base_model)
    assert loaded.blocks[1].mlp.expert_bias[0].item() == pytest.approx(0.1)

    # LoRA's coverage on MoE: every linear layer, i.e. not the stacked routed experts nor the
    # router (whose name, gate, is not a target).
    pytest.importorskip("peft")
    lora = Trainer(
        _config(moe_setup, tmp_path / "lora", model=str(folder), model_config="", lora_rank=2)
    )
    adapted = sorted(
        {n.split(".lora_A")[0] for n, _ in lora.base_model.named_parameters() if ".lora_A" in n}
    )
    attention = [f"blocks.{i}.attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
    dense_mlp = [f"blocks.0.mlp.{p}_proj" for p in ("down", "gate", "up")]
    shared = [f"blocks.1.shared_expert.{p}_proj" for p in ("down", "gate", "up")]
    assert adapted == sorted(attention + dense_mlp + shared)
    trainable = {n for n, p in lora.base_model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable)


def test_moe_resume_is_exact(moe_setup, tmp_path):
    whole = tmp_path / "whole"
    end = train(_config(moe_setup, whole), progress=False)
    parts = tmp_path / "parts"
    train(_config(moe_setup, parts, save_every=4), progress=False)
    shutil.rmtree(parts / "checkpoints" / "step-0000008")
    (parts / "checkpoints" / "latest").write_text("step-0000004\n")
    resumed = train(_config(moe_setup, parts, save_every=4, resume=True), progress=False)
    assert _records(parts) == _records(whole)
    assert all(aux is not None for _, aux in _records(parts).values())
    _assert_same_weights(llada.load_model(resumed.checkpoint), llada.load_model(end.checkpoint))


def test_moe_lora_and_sft_fine_tune_a_checkpoint(moe_setup, tmp_path):
    pytest.importorskip("peft")
    base = train(_config(moe_setup, tmp_path / "base", max_steps=2), progress=False)
    lora = dict(model=str(base.checkpoint), model_config="", lora_rank=4, lora_alpha=8.0, lr=1e-2)
    whole = train(_config(moe_setup, tmp_path / "whole", max_steps=6, **lora), progress=False)
    merged, original = llada.load_model(whole.checkpoint), llada.load_model(base.checkpoint)
    assert isinstance(merged, LLaDAMoEModel)
    # The adapters cover the attention projections; experts, routers, embeddings stay frozen.
    assert not torch.equal(
        merged.blocks[0].attn.q_proj.weight, original.blocks[0].attn.q_proj.weight
    )
    for name in ("mlp.gate.weight", "mlp.gate_proj", "mlp.down_proj", "ff_norm.weight"):
        assert torch.equal(
            merged.blocks[1].get_parameter(name), original.blocks[1].get_parameter(name)
        ), name
    assert torch.equal(merged.embed.weight, original.embed.weight)
    parts = tmp_path / "parts"
    train(_config(moe_setup, parts, max_steps=6, save_every=3, **lora), progress=False)
    shutil.rmtree(parts / "checkpoints" / "step-0000006")
    (parts / "checkpoints" / "latest").write_text("step-0000003\n")
    resumed = train(
        _config(moe_setup, parts, max_steps=6, save_every=3, resume=True, **lora), progress=False
    )
    assert _records(parts) == _records(tmp_path / "whole")
    _assert_same_weights(llada.load_model(resumed.checkpoint), merged)

    # SFT of all weights on chat records, from the same MoE checkpoint.
    records = tmp_path / "sft.jsonl"
    with open(records, "w") as f:
        for a in range(24):
            messages = [
                {"role": "user", "content": f"What is {a} + 1?"},
                {"role": "assistant", "content": str(a + 1)},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    sft = train(
        _config(
            moe_setup,
            tmp_path / "sft",
            objective="sft",
            model=str(base.checkpoint),
            model_config="",
            data=str(records),
            val_data=str(records),
            max_steps=12,
            seq_len=64,
            eval_every=6,
            lr=1e-2,
        ),
        progress=False,
    )
    assert sft.val_history[-1]["val_loss"] < sft.val_history[0]["val_loss"]
    assert isinstance(llada.load_model(sft.checkpoint), LLaDAMoEModel)


# torchrun ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_moe_torchrun_follows_the_single_process_curve(moe_setup, tmp_path, parallel):
    """2 processes (gloo) at the same global batch as 1 process with 2x accumulation."""
    single = _config(moe_setup, tmp_path / "one", max_steps=6, grad_accum=2, eval_every=3)
    train(single, progress=False)
    config_file = tmp_path / "two.json"
    config_file.write_text(
        json.dumps(
            dict(single.to_dict(), out_dir=str(tmp_path / "two"), grad_accum=1, parallel=parallel)
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + ["-m", "llada.cli.main", "train", "--no-progress", "--config", str(config_file)],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-3)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    assert isinstance(llada.load_model(latest_checkpoint(tmp_path / "two")), LLaDAMoEModel)
