"""`llada train` on LLaDA 2.x: the block-diffusion loss (inclusionAI/dFactory,
tasks/train_llada2_bd.py) against per-block forwards, the SFT prompt, gradients into the MoE,
and the command end to end (learning, checkpoint, exact resume, a new model from its config)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import llada
from conftest import REFERENCE
from llada.cli.main import main
from llada.diffusion import PRETRAIN_EPS
from llada.losses import block_diffusion_loss, pretraining_loss, sft_loss
from llada.model.llada2 import LLaDA2Config, LLaDA2Model, block_attention_mask
from llada.train.config import TrainConfig
from llada.train.loop import Trainer, dropout_note, read_metrics


@pytest.fixture(scope="module")
def model(llada2_chat_checkpoint) -> LLaDA2Model:
    return llada.load_model(llada2_chat_checkpoint, dtype=torch.float32).eval()


def _tokens(model, shape, seed):
    """Random ids of the vocabulary, never the mask id."""
    mask_id = model.special_tokens.mask_id
    x0 = torch.randint(
        0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed)
    )
    return torch.where(x0 == mask_id, (mask_id + 1) % model.config.vocab_size, x0)


def _per_block_loss(model, x0, block, seed, prompt_lengths=None):
    """The block-diffusion loss by its definition: for every block b, one inference-style forward
    over [clean blocks before b ; noisy block b] under the samplers' block mask, Σ CE / p_mask on
    the masked tokens of block b; the masking drawn as `llada.diffusion.random_masking` draws it
    (t per row, then one uniform per token)."""
    batch, length = x0.shape
    mask_id = model.special_tokens.mask_id
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=generator)
    p_mask = (1 - PRETRAIN_EPS) * t + PRETRAIN_EPS  # (B,)
    is_masked = torch.rand(batch, length, generator=generator) < p_mask[:, None]
    if prompt_lengths is not None:
        is_masked &= torch.arange(length)[None, :] >= prompt_lengths[:, None]
    noisy = torch.where(is_masked, mask_id, x0)
    total = torch.zeros(())
    for row in range(batch):
        row_total = torch.zeros(())
        for start in range(0, length, block):
            end = min(start + block, length)
            window = torch.cat([x0[row, :start], noisy[row, start:end]])[None]
            logits = model(window, block_attention_mask(end, block)).logits[0, start:]
            chosen = is_masked[row, start:end]
            ce = F.cross_entropy(logits[chosen], x0[row, start:end][chosen], reduction="none")
            row_total = row_total + (ce / p_mask[row]).sum()
        if prompt_lengths is None:
            total = total + row_total / (batch * length)
        else:
            total = total + row_total / (length - prompt_lengths[row]) / batch
    return total, int(is_masked.sum())


@pytest.mark.parametrize("prompt_lengths", [None, torch.tensor([3, 9])])
def test_one_forward_on_both_halves_is_the_sum_of_per_block_losses(model, prompt_lengths):
    x0 = _tokens(model, (2, 14), seed=0)  # 14 = 3 blocks of 4 and a partial one of 2
    out = block_diffusion_loss(
        model,
        x0,
        model.special_tokens.mask_id,
        block_length=4,
        prompt_lengths=prompt_lengths,
        generator=torch.Generator().manual_seed(5),
    )
    expected, masked = _per_block_loss(model, x0, 4, seed=5, prompt_lengths=prompt_lengths)
    assert masked > 0
    assert out.num_targets == masked
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_one_block_is_the_whole_sequence_loss(model):
    """A block as long as the sequence: the noisy half sees only itself, bidirectionally, so the
    loss is LLaDA's (pretraining_loss, sft_loss) on the same draws; a shorter block differs."""
    x0 = _tokens(model, (2, 12), seed=1)
    mask_id = model.special_tokens.mask_id
    prompts = torch.tensor([2, 5])

    def draws():
        return torch.Generator().manual_seed(9)

    whole = block_diffusion_loss(model, x0, mask_id, block_length=12, generator=draws())
    torch.testing.assert_close(
        whole.loss, pretraining_loss(model, x0, mask_id, generator=draws()).loss
    )
    whole_sft = block_diffusion_loss(
        model, x0, mask_id, block_length=16, prompt_lengths=prompts, generator=draws()
    )
    torch.testing.assert_close(
        whole_sft.loss, sft_loss(model, x0, prompts, mask_id, generator=draws()).loss
    )
    blocks = block_diffusion_loss(model, x0, mask_id, block_length=3, generator=draws())
    assert blocks.num_targets == whole.num_targets
    assert abs(blocks.loss.item() - whole.loss.item()) > 1e-3


