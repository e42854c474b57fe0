"""llada checkpoints through transformers' Auto classes and `pipeline`.

`import llada.hf` (or `llada.register_with_transformers()`) registers llada's models with
transformers, after which the usual calls load a llada checkpoint folder without remote code:

    import llada.hf
    from transformers import AutoModel, AutoTokenizer, pipeline

    model = AutoModel.from_pretrained("models/llada-tiny-instruct")
    tokenizer = AutoTokenizer.from_pretrained("models/llada-tiny-instruct")
    generator = pipeline("text-generation", model="models/llada-tiny-instruct")

Registration is explicit, not a side effect of `import llada`: transformers takes seconds to
import, and `import llada` (and `llada --help`) must stay fast and torch-free.

What is registered. config.json's `model_type` picks the config class: `"llada"` (dense LLaDA
and LLaDA-MoE, whose official config.json both say "llada") and `"llada2_moe"` (LLaDA 2.x). The
model classes (`LLaDAForMaskedDiffusion`, `LLaDA2ForMaskedDiffusion`) serve AutoModel,
AutoModelForMaskedLM and AutoModelForCausalLM (the class the official `auto_map` names, and the
one `pipeline("text-generation")` asks for). They are thin `PreTrainedModel` wrappers around
llada's own model (`.model`, an `LLaDAModel`, `LLaDAMoEModel` or `LLaDA2Model`), loaded by
`llada.load_model`: the official tensor names are mapped by `llada.model.families`, and only
safetensors and JSON are read. A model_type that transformers itself already knows is left to
transformers, and `trust_remote_code=True` with the official modeling_*.py files in the folder
still loads the official code, as transformers gives remote code precedence.

`generate` runs llada's sampler (`llada.sampling.fast.sample`), not transformers' left-to-right
decoding, with the folder's sampler settings (generation_config.json, `generation_defaults`):
it fills `max_new_tokens` masked positions after the prompt and returns prompt + answer, the
answer cut at its first EOS/EoT (the rest is EOS).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    GenerationConfig,
    PreTrainedModel,
)

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .generation_config import generation_defaults
from .model.checkpoint import load_model, resolve_checkpoint
from .model.checkpoint import save_pretrained as _save_pretrained
from .model.families import detect_family

__all__ = [
    "LLaDA2ForMaskedDiffusion",
    "LLaDA2HFConfig",
    "LLaDAForMaskedDiffusion",
    "LLaDAHFConfig",
    "generation_defaults",
    "register_with_transformers",
]


class LLaDAHFConfig(PreTrainedConfig):
    """config.json of a dense LLaDA or LLaDA-MoE folder, as transformers reads it.

    The keys stay as the file writes them; llada's own config class is built from them when a
    model is made (`LLaDAForMaskedDiffusion`)."""

    model_type = "llada"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # LLaDA-MoE's and LLaDA 2.x's config.json write `"rope_scaling": null`, which
        # transformers reports as a deprecated key on every load; null means what leaving it
        # out means.
        if config_dict.get("rope_scaling", 0) is None:
            config_dict = {k: v for k, v in config_dict.items() if k != "rope_scaling"}
        return super().from_dict(config_dict, **kwargs)


class LLaDA2HFConfig(LLaDAHFConfig):
    """config.json of a LLaDA 2.x folder (`"model_type": "llada2_moe"`), as transformers reads it."""

    model_type = "llada2_moe"


# Keyword arguments of `from_pretrained` that choose where a folder comes from. llada resolves
# the folder itself (`resolve_checkpoint`); these may only say what it does anyway.
_HUB_DEFAULTS = {
    "cache_dir": None,
    "force_download": False,
    "local_files_only": False,
    "proxies": None,
    "revision": "main",
    "subfolder": "",
    "token": None,
    "use_safetensors": True,
}
# Keyword arguments transformers passes along that have no meaning for llada's loader.
_IGNORED = {"_from_auto", "_from_pipeline", "_commit_hash", "trust_remote_code", "code_revision"}
# Keys of a transformers GenerationConfig that do not change what llada's sampler does.
_TOKEN_KEYS = {"bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"}


class LLaDAForMaskedDiffusion(PreTrainedModel):
    """A llada model as transformers' Auto classes return it.

    `.model` is llada's own model (see `llada.load_model`); `forward` returns its logits as a
    `MaskedLMOutput`; `generate` runs llada's sampler; `save_pretrained` writes an official
    checkpoint folder (`llada.save_pretrained`). `.special_tokens` are the model's token ids.
    """

    config_class = LLaDAHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: PreTrainedConfig, model: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        if model is None:
            # A new model with fresh weights, from the config alone (`AutoModel.from_config`).
            data = config.to_diff_dict()
            family = detect_family(data)
            model = family.model_class(family.config_class.from_hf_dict(data))
            model.special_tokens = None
        self.model = model
        self.generation_config = _generation_config(model, {})
        self.post_init()

    def init_weights(self) -> None:
        """Nothing: llada's model initialises its weights when it is built (`post_init` would
        overwrite loaded weights with transformers' defaults otherwise)."""

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing, as `init_weights`."""

    @property
    def special_tokens(self):
        return self.model.special_tokens

    @classmethod
    def can_generate(cls) -> bool:
        return True

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: PreTrainedConfig | None = None,
        **kwargs: Any,
    ) -> LLaDAForMaskedDiffusion:
        """Load a checkpoint folder (or hub id) with `llada.load_model`.

        dtype (or torch_dtype): None or "auto" keeps the checkpoint's. device_map: None (CPU),
        one device ("cuda", "cuda:1", torch.device, an index, {"": device}) or "auto" (the first
        GPU if there is one). attn_implementation: "sdpa" or "eager". A setting llada's loader
        cannot honour (a split device_map, quantization, ...) is refused with a ValueError.
        """
        if model_args:
            raise ValueError(
                f"{cls.__name__}.from_pretrained takes no positional arguments after the folder"
            )
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        if dtype is None:
            dtype = torch_dtype
        if dtype == "auto":
            dtype = None
        device = _device_of(kwargs.pop("device_map", None))
        attn_implementation = kwargs.pop("attn_implementation", None) or "sdpa"
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not available for llada models; "
                "use 'sdpa' or 'eager'"
            )
        adapter = kwargs.pop("adapter_kwargs", None) or {}
        if "_adapter_model_path" in adapter:
            raise ValueError("PEFT adapters are not supported for llada models; merge them first")
        revision = kwargs.get("revision")
        if isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision):
            # AutoModel resolves the revision to a commit; llada loads the main one.
            kwargs.pop("revision")
        for key, default in _HUB_DEFAULTS.items():
            value = kwargs.pop(key, default)
            if value not in (default, None) and not (key == "use_safetensors" and value):
                raise ValueError(
                    f"{key}={value!r} is not supported for llada models: llada loads the folder "
                    "or the hub id's main revision itself; download the folder and pass its path"
                )
        for key in _IGNORED:
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(
                f"{cls.__name__}.from_pretrained does not take {sorted(kwargs)}; it takes dtype, "
                "device_map (one device) and attn_implementation"
            )
        folder = resolve_checkpoint(pretrained_model_name_or_path)
        model = load_model(
            folder, dtype=dtype, device=device, attn_implementation=attn_implementation
        )
        if config is None or not isinstance(config, cls.config_class):
            config = cls.config_class.from_pretrained(str(folder))
        config.name_or_path = str(pretrained_model_name_or_path)
        wrapper = cls(config, model=model)
        wrapper.generation_config = _generation_config(model, generation_defaults(folder))
        return wrapper.eval()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput:
        """input_ids (B, T) -> `MaskedLMOutput` with logits (B, T, vocab) (llada's forward; other
        keyword arguments go to it)."""
        out = self.model(
            input_ids, attention_mask, output_hidden_states=bool(output_hidden_states), **kwargs
        )
        return MaskedLMOutput(logits=out.logits, hidden_states=out.hidden_states)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Masked diffusion sampling after each (left-padded) prompt row.

        Settings: the folder's (`generation_defaults`), then what `generation_config` and the
        keyword arguments set, in transformers' names where they mean the same thing
        (max_new_tokens -> gen_length, with steps and block_length following it unless set;
        do_sample=False -> temperature 0, do_sample=True -> the given temperature, else the
        folder's if above 0, else 1) or in `GenerateConfig`'s names (steps, block_length,
        cfg_scale, remasking, ...). Returns
        (B, T + gen_length) ids; after the first EOS/EoT of an answer every id is EOS.
        """
        from .api import default_decode
        from .sampling.config import GenerateConfig
        from .sampling.fast import sample

        if input_ids is None:
            raise ValueError("generate needs input_ids: LLaDA answers a prompt (B, T)")
        given: dict[str, Any] = {}
        if generation_config is not None:
            given.update(generation_config.to_diff_dict())
        given.update(kwargs)
        settings = _sampler_settings(self.generation_config, given)
        config = GenerateConfig(**settings)
        tokens = self.model.special_tokens
        if tokens is None:
            raise ValueError(
                "this model has no special token ids (made from a config, not loaded from a "
                "folder); load it with from_pretrained to generate"
            )
        decode = default_decode(self.model, interactive=False)
        ids = input_ids.to(self.model.device)
        mask = None if attention_mask is None else attention_mask.to(self.model.device)
        if mask is not None and bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError(
                "the prompts are right-padded; LLaDA writes the answer after the prompt, so pad "
                "on the left (tokenizer.padding_side = 'left')"
            )
        out = sample(self.model, ids, mask, config, decode).tokens
        answer = out[:, ids.shape[1] :]
        stop = torch.zeros_like(answer, dtype=torch.bool)
        for stop_id in tokens.stop_ids:
            stop |= answer == stop_id
        after_stop = stop.long().cumsum(dim=1) > 0
        answer = answer.masked_fill(after_stop, tokens.eos_id)
        return torch.cat([out[:, : ids.shape[1]], answer], dim=1)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write an official checkpoint folder with `llada.save_pretrained` (max_shard_size
        and dtype are passed on; the sampler settings of `generation_config.llada` are kept).
        The tokenizer is saved by the tokenizer's own `save_pretrained`."""
        options = {k: kwargs.pop(k) for k in ("max_shard_size", "dtype") if k in kwargs}
        for key in ("safe_serialization", "is_main_process", "push_to_hub", "state_dict"):
            value = kwargs.pop(key, None)
            if key == "push_to_hub" and value:
                raise ValueError("push_to_hub is not supported; upload the saved folder yourself")
            if key == "state_dict" and value is not None:
                raise ValueError("state_dict is not supported; call llada.save_pretrained")
        if kwargs:
            raise ValueError(
                f"save_pretrained does not take {sorted(kwargs)}; it takes max_shard_size, dtype"
            )
        sampler = getattr(self.generation_config, "llada", None)
        _save_pretrained(self.model, save_directory, generation=sampler, **options)


