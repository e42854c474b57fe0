"""Official checkpoint folders: tensor names, loading, sharded and atomic saving, refusals."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import llada.model.checkpoint as checkpoint
from llada.model.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    from_hf,
    from_hf_name,
    load_model,
    save_pretrained,
    to_hf,
    to_hf_name,
)
from llada.model.config import LLaDAConfig
from llada.model.transformer import LLaDAModel

TINY = Path(__file__).resolve().parents[1] / "data" / "reference" / "tiny-gqa"
# A real tokenizer file, for tests that need one next to the tiny weights.
TOKENIZER_JSON = (
    Path(__file__).resolve().parents[2] / "models" / "llada-tiny-instruct" / "tokenizer.json"
).read_text(encoding="utf-8")


def tiny_config_json() -> dict:
    return json.loads((TINY / "config.json").read_text(encoding="utf-8"))


def copy_tiny(dest: Path) -> Path:
    """A writable copy of the (read-only) tiny checkpoint folder."""
    dest.mkdir(parents=True)
    for item in TINY.iterdir():
        shutil.copyfile(item, dest / item.name)
    return dest


def write_config(folder: Path, data: dict) -> None:
    (folder / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")


def logits_of(model: LLaDAModel) -> torch.Tensor:
    ids = torch.arange(0, 3 * 17).reshape(3, 17) * 7 % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny_model() -> LLaDAModel:
    return load_model(TINY)


# Names ---------------------------------------------------------------------------------------


def test_name_mapping_round_trips_the_official_names():
    state = load_file(TINY / SINGLE_FILE)
    assert len(state) == 21
    ours = from_hf(state)
    assert set(to_hf(ours)) == set(state)
    model = LLaDAModel(LLaDAConfig.from_hf_dict(tiny_config_json()))
    assert set(ours) == {name for name, _ in model.named_parameters()}
    for name in state:
        assert to_hf_name(from_hf_name(name)) == name
    assert (
        from_hf_name("model.transformer.blocks.1.ff_proj.weight") == "blocks.1.mlp.gate_proj.weight"
    )
    assert from_hf_name("model.transformer.ff_out.weight") == "lm_head.weight"


@pytest.mark.parametrize(
    "name",
    [
        "model.transformer.blocks.0.att_proj.weight",
        "model.transformer.blocks.0.q_proj.bias",
        "transformer.wte.weight",
        "model.transformer.wpe.weight",
        "lm_head.weight",
    ],
)
def test_unknown_official_names_are_refused(name):
    with pytest.raises(ValueError):
        from_hf_name(name)
    with pytest.raises(ValueError):
        from_hf({name: torch.zeros(1)})


def test_unknown_parameter_names_are_refused():
    with pytest.raises(ValueError):
        to_hf_name("blocks.0.attn.qkv.weight")
    with pytest.raises(ValueError):
        to_hf({"rope.inv_freq": torch.zeros(1)})


def test_8b_defaults_give_the_official_names_and_parameter_count():
    config = LLaDAConfig()
    with torch.device("meta"):
        model = LLaDAModel(config)
    names = [to_hf_name(name) for name, _ in model.named_parameters()]
    assert len(names) == len(set(names)) == 291
    total = sum(p.numel() for p in model.parameters())
    assert total == 8_015_581_184
    assert config.num_parameters() == total
    shapes = {to_hf_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["model.transformer.wte.weight"] == (126464, 4096)
    assert shapes["model.transformer.ff_out.weight"] == (126464, 4096)
    assert shapes["model.transformer.blocks.31.ff_proj.weight"] == (12288, 4096)
    assert shapes["model.transformer.blocks.31.ff_out.weight"] == (4096, 12288)
    assert list(model.buffers()) == []


# Loading -------------------------------------------------------------------------------------


def test_loaded_parameters_are_materialised_and_frozen(tiny_model):
    params = list(tiny_model.named_parameters())
    assert len(params) == 21
    for name, p in params:
        assert p.device.type == "cpu", name
        assert not p.is_meta, name
        assert p.requires_grad is False, name
        assert p.dtype == torch.float32, name
    assert not tiny_model.training
    assert torch.isfinite(logits_of(tiny_model)).all()


def test_special_tokens_come_from_config_json(tiny_model):
    data = tiny_config_json()
    tokens = tiny_model.special_tokens
    assert tokens.mask_id == data["mask_token_id"]
    assert tokens.eos_id == data["eos_token_id"]
    assert tokens.pad_id == data["pad_token_id"]


def test_load_with_dtype_casts(tiny_model):
    model = load_model(TINY, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(
        model.named_parameters(), tiny_model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b.to(torch.bfloat16)), name


# Saving --------------------------------------------------------------------------------------


def test_single_file_save_reloads_identically(tiny_model, tmp_path):
    out = save_pretrained(tiny_model, tmp_path / "single")
    assert (out / SINGLE_FILE).is_file()
    assert not (out / INDEX_FILE).exists()
    assert len(list(out.glob("*.safetensors"))) == 1
    reloaded = load_model(out)
    assert torch.equal(logits_of(reloaded), logits_of(tiny_model))
    # The file holds exactly the official names, as the original.
    assert set(load_file(out / SINGLE_FILE)) == set(load_file(TINY / SINGLE_FILE))


def test_sharded_save_writes_an_index_and_reloads_identically(tiny_model, tmp_path):
    out = save_pretrained(tiny_model, tmp_path / "sharded", max_shard_size="100KB")
    assert not (out / SINGLE_FILE).exists()
    index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(load_file(TINY / SINGLE_FILE))
    expected_total = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    assert index["metadata"]["total_size"] == expected_total
    for shard in shards:
        names = set(load_file(shard))
        assert names == {k for k, v in index["weight_map"].items() if v == shard.name}
    reloaded = load_model(out)
    assert torch.equal(logits_of(reloaded), logits_of(tiny_model))


def test_bf16_save_reloads_as_bf16(tiny_model, tmp_path):
    out = save_pretrained(tiny_model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = load_model(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    cast = load_model(TINY, dtype=torch.bfloat16)
    got, want = logits_of(reloaded), logits_of(cast)
    assert got.dtype == torch.bfloat16
    # Saving as bf16 rounds each weight exactly as casting on load does.
    for (name, a), (_, b) in zip(reloaded.named_parameters(), cast.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(got, want)
    full = logits_of(tiny_model)
    assert ((got.float() - full).norm() / full.norm()).item() < 0.05
    assert (got.float().argmax(-1) == full.argmax(-1)).float().mean().item() > 0.9


def test_saved_config_keeps_official_and_unknown_keys(tmp_path):
    folder = copy_tiny(tmp_path / "custom")
    data = tiny_config_json()
    data["my_custom_key"] = 7
    write_config(folder, data)
    model = load_model(folder)
    out = save_pretrained(model, tmp_path / "resaved")
    saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    # auto_map is written only with the remote-code files it names (see the next test).
    missing = set(tiny_config_json()) - set(saved)
    assert missing == {"auto_map"}, missing
    assert saved["my_custom_key"] == 7
    assert saved["model_type"] == "llada"
    assert saved["architectures"] == ["LLaDAModelLM"]
    for key, value in tiny_config_json().items():
        if key != "auto_map":
            assert saved[key] == value, key
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["eos_token_id"] == data["eos_token_id"]


def test_auto_map_is_written_only_with_the_remote_code_it_names(tmp_path):
    # Without configuration_llada.py and modeling_llada.py next to it, an auto_map makes
    # transformers ask "run custom code? [y/N]" on every load; with them, it is what lets the
    # official remote code load the folder.
    model = load_model(TINY)
    names = sorted({v.split(".")[0] for v in tiny_config_json()["auto_map"].values()})
    assert names == ["configuration_llada", "modeling_llada"]
    official = copy_tiny(tmp_path / "official")
    partial = copy_tiny(tmp_path / "partial")
    for name in names:
        (official / f"{name}.py").write_text("# official remote code\n", encoding="utf-8")
    (partial / "modeling_llada.py").write_text("# official remote code\n", encoding="utf-8")
    with_code = save_pretrained(model, tmp_path / "with-code", copy_from=official)
    saved = json.loads((with_code / "config.json").read_text(encoding="utf-8"))
    assert saved["auto_map"] == tiny_config_json()["auto_map"]
    half = save_pretrained(model, tmp_path / "half", copy_from=partial)
    assert "auto_map" not in json.loads((half / "config.json").read_text(encoding="utf-8"))
    # Resaving the folder over itself keeps the files, so the auto_map stays.
    again = save_pretrained(load_model(with_code), with_code)
    assert "auto_map" in json.loads((again / "config.json").read_text(encoding="utf-8"))


def test_saving_into_an_existing_folder_keeps_other_files(tiny_model, tmp_path):
    folder = copy_tiny(tmp_path / "existing")
    (folder / "tokenizer.json").write_text(TOKENIZER_JSON, encoding="utf-8")
    (folder / "modeling_llada.py").write_text("# official remote code\n", encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("keep me", encoding="utf-8")
    # Replace weights with a different model; the old single file must go away.
    changed = load_model(TINY)
    with torch.no_grad():
        changed.final_norm.weight.mul_(2.0)
    save_pretrained(changed, folder, max_shard_size="200KB")
    assert (folder / "tokenizer.json").read_text(encoding="utf-8") == TOKENIZER_JSON
    assert (folder / "modeling_llada.py").read_text(encoding="utf-8") == "# official remote code\n"
    assert (folder / "sub" / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert not (folder / SINGLE_FILE).exists()
    assert (folder / INDEX_FILE).is_file()
    reloaded = load_model(folder)
    assert torch.equal(logits_of(reloaded), logits_of(changed))
    assert not torch.equal(logits_of(reloaded), logits_of(tiny_model))
    # No leftovers next to the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_failed_save_leaves_the_old_folder_intact(tiny_model, tmp_path, monkeypatch):
    folder = save_pretrained(tiny_model, tmp_path / "good", max_shard_size="100KB")
    (folder / "tokenizer.json").write_text(TOKENIZER_JSON, encoding="utf-8")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    old_logits = logits_of(load_model(folder))

    changed = load_model(TINY)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(0.5)
    real_save_file = checkpoint.save_file
    calls = []

    def flaky_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", flaky_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(changed, folder, max_shard_size="100KB")
    assert len(calls) == 2
    after = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert after == before
    assert torch.equal(logits_of(load_model(folder)), old_logits)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "good"]
    assert leftovers == []
    assert not any(".saving-" in p.name for p in tmp_path.iterdir())


def test_saved_folder_permissions_follow_the_umask(tiny_model, tmp_path):
    # tempfile.mkdtemp makes the staging folder 0700 and safetensors writes files 0600; a saved
    # checkpoint must still be readable as an ordinary mkdir/open would make it.
    old_umask = os.umask(0o022)
    try:
        out = save_pretrained(tiny_model, tmp_path / "perms", max_shard_size="100KB")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name


# Safety and refusals -------------------------------------------------------------------------


class _OpensSentinel:
    """Unpickling this object would create a file: stands in for a malicious pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_code_in_the_folder_runs_on_load(tiny_model, tmp_path):
    folder = copy_tiny(tmp_path / "hostile")
    sentinel = tmp_path / "SENTINEL"
    code = f"open({str(sentinel)!r}, 'w').write('ran')\nraise RuntimeError('remote code ran')\n"
    for name in ("modeling_llada.py", "configuration_llada.py", "__init__.py"):
        (folder / name).write_text(code, encoding="utf-8")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_OpensSentinel(str(sentinel))))
    model = load_model(folder)
    assert not sentinel.exists()
    assert torch.equal(logits_of(model), logits_of(tiny_model))