def test_the_prompt_is_never_noised_and_only_noisy_answer_positions_are_read(model):
    x0 = _tokens(model, (3, 16), seed=2)
    prompt_lengths = torch.tensor([4, 11, 15])
    mask_id = model.special_tokens.mask_id
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, attention_mask=None, positions=None, logits_at=None):
            seen.update(x=x, positions=positions, at=logits_at)
            return model(x, attention_mask, positions=positions, logits_at=logits_at)

    for seed in range(5):
        block_diffusion_loss(
            Spy(),
            x0,
            mask_id,
            block_length=4,
            prompt_lengths=prompt_lengths,
            generator=torch.Generator().manual_seed(seed),
        )
        x = seen["x"]
        assert x.shape == (3, 32)
        assert torch.equal(x[:, 16:], x0)  # the clean half
        read = torch.zeros(x.numel(), dtype=torch.bool)
        read[seen["at"]] = True
        read = read.view(x.shape)
        assert not read[:, 16:].any()
        for row, prompt in enumerate(prompt_lengths.tolist()):
            assert torch.equal(x[row, :prompt], x0[row, :prompt])
            assert not read[row, :prompt].any()
        # Read exactly where the noisy half holds the mask token.
        assert torch.equal(read[:, :16], x[:, :16] == mask_id)
        assert torch.equal(seen["positions"], torch.arange(16).repeat(2))