class LLaDA2ForMaskedDiffusion(LLaDAForMaskedDiffusion):
    """A LLaDA 2.x model as transformers' Auto classes return it."""

    config_class = LLaDA2HFConfig


def _device_of(device_map: Any) -> torch.device:
    """The one device a `device_map` names; llada places a model on one device."""
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(
                "a device_map that splits the model is not supported for llada models; pass one "
                "device (device_map='cuda'), or use llada's tensor parallelism (see the README)"
            )
        device_map = device_map[""]
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device_map={device_map!r} is not a device; pass e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from None


def _generation_config(model: torch.nn.Module, sampler: dict[str, Any]) -> GenerationConfig:
    """transformers' view of a model's sampler settings: the llada settings under `llada`,
    and the few that transformers has its own names for (max_new_tokens, do_sample,
    temperature), so that `pipeline` adds none of its own defaults."""
    from .sampling.config import GenerateConfig

    full = dataclasses.asdict(GenerateConfig(**sampler))
    values: dict[str, Any] = {
        "max_new_tokens": full["gen_length"],
        "do_sample": full["temperature"] > 0,
        "llada": dict(sampler),
    }
    if full["temperature"] > 0:
        values["temperature"] = full["temperature"]
    tokens = getattr(model, "special_tokens", None)
    if tokens is not None:
        values.update(eos_token_id=tokens.eos_id, pad_token_id=tokens.pad_id)
        if tokens.bos_id is not None:
            values["bos_token_id"] = tokens.bos_id
    return GenerationConfig(**values)


