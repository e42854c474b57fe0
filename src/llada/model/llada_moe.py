"""The LLaDA-MoE mask predictor (inclusionAI/LLaDA-MoE-7B-A1B): a bidirectional transformer with
QK-norm, partial RoPE and softmax-routed SwiGLU experts.

The numerics follow the reference modeling code (ZHZisZZ/dllm's copy of the official
`modeling_lladamoe.py`, dllm/pipelines/llada/models/modeling_lladamoe.py):
- pre-norm LLaMA blocks; RMSNorm in float32, cast back before the weight multiply;
- QK-norm: one RMSNorm over head_dim, shared by all heads, applied to q and k BEFORE RoPE (and
  before the optional clip_qkv clamp);
- RoPE on the first int(head_dim * partial_rotary_factor) dims of each head (rotate-half within
  that slice), the rest pass through; float32 tables, the rotation in the activation dtype;
- router: probabilities = softmax(gate(x)) in float32; with `moe_router_enable_expert_bias` the
  bias is ADDED TO THE PROBABILITIES, top-k is taken on the biased values and those biased values
  are the weights; no renormalisation (the reference hard-codes norm_topk_prob off, whatever the
  config says); `moe_router_score_function`, `routed_scaling_factor` and the group keys are kept
  in the config but unused, as in the reference;
- an optional shared expert (a sibling of the routed experts, weight 1) and dense layers where
  `moe_layer_freq` says 0;
- attention is never causal and honours a left-padding mask, as dllm's copy does (the official
  remote code drops the mask: padding tokens are attended there);
- logits in the model dtype.

The experts' weights are stacked per projection (see `experts.py`); the checkpoint name map
(`families.py`) stacks and splits the official per-expert tensors. The call interface is the
dense `LLaDAModel`'s, so the samplers, KV caches, likelihood and losses work unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Real
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tokens import LLADA_MOE
from .config import HFConfigNames, check_config_values, config_from_json_file
from .experts import experts_forward
from .transformer import (
    AttentionImplementation,
    LayerCache,
    MaskPredictor,
    RMSNorm,
    RotaryEmbedding,
    RotaryTables,
    SwiGLU,
    attend,
    cached_keys_values,
)

# What `architectures` says in the official config.json (llama.cpp registers both names).
ARCHITECTURES = ("LLaDAMoEModelLM", "LLaDAMoEModel")
# Keys only a LLaDA-MoE config has; any of them marks the family.
MARKER_KEYS = ("num_experts", "expert_intermediate_size", "moe_layer_freq")
# Keys the official config class takes with -1 placeholders as defaults: config.json must say.
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts",
    "num_experts_per_tok",
    "expert_intermediate_size",
)
_AUTO_MAP = {
    "AutoConfig": "configuration_lladamoe.LLaDAConfig",
    "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
    "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
}
# Bounds that refuse a corrupt or hostile config.json at once (far beyond any released model).
_SIZE_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "num_experts": 1 << 14,
    "num_experts_per_tok": 1 << 14,
    "expert_intermediate_size": 1 << 20,
    "dense_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "max_position_embeddings": 1 << 24,
}
_OPTIONAL_SIZES = {
    "num_key_value_heads",
    "dense_intermediate_size",
    "shared_expert_intermediate_size",
}


@dataclass(frozen=True)
class LLaDAMoEConfig(HFConfigNames):
    """Hyper-parameters of a LLaDA-MoE model, named as in the official config.json.

    The defaults are LLaDA-MoE-7B-A1B's: 16 layers, hidden 2048, 16 heads (no GQA), 64 experts
    top-8 of width 1024, every layer MoE, no shared expert, vocabulary 157184. Keys this version
    does not know are kept in `extra` and written back by `to_hf_dict`.
    """

    vocab_size: int = 157184
    hidden_size: int = 2048
    dense_intermediate_size: int | None = 8192
    expert_intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = 16
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-05
    use_cache: bool = False
    pad_token_id: int | None = LLADA_MOE.pad_id
    bos_token_id: int | None = None
    eos_token_id: int | None = LLADA_MOE.eos_id
    tie_word_embeddings: bool = False
    rope_theta: float = 50000.0
    partial_rotary_factor: float = 1.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    clip_qkv: float | None = None
    num_experts_per_tok: int = 8
    num_experts: int = 64
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.01
    norm_topk_prob: bool = False
    qk_layernorm: bool = True
    moe_layer_freq: tuple[int, ...] | None = None
    moe_router_enable_expert_bias: bool = False
    moe_router_score_function: str = "softmax"
    routed_scaling_factor: float = 1.0
    router_num_group: int | None = None
    router_topk_group: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.moe_layer_freq, list):
            object.__setattr__(self, "moe_layer_freq", tuple(self.moe_layer_freq))
        self._check()

    def _check(self) -> None:
        check_config_values(
            self,
            sizes=_SIZE_LIMITS,
            optional=_OPTIONAL_SIZES,
            token_ids=("pad_token_id", "bos_token_id", "eos_token_id"),
            reals=("rope_theta", "rms_norm_eps", "partial_rotary_factor", "attention_dropout"),
            bools=(
                "tie_word_embeddings",
                "attention_bias",
                "qk_layernorm",
                "moe_router_enable_expert_bias",
            ),
        )
        refusals = {
            "hidden_act": (self.hidden_act, "silu", "only SiLU-gated experts are implemented"),
            "rope_scaling": (self.rope_scaling, None, "RoPE scaling is not implemented"),
            "attention_bias": (self.attention_bias, False, "q/k/v/o biases are not implemented"),
        }
        for key, (value, supported, why) in refusals.items():
            if value != supported:
                raise ValueError(
                    f"config key '{key}' = {value!r} is not supported ({why}); "
                    f"this implementation needs '{key}' = {supported!r}."
                )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("config keys 'rope_theta' and 'rms_norm_eps' must be positive")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(
                f"config key 'partial_rotary_factor' must be in (0, 1], "
                f"got {self.partial_rotary_factor!r}"
            )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"config key 'attention_dropout' must be in [0, 1), got {self.attention_dropout!r}"
            )
        if self.clip_qkv is not None and (
            isinstance(self.clip_qkv, bool)
            or not isinstance(self.clip_qkv, Real)
            or not self.clip_qkv > 0
        ):
            raise ValueError(
                f"config key 'clip_qkv' must be null or a positive number, got {self.clip_qkv!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ValueError(
                f"RoPE needs an even, non-zero rotary dimension; int(head_dim "
                f"{self.head_dim} x partial_rotary_factor {self.partial_rotary_factor}) = "
                f"{self.rotary_dim}"
            )
        if self.num_attention_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"config key 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                f"'num_experts' ({self.num_experts})"
            )
        freq = self.moe_layer_freq
        if freq is not None and (
            len(freq) != self.num_hidden_layers
            or any(isinstance(f, bool) or f not in (0, 1) for f in freq)
        ):
            raise ValueError(
                f"config key 'moe_layer_freq' must list one 0 (dense) or 1 (MoE) per layer "
                f"({self.num_hidden_layers} layers), got {list(freq)!r}"
            )
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and (
            self.dense_intermediate_size is None
        ):
            raise ValueError(
                "config key 'moe_layer_freq' asks for dense layers but "
                "'dense_intermediate_size' is null"
            )

    # Derived sizes ------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layer_freq is None or self.moe_layer_freq[layer] == 1

    @property
    def embedding_dropout(self) -> float:
        return 0.0

    def num_parameters(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameters in total, or those one token uses (`active`: top-k experts only)."""
        d, kv = self.hidden_size, self.n_kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv + (2 * self.head_dim if self.qk_layernorm else 0)
        total = d
        for layer in range(self.num_hidden_layers):
            total += attention + 2 * d
            if self.is_moe_layer(layer):
                experts = self.num_experts_per_tok if active else self.num_experts
                total += d * self.num_experts + experts * 3 * d * self.expert_intermediate_size
                if self.moe_router_enable_expert_bias:
                    total += self.num_experts
                if self.shared_expert_intermediate_size:
                    total += 3 * d * self.shared_expert_intermediate_size
            else:
                total += 3 * d * self.dense_intermediate_size
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    def with_changes(self, **changes: Any) -> LLaDAMoEConfig:
        return replace(self, **changes)

    # config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LLaDAMoEConfig:
        """Build from the dict of an official config.json; the sizes must be there."""
        if not isinstance(data, dict):
            raise ValueError(
                f"a config must be a JSON object of keys and values, got {type(data).__name__}"
            )
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ValueError(
                f"a LLaDA-MoE config.json must give {', '.join(repr(k) for k in missing)} "
                "(the official class has no usable defaults for them)"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data[k] for k in known if k in data}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LLaDAMoEConfig:
        return config_from_json_file(cls, path)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """The official config.json (`"model_type": "llada"`, as the official folders say)."""
        data = dict(self.extra)
        data.update({k: v for k, v in asdict(self).items() if k != "extra"})
        if self.moe_layer_freq is not None:
            data["moe_layer_freq"] = list(self.moe_layer_freq)
        data.setdefault("architectures", [ARCHITECTURES[0]])
        data.setdefault("auto_map", dict(_AUTO_MAP))
        data["model_type"] = "llada"
        if torch_dtype is not None:
            data["torch_dtype"] = torch_dtype
        data.setdefault("torch_dtype", "float32")
        return dict(sorted(data.items()))


