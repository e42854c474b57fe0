"""llada checkpoint folders in the real transformers: Auto classes, tokenizer, pipeline, and no
"run custom code? [y/N]" prompt (llada.hf, llada.generation_config, checkpoint.save_pretrained)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import llada  # noqa: E402
import llada.hf  # noqa: E402  (registers with transformers)
from llada import GenerateConfig, load_model, save_pretrained  # noqa: E402
from llada.generation_config import generation_defaults  # noqa: E402
from llada.tokenizer import train_tokenizer  # noqa: E402
from llada.tokens import MASK_TOKEN, MOE_MASK_TOKEN, resolve_special_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INSTRUCT = ROOT / "models" / "llada-tiny-instruct"
MOE = ROOT / "models" / "llada-tiny-moe-base"
LLADA2 = ROOT / "tests" / "data" / "reference" / "llada2-tiny"
SHIPPED = [INSTRUCT, ROOT / "models" / "llada-tiny-base", MOE]

# Loads each folder given on the command line with AutoTokenizer and AutoModel and prints one
# JSON line per folder. Run with stdin closed: an interactive prompt would read EOF.
_PROBE = r"""
import json, os, sys
if sys.argv[1] == "register":
    import llada.hf
from transformers import AutoModel, AutoTokenizer
for folder in sys.argv[2:]:
    row = {"folder": folder}
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        row["mask_token"] = AutoTokenizer.from_pretrained(folder).mask_token
    try:
        row["model"] = type(AutoModel.from_pretrained(folder)).__name__
    except ValueError as error:
        row["error"] = str(error)
    print(json.dumps(row), flush=True)
