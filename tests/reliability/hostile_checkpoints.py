"""Hostile and broken checkpoint folders, each built from a copy of the shipped instruct model.

Every case is one thing a corrupt download, a hand edit or a malicious upload can do to a
folder. `build(case, root)` writes the folder; `case.culprit` is the file that the error
message must name. Used by tests/reliability/test_checkpoints.py.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "llada-tiny-instruct"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class Case:
    name: str
    culprit: str  # a file name (or path fragment) the error message must contain
    edit: Callable[[Path], None]


def build(case: Case, root: Path) -> Path:
    """A copy of the shipped model under `root`, broken as `case` says."""
    folder = root / case.name
    shutil.copytree(SHIPPED, folder)
    case.edit(folder)
    return folder


# Helpers ---------------------------------------------------------------------------------------


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def set_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = _config(folder)
        for key, value in changes.items():
            if value is _DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        (folder / "config.json").write_text(json.dumps(data), encoding="utf-8")

    return edit


_DELETE = object()


def write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return edit


def _read_header(folder: Path) -> tuple[dict, bytes]:
    data = (folder / WEIGHTS).read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _write_header(folder: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode("utf-8")
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the safetensors header (same data section)."""

    def edit(folder: Path) -> None:
        header, body = _read_header(folder)
        change(header)
        _write_header(folder, header, body)

    return edit


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    """Rewrite the weights as a valid safetensors file with other tensors."""

    def edit(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        change(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return edit


def set_template(template: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "tokenizer_config.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        data["chat_template"] = template
        path.write_text(json.dumps(data), encoding="utf-8")

    return edit


def _mask_id_in_tokenizer(new_id: int) -> Callable[[Path], None]:
    """config.json without mask_token_id; the tokenizer files give the mask an id beyond the
    vocabulary."""

    def edit(folder: Path) -> None:
        set_config(mask_token_id=_DELETE)(folder)
        path = folder / "tokenizer.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        for entry in data["added_tokens"]:
            if entry["content"] == "<|mdm_mask|>":
                entry["id"] = new_id
        path.write_text(json.dumps(data), encoding="utf-8")

    return edit


BLOCK0 = "model.transformer.blocks.0"
NESTED_LOOPS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
    "{% endfor %}{% endfor %}{% endfor %}{{ bos_token }}"
)


def _set(header: dict, name: str, key: str, value) -> None:
    header[name][key] = value


def _overlap(header: dict) -> None:
    header[f"{BLOCK0}.attn_norm.weight"]["data_offsets"] = list(
        header["model.transformer.blocks.1.attn_norm.weight"]["data_offsets"]
    )


def _as_int64(tensors: dict) -> None:
    name = "model.transformer.ln_f.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int64)


def _drop(tensors: dict) -> None:
    del tensors["model.transformer.ln_f.weight"]


def _extra(tensors: dict) -> None:
    tensors["model.transformer.ln_f.bias"] = torch.zeros(256, dtype=torch.bfloat16)


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


CASES: list[Case] = [
    # config.json
    Case("config-not-json", "config.json", write("config.json", "{ this is not json")),
    Case("config-empty", "config.json", write("config.json", "")),
    Case("config-a-list", "config.json", write("config.json", "[1, 2, 3]")),
    Case("config-not-utf8", "config.json", write("config.json", b'{"d_model": "\xff\xfe"}')),
    Case("d-model-a-string", "config.json", set_config(d_model="256")),
    Case("two-million-layers", "config.json", set_config(n_layers=2_000_000)),
    Case("negative-layers", "config.json", set_config(n_layers=-1)),
    Case("zero-heads", "config.json", set_config(n_heads=0)),
    Case("heads-do-not-divide", "config.json", set_config(d_model=250)),
    Case("float-heads", "config.json", set_config(n_heads=4.5)),
    Case(
        "terabyte-vocabulary",
        "config.json",
        set_config(vocab_size=10**12, embedding_size=10**12),
    ),
    Case("weight-tying-a-string", "config.json", set_config(weight_tying="false")),
    Case("negative-norm-eps", "config.json", set_config(rms_norm_eps=-1.0)),
    Case("nan-rope-theta", "config.json", set_config(rope_theta=float("nan"))),
    Case("mask-id-out-of-vocab", "config.json", set_config(mask_token_id=5000)),
    Case("negative-eos-id", "config.json", set_config(eos_token_id=-5)),
    Case("mask-id-a-string", "config.json", set_config(mask_token_id="2")),
    Case("fewer-layers-than-weights", "model.safetensors", set_config(n_layers=4)),
    Case("more-layers-than-weights", "config.json", set_config(n_layers=12)),
    Case("wider-than-weights", "model.safetensors", set_config(d_model=512)),
    # model.safetensors
    Case("weights-4-bytes", "model.safetensors", write(WEIGHTS, b"\x01\x02\x03\x04")),
    Case("weights-empty", "model.safetensors", write(WEIGHTS, b"")),
    Case(
        "header-longer-than-file",
        "model.safetensors",
        write(WEIGHTS, struct.pack("<Q", 2**40) + b"{}"),
    ),
    Case(
        "header-not-json",
        "model.safetensors",
        write(WEIGHTS, struct.pack("<Q", 12) + b"not a header"),
    ),
    Case("header-a-list", "model.safetensors", write(WEIGHTS, struct.pack("<Q", 2) + b"[]")),
    Case(
        "header-deeply-nested",
        "model.safetensors",
        write(WEIGHTS, struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000),
    ),
    Case(
        "negative-shape",
        "model.safetensors",
        edit_header(lambda h: _set(h, f"{BLOCK0}.attn_norm.weight", "shape", [-256])),
    ),
    Case(
        "four-terabyte-shape",
        "model.safetensors",
        edit_header(
            lambda h: (
                _set(h, "model.transformer.wte.weight", "shape", [2**20, 2**20]),
                _set(h, "model.transformer.wte.weight", "data_offsets", [0, 2**41]),
            )
        ),
    ),
    Case(
        "unknown-dtype",
        "model.safetensors",
        edit_header(lambda h: _set(h, f"{BLOCK0}.attn_norm.weight", "dtype", "Q4_K")),
    ),
    Case("overlapping-tensors", "model.safetensors", edit_header(_overlap)),
    Case("int64-weights", "model.safetensors", edit_tensors(_as_int64)),
    Case("truncated-weights", "model.safetensors", _truncate),
    Case("missing-tensor", "model.safetensors", edit_tensors(_drop)),
    Case("unknown-tensor", "model.safetensors", edit_tensors(_extra)),
    Case(
        "index-not-json",
        "model.safetensors.index.json",
        write("model.safetensors.index.json", "weight_map: everything"),
    ),
    Case(
        "index-path-traversal",
        "model.safetensors.index.json",
        write(
            "model.safetensors.index.json",
            json.dumps({"weight_map": {"model.transformer.wte.weight": "../../../etc/passwd"}}),
        ),
    ),
    # tokenizer files and the chat template
    Case("tokenizer-json-garbage", "tokenizer.json", write("tokenizer.json", "garbage \x00")),
    Case("tokenizer-json-not-a-tokenizer", "tokenizer.json", write("tokenizer.json", '{"a": 5}')),
    Case(
        "tokenizer-config-garbage",
        "tokenizer_config.json",
        write("tokenizer_config.json", "{{{"),
    ),
    Case(
        "tokenizer-config-a-list",
        "tokenizer_config.json",
        write("tokenizer_config.json", "[]"),
    ),
    Case(
        "special-tokens-map-garbage",
        "special_tokens_map.json",
        write("special_tokens_map.json", "\x00\x01"),
    ),
    Case("tokenizer-mask-out-of-vocab", "tokenizer", _mask_id_in_tokenizer(99_999)),
    Case("template-nested-loops", "tokenizer_config.json", set_template(NESTED_LOOPS)),
    Case("template-syntax-error", "tokenizer_config.json", set_template("{% for %}")),
    Case(
        "template-sandbox-escape",
        "tokenizer_config.json",
        set_template("{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ),
    Case(
        "template-huge-repeat",
        "tokenizer_config.json",
        set_template("{{ 'x' * 10000000000 }}"),
    ),
    Case("template-huge-power", "tokenizer_config.json", set_template("{{ 10 ** 1000000000 }}")),
    Case(
        "template-file-loops",
        "chat_template.jinja",
        write(
            "chat_template.jinja",
            "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{{ a }}{% endfor %}"
            "{% endfor %}",
        ),
    ),
]
