"""Official LLaDA checkpoint folders: tensor names, streaming load, sharded atomic save.

A folder is config.json + `model.safetensors` (or shards listed in
`model.safetensors.index.json`) + tokenizer files. Loading builds the model on the meta device
and reads one tensor at a time straight from the file into its final place, so peak memory
stays close to the checkpoint's size. Nothing in the folder is executed or unpickled: Python
files (the official `modeling_llada.py`) are ignored, and only safetensors and JSON are read.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..tokens import resolve_special_tokens
from .config import LLaDAConfig
from .transformer import AttentionImplementation, LLaDAModel

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Official name (SPEC §2.2) <-> our parameter name. `{}` is the block index.
_BLOCK_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "q_proj.weight": "attn.q_proj.weight",
    "k_proj.weight": "attn.k_proj.weight",
    "v_proj.weight": "attn.v_proj.weight",
    "attn_out.weight": "attn.o_proj.weight",
    "ff_norm.weight": "ff_norm.weight",
    "ff_proj.weight": "mlp.gate_proj.weight",  # the official "ff_proj" is the SiLU gate
    "up_proj.weight": "mlp.up_proj.weight",
    "ff_out.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "model.transformer.wte.weight": "embed.weight",
    "model.transformer.ln_f.weight": "final_norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
}
_BLOCK_PATTERN = re.compile(r"^model\.transformer\.blocks\.(\d+)\.(.+)$")
_OUR_BLOCK_PATTERN = re.compile(r"^blocks\.(\d+)\.(.+)$")
_OUR_TO_HF_BLOCK = {ours: theirs for theirs, ours in _BLOCK_NAMES.items()}
_OUR_TO_HF_TOP = {ours: theirs for theirs, ours in _TOP_NAMES.items()}

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def from_hf_name(name: str) -> str:
    """Official tensor name -> our parameter name. Raises ValueError for unknown names."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _BLOCK_PATTERN.match(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise ValueError(f"unexpected tensor '{name}' in a dense LLaDA checkpoint")


def to_hf_name(name: str) -> str:
    """Our parameter name -> official tensor name."""
    if name in _OUR_TO_HF_TOP:
        return _OUR_TO_HF_TOP[name]
    match = _OUR_BLOCK_PATTERN.match(name)
    if match and match.group(2) in _OUR_TO_HF_BLOCK:
        return f"model.transformer.blocks.{match.group(1)}.{_OUR_TO_HF_BLOCK[match.group(2)]}"
    raise ValueError(f"parameter '{name}' has no official checkpoint name")


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {from_hf_name(k): v for k, v in state_dict.items()}


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state_dict.items()}


# Reading ---------------------------------------------------------------------------------------


def _read_header(handle) -> tuple[dict, int]:
    """The JSON header of an open safetensors file, and the byte offset where data starts."""
    size_bytes = handle.read(8)
    if len(size_bytes) != 8:
        raise ValueError(f"{handle.name} is not a safetensors file (too short)")
    header_size = int.from_bytes(size_bytes, "little")
    if header_size > 100_000_000:
        raise ValueError(f"{handle.name} is not a safetensors file (header size {header_size})")
    header = json.loads(handle.read(header_size))
    header.pop("__metadata__", None)
    return header, 8 + header_size


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from a safetensors file, one tensor in memory at a time.

    Reads with plain file reads instead of a memory map, so pages of the file never count
    towards the process's resident memory: loading an N-byte checkpoint peaks near N bytes.
    """
    with open(path, "rb") as handle:
        header, data_start = _read_header(handle)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtype)
            if end - begin != tensor.numel() * tensor.element_size():
                raise ValueError(
                    f"{path}: tensor '{name}' has a size that does not match its shape"
                )
            if end > begin:
                handle.seek(data_start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if handle.readinto(view) != end - begin:
                    raise ValueError(
                        f"{path}: file ends inside tensor '{name}' (truncated download?)"
                    )
            yield name, tensor


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, single or sharded."""
    index = folder / INDEX_FILE
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: shards listed in {INDEX_FILE} are missing: {missing}"
            )
        return [folder / name for name in files]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ValueError(
            f"{folder} holds only pickle weights (*.bin/*.pt); llada reads safetensors only, since "
            "unpickling can run arbitrary code. Convert the weights to safetensors first."
        )
    raise FileNotFoundError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder, a shipped model name, or a Hugging Face hub id -> a local folder."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    shipped = Path(__file__).resolve().parents[3] / "models" / text
    if "/" not in text and shipped.is_dir():
        return shipped
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {path}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id=text,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"],
            )
        )
    except Exception as error:  # noqa: BLE001 - any hub failure gets the same advice
        raise FileNotFoundError(
            f"could not fetch '{text}' from the Hugging Face hub ({type(error).__name__}: {error}). "
            f"Offline, download the folder elsewhere (config.json, *.safetensors, tokenizer files) "
            f"and pass its path, e.g. load_model('/path/to/{text.split('/')[-1]}')."
        ) from None


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float64": torch.float64,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {sorted(names)}")
    return names[dtype]


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: AttentionImplementation = "sdpa",
) -> LLaDAModel:
    """Load an official LLaDA checkpoint folder (or hub id) into `LLaDAModel`, in eval mode.

    dtype: None keeps the checkpoint's dtype. device: where the parameters end up; tensors are
    streamed there one at a time. The model's `special_tokens` are resolved from the folder.
    """
    folder = resolve_checkpoint(path_or_hub_id)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is it a LLaDA checkpoint folder?")
    with open(config_path, encoding="utf-8") as f:
        raw_config = json.load(f)
    config = LLaDAConfig.from_hf_dict(raw_config)
    target_dtype = _parse_dtype(dtype)
    device = torch.device(device)

    with torch.device("meta"), _skip_weight_init():
        model = LLaDAModel(config, attn_implementation=attn_implementation)
    expected = {name for name, _ in model.named_parameters()}
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in checkpoint_files(folder):
        for hf_name, tensor in iter_safetensors(file):
            name = from_hf_name(hf_name)
            if name in loaded:
                raise ValueError(f"{file.name}: tensor '{hf_name}' appears in more than one shard")
            if name not in expected:
                raise ValueError(
                    f"{file.name}: tensor '{hf_name}' does not fit this config (weight_tying?)"
                )
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"{file.name}: tensor '{hf_name}' has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(params[name].shape)}"
                )
            tensor = tensor.to(device=device, dtype=target_dtype or tensor.dtype)
            _set_parameter(model, name, torch.nn.Parameter(tensor, requires_grad=False))
            loaded.add(name)
            del tensor
    missing = expected - loaded
    if missing:
        raise ValueError(
            f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}"
        )
    model.special_tokens = resolve_special_tokens(raw_config, folder, config.padded_vocab_size)
    model.checkpoint_folder = folder
    return model.eval()


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Skip the layers' default initialisation while building on the meta device.

    Every weight is replaced from the file anyway, and `normal_` on a meta tensor still costs
    an import of torch's symbolic machinery (about 70 MB and 0.8 s per process).
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _set_parameter(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, leaf, value)