"""


def _probe(register: bool, folders: list[Path]) -> tuple[list[dict], str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "register" if register else "plain", *map(str, folders)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return rows, output


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    """The shipped instruct model saved again by llada, with its tokenizer."""
    folder = tmp_path_factory.mktemp("saved") / "llada-saved"
    save_pretrained(load_model(INSTRUCT), folder, copy_from=INSTRUCT)
    return folder


def test_import_llada_does_not_import_transformers():
    code = "import sys, llada; print('transformers' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    assert result.stdout.split() == ["False", "False"], result.stderr


def test_plain_transformers_never_prompts(saved_folder):
    # Without llada.hf: the tokenizer loads, the model is refused with transformers' own
    # error, and nothing asks whether to run custom code.
    rows, output = _probe(False, [*SHIPPED, saved_folder])
    assert "custom code" not in output
    assert [row["folder"] for row in rows] == [str(f) for f in [*SHIPPED, saved_folder]]
    for row in rows:
        assert row["mask_token"] in (MASK_TOKEN, MOE_MASK_TOKEN), row
        assert "llada" in row["error"], row


def test_registered_transformers_loads_without_prompting(saved_folder):
    rows, output = _probe(True, [*SHIPPED, saved_folder, LLADA2])
    assert "custom code" not in output
    models = [row.get("model") for row in rows]
    assert models == ["LLaDAForMaskedDiffusion"] * 4 + ["LLaDA2ForMaskedDiffusion"], output


@pytest.mark.parametrize("folder", [INSTRUCT, MOE, LLADA2], ids=lambda p: p.name)
@pytest.mark.parametrize("auto", ["AutoModel", "AutoModelForMaskedLM", "AutoModelForCausalLM"])
def test_auto_classes_return_the_llada_model(folder, auto):
    import transformers

    model = getattr(transformers, auto).from_pretrained(folder)
    native = load_model(folder)
    assert type(model.model) is type(native)
    assert model.special_tokens == native.special_tokens
    ids = (torch.arange(2 * 11).reshape(2, 11) * 5 + 7) % 200
    with torch.no_grad():
        assert torch.equal(model(ids).logits, native(ids).logits)


def test_from_pretrained_dtype_and_refusals():
    from transformers import AutoModel

    model = AutoModel.from_pretrained(INSTRUCT, dtype=torch.float32, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="device_map that splits"):
        AutoModel.from_pretrained(INSTRUCT, device_map={"model.embed": 0, "lm_head": 1})
    with pytest.raises(ValueError, match="quantization_config"):
        AutoModel.from_pretrained(INSTRUCT, quantization_config={"load_in_8bit": True})


def test_from_config_builds_the_same_architecture():
    from transformers import AutoConfig, AutoModel

    for folder in (INSTRUCT, MOE, LLADA2):
        fresh = AutoModel.from_config(AutoConfig.from_pretrained(folder))
        native = load_model(folder)
        shapes = {n: p.shape for n, p in fresh.model.named_parameters()}
        assert shapes == {n: p.shape for n, p in native.named_parameters()}, folder.name


@pytest.mark.parametrize("folder", SHIPPED, ids=lambda p: p.name)
def test_shipped_tokenizers_name_their_special_tokens(folder):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = load_model(folder).special_tokens
    assert tokenizer.mask_token_id == tokens.mask_id
    assert json.loads((folder / "config.json").read_text())["mask_token_id"] == tokens.mask_id
    assert tokenizer.bos_token_id == tokens.bos_id
    assert tokenizer.eos_token_id == tokens.eos_id
    assert tokenizer.pad_token_id == tokens.pad_id
    # Tokenization is the tokenizer.json's own, special tokens included.
    text = f"{tokenizer.bos_token}To be, or not{tokenizer.mask_token}{tokenizer.mask_token} to be."
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert ids.count(tokens.mask_id) == 2 and ids[0] == tokens.bos_id


@pytest.mark.parametrize(
    ("family", "mask"), [("llada-8b", MASK_TOKEN), ("llada-moe", MOE_MASK_TOKEN)]
)
def test_trained_tokenizer_names_its_mask_token(tmp_path, family, mask):
    from transformers import AutoTokenizer

    folder = train_tokenizer(["to be or not to be"] * 5, 300, tmp_path / family, family=family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens = resolve_special_tokens({}, folder, vocab_size=300)
    assert tokenizer.mask_token == mask
    assert tokenizer.mask_token_id == tokens.mask_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        tokens.bos_id,
        tokens.eos_id,
        tokens.pad_id,
    )


def test_generation_config_holds_the_sampler_settings(tmp_path):
    from transformers import AutoModel

    settings = GenerateConfig(steps=8, gen_length=16, block_length=8, temperature=0.5)
    folder = save_pretrained(
        load_model(INSTRUCT), tmp_path / "with-settings", copy_from=INSTRUCT, generation=settings
    )
    data = json.loads((folder / "generation_config.json").read_text())
    assert data["llada"] == dataclasses.asdict(settings)
    tokens = load_model(INSTRUCT).special_tokens
    assert (data["mask_token_id"], data["pad_token_id"]) == (tokens.mask_id, tokens.pad_id)
    assert generation_defaults(folder) == dataclasses.asdict(settings)
    assert llada.generation_defaults(INSTRUCT) == {}
    # Saving again without settings keeps them; through transformers too.
    resaved = save_pretrained(load_model(folder), tmp_path / "resaved", copy_from=folder)
    assert generation_defaults(resaved) == dataclasses.asdict(settings)
    model = AutoModel.from_pretrained(folder)
    assert model.generation_config.llada == dataclasses.asdict(settings)
    assert model.generation_config.max_new_tokens == 16
    model.save_pretrained(tmp_path / "from-transformers")
    assert generation_defaults(tmp_path / "from-transformers") == dataclasses.asdict(settings)
    reloaded = load_model(tmp_path / "from-transformers")
    for (name, a), (_, b) in zip(
        reloaded.named_parameters(), model.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bad_sampler_settings_are_refused_with_the_file_named(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    path = folder / "generation_config.json"
    path.write_text(json.dumps({"llada": {"stepz": 3}}))
    with pytest.raises(ValueError, match=r"generation_config\.json.*'stepz'"):
        generation_defaults(folder)
    path.write_text(json.dumps({"llada": {"gen_length": 10, "block_length": 20}}))
    with pytest.raises(ValueError, match=r"generation_config\.json.*block_length"):
        generation_defaults(folder)
    path.write_text(json.dumps({"llada": [1, 2]}))
    with pytest.raises(ValueError, match="must be an object"):
        generation_defaults(folder)


def test_pipeline_answers_as_llada_api_does(tmp_path):
    from transformers import pipeline

    from llada import api

    prompt = "Who are you?"
    generator = pipeline("text-generation", model=str(INSTRUCT))
    chat = generator([{"role": "user", "content": prompt}], max_new_tokens=32)
    answer = chat[0]["generated_text"][-1]["content"]
    model, tokenizer, _ = api.load(INSTRUCT)
    config = GenerateConfig(steps=32, gen_length=32, block_length=32)
    assert answer == api.generate_texts(model, tokenizer, [prompt], config)[0]

    # The folder's sampler settings are the pipeline's defaults.
    settings = GenerateConfig(steps=8, gen_length=16, block_length=8)
    folder = save_pretrained(load_model(MOE), tmp_path / "moe", copy_from=MOE, generation=settings)
    generator = pipeline("text-generation", model=str(folder))
    text = generator("To be, or not to be", return_full_text=False)[0]["generated_text"]
    moe, moe_tokenizer, _ = api.load(folder)
    want = api.generate_texts(moe, moe_tokenizer, ["To be, or not to be"], settings, chat=False)
    assert text == want[0]


def test_generate_refuses_left_to_right_settings():
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(MOE)
    ids = AutoTokenizer.from_pretrained(MOE)("To be", return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, num_beams=4)
    prompt, right_padded = torch.tensor([[10, 11, 1]]), torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(prompt, attention_mask=right_padded, max_new_tokens=4)
    out = model.generate(ids, max_new_tokens=8, steps=4, block_length=4)
    assert out.shape == (1, ids.shape[1] + 8)
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_registration_is_exported_and_idempotent():
    from transformers import AutoConfig

    llada.register_with_transformers()
    llada.hf.register_with_transformers()
    assert type(AutoConfig.from_pretrained(INSTRUCT)) is llada.hf.LLaDAHFConfig
