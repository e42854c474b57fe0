"""generation_config.json: the sampler settings a checkpoint folder carries.

transformers keeps a model's default decoding settings in generation_config.json. A masked
diffusion model has other settings (steps, block length, remasking) than a left-to-right one, so
llada keeps them in that file under one key, `"llada"`, with the names and meaning of
`llada.sampling.config.GenerateConfig`:

    {
      "_from_model_config": true,
      "bos_token_id": 0,
      "eos_token_id": 1,
      "pad_token_id": 1,
      "mask_token_id": 2,
      "llada": {"steps": 64, "gen_length": 64, "block_length": 32, "temperature": 0.0}
    }

The top-level keys are transformers' own (the token ids). The `"llada"` object holds any subset
of GenerateConfig's fields; what it leaves out keeps GenerateConfig's default. Nothing here
imports transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

GENERATION_CONFIG_FILE = "generation_config.json"
# The key of generation_config.json that holds llada's sampler settings.
SAMPLER_KEY = "llada"


def read_generation_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a folder's generation_config.json; {} when there is none.

    ValueError naming the file when it is not a JSON object.
    """
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({' '.join(str(error).split())[:200]}); fix or delete it"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; fix or delete it")
    return data


def generation_defaults(folder: str | os.PathLike) -> dict[str, Any]:
    """The sampler settings a checkpoint folder asks for, as GenerateConfig keyword arguments.

    Reads the `"llada"` object of generation_config.json; {} when the file or the key is absent.
    The result is validated: every key must be a field of `GenerateConfig` and the settings must
    build one (`GenerateConfig(**generation_defaults(folder))` holds), so a bad file is refused
    here with a ValueError naming the file and the key, not later inside a sampler. Settings
    given on a command line or in a call should override these (`{**defaults, **given}`).
    """
    from .sampling.config import GenerateConfig

    path = Path(folder) / GENERATION_CONFIG_FILE
    section = read_generation_config(folder).get(SAMPLER_KEY)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(
            f"{path}: '{SAMPLER_KEY}' must be an object of sampler settings, e.g. "
            '{"steps": 64, "gen_length": 64}; fix or delete it'
        )
    known = [f.name for f in dataclasses.fields(GenerateConfig)]
    unknown = [key for key in section if key not in known]
    if unknown:
        raise ValueError(
            f"{path}: '{SAMPLER_KEY}' has unknown sampler settings {unknown}; the settings are "
            f"{', '.join(known)}"
        )
    try:
        GenerateConfig(**section)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: the '{SAMPLER_KEY}' settings are invalid: {error}") from None
    return dict(section)


def sampler_settings(settings: Any) -> dict[str, Any]:
    """A GenerateConfig (or any dataclass) or a mapping of settings -> a plain dict."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return dataclasses.asdict(settings)
    if isinstance(settings, Mapping):
        return dict(settings)
    raise TypeError(
        f"generation settings must be a GenerateConfig or a dict, got {type(settings).__name__}"
    )
