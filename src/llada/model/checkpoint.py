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
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..generation_config import SAMPLER_KEY, read_generation_config, sampler_settings
from ..tokens import SpecialTokens, resolve_special_tokens
from .config import LLaDAConfig
from .families import DENSE, Family, detect_family, family_of, from_hf_name, to_hf_name
from .llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from .transformer import AttentionImplementation, LLaDAModel

__all__ = ["from_hf_name", "to_hf_name", "from_hf", "to_hf", "load_model", "save_pretrained"]

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official dense state dict -> ours (see `families.py` for every family's map)."""
    return DENSE.from_official(state_dict)


def to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return DENSE.to_official(state_dict)


# Reading ---------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix.

    A ValueError, so the CLI prints it as one `llada: error: ...` line.
    """


# Which tensors' headers we accept, and their bytes per element. Only floating point weights
# are loadable: integer or boolean "weights" would only fail later, inside a forward pass.
_FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
# A safetensors header is a few KB per tensor; 100 MB is far beyond any real checkpoint's.
MAX_HEADER_BYTES = 100_000_000
_ADVICE = "pass --model with an intact LLaDA checkpoint folder (re-download or re-export it)"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header, checked against its file: bytes [begin, end) of
    the data section hold `shape` elements of `dtype`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorEntry], int]:
    """The checked header of a safetensors file: name -> entry, and where the data starts.

    Reads at most 8 bytes + the header, never the data: a header that claims more bytes than
    the file holds, a negative or absurd shape, or overlapping tensors are refused here, in
    milliseconds, before anything is allocated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise CheckpointError(
                f"{path} is not a safetensors file (only {size} bytes); {_ADVICE}"
            )
        header_size = int.from_bytes(size_bytes, "little")
        if header_size > MAX_HEADER_BYTES or 8 + header_size > size:
            raise CheckpointError(
                f"{path} is not a safetensors file (its header claims {header_size} bytes, the "
                f"file has {size}); {_ADVICE}"
            )
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(
            f"{path} is not a safetensors file (its header is not JSON: {_one_line(error)}); "
            f"{_ADVICE}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; {_ADVICE}")
    header.pop("__metadata__", None)
    data_start = 8 + header_size
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _header_entry(path, name, info, data_size)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (_, first_end, first), (second_begin, _, second) in zip(spans, spans[1:], strict=False):
        if second_begin < first_end:
            raise CheckpointError(
                f"{path}: tensors '{first}' and '{second}' overlap in the file; {_ADVICE}"
            )
    return entries, data_start


def _header_entry(path: Path, name: str, info: object, data_size: int) -> TensorEntry:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{name}' {what}; {_ADVICE}")

    if not isinstance(info, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise bad(f"has an unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"has an invalid shape {shape!r} (dimensions must be non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    numel = math.prod(shape)
    if end - begin != numel * _DTYPE_BYTES[dtype]:
        raise bad(
            f"has shape {tuple(shape)} ({_gigabytes(numel * _DTYPE_BYTES[dtype])} as {dtype}) "
            f"but {end - begin} bytes in the file"
        )
    if end > data_size:
        raise bad(
            f"lies beyond the end of the file (byte {end} of a {data_size}-byte data section; "
            "truncated download?)"
        )
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _gigabytes(nbytes: int) -> str:
    return f"{nbytes / 10**9:.3g} GB" if nbytes >= 10**7 else f"{nbytes} bytes"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, CPU tensor) from a safetensors file, one tensor in memory at a time.

    Reads with plain file reads instead of a memory map, so pages of the file never count
    towards the process's resident memory: loading an N-byte checkpoint peaks near N bytes.
    Only floating point tensors are read; the header is checked first (`read_safetensors_header`).
    """
    entries, data_start = read_safetensors_header(path)
    with open(path, "rb") as handle:
        for entry in sorted(entries.values(), key=lambda e: e.begin):
            yield entry.name, _read_tensor(Path(path), handle, entry, data_start)


def _read_tensor(path: Path, handle, entry: TensorEntry, data_start: int) -> torch.Tensor:
    dtype = _FLOAT_DTYPES.get(entry.dtype)
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor '{entry.name}' is {entry.dtype}; LLaDA weights must be floating "
            f"point (F32, F16 or BF16); {_ADVICE}"
        )
    tensor = torch.empty(entry.shape, dtype=dtype)
    if entry.nbytes:
        handle.seek(data_start + entry.begin)
        view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
        if handle.readinto(view) != entry.nbytes:
            raise CheckpointError(
                f"{path}: file ends inside tensor '{entry.name}' (truncated download?); {_ADVICE}"
            )
    return tensor


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object, or a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({_one_line(error)}); fix or replace {what}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; fix or replace {what}")
    return data


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, single or sharded."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json_object(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{index} has no 'weight_map' of tensor name -> shard file; {_ADVICE}"
            )
        files = sorted(set(weight_map.values()))
        for name in files:
            # A shard is a file of this folder, never a path elsewhere (../../etc/passwd).
            if Path(name).name != name or name in ("", ".", ".."):
                raise CheckpointError(
                    f"{index} names the shard '{name}', which is not a file in {folder}; {_ADVICE}"
                )
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


def expected_tensors(config: LLaDAConfig | LLaDAMoEConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor name -> shape for a config of any family, without building the model."""
    return family_of(config).expected_tensors(config)


@dataclass(frozen=True)
class CheckpointPlan:
    """What `inspect_checkpoint` found: everything checked, nothing allocated."""

    folder: Path
    config: LLaDAConfig | LLaDAMoEConfig
    raw_config: dict
    # Official tensor name -> (file, header entry).
    tensors: dict[str, tuple[Path, TensorEntry]]
    special_tokens: SpecialTokens | None
    # Bytes the weights take once loaded in the requested dtype.
    weight_bytes: int
    family: Family = DENSE


def inspect_checkpoint(
    path_or_hub_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
) -> CheckpointPlan:
    """Check a checkpoint folder completely before anything is allocated.

    Reads only JSON and the safetensors headers: config.json (types, bounds, consistency),
    every tensor's name, dtype (floating point), shape (against config.json) and byte range
    (against the file size), the memory the weights need (against what is available), the
    special token ids (inside the vocabulary) and the tokenizer files, including a trial
    render of the chat template in a sandbox with a time bound. Raises `CheckpointError` (a
    ValueError) naming the file and the fix, or FileNotFoundError.
    """
    folder = resolve_checkpoint(path_or_hub_id)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; pass --model with a LLaDA checkpoint folder"
        )
    raw_config = _read_json_object(config_path, "config.json")
    try:
        family = detect_family(raw_config)
        config = family.config_class.from_hf_dict(raw_config)
    except ValueError as error:
        raise CheckpointError(
            f"{config_path}: {_one_line(error)}; fix config.json or pass --model with another "
            "checkpoint folder"
        ) from None
    target_dtype = _parse_dtype(dtype)

    expected = expected_tensors(config)
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for file in checkpoint_files(folder):
        entries, _ = read_safetensors_header(file)
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(
                    f"{file}: tensor '{name}' is also in {tensors[name][0].name}; {_ADVICE}"
                )
            if name not in expected:
                raise CheckpointError(
                    f"{file}: tensor '{name}' does not belong to the {family.name} model that "
                    f"{CONFIG_FILE} describes ({family.describe(name, config)}); {_ADVICE}"
                )
            if entry.shape != expected[name]:
                raise CheckpointError(
                    f"{file}: tensor '{name}' has shape {entry.shape}, {CONFIG_FILE} implies "
                    f"{expected[name]} ({family.describe(name, config)}); the weights and "
                    "config.json do not belong together (fix config.json or pass --model with "
                    "a matching folder)"
                )
            if entry.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(
                    f"{file}: tensor '{name}' is {entry.dtype}; LLaDA weights must be floating "
                    f"point (F32, F16 or BF16); {_ADVICE}"
                )
            tensors[name] = (file, entry)
    missing = [name for name in expected if name not in tensors]
    if missing:
        files = checkpoint_files(folder)
        where = str(files[0]) + (f" and {len(files) - 1} more shards" if len(files) > 1 else "")
        raise CheckpointError(
            f"{where}: the weights lack {len(missing)} of the {len(expected)} tensors that "
            f"{CONFIG_FILE} implies, e.g. '{missing[0]}' "
            f"({family.describe(missing[0], config)}); fix config.json or pass --model with a "
            "complete folder"
        )

    weight_bytes = sum(
        math.prod(entry.shape)
        * (
            torch.empty((), dtype=target_dtype).element_size()
            if target_dtype is not None
            else _DTYPE_BYTES[entry.dtype]
        )
        for _, entry in tensors.values()
    )
    _check_memory(folder, weight_bytes, torch.device(device))

    try:
        special_tokens = resolve_special_tokens(raw_config, folder, config.padded_vocab_size)
    except ValueError as error:
        unknown_id = getattr(error, "key", None) is not None or str(error).startswith("cannot tell")
        if family is DENSE or not unknown_id:
            raise CheckpointError(_one_line(error)) from None
        # A LLaDA-MoE config.json carries no mask id; without tokenizer files that declare
        # one, the callers pass mask_id explicitly (llada.tokens.special_tokens_of).
        special_tokens = None
    from ..tokenizer import check_tokenizer_files

    check_tokenizer_files(folder)
    return CheckpointPlan(folder, config, raw_config, tensors, special_tokens, weight_bytes, family)


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when it cannot be told."""
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except Exception:  # noqa: BLE001 - no CUDA, or no way to ask: skip the check
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_memory(folder: Path, weight_bytes: int, device: torch.device) -> None:
    available = available_memory(device)
    if available is not None and weight_bytes > available:
        raise CheckpointError(
            f"{folder}: the weights need {_gigabytes(weight_bytes)} of memory on {device}, but "
            f"only {_gigabytes(available)} is available; free memory, use a larger machine, "
            "or pass --dtype bfloat16 to halve float32 weights"
        )


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder, a shipped model name, or a Hugging Face hub id -> a local folder.

    Shipped models are found from any working directory, by name (`llada-tiny-instruct`) or
    as the README writes them (`models/llada-tiny-instruct`), in a source checkout and in an
    installed wheel (`_shipped_root`). Something that looks like a
    local path and does not exist is reported as such, never looked up on the hub.
    """
    text = os.fspath(path_or_hub_id)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    shipped = _shipped_model(text)
    if shipped is not None:
        return shipped
    if _looks_local(text):
        raise FileNotFoundError(
            f"no such folder: {path.absolute()}; pass --model with the path of a checkpoint "
            f"folder that holds config.json{_shipped_hint()}"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id=text,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"],
            )
        )
    except Exception as error:  # noqa: BLE001 - any hub failure gets the same advice
        if type(error).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            reason = f"'{text}' is not a model on the Hugging Face hub, or it is private"
        elif type(error).__name__ == "ImportError":
            reason = "huggingface_hub is not installed"
        else:
            reason = f"the Hugging Face hub could not be reached for '{text}' (offline?)"
        raise FileNotFoundError(
            f"no local folder '{text}', and {reason} ({type(error).__name__}: "
            f"{_one_line(error)[:120]}). Download the folder elsewhere (config.json, "
            f"*.safetensors, tokenizer files) and pass its path, e.g. --model "
            f"/path/to/{text.split('/')[-1]}{_shipped_hint()}"
        ) from None


def _shipped_root() -> Path:
    """The folder of the shipped models: models/ of a source checkout (an editable install
    too), else llada/shipped_models of an installed wheel (setup.py puts them there)."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parents[1] / "models"
    return checkout if checkout.is_dir() else package / "shipped_models"


def _shipped_model(text: str) -> Path | None:
    """The shipped model folder that `text` names (`name` or `models/name`), if any."""
    parts = Path(text).parts
    if parts and parts[0] == ".":
        parts = parts[1:]
    if len(parts) == 2 and parts[0] == "models":
        parts = parts[1:]
    if len(parts) != 1 or parts[0] in (".", ".."):
        return None
    candidate = _shipped_root() / parts[0]
    return candidate if (candidate / CONFIG_FILE).is_file() else None


def _shipped_hint() -> str:
    root = _shipped_root()
    names = (
        sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).is_file())
        if root.is_dir()
        else []
    )
    return f" (shipped models: {', '.join(names)})" if names else ""


def _looks_local(text: str) -> bool:
    """Whether a missing `text` was meant as a path on this machine rather than a hub id."""
    if text.startswith((".", "/", "~", "\\")) or os.sep in text.replace("/", "") or ":" in text:
        return True
    parts = text.split("/")
    if len(parts) != 2 or not all(parts):
        return True
    # `models/foo` where ./models exists: a local path with a typo, not the hub org `models`.
    return Path(parts[0]).is_dir()


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
) -> torch.nn.Module:
    """Load an official checkpoint folder (or hub id) into its family's model, in eval mode.

    The family (dense LLaDA -> `LLaDAModel`, LLaDA-MoE -> `LLaDAMoEModel`, LLaDA 2.x ->
    `LLaDA2Model`) is told from config.json (`families.detect_family`).

    dtype: None keeps the checkpoint's dtype. device: where the parameters end up; tensors are
    streamed there one at a time. The model's `special_tokens` are resolved from the folder.
    The whole folder is checked first (`inspect_checkpoint`), so a broken or hostile folder is
    refused with one line naming the file before anything is allocated.
    """
    device = torch.device(device)
    folder = resolve_checkpoint(path_or_hub_id)
    quantized = _quantized(folder)
    if quantized is not None:
        # A folder written from a quantized model (llada.quantize): llada's own format.
        from ..quantization import load_quantized

        raw_config, entry = quantized
        return load_quantized(
            folder, raw_config, entry, _parse_dtype(dtype), device, attn_implementation
        )
    plan = inspect_checkpoint(folder, dtype=dtype, device=device)
    target_dtype = _parse_dtype(dtype)

    family = plan.family
    with torch.device("meta"), _skip_weight_init():
        model = family.model_class(plan.config, attn_implementation=attn_implementation)
    by_file: dict[Path, list[TensorEntry]] = {}
    for file, entry in plan.tensors.values():
        by_file.setdefault(file, []).append(entry)
    for file, entries in by_file.items():
        # Re-read the header: it is what says where the data starts, and the file could have
        # been replaced since it was inspected.
        current, data_start = read_safetensors_header(file)
        with open(file, "rb") as handle:
            for entry in sorted(entries, key=lambda e: e.begin):
                if current.get(entry.name) != entry:
                    raise CheckpointError(f"{file} changed while it was being loaded; retry")
                tensor = _read_tensor(file, handle, entry, data_start)
                tensor = tensor.to(device=device, dtype=target_dtype or tensor.dtype)
                name, index = family.from_official_name(entry.name)
                _set_tensor(model, name, tensor, index)
                del tensor
    model.special_tokens = plan.special_tokens
    model.checkpoint_folder = plan.folder
    return model.eval()


def _quantized(folder: Path) -> tuple[dict, dict] | None:
    """(config.json, its checked "quantization" entry) for a quantized folder, else None."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        return None
    raw_config = _read_json_object(config_path, "config.json")
    if "quantization" not in raw_config:
        return None
    from ..quantization import quantization_entry

    try:
        return raw_config, quantization_entry(raw_config, config_path)
    except ValueError as error:
        raise CheckpointError(str(error)) from None


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


def _set_tensor(
    model: torch.nn.Module, name: str, tensor: torch.Tensor, index: int | None = None
) -> None:
    """Put a loaded tensor in place of the meta parameter or buffer `name`.

    With `index`, the tensor is slice `index` along dim 0 of a stacked parameter (an expert of
    a MoE layer): the whole parameter is allocated at its first slice and filled slice by slice.
    """
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if index is not None:
        current = getattr(owner, leaf)
        if current.is_meta:
            current = torch.nn.Parameter(
                torch.empty(current.shape, dtype=tensor.dtype, device=tensor.device),
                requires_grad=False,
            )
            setattr(owner, leaf, current)
        current.data[index].copy_(tensor)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, torch.nn.Parameter(tensor, requires_grad=False))


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
    model: LLaDAModel | LLaDAMoEModel,
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    copy_from: str | os.PathLike | None = None,
    add_files: Callable[[Path], None] | None = None,
    generation: object | None = None,
) -> Path:
    """Write `model` as an official checkpoint folder, atomically.

    Everything is written to a temporary sibling folder first and swapped in at the end, so a
    crash at any moment leaves either the previous folder or the new one, never a mix. Tokenizer
    files and anything else already in the folder (e.g. the official modeling_*.py) are kept.

    state_dict: the weights to write (our names) instead of the model's own, e.g. a full state
        dict gathered from a sharded model; `model` then only supplies config and token ids.
    copy_from: another folder whose non-weight files (tokenizer, ...) are copied in too.
    add_files: called with the staging folder to write more files into the same atomic swap.
    generation: the sampler settings the folder should ask for (a `GenerateConfig` or a dict of
        its fields), written to generation_config.json under `"llada"`
        (`llada.generation_config`). None keeps the settings of the folder saved from
        (copy_from, else the folder itself, else the model's own checkpoint folder), if any.

    config.json keeps the official `auto_map` only when the remote-code files it names
    (modeling_*.py, configuration_*.py) are in the saved folder: without them, transformers
    would stop at an interactive "run custom code? [y/N]" prompt on every load, and then fail.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    target_dtype = _parse_dtype(dtype) or model.dtype
    limit = _parse_size(max_shard_size)
    # A quantized model (llada.quantize) is written in llada's own quantized format instead.
    quantization = getattr(model, "quantization", None)
    if quantization is not None and (state_dict is not None or target_dtype != model.dtype):
        raise ValueError(
            "a quantized model is saved as it is: drop dtype and state_dict, or save the "
            "float model"
        )

    if state_dict is None and quantization is None:
        state_dict = {name: p.detach() for name, p in model.named_parameters()}
        # Persistent buffers are weights of the checkpoint too (LLaDA-MoE's expert_bias).
        persistent = model.state_dict(keep_vars=True).keys()
        state_dict.update(
            (name, b.detach()) for name, b in model.named_buffers() if name in persistent
        )
    state = {} if quantization is not None else family_of(model).to_official(state_dict)
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
        if quantization is not None:
            from ..quantization import write_quantized_weights

            write_quantized_weights(model, staging)
            shards = []
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
        config_json = model.config.to_hf_dict(torch_dtype=_DTYPE_NAMES.get(target_dtype))
        if quantization is not None:
            config_json["quantization"] = dict(quantization)
        _write_json(staging / CONFIG_FILE, _without_missing_remote_code(config_json, staging))
        sources = (copy_from, folder, getattr(model, "checkpoint_folder", None))
        _write_json(
            staging / GENERATION_CONFIG_FILE,
            _generation_config(model, [Path(s) for s in sources if s is not None], generation),
        )
        if add_files is not None:
            add_files(staging)
        _swap_in(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _without_missing_remote_code(config_json: dict, folder: Path) -> dict:
    """config.json without `auto_map` when `folder` lacks a module file that it names.

    An `auto_map` entry is "module.Class" (or "repo--module.Class"); transformers imports
    `folder/module.py` for it. The official files are third-party code that llada does not ship,
    so a folder saved here usually has none: transformers would then ask whether to run custom
    code that is not there, and fail after a timeout.
    """
    auto_map = config_json.get("auto_map")
    if not isinstance(auto_map, dict):
        return config_json
    references = [
        item
        for value in auto_map.values()
        for item in (value if isinstance(value, list) else [value])
    ]
    modules = {
        str(reference).split("--")[-1].rpartition(".")[0]
        for reference in references
        if reference is not None
    }
    if all(module and (folder / f"{module}.py").is_file() for module in modules):
        return config_json
    return {key: value for key, value in config_json.items() if key != "auto_map"}


def _generation_config(model: torch.nn.Module, sources: list[Path], generation: object) -> dict:
    """generation_config.json for a saved model: the special token ids of the model and its
    sampler settings under `"llada"` (`llada.generation_config`).

    The first source folder that has a generation_config.json gives the other keys (kept as
    they are) and, when `generation` is None, the sampler settings.
    """
    data: dict = {}
    for source in sources:
        if (source / GENERATION_CONFIG_FILE).is_file():
            # A broken file is replaced, not carried over.
            with contextlib.suppress(ValueError):
                data = read_generation_config(source)
            break
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
        data.pop(key, None)
    data["_from_model_config"] = True
    tokens = model.special_tokens
    data["eos_token_id"] = model.config.eos_token_id
    if tokens is not None:
        data["pad_token_id"] = tokens.pad_id
        data["mask_token_id"] = tokens.mask_id
        if tokens.bos_id is not None:
            data["bos_token_id"] = tokens.bos_id
    if generation is not None:
        data[SAMPLER_KEY] = sampler_settings(generation)
    return data


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
