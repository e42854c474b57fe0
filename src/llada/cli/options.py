"""Command-line flags derived from the settings dataclasses, so that they never drift apart."""

from __future__ import annotations

import argparse
import re
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from ..sampling.config import (
    BLOCK_PRESETS,
    EVALUATION_PRESET,
    PRESETS,
    BlockDecodeConfig,
    GenerateConfig,
    decode_preset,
    profile,
)
from ..sampling.config import INTERACTIVE_PRESET as INTERACTIVE_PRESET


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


def add_sampler_arguments(parser: argparse.ArgumentParser, profile_name: str) -> None:
    """--preset, the LLaDA 2.x flags and the `GenerateConfig` flags, with the defaults of the
    profile `profile_name` (`llada.sampling.config.PROFILES`); see `sampler_config`."""
    chosen = profile(profile_name)
    add_preset_argument(parser, chosen.preset)
    add_dataclass_arguments(
        parser,
        GenerateConfig,
        f"sampler (defaults: the checkpoint's generation_config.json, else {chosen.source})",
        defaults=chosen.generate,
        suppress_defaults=True,
    )
    parser.set_defaults(sampler_profile=profile_name)


def given_sampler_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The `GenerateConfig` flags the user gave (the others are None)."""
    return {
        f.name: getattr(args, f.name)
        for f in fields(GenerateConfig)
        if getattr(args, f.name) is not None
    }


def sampler_config(args: argparse.Namespace, model=None) -> GenerateConfig:
    """The command's sampler settings: its profile's defaults, then the model folder's
    generation_config.json ("llada" settings written by `save_pretrained`), then the flags the
    user gave. Without a model: the profile's and the flags'."""
    from ..generation_config import generation_defaults

    chosen = profile(args.sampler_profile)
    folder = getattr(model, "checkpoint_folder", None)
    stored = generation_defaults(folder) if folder is not None else {}
    return chosen.config(**(stored | given_sampler_flags(args)))


def add_preset_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """--preset (default None: the model family's, `default_preset`) and the LLaDA 2.x
    sampler's flags, which override its preset's values."""
    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS) + sorted(BLOCK_PRESETS),
        help="decoding method. LLaDA-8B / LLaDA-MoE: 'reference' is the published sampler "
        "token for token; 'fast' and 'fastest' use KV caches, confidence-threshold parallel "
        "decoding and early stop; the 'fastdllm-*' presets are Fast-dLLM's methods (default: "
        f"{default}). LLaDA 2.x: 'llada2.0', 'llada2.1-quality', 'llada2.1-speed', the authors' "
        "settings, run with the exact block KV cache (default: llada2.1-quality for a "
        "checkpoint named 2.1, else llada2.0)",
    )
    parser.set_defaults(interactive_preset=default != EVALUATION_PRESET)
    group = parser.add_argument_group("LLaDA 2.x sampler (overrides the preset's values)")
    helps = _field_help(BlockDecodeConfig)
    hints = typing.get_type_hints(BlockDecodeConfig)
    for f in fields(BlockDecodeConfig):
        if f.name == "version":  # the preset chooses the sampler
            continue
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                help=helps.get(f.name, ""),
            )  # fmt: skip
            continue
        kind = (
            int
            if f.name in ("top_k", "max_post_steps", "minimal_topk", "num_to_transfer")
            else float
        )
        group.add_argument(flag, dest=f.name, type=kind, default=None, help=helps.get(f.name, ""))


def decode_from_args(args: argparse.Namespace, model) -> str | object:
    """The decoding for --preset and the LLaDA 2.x flags: a preset name, or a
    `BlockDecodeConfig` when flags change a LLaDA 2.x preset; one clear error for a preset or
    flag of the other family."""
    import dataclasses

    from ..api import default_decode

    name = args.preset or default_decode(model, interactive=args.interactive_preset)
    decode_preset(name)  # an unknown name: the error that lists the presets
    block_model = bool(getattr(model, "block_diffusion", False))
    given = {
        f.name: getattr(args, f.name)
        for f in fields(BlockDecodeConfig)
        if getattr(args, f.name, None) is not None
    }
    if block_model and name in PRESETS:
        raise ValueError(
            f"--preset {name}: this is a LLaDA 2.x model (block diffusion); choose one of "
            f"{', '.join(BLOCK_PRESETS)}"
        )
    if not block_model and name in BLOCK_PRESETS:
        raise ValueError(
            f"--preset {name} is for LLaDA 2.x models; this model takes one of {', '.join(PRESETS)}"
        )
    if not given:
        return name
    if not block_model:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise ValueError(
            f"{flag} is a LLaDA 2.x sampler flag; this model's sampler has no such option"
        )
    try:
        return dataclasses.replace(decode_preset(name), **given)
    except ValueError as error:
        raise ValueError(f"--{str(error).split(' ', 1)[0].replace('_', '-')}: {error}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --device and --seed, shared by the commands that run a model."""
    parser.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the shipped model)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        help="auto (the checkpoint's) | float32 | bfloat16 | float16 (default: auto)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (cuda, then mps, then cpu: the first this torch can use) | cpu | cuda | "
        "cuda:N | mps (default: auto)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed for temperature > 0 and random remasking"
    )


def check_device(name: str | None, flag: str = "--device") -> str | None:
    """The device to use for `name`: "auto" becomes cuda, else mps, else cpu (the first this
    torch can use); any other name is returned as given, or refused in one line that names the
    flag and the fix when this torch cannot use it (torch's own errors are tracebacks from deep
    inside the first tensor move)."""
    if name is None:
        return None
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    build = f"torch {torch.__version__}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{flag} {name}: not a device name; use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cpu":
        return name
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
        return name
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"{flag} {name}: MPS is not available here ({build}; it needs Apple silicon "
                f"and a macOS build of torch); use {flag} cpu"
            )
        return name
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(
            f"{flag} {name}: this torch cannot use {device.type!r} devices ({build}); use {flag} cpu or cuda"
        )
    return name


