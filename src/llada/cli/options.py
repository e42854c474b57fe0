"""Command-line flags derived from the settings dataclasses, so that they never drift apart."""

from __future__ import annotations

import argparse
import re
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from ..sampling.config import PRESETS


def _field_help(cls: type) -> dict[str, str]:
    """'name: text' paragraphs of a dataclass docstring -> {name: text}."""
    helps: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"\s{4}(\w+)(?:, \w+)*: (.*)", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
        else:
            current = None
    return helps


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    defaults: dict[str, Any] | None = None,
    suppress_defaults: bool = False,
) -> None:
    """Add `--field-name` flags for every field of `cls`, defaults and help from the class
    (`defaults` overrides some defaults for this command). With `suppress_defaults`, flags not
    given stay None, so that a config file can supply them."""
    group = parser.add_argument_group(title)
    helps = _field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        default = (defaults or {}).get(f.name, default)
        hint = hints[f.name]
        text = helps.get(f.name, "") + f" (default: {default})"
        parse_default = None if suppress_defaults else default
        if hint is bool:
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=parse_default,
                help=text,
            )
            continue
        choices = None
        origin = typing.get_origin(hint)
        if origin is typing.Literal:
            choices = list(typing.get_args(hint))
            kind: Any = str
        elif origin in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(hint) if a is not type(None))
        else:
            kind = hint
        group.add_argument(
            flag, dest=f.name, type=kind, default=parse_default, choices=choices, help=text
        )


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


# The reference chat.py's settings: 128 tokens in blocks of 32, one token per step.
CHAT_SAMPLER_DEFAULTS = {"steps": 128, "gen_length": 128, "block_length": 32}


# The decoding preset of commands that talk to people (chat, generate, demo): `fast` holds the
# reference sampler's task accuracy on the shipped model (BENCHMARKS.md). Evaluation commands
# keep `reference`, the published setting.
INTERACTIVE_PRESET = "fast"


def add_preset_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--preset",
        default=default,
        choices=sorted(PRESETS),
        help="decoding method: 'reference' is the published sampler token for token; 'fast' "
        "and 'fastest' use KV caches, confidence-threshold parallel decoding and early stop; "
        f"the 'fastdllm-*' presets are Fast-dLLM's methods (default: {default})",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device and --seed, shared by the commands that run a model."""
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the shipped model)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps (default: cpu)")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed for temperature > 0 and random remasking"
    )


def check_device(name: str | None, flag: str = "--device") -> None:
    """Refuse a device this torch cannot use, in one line that names the flag and the fix
    (torch's own errors are tracebacks from deep inside the first tensor move)."""
    if name is None:
        return
    import torch

    build = f"torch {torch.__version__}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{flag} {name}: not a device name; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(
                f"{flag} {name}: this torch has no CUDA support ({build}); install a CUDA "
                f"build or use {flag} cpu"
            )
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(
                f"{flag} {name}: no CUDA GPU is visible ({build}); check the driver and "
                f"CUDA_VISIBLE_DEVICES, or use {flag} cpu"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{flag} {name}: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}"
            )
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"{flag} {name}: MPS is not available here ({build}; it needs Apple silicon "
                f"and a macOS build of torch); use {flag} cpu"
            )
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(
            f"{flag} {name}: this torch cannot use {device.type!r} devices ({build}); use {flag} cpu or cuda"
        )


def check_dtype(name: str | None, flag: str = "--dtype") -> None:
    """Refuse an unknown dtype name before the model is read, naming the flag."""
    from ..model.checkpoint import _parse_dtype

    try:
        _parse_dtype(name)
    except ValueError as error:
        raise ValueError(f"{flag} {name}: {error}") from None


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer, is_random) for --model/--dtype/--device, with a note on stderr when
    no model is given and none is shipped, so the command runs on a random stand-in."""
    import sys

    from ..api import load

    check_device(args.device)
    check_dtype(args.dtype)
    model, tokenizer, is_random = load(args.model, dtype=args.dtype, device=args.device)
    if is_random:
        print(
            "note: no trained model is shipped with this install, so this runs on a small "
            f"random-weight LLaDA created at {model.checkpoint_folder}; its text is noise. "
            "Pass --model PATH for a real one.",
            file=sys.stderr,
        )
    return model, tokenizer, is_random