# Writing ---------------------------------------------------------------------------------------

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float64: "float64",
}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size '{size}' is not a size like '5GB' or '500MB'")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    return int(float(match.group(1)) * scale)


def save_pretrained(
    model: LLaDAModel,
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    copy_from: str | os.PathLike | None = None,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` as an official checkpoint folder, atomically.

    Everything is written to a temporary sibling folder first and swapped in at the end, so a
    crash at any moment leaves either the previous folder or the new one, never a mix. Tokenizer
    files and anything else already in the folder (e.g. the official modeling_*.py) are kept.

    state_dict: the weights to write (our names) instead of the model's own, e.g. a full state
        dict gathered from a sharded model; `model` then only supplies config and token ids.
    copy_from: another folder whose non-weight files (tokenizer, ...) are copied in too.
    add_files: called with the staging folder to write more files into the same atomic swap.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    target_dtype = _parse_dtype(dtype) or model.dtype
    limit = _parse_size(max_shard_size)

    if state_dict is None:
        state_dict = {name: p.detach() for name, p in model.named_parameters()}
    state = {to_hf_name(name): tensor for name, tensor in state_dict.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total = 0
    for name, tensor in state.items():
        size = tensor.numel() * torch.empty((), dtype=target_dtype).element_size()
        if shards[-1] and shard_bytes + size > limit:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
        total += size

    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.saving-", dir=folder.parent))
    try:
        for source in (Path(copy_from) if copy_from else None, folder):
            if source is None or not source.is_dir():
                continue
            for item in source.iterdir():
                if (
                    item.name in (CONFIG_FILE, INDEX_FILE, GENERATION_CONFIG_FILE)
                    or item.suffix == ".safetensors"
                    or (staging / item.name).exists()
                ):
                    continue
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, staging / item.name)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            file_name = (
                SINGLE_FILE
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            tensors = {
                k: v.to(device="cpu", dtype=target_dtype).contiguous() for k, v in shard.items()
            }
            save_file(tensors, staging / file_name, metadata={"format": "pt"})
            del tensors
            weight_map.update(dict.fromkeys(shard, file_name))
        if len(shards) > 1:
            _write_json(
                staging / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        _write_json(
            staging / CONFIG_FILE,
            model.config.to_hf_dict(torch_dtype=_DTYPE_NAMES.get(target_dtype)),
        )
        tokens = model.special_tokens
        generation = {"_from_model_config": True, "eos_token_id": model.config.eos_token_id}
        if tokens is not None and tokens.bos_id is not None:
            generation["bos_token_id"] = tokens.bos_id
        _write_json(staging / GENERATION_CONFIG_FILE, generation)
        if add_files is not None:
            add_files(staging)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace `folder` by `staging` with renames only (each rename is atomic on POSIX)."""
    # mkdtemp makes the staging folder 0700 and safetensors writes 0600; give the result the
    # permissions an ordinary mkdir/open would have under the current umask.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for file in staging.iterdir():
        if file.is_file():
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    if not folder.exists():
        os.rename(staging, folder)
        _fsync_dir(folder.parent)
        return
    if _exchange(staging, folder):
        # `staging` now holds the previous version.
        _fsync_dir(folder.parent)
        shutil.rmtree(staging, ignore_errors=True)
        return
    # No atomic exchange on this system: two renames, with a short window in which only the
    # retired copy exists.
    retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.rename(folder, retired / folder.name)
    os.rename(staging, folder)
    _fsync_dir(folder.parent)
    shutil.rmtree(retired, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