def test_pickle_only_folder_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(TINY / "config.json", folder / "config.json")
    sentinel = tmp_path / "SENTINEL"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_OpensSentinel(str(sentinel))))
    with pytest.raises(ValueError, match="safetensors"):
        load_model(folder)
    assert not sentinel.exists()


def test_folder_without_config_is_refused(tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copyfile(TINY / SINGLE_FILE, folder / SINGLE_FILE)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_folder_without_weights_is_refused(tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copyfile(TINY / "config.json", folder / "config.json")
    with pytest.raises(FileNotFoundError):
        load_model(folder)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_safetensors_is_refused(tmp_path, keep_fraction):
    folder = copy_tiny(tmp_path / "truncated")
    data = (TINY / SINGLE_FILE).read_bytes()
    (folder / SINGLE_FILE).write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ValueError):
        load_model(folder)


def test_truncated_header_is_refused(tmp_path):
    folder = copy_tiny(tmp_path / "truncated-header")
    (folder / SINGLE_FILE).write_bytes((TINY / SINGLE_FILE).read_bytes()[:100])
    with pytest.raises(ValueError):
        load_model(folder)


def test_missing_shard_is_refused(tiny_model, tmp_path):
    folder = save_pretrained(tiny_model, tmp_path / "sharded", max_shard_size="100KB")
    sorted(folder.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_model(folder)


@pytest.mark.parametrize(
    "changes",
    [
        {"d_model": 128},
        {"n_layers": 1},
        {"n_layers": 3},
        {"mlp_hidden_size": 128},
        {"n_kv_heads": 4},
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, changes):
    folder = copy_tiny(tmp_path / "mismatch")
    write_config(folder, {**tiny_config_json(), **changes})
    with pytest.raises(ValueError):
        load_model(folder)


def test_unsupported_config_option_is_refused_by_name(tmp_path):
    folder = copy_tiny(tmp_path / "alibi")
    write_config(folder, {**tiny_config_json(), "alibi": True})
    with pytest.raises(ValueError, match="alibi"):
        load_model(folder)


def test_hub_id_offline_asks_for_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(tmp_path)
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        pass
    else:
        # The hub reads the variable at import time; an earlier import may have missed it.
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(FileNotFoundError) as info:
        load_model("llada-tests-nonexistent/no-such-model")
    message = str(info.value)
    assert "pass its path" in message
    assert "/path/to/no-such-model" in message


@pytest.mark.parametrize(
    "config",
    [
        LLaDAConfig.from_hf_dict(tiny_config_json()),
        LLaDAConfig(),
        LLaDAConfig(d_model=64, n_heads=4, n_kv_heads=1, n_layers=3, weight_tying=True),
    ],
    ids=["tiny-gqa", "8b", "mqa-tied"],
)
def test_expected_tensors_are_the_models_without_building_it(config):
    with torch.device("meta"):
        model = LLaDAModel(config)
    built = {to_hf_name(name): tuple(p.shape) for name, p in model.named_parameters()}
    assert checkpoint.expected_tensors(config) == built


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"d_model": "64"}, "d_model"),
        ({"n_layers": 2_000_000}, "n_layers"),
        ({"n_heads": 4.0}, "n_heads"),
        ({"rope_theta": "big"}, "rope_theta"),
        ({"weight_tying": 1}, "weight_tying"),
        ({"pad_token_id": -1}, "pad_token_id"),
    ],
)
def test_config_types_and_bounds_are_checked_by_key(changes, key):
    with pytest.raises(ValueError, match=key) as info:
        LLaDAConfig.from_hf_dict({**tiny_config_json(), **changes})
    assert "\n" not in str(info.value)


def test_header_is_read_without_the_data(tmp_path):
    header, data_start = checkpoint.read_safetensors_header(TINY / SINGLE_FILE)
    assert len(header) == 21
    assert data_start > 8
    # A header alone, whose tensors lie past the end of the file, is refused.
    path = tmp_path / "header-only.safetensors"
    data = (TINY / SINGLE_FILE).read_bytes()
    path.write_bytes(data[:data_start])
    with pytest.raises(checkpoint.CheckpointError, match="beyond the end of the file"):
        checkpoint.read_safetensors_header(path)