def _sampler_settings(defaults: GenerationConfig, given: dict[str, Any]) -> dict[str, Any]:
    """GenerateConfig keyword arguments from the model's settings and a call's (see
    `LLaDAForMaskedDiffusion.generate`); ValueError for a setting llada's sampler lacks."""
    from .sampling.config import GenerateConfig

    fields = {f.name for f in dataclasses.fields(GenerateConfig)}
    settings = dict(getattr(defaults, "llada", None) or {})
    settings.update(given.pop("llada", None) or {})
    explicit = set(settings)
    max_new_tokens = given.pop("max_new_tokens", None)
    do_sample = given.pop("do_sample", None)
    temperature = given.pop("temperature", None)
    for key in list(given):
        if key in fields:
            settings[key] = given.pop(key)
            explicit.add(key)
    if max_new_tokens is not None and max_new_tokens != settings.get("gen_length"):
        settings["gen_length"] = max_new_tokens
        # Settings tied to the old length follow the new one unless they were set.
        if "block_length" not in explicit or settings["block_length"] > max_new_tokens:
            settings["block_length"] = max_new_tokens
        if "steps" not in explicit:
            settings["steps"] = max_new_tokens
    if do_sample is False:
        settings["temperature"] = 0.0
    elif temperature is not None:
        settings["temperature"] = float(temperature)
    elif do_sample and not settings.get("temperature"):
        # Sampling without a temperature samples at 1, as in transformers.
        settings["temperature"] = 1.0
    unknown = {
        key: value
        for key, value in given.items()
        if key not in _TOKEN_KEYS
        and not key.startswith("_")
        and key not in ("transformers_version", "use_cache")
        and value is not None
    }
    if unknown:
        raise ValueError(
            f"LLaDA is a masked diffusion model; its sampler has no {sorted(unknown)}. It takes "
            f"max_new_tokens, do_sample, temperature and {', '.join(sorted(fields - {'temperature'}))}"
        )
    return settings


_REGISTERED = False


def register_with_transformers() -> None:
    """Register llada's config and model classes with transformers' Auto classes (idempotent;
    importing `llada.hf` does it). A model_type transformers already knows is left alone."""
    global _REGISTERED
    if _REGISTERED:
        return
    for config_class, model_class in (
        (LLaDAHFConfig, LLaDAForMaskedDiffusion),
        (LLaDA2HFConfig, LLaDA2ForMaskedDiffusion),
    ):
        if config_class.model_type in CONFIG_MAPPING and (
            CONFIG_MAPPING[config_class.model_type] is not config_class
        ):
            continue
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
            auto.register(config_class, model_class, exist_ok=True)
    _REGISTERED = True


register_with_transformers()