def test_gradients_reach_the_routers_and_the_experts(llada2_chat_checkpoint):
    model = llada.load_model(llada2_chat_checkpoint, dtype=torch.float32).train()
    model.requires_grad_(True)  # load_model gives an inference model
    x0 = _tokens(model, (2, 16), seed=3)
    out = block_diffusion_loss(
        model,
        x0,
        model.special_tokens.mask_id,
        block_length=4,
        generator=torch.Generator().manual_seed(1),
    )
    out.loss.backward()
    moe = model.blocks[1].mlp
    for name, parameter in [
        ("router", moe.gate.weight),
        ("experts gate_proj", moe.gate_proj),
        ("experts down_proj", moe.down_proj),
        ("shared experts", moe.shared_experts.down_proj.weight),
        ("dense layer", model.blocks[0].mlp.down_proj.weight),
        ("attention", model.blocks[1].attn.qkv_proj.weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Every expert some token chose gets a gradient (32 tokens x top-2 of 4 experts).
    assert (moe.gate_proj.grad.flatten(1).abs().sum(1) > 0).sum() >= 2


def test_lora_covers_the_fused_attention_projection(llada2_chat_checkpoint):
    pytest.importorskip("peft")
    from llada.train.lora import add_lora

    model = add_lora(llada.load_model(llada2_chat_checkpoint, dtype=torch.float32), 4, 8.0)
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n}
    assert "blocks.1.attn.qkv_proj" in adapted and "blocks.1.attn.o_proj" in adapted
    assert "blocks.1.mlp.shared_experts.down_proj" in adapted
    assert not any(".mlp.gate" in n and "gate_proj" not in n for n in adapted)  # routers frozen


# The trainer and the command ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_records(tmp_path_factory):
    """Four chat records: with batch_size 4, every step sees the same batch."""
    path = tmp_path_factory.mktemp("llada2-sft") / "sft.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for a in range(4):
            messages = [
                {"role": "user", "content": f"What is {a} + 1?"},
                {"role": "assistant", "content": f"The answer is {a + 1}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def _sft_args(checkpoint, records, out_dir, *extra):
    return [
        "train",
        "--no-progress",
        "--objective", "sft",
        "--model", str(checkpoint),
        "--data", str(records),
        "--out-dir", str(out_dir),
        "--seq-len", "96",
        "--batch-size", "4",
        "--lr", "3e-3",
        "--warmup-steps", "2",
        "--schedule", "constant",
        "--eval-every", "0",
        "--save-every", "0",
        "--log-every", "1",
        "--block-length", "8",
        *extra,
    ]  # fmt: skip


def test_llada_train_sft_learns_saves_and_resumes(llada2_chat_checkpoint, sft_records, tmp_path):
    run = tmp_path / "run"
    args = _sft_args(llada2_chat_checkpoint, sft_records, run, "--max-steps", "40")
    assert main([*args, "--val-data", str(sft_records), "--eval-every", "40"]) == 0
    records = read_metrics(run)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    # The validation (fixed masks, the same block-diffusion loss) agrees with training's end.
    (validation,) = [r["val_loss"] for r in records if "val_loss" in r]
    assert validation < 0.6 * first, (first, validation)
    model = llada.load_model(run / "checkpoints" / "step-0000040")
    assert isinstance(model, LLaDA2Model)
    trained = dict(model.named_parameters())
    start = dict(llada.load_model(llada2_chat_checkpoint).named_parameters())
    assert not torch.equal(trained["blocks.1.mlp.gate.weight"], start["blocks.1.mlp.gate.weight"])

    # Exact resume: 6 steps at once, or 3 + 3 from a checkpoint.
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(_sft_args(llada2_chat_checkpoint, sft_records, whole, "--max-steps", "6")) == 0
    split = _sft_args(llada2_chat_checkpoint, sft_records, parts, "--max-steps", "6")
    assert main([*split, "--save-every", "3"]) == 0
    shutil.rmtree(parts / "checkpoints" / "step-0000006")
    (parts / "checkpoints" / "latest").write_text("step-0000003\n")
    assert main([*split, "--save-every", "3", "--resume"]) == 0
    assert [r["loss"] for r in read_metrics(parts)] == [r["loss"] for r in read_metrics(whole)]


def test_the_trainer_picks_block_diffusion_for_llada2_only(
    llada2_chat_checkpoint, sft_records, training_setup, tmp_path
):
    settings = dict(
        objective="sft",
        data=str(sft_records),
        seq_len=96,
        batch_size=4,
        max_steps=1,
        eval_every=0,
    )
    trainer = Trainer(
        TrainConfig(model=str(llada2_chat_checkpoint), out_dir=str(tmp_path / "a"), **settings)
    )
    assert trainer.block_length == 32  # the family's default (dFactory's block_size)
    batch = trainer.train_data.batch([0, 1, 2, 3])
    out = trainer._loss(batch, torch.Generator().manual_seed(4), None)
    expected = block_diffusion_loss(
        trainer.base_model,
        batch["input_ids"],
        trainer.special_tokens.mask_id,
        block_length=32,
        prompt_lengths=batch["prompt_lengths"],
        generator=torch.Generator().manual_seed(4),
    )
    torch.testing.assert_close(out.loss, expected.loss)
    # A dense model keeps its objective and refuses the flag.
    dense = dict(
        model_config=str(training_setup["model_config"]),
        tokenizer=str(training_setup["tokenizer"]),
        data=str(training_setup["tokens"]),
        seq_len=32,
        batch_size=2,
        max_steps=1,
        eval_every=0,
    )
    assert Trainer(TrainConfig(out_dir=str(tmp_path / "d"), **dense)).block_length is None
    with pytest.raises(ValueError, match="--block-length 8: a LLaDA model trains on the whole"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "e"), block_length=8, **dense))
    with pytest.raises(ValueError, match="LLaDA 2.x has no router load-balancing loss"):
        Trainer(
            TrainConfig(
                model=str(llada2_chat_checkpoint),
                out_dir=str(tmp_path / "f"),
                router_aux_loss="on",
                **settings,
            )
        )
    with pytest.raises(ValueError, match="block_length must be a positive integer"):
        TrainConfig(model="m", data="d", block_length=0)


def test_the_dropout_note_names_only_the_dropout_llada2_applies():
    raw = json.loads((REFERENCE / "llada2-tiny" / "config.json").read_text(encoding="utf-8"))
    given = {k: v for k, v in raw.items() if not k.endswith("_dropout")}
    # The reference class's defaults: 0.1 for all three keys; its code applies the attention's.
    config = LLaDA2Config.from_hf_dict(given)
    assert config.embedding_dropout == 0.1
    assert dropout_note(config, given) == (
        "dropout: attention 0.1 (the reference config's defaults for the keys the model config "
        "leaves out; set attention_dropout to 0 in it to disable)"
    )
    assert dropout_note(LLaDA2Config.from_hf_dict(raw), raw) is None


def test_a_new_llada2_model_from_its_config_pretrains(llada2_chat_checkpoint, tmp_path, capsys):
    from llada.tokenizer import load_tokenizer
    from llada.train.data import write_token_file

    tokenizer = load_tokenizer(llada2_chat_checkpoint)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = [f"The cat sat on the mat number {i}.\n" for i in range(60)]
    tokens = write_token_file(texts, tokenizer, tmp_path / "corpus", eos_id=eos)
    raw = json.loads((REFERENCE / "llada2-tiny" / "config.json").read_text(encoding="utf-8"))
    # The vocabulary and the special ids come from the tokenizer.
    config = {k: v for k, v in raw.items() if k not in ("vocab_size", "pad_token_id")}
    config["num_hidden_layers"] = 2
    (tmp_path / "model.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    args = [
        "train", "--no-progress",
        "--model-config", str(tmp_path / "model.json"),
        "--tokenizer", str(llada2_chat_checkpoint),
        "--data", str(tokens),
        "--out-dir", str(run),
        "--seq-len", "32", "--batch-size", "4", "--max-steps", "3",
        "--eval-every", "0", "--val-fraction", "0", "--log-every", "1",
    ]  # fmt: skip
    assert main(args) == 0
    assert "objective: block diffusion (LLaDA 2.x), block length 32" in capsys.readouterr().out
    model = llada.load_model(run / "checkpoints" / "step-0000003")
    assert isinstance(model, LLaDA2Model)
    assert model.config.vocab_size == len(tokenizer)
    assert len(read_metrics(run)) == 3


@pytest.mark.slow
def test_fsdp_under_torchrun_follows_the_single_process_curve(llada2_chat_checkpoint, tmp_path):
    """2 processes (gloo, FSDP) at the same global batch as 1 process with 2x accumulation."""
    import os
    import subprocess
    import sys

    from llada.tokenizer import load_tokenizer
    from llada.train.data import write_token_file
    from llada.train.loop import train

    tokenizer = load_tokenizer(llada2_chat_checkpoint)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = [f"The cat sat on the mat number {i}.\n" for i in range(60)]
    tokens = write_token_file(texts, tokenizer, tmp_path / "corpus", eos_id=eos)
    raw = json.loads((REFERENCE / "llada2-tiny" / "config.json").read_text(encoding="utf-8"))
    config = {k: v for k, v in raw.items() if k not in ("vocab_size", "pad_token_id")}
    (tmp_path / "model.json").write_text(json.dumps(config | {"num_hidden_layers": 2}))
    single = TrainConfig(
        model_config=str(tmp_path / "model.json"),
        tokenizer=str(llada2_chat_checkpoint),
        data=str(tokens),
        out_dir=str(tmp_path / "one"),
        seq_len=32,
        batch_size=4,
        grad_accum=2,
        max_steps=4,
        warmup_steps=1,
        eval_every=0,
        val_fraction=0.0,
        save_every=0,
        log_every=1,
        block_length=8,
    )
    train(single, progress=False)
    config_file = tmp_path / "two.json"
    two = dict(single.to_dict(), out_dir=str(tmp_path / "two"), grad_accum=1, parallel="fsdp")
    config_file.write_text(json.dumps(two))
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
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