def check_dtype(name: str | None, flag: str = "--dtype") -> str | None:
    """The dtype name to load with: None for "auto" (the checkpoint's own); an unknown name is
    refused before the model is read, naming the flag."""
    if name is None or name == "auto":
        return None
    from ..model.checkpoint import _parse_dtype

    try:
        _parse_dtype(name)
    except ValueError as error:
        raise ValueError(f"{flag} {name}: {error}") from None
    return name


QUANTIZE_MODES = ("int8-weight", "int8-dynamic", "int4-weight")  # llada.quantization.MODES


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize and --compile: applied to the loaded model, from outside it."""
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_MODES,
        default=None,
        help="quantize the weights after loading (torchao; `quant` extra): int8-weight and "
        "int8-dynamic on CPU or GPU, int4-weight on CUDA (default: off; a folder saved "
        "quantized loads quantized without it)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model's forward (mode chosen per device; the first calls "
        "are slow while it compiles)",
    )


def _apply_runtime(args: argparse.Namespace, model):
    """The loaded model with --quantize and --compile applied (when the command has them)."""
    mode = getattr(args, "quantize", None)
    if mode is not None:
        if getattr(args, "tensor_parallel", False):
            raise ValueError("--quantize with --tensor-parallel is not supported yet; use one")
        from ..quantization import is_quantized, quantize

        if not is_quantized(model):
            model = quantize(model, mode)
        elif model.quantization["mode"] != mode:
            raise ValueError(
                f"--quantize {mode}: this folder is saved quantized as "
                f"{model.quantization['mode']}; load it without --quantize"
            )
    if getattr(args, "compile", False):
        from ..compile import compile_model

        model = compile_model(model)
    return model


def add_tensor_parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tensor-parallel",
        action="store_true",
        help="split a LLaDA 2.x model over the processes torchrun starts, one per GPU (or gloo "
        "processes on CPUs): attention heads and dense layers tensor-parallel, MoE experts "
        "expert-parallel, e.g. torchrun --nproc-per-node 8 -m llada.cli.main generate "
        "--tensor-parallel --device cuda --model DIR ... (only rank 0 writes output)",
    )


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer, is_random) for --model/--dtype/--device, with a note on stderr when
    no model is given and none is shipped, so the command runs on a random stand-in. With
    --tensor-parallel under torchrun, this rank's share of the model (`llada.parallel`); the
    process's `Distributed` is then `args.parallel_env`."""
    import os
    import sys

    from ..api import load

    args.device = check_device(args.device)
    args.dtype = check_dtype(args.dtype)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(args, "tensor_parallel", False):
        model, tokenizer, is_random = _load_tensor_parallel(args)
        return _apply_runtime(args, model), tokenizer, is_random
    if world_size > 1:
        raise ValueError(
            f"started by torchrun with {world_size} processes: pass --tensor-parallel to split "
            "a LLaDA 2.x model over them (every process would otherwise run the whole command)"
        )
    model, tokenizer, is_random = load(args.model, dtype=args.dtype, device=args.device)
    if is_random:
        print(
            "note: no trained model is shipped with this install, so this runs on a small "
            f"random-weight LLaDA created at {model.checkpoint_folder}; its text is noise. "
            "Pass --model PATH for a real one.",
            file=sys.stderr,
        )
    return _apply_runtime(args, model), tokenizer, is_random


def _load_tensor_parallel(args: argparse.Namespace):
    """This rank's share of a LLaDA 2.x model (`llada.parallel.load_tensor_parallel`): ranks
    other than 0 write nothing to standard output; the process group ends at exit."""
    import atexit
    import os
    import sys

    from ..api import resolve_model_path
    from ..parallel import load_tensor_parallel, setup_from_env
    from ..tokenizer import load_tokenizer
    from ..train.parallel import shutdown

    if args.model is None:
        raise ValueError("--tensor-parallel needs --model (a LLaDA 2.x folder or hub id)")
    folder, is_random = resolve_model_path(args.model)
    env, mesh = setup_from_env("cuda" if args.device.startswith("cuda") else "cpu")
    atexit.register(shutdown, env)
    args.parallel_env = env
    if mesh is None:
        print(
            "note: --tensor-parallel without torchrun: one process holds the whole model "
            "(launch with torchrun --nproc-per-node N to split it)",
            file=sys.stderr,
        )
    elif not env.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    model = load_tensor_parallel(folder, mesh, dtype=args.dtype, device=env.device)
    return model, load_tokenizer(folder), is_random


def add_run_arguments(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """--config FILE, --no-progress and a flag per field of the run settings `cls` (flags not
    given stay None, so the file supplies them): `llada train` and `llada rl`."""
    parser.add_argument(
        "--config", default=None, help="JSON file of settings; flags given here override it"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_arguments(parser, cls, title, suppress_defaults=True)


def run_settings(cls: type, args: argparse.Namespace) -> Any:
    """`cls.from_dict` of the --config file's settings with the flags given on top."""
    import json

    settings: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            settings = json.load(f)
    given = {f.name: getattr(args, f.name) for f in fields(cls)}
    settings.update({k: v for k, v in given.items() if v is not None})
    return cls.from_dict(settings)


def say_above_progress(line: str) -> None:
    """A line of a run, above its progress bar; warnings to stderr."""
    import sys

    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr if line.startswith("warning:") else sys.stdout)