# The model -----------------------------------------------------------------------------------


class MoE(nn.Module):
    """Softmax router and k of E SwiGLU experts, weights stacked (E, F, D) / (E, D, F)."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        e, d, f = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(d, e, bias=False)  # the router
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        if config.moe_router_enable_expert_bias:
            # A persistent buffer in the official checkpoints, updated outside the gradient.
            self.register_buffer("expert_bias", torch.zeros(e))
        else:
            self.expert_bias = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> (router logits (T, E), expert ids (T, k), weights (T, k) float32)."""
        logits = self.gate(x)
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if self.expert_bias is not None:
            # As the reference: the bias shifts the probabilities themselves, and the shifted
            # values are both what top-k ranks and the weights (not DeepSeek-V3's use).
            scores = scores + self.expert_bias
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        return logits, ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, ids, weights = self.route(flat)
        # experts.py's "auto": tokens sorted by expert, grouped matmuls or per-expert slices
        # by device and size, tested equal to the readable loop.
        out = experts_forward(
            flat, ids, weights.to(x.dtype), self.gate_proj, self.up_proj, self.down_proj
        )
        return out.view(shape)


class Attention(nn.Module):
    """Bidirectional attention with QK-norm before partial RoPE, and grouped K/V heads."""

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.n_kv_heads
        self.head_dim, self.rotary_dim = config.head_dim, config.rotary_dim
        self.dropout = config.attention_dropout
        self.clip_qkv = config.clip_qkv
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        if config.qk_layernorm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        attention_bias: torch.Tensor | None,
        implementation: AttentionImplementation,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = rotary.rotate_leading(q, k, self.rotary_dim)
        k, v = cached_keys_values(cache, k, v)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, k, v, attention_bias, implementation, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm block: attention, then routed experts (+ shared expert) or a dense MLP."""

    def __init__(self, config: LLaDAMoEConfig, layer: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(d, config.dense_intermediate_size)
        # The shared expert belongs to MoE layers only (a dense layer has just its MLP).
        shared = config.shared_expert_intermediate_size if self.is_moe else None
        self.shared_expert = SwiGLU(d, shared) if shared else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        attention_bias: torch.Tensor | None,
        implementation: AttentionImplementation,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, attention_bias, implementation, cache)
        h = self.ff_norm(x)
        out = self.mlp(h)
        if self.shared_expert is not None:
            out = out + self.shared_expert(h)
        return x + out


class LLaDAMoEModel(MaskPredictor):
    """The LLaDA-MoE mask predictor; `model(input_ids, attention_mask)` returns `LLaDAOutput`."""

    def __init__(
        self, config: LLaDAMoEConfig, attn_implementation: AttentionImplementation = "sdpa"
    ) -> None:
        super().__init__()
        self.config = config
        self.attn_implementation: AttentionImplementation = attn_implementation
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        # HF-LLaMA RoPE: float32 tables cast to the activation dtype, the rotation in that dtype
        # (the dense reference rotates in float32 instead).
        self.rope = RotaryEmbedding(config.rotary_dim, config.rope_theta, full_precision=False)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Resolved from the checkpoint folder by `load_model`; see llada.tokens.
        self.special_tokens = None

    def routers(self) -> list[nn.Linear]:
        """The router (`mlp.gate`) of each MoE layer, in layer order. Its output is that layer's
        router logits (tokens, experts): a forward hook reads them from outside, so the forward
        keeps its signature and has no extra outputs (llada.losses.recording_router_logits)."""
        return [block.mlp.gate for block in self.blocks if block.is_moe]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) weights, unit norms, zero expert bias (the HF init)."""
        std = self.config.initializer_range
        for name, parameter in self.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, std, generator=generator)
        for block in self.blocks:
            if block.is_moe and block.mlp.expert_bias is not None:
                block.mlp.expert_bias.zero_()
