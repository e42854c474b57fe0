"""Quantized weights through torchao, applied to a loaded model from outside.

`quantize(model, mode)` replaces the weights of the model's `nn.Linear` layers in place by
torchao tensor subclasses; the model classes are not touched (the gpt-fast habit: speed is
applied from outside the model). The modes:

- "int8-weight": int8 weights, one scale per output row (torchao `Int8WeightOnlyConfig`,
  per-row symmetric); activations stay in the model dtype. CPU and GPU.
- "int8-dynamic": as int8-weight, and each activation row is quantized to int8 at run time so
  the matmul runs in int8 (torchao `Int8DynamicActivationInt8WeightConfig`, per-row). CPU and GPU.
- "int4-weight": int4 weights in groups of `group_size` input columns, one bf16 scale and zero
  point per group (torchao `Int4WeightOnlyConfig` in the "tile_packed_to_4d" layout, the layout
  of torch's own tinygemm kernel `torch.ops.aten._weight_int4pack_mm`). CUDA only, bfloat16
  models only: torchao 0.18 has no CPU kernel for its int4 layouts that torch 2.13 ships
  without the optional `mslk` kernel package, so CPU is refused with one line.

What is quantized: every `nn.Linear` (attention projections, dense SwiGLU MLPs, shared experts,
the LM head) except MoE routers, whose top-k choice flips on small errors and which are a
negligible share of the bytes. Not quantized: the token embedding (a lookup, not a matmul;
torchao's default filter skips it too), norms, and the stacked expert weights of the MoE
families (`nn.Parameter` of shape (E, F, D), not `nn.Linear`: torchao's linear configs do not
apply to them, and our grouped expert matmuls (`model/experts.py`) take plain tensors). A MoE
model's quantized share is therefore its attention, shared experts and LM head only.

Saved folders (`save_pretrained` on a quantized model): config.json with a `"quantization"`
entry ({"method": "torchao", "mode": ..., "group_size": ..., "torchao_version": ...}) and the
weights in `model.quantized.safetensors`, flattened with torchao's safetensors support
(`torchao.prototype.safetensors`): every quantized weight becomes plain tensors
(`<module>._weight_qdata`, `<module>._weight_scale`, ...) plus a JSON description of its
subclass in the safetensors metadata, under llada's own parameter names. Loading reads
safetensors and JSON only, never a pickle; torchao rebuilds only classes on its allow-list.
Such a folder is read by llada only (`load_model` sees the entry and comes here).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = ["MODES", "quantize", "is_quantized", "weight_bytes", "QUANTIZED_FILE"]

MODES = ("int8-weight", "int8-dynamic", "int4-weight")
# The group size of int4 scales: torchao's default, and the one the tinygemm kernel is tuned
# for (gpt-fast's int4 default too). Input widths not divisible by it stay unquantized.
INT4_GROUP_SIZE = 128
QUANTIZED_FILE = "model.quantized.safetensors"
QUANTIZATION_KEY = "quantization"
_INSTALL = "install torchao (pip install 'torchao>=0.18') to use quantized weights"


def _torchao():
    """Import torchao, quietly: it warns about its CUDA-only kernel libraries on a CPU build."""
    # torch's pytree module also warns once per torchao enum that it registers.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
        import torchao.quantization as quantization
    except ImportError as error:
        raise ImportError(f"{_INSTALL} ({error})") from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    return quantization


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def _config(mode: str, group_size: int):
    quantization = _torchao()
    # set_inductor_config=False: torchao would otherwise change global torch._inductor
    # settings, a side effect on every later compile of the process.
    if mode == "int8-weight":
        return quantization.Int8WeightOnlyConfig(set_inductor_config=False)
    if mode == "int8-dynamic":
        return quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    return quantization.Int4WeightOnlyConfig(
        group_size=group_size,
        int4_packing_format="tile_packed_to_4d",
        set_inductor_config=False,
    )


def is_quantized(model: nn.Module) -> bool:
    """Whether `quantize` (or loading a quantized folder) has been applied to `model`."""
    return getattr(model, QUANTIZATION_KEY, None) is not None


def _routers(model: nn.Module) -> set[int]:
    routers = getattr(model, "routers", None)
    return {id(module) for module in routers()} if callable(routers) else set()


def quantize(model: nn.Module, mode: str, *, group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """Quantize the `nn.Linear` weights of a loaded llada model in place; returns the model.

    mode: "int8-weight", "int8-dynamic" or "int4-weight" (module docstring: what each does and
    which layers it touches). group_size: input columns per int4 scale (32, 64, 128 or 256;
    int4 only). The model keeps its interface: forward, samplers, likelihood and
    `save_pretrained` work as before. Raises ValueError for an unknown mode, a model that is
    already quantized, or int4 off CUDA / outside bfloat16; ImportError without torchao.
    """
    _check_mode(mode)
    if is_quantized(model):
        raise ValueError(
            f"the model is already quantized ({model.quantization['mode']}); load the float "
            "checkpoint again to quantize it another way"
        )
    parameters = list(model.parameters())
    device = parameters[0].device if parameters else torch.device("cpu")
    dtype = getattr(model, "dtype", parameters[0].dtype if parameters else torch.float32)
    if mode == "int4-weight":
        if device.type != "cuda":
            raise ValueError(
                f"int4-weight runs on CUDA GPUs only (torchao's int4 kernel, compute capability "
                f">= 8.0), and the model is on {device}; use int8-weight or int8-dynamic on CPU"
            )
        if dtype != torch.bfloat16:
            raise ValueError(
                f"int4-weight needs a bfloat16 model (the int4 kernel computes in bfloat16), and "
                f"this one is {dtype}; load it with dtype='bfloat16' (--dtype bfloat16)"
            )
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size {group_size} is not one of 32, 64, 128, 256")
    config = _config(mode, group_size)
    routers = _routers(model)

    def quantizable(module: nn.Module, _name: str) -> bool:
        return isinstance(module, nn.Linear) and id(module) not in routers

    _torchao().quantize_(model, config, filter_fn=quantizable)
    model.quantization = _entry(mode, group_size)
    return model


def _entry(mode: str, group_size: int) -> dict:
    import torchao

    entry: dict = {"method": "torchao", "mode": mode}
    if mode == "int4-weight":
        entry["group_size"] = group_size
    entry["torchao_version"] = torchao.__version__
    return entry


def _is_subclass(tensor: torch.Tensor) -> bool:
    return type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "tensor_data_names")


def _inner_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a (possibly quantized) tensor's bytes."""
    if not _is_subclass(tensor):
        yield tensor
        return
    names = list(tensor.tensor_data_names) + list(getattr(tensor, "optional_tensor_data_names", []))
    for name in names:
        inner = getattr(tensor, name, None)
        if inner is not None:
            yield from _inner_tensors(inner)


