"""LoRA checkpoints in peft's format: the real peft loads them onto the base model and gives
the trained model; `llada export --merge` merges them through peft."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import train_config

import llada
from llada.cli.main import main
from llada.train.loop import Trainer, train

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base_checkpoint(training_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-base")
    return train(train_config(training_setup, out / "run", max_steps=4), progress=False).checkpoint


def _lora_trainer(training_setup, base, out, **changes) -> Trainer:
    config = train_config(
        training_setup,
        out,
        model=str(base),
        model_config="",
        lora_rank=4,
        lora_alpha=8.0,
        lr=1e-2,
        max_steps=6,
        **changes,
    )
    return Trainer(config)


def test_peft_loads_the_adapters_of_a_checkpoint_onto_the_base(
    training_setup, base_checkpoint, tmp_path
):
    trainer = _lora_trainer(training_setup, base_checkpoint, tmp_path / "run")
    for _ in range(6):
        trainer.train_step()
    folder = trainer.save()
    assert folder.name == "step-0000006"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json"):
        assert (folder / name).is_file(), name
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["r"] == 4 and settings["lora_alpha"] == 8
    assert settings["base_model_name_or_path"] == str(base_checkpoint.resolve())

    tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = trainer.base_model.eval()
    with torch.no_grad():
        expected = trained(tokens).logits
        loaded = peft.PeftModel.from_pretrained(llada.load_model(base_checkpoint), str(folder))
        got = loaded(tokens).logits
        base_logits = llada.load_model(base_checkpoint)(tokens).logits
        merged = llada.load_model(folder)(tokens).logits  # the official folder, merged weights
    # The adapters moved the model away from its base, and peft reproduces the trained model.
    assert not torch.allclose(base_logits, expected, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_export_merge_merges_through_peft(training_setup, base_checkpoint, tmp_path, capsys):
    run = tmp_path / "run"
    train(
        train_config(
            training_setup,
            run,
            model=str(base_checkpoint),
            model_config="",
            lora_rank=4,
            lora_alpha=8.0,
            lr=1e-2,
            max_steps=3,
        ),
        progress=False,
    )
    checkpoint = run / "checkpoints" / "step-0000003"
    assert main(["export", str(run), str(tmp_path / "merged"), "--merge"]) == 0
    exported = llada.load_model(tmp_path / "merged")
    in_checkpoint = llada.load_model(checkpoint)  # merged by llada.train.lora
    base = llada.load_model(base_checkpoint)
    changed = 0
    for name, tensor in in_checkpoint.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, rtol=1e-6, atol=1e-6)
        changed += not torch.equal(tensor, base.state_dict()[name])
    assert changed >= 2 * 7  # the 7 linear layers of each of the 2 blocks
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    llada.load_tokenizer(tmp_path / "merged")

    # The adapter is what gets merged: onto another base (here the merged checkpoint itself)
    # it adds the same B A * alpha / r once more.
    assert main(["export", str(checkpoint), str(tmp_path / "m2"), "--merge", "--base",
                 str(checkpoint)]) == 0  # fmt: skip
    twice = llada.load_model(tmp_path / "m2").state_dict()
    for name, tensor in in_checkpoint.state_dict().items():
        delta = tensor - base.state_dict()[name]
        torch.testing.assert_close(twice[name], tensor + delta, rtol=1e-5, atol=1e-6)
    # A checkpoint without an adapter is refused in one line.
    capsys.readouterr()
    assert main(["export", str(base_checkpoint), str(tmp_path / "m3"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "holds no LoRA adapter (adapter_config.json)" in err and "without --merge" in err
