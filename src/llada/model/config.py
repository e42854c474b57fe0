"""The dense LLaDA model configuration: every key of the official config.json, validated.

`LLaDAConfig()` is the LLaDA-8B architecture. `LLaDAConfig.from_hf_dict` reads an official
config.json the way the reference does: keys the file leaves out take the reference
`ModelConfig` defaults (GPT-2-like, those of GSAI-ML/LLaDA-8B-Instruct's configuration_llada.py),
not ours, so that a folder means the same model
here as under the reference code. Keys we do not know are kept and written back on save.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ..tokens import LLADA_8B

# What the reference `ModelConfig()` gives a key that config.json leaves out
# (GSAI-ML/LLaDA-8B-Instruct configuration_llada.py).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "d_model": 768,
    "n_heads": 12,
    "n_kv_heads": None,
    "n_layers": 12,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "block_group_size": 1,
    "alibi": False,
    "alibi_bias_max": 8.0,
    "rope": False,
    "rope_full_precision": True,
    "flash_attention": False,
    "attention_dropout": 0.1,
    "multi_query_attention": None,
    "attention_layer_norm": False,
    "residual_dropout": 0.1,
    "embedding_dropout": 0.1,
    "input_emb_norm": False,
    "layer_norm_type": "default",
    "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-05,
    "attention_layer_norm_with_affine": True,
    "max_sequence_length": 1024,
    "rope_theta": 10000.0,
    "include_qkv_bias": False,
    "include_bias": False,
    "bias_for_layer_norm": None,
    "scale_logits": False,
    "vocab_size": 50257,
    "embedding_size": 50304,
    "weight_tying": True,
    "eos_token_id": 50256,
    "pad_token_id": 50256,
    "mask_token_id": 50256,
    "init_device": None,
    "init_fn": "normal",
    "init_std": 0.02,
    "init_cutoff_factor": None,
    "precision": None,
    "use_cache": False,
}

# Keys that transformers writes and the official folders carry; `to_hf_dict` sets them.
_HF_AUTO_MAP = {
    "AutoConfig": "configuration_llada.LLaDAConfig",
    "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
    "AutoModel": "modeling_llada.LLaDAModelLM",
}


# Upper bounds on the sizes a config.json may ask for: about 30x beyond the largest released
# dense LLMs, so no real model is refused, while a corrupt or hostile file is refused at once.
_SIZE_LIMITS: dict[str, int] = {
    "d_model": 1 << 17,
    "n_heads": 1 << 12,
    "n_kv_heads": 1 << 12,
    "n_layers": 1 << 12,
    "mlp_ratio": 1 << 8,
    "mlp_hidden_size": 1 << 20,
    "vocab_size": 1 << 24,
    "embedding_size": 1 << 24,
    "max_sequence_length": 1 << 24,
    "block_group_size": 1 << 12,
}
_OPTIONAL_SIZES = {"n_kv_heads", "mlp_hidden_size", "embedding_size"}
_REAL_KEYS = (
    "rope_theta",
    "rms_norm_eps",
    "attention_dropout",
    "residual_dropout",
    "embedding_dropout",
    "alibi_bias_max",
    "init_std",
    "init_cutoff_factor",
)
_BOOL_KEYS = ("weight_tying", "rope_full_precision", "scale_logits", "multi_query_attention")


@dataclass(frozen=True)
class LLaDAConfig:
    """Hyper-parameters of a dense LLaDA model, named as in the official config.json.

    The defaults are LLaDA-8B-Instruct's (its config.json). Options the reference offers but this
    implementation does not (ALiBi, models without RoPE, OLMo block types, biases, QK-norm) are
    refused at construction with an error naming the key.
    """

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    rope_theta: float = 500000.0
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-05
    max_sequence_length: int = 4096
    include_qkv_bias: bool | None = False
    include_bias: bool = False
    bias_for_layer_norm: bool | None = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = LLADA_8B.eos_id
    pad_token_id: int | None = LLADA_8B.pad_id
    mask_token_id: int | None = LLADA_8B.mask_id
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False
    # Keys of config.json that are not model hyper-parameters (transformers_version, ...) or that
    # this version does not know; written back unchanged by `to_hf_dict`.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._check_types_and_sizes()
        refusals = {
            "alibi": (self.alibi, False, "ALiBi position biases are not implemented"),
            "rope": (self.rope, True, "only RoPE models are implemented"),
            "block_type": (self.block_type, "llama", "only the 'llama' block is implemented"),
            "activation_type": (
                self.activation_type,
                "silu",
                "only SiLU-gated MLPs are implemented",
            ),
            "layer_norm_type": (self.layer_norm_type, "rms", "only RMSNorm is implemented"),
            "layer_norm_with_affine": (
                self.layer_norm_with_affine,
                True,
                "norms without weights are not implemented",
            ),
            "attention_layer_norm": (
                self.attention_layer_norm,
                False,
                "QK-norm is not implemented for dense LLaDA",
            ),
            "include_bias": (self.include_bias, False, "linear biases are not implemented"),
            "include_qkv_bias": (
                bool(self.include_qkv_bias),
                False,
                "q/k/v biases are not implemented",
            ),
            "bias_for_layer_norm": (
                bool(self.bias_for_layer_norm),
                False,
                "norm biases are not implemented",
            ),
            "input_emb_norm": (
                self.input_emb_norm,
                False,
                "input embedding normalisation is not implemented",
            ),
            "block_group_size": (self.block_group_size, 1, "grouped blocks are not implemented"),
        }
        for key, (value, supported, why) in refusals.items():
            if value != supported:
                raise ValueError(
                    f"config key '{key}' = {value!r} is not supported ({why}); "
                    f"this implementation needs '{key}' = {supported!r}."
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"RoPE needs an even head dimension; d_model/n_heads = {self.head_dim}."
            )
        if (
            self.n_kv_heads is not None
            and self.multi_query_attention is not None
            and self.n_kv_heads != (1 if self.multi_query_attention else self.n_heads)
        ):
            raise ValueError(
                "config keys 'multi_query_attention' and 'n_kv_heads' disagree; set one of them to null."
            )
        if self.n_heads % self.effective_n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.effective_n_kv_heads})."
            )
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            raise ValueError(
                f"embedding_size ({self.embedding_size}) must be at least vocab_size ({self.vocab_size})."
            )
        for key in ("attention_dropout", "residual_dropout", "embedding_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(
                    f"config key '{key}' must be in [0, 1), got {getattr(self, key)!r}"
                )

    def _check_types_and_sizes(self) -> None:
        """Types and bounds of the keys that decide shapes and numerics, checked before anything
        is computed from them, so that a hand-edited or hostile config.json gets one line naming
        the key instead of a TypeError deep in the model, or minutes spent building a
        2,000,000-layer model."""
        check_config_values(
            self,
            sizes=_SIZE_LIMITS,
            optional=_OPTIONAL_SIZES | {"init_cutoff_factor", "multi_query_attention"},
            token_ids=("eos_token_id", "pad_token_id", "mask_token_id"),
            reals=_REAL_KEYS,
            bools=_BOOL_KEYS,
        )
        for key in ("rope_theta", "rms_norm_eps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config key '{key}' must be positive, got {getattr(self, key)!r}")

    # Derived sizes -------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def hidden_size(self) -> int:
        """Width of the SwiGLU layer (`mlp_hidden_size`, else `mlp_ratio * d_model`)."""
        return (
            self.mlp_hidden_size
            if self.mlp_hidden_size is not None
            else self.mlp_ratio * self.d_model
        )

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head; logits have this many columns."""
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    def num_parameters(self, include_embeddings: bool = True) -> int:
        d, h, kv = self.d_model, self.hidden_size, self.effective_n_kv_heads * self.head_dim
        per_block = 2 * d + d * d + 2 * d * kv + d * d + 3 * d * h
        total = self.n_layers * per_block + d
        if include_embeddings:
            total += self.padded_vocab_size * d * (1 if self.weight_tying else 2)
        return total

    def with_changes(self, **changes: Any) -> LLaDAConfig:
        return replace(self, **changes)

    # config.json -------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LLaDAConfig:
        """Build from the dict of an official config.json (missing keys: reference defaults)."""
        if not isinstance(data, dict):
            raise ValueError(
                f"a config must be a JSON object of keys and values, got {type(data).__name__}"
            )
        if data.get("model_type") not in (None, "llada"):
            raise ValueError(
                f"config.json has model_type '{data.get('model_type')}', expected 'llada' "
                "(LLaDA-MoE checkpoints use a different architecture)."
            )
        from .llada_moe import MARKER_KEYS

        moe_keys = [k for k in MARKER_KEYS if k in data]
        if moe_keys:
            # Otherwise every dense key would take its GPT-2-like default: a silent wrong model.
            raise ValueError(
                f"this config describes a LLaDA-MoE model ({', '.join(moe_keys)}), not a dense "
                "LLaDA one; load it with llada.load_model or build it with LLaDAMoEConfig"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data.get(k, REFERENCE_DEFAULTS.get(k)) for k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LLaDAConfig:
        return config_from_json_file(cls, path)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """The official config.json, with `auto_map` so that the reference remote code loads it."""
        data = {k: v for k, v in self.extra.items()}
        data.update({k: v for k, v in asdict(self).items() if k != "extra"})
        data["architectures"] = ["LLaDAModelLM"]
        data["auto_map"] = dict(_HF_AUTO_MAP)
        data["model_type"] = "llada"
        if torch_dtype is not None:
            data["torch_dtype"] = torch_dtype
        data.setdefault("torch_dtype", "float32")
        return dict(sorted(data.items()))


def check_config_values(
    config: object,
    *,
    sizes: Mapping[str, int] | None = None,
    optional: Collection[str] = (),
    token_ids: Collection[str] = (),
    reals: Collection[str] = (),
    bools: Collection[str] = (),
) -> None:
    """Types and bounds of a config's keys, for every family, with one line naming the key.

    sizes: key -> largest accepted value (positive integers); token_ids: non-negative integers;
    reals: finite numbers; bools: true or false. Keys in `optional` may be None."""
    for key, limit in (sizes or {}).items():
        value = getattr(config, key)
        if value is None and key in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0:
            raise ValueError(
                f"config key '{key}' must be a positive integer, got {value!r}"
                + (" (a string)" if isinstance(value, str) else "")
            )
        if value > limit:
            raise ValueError(
                f"config key '{key}' = {value} is beyond what llada loads (at most {limit}: "
                "is the file corrupt?)"
            )
    for key in token_ids:
        value = getattr(config, key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, Integral) or value < 0
        ):
            raise ValueError(
                f"config key '{key}' must be a non-negative integer token id, got {value!r}"
            )
    for key in reals:
        value = getattr(config, key)
        if value is None and key in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"config key '{key}' must be a finite number, got {value!r}")
    for key in bools:
        value = getattr(config, key)
        if value is None and key in optional:
            continue
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be true or false, got {value!r}")


def config_from_json_file(cls: Any, path: str | Path) -> Any:
    """`cls.from_hf_dict` of a config.json file, with errors that name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    try:
        return cls.from_hf_dict(data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


class HFConfigNames:
    """The family-independent names the samplers, likelihood and trainer read (the dense
    config's own field names), for a config named as HF-LLaMA's (`hidden_size`,
    `num_hidden_layers`, ...): LLaDA-MoE's and LLaDA 2.x's."""

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def weight_tying(self) -> bool:
        return self.tie_word_embeddings

    @property
    def residual_dropout(self) -> float:
        return 0.0  # these references have attention (and embedding) dropout only

    @property
    def mask_token_id(self) -> int | None:
        # Not an official key: the mask id comes from the tokenizer files (`<|mask|>`) and is
        # kept among the extra keys when a config is made for a new model.
        value = self.extra.get("mask_token_id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None