def weight_bytes(model: nn.Module) -> int:
    """Bytes that the model's parameters and persistent buffers occupy, quantized or not
    (int8/int4 data plus their scales and zero points)."""
    state = model.state_dict()
    return sum(
        inner.numel() * inner.element_size() for t in state.values() for inner in _inner_tensors(t)
    )


# Saving and loading ----------------------------------------------------------------------------


def write_quantized_weights(model: nn.Module, folder: Path) -> None:
    """Write the model's state dict (llada's names) to `folder/model.quantized.safetensors`,
    quantized weights flattened by torchao's safetensors support (module docstring)."""
    from safetensors.torch import save_file

    _torchao()
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state = {
        name: (tensor if _is_subclass(tensor) else tensor.detach()).to("cpu")
        for name, tensor in model.state_dict().items()
    }
    tensors, metadata = flatten_tensor_state_dict(state)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    metadata["format"] = "pt"
    metadata[QUANTIZATION_KEY] = json.dumps(model.quantization)
    save_file(tensors, Path(folder) / QUANTIZED_FILE, metadata=metadata)


def quantization_entry(raw_config: dict, config_path: Path) -> dict | None:
    """The checked `"quantization"` entry of a config.json, or None for a float checkpoint."""
    entry = raw_config.get(QUANTIZATION_KEY)
    if entry is None:
        return None
    if (
        not isinstance(entry, dict)
        or entry.get("method") != "torchao"
        or entry.get("mode") not in MODES
    ):
        raise ValueError(
            f"{config_path}: the 'quantization' entry {entry!r} is not one llada wrote "
            f"(method 'torchao', mode one of {', '.join(MODES)}); save the folder again with "
            "llada, or remove the entry from a float checkpoint"
        )
    return entry


def load_quantized(
    folder: Path,
    raw_config: dict,
    entry: dict,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """Build the model that a quantized folder describes (`load_model` calls this).

    The safetensors header is checked first (`read_safetensors_header`: sizes, offsets), the
    tensors are read without unpickling, torchao rebuilds its subclasses from the JSON
    metadata, and the result must cover every parameter and persistent buffer of the model.
    dtype: None or the dtype the folder was saved in; a quantized folder is not converted.
    """
    from safetensors import safe_open

    from .model.checkpoint import (
        CheckpointError,
        _skip_weight_init,
        read_safetensors_header,
    )
    from .model.families import DENSE, detect_family
    from .tokenizer import check_tokenizer_files
    from .tokens import resolve_special_tokens

    device = torch.device(device)
    if device.type != "cuda" and entry["mode"] == "int4-weight":
        raise ValueError(
            f"{folder} holds int4-weight weights, which run on CUDA GPUs only; load it with "
            "--device cuda, or quantize the float checkpoint with int8-weight for CPU"
        )
    family = detect_family(raw_config)
    config = family.config_class.from_hf_dict(raw_config)
    path = folder / QUANTIZED_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: config.json says the weights are quantized, but {QUANTIZED_FILE} is "
            "missing; save the quantized model again"
        )
    read_safetensors_header(path)
    _torchao()
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    # Read straight onto the device: int4's packed layout is the CUDA kernel's.
    with safe_open(path, framework="pt", device=str(device)) as handle:
        metadata = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - not a dict
    try:
        state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path}: the quantized weights cannot be rebuilt ({error}); save the quantized "
            "model again with this torchao version"
        ) from None
    if leftover:
        raise CheckpointError(
            f"{path}: tensors {sorted(leftover)[:3]} belong to no weight; save the model again"
        )
    with torch.device("meta"), _skip_weight_init():
        model = family.model_class(config, attn_implementation=attn_implementation)
    saved_dtype = state["embed.weight"].dtype
    if dtype is not None and dtype != saved_dtype:
        raise ValueError(
            f"{folder} holds quantized weights saved in {saved_dtype}; they load in that dtype "
            f"only (drop --dtype or pass {str(saved_dtype).removeprefix('torch.')})"
        )
    state = {name: tensor.to(device) for name, tensor in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the weights do not match the model that config.json describes "
            f"({' '.join(str(error).split())[:300]}); save the quantized model again"
        ) from None
    try:
        model.special_tokens = resolve_special_tokens(raw_config, folder, config.padded_vocab_size)
    except ValueError as error:
        # As `inspect_checkpoint`: a MoE folder without tokenizer files declares no mask id;
        # the callers then pass mask_id explicitly. A dense folder must resolve.
        if family is DENSE:
            raise CheckpointError(" ".join(str(error).split())) from None
        model.special_tokens = None
    check_tokenizer_files(folder)
    model.checkpoint_folder = folder
    model.quantization = dict(entry)
    return model.eval()
