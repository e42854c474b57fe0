"""The LLaDA 2.0 / 2.1 mask predictor (inclusionAI/LLaDA2.0-mini, LLaDA2.1-mini, -flash): a
block-diffusion MoE transformer with a fused QKV projection, QK-norm, partial RoPE, dense first
layers, and sigmoid-routed, group-limited experts plus shared experts.

The numerics follow the official remote code `modeling_llada2_moe.py` (as copied in
ZHZisZZ/dllm, dllm/pipelines/llada2/models/ and dllm/pipelines/llada21/models/; 2.0 and 2.1 share
the architecture, the tensor names and the config keys):
- pre-norm blocks; RMSNorm in float32, cast back before the weight multiply;
- attention: one `query_key_value` projection, split by heads (all query heads, then all key
  heads, then all value heads); QK-norm (one RMSNorm over head_dim, shared by all heads) BEFORE
  RoPE; RoPE on the first int(head_dim * partial_rotary_factor) dims of each head, float32
  tables cast to the activation dtype; grouped K/V heads; scale head_dim^-0.5;
- layers with index < first_k_dense_replace have a dense SwiGLU (intermediate_size), the others
  are MoE: router logits in float32, s = sigmoid(logits); expert_bias is added to s for the
  CHOICE only (group-limited: n_group contiguous groups scored by the sum of their two best
  biased scores, the topk_group best groups kept, then the top num_experts_per_tok experts);
  the weights are the UNBIASED s of the chosen experts, renormalised to sum 1 when k > 1, times
  routed_scaling_factor; plus the shared experts (SwiGLU of moe_intermediate_size x
  num_shared_experts) with weight 1;
- logits always float32, whatever the model dtype.

The config keys the official code reads but ignores are kept and written back, with the
reference's behaviour: `score_function` (always sigmoid), `router_dtype` (always float32),
`norm_topk_prob` (always renormalises when k > 1), `moe_router_enable_expert_bias` (the bias
always exists and is always used), `rotary_dim` (derived from partial_rotary_factor),
`sliding_window` and friends (not applied by eager or SDPA attention), the dropouts other than
attention_dropout, `norm_head`, `norm_softmax`, `use_rmsnorm`, `max_window_layers`.

Attention masks differ from the reference in one place, on purpose: a 2-D (B, T) attention_mask
is key padding here (1 = token, 0 = padding, attention stays bidirectional), as for the other
families. The reference turns a 2-D mask holding any zero into HF's CAUSAL mask plus padding,
so the model silently becomes left-to-right (and without zeros drops it). The LLaDA 2.x samplers
pass a 4-D block mask instead (`block_attention_mask`), which both treat alike.

The routed experts' weights are stacked per projection (`experts.py`); the name map in
`families.py` stacks and splits the official per-expert tensors. The call interface is the
dense `LLaDAModel`'s, so KV caches, likelihood and losses work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..tokens import LLADA_8B, LLADA_MOE
from .config import HFConfigNames, check_config_values, config_from_json_file
from .experts import ExpertsImpl, experts_forward
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

# What `architectures` says in the official config.json (and the base model's class name).
ARCHITECTURES = ("LLaDA2MoeModelLM", "LLaDA2MoeModel")
# Keys only a LLaDA 2.x config has; any of them marks the family. (It shares `num_experts` and
# `num_experts_per_tok` with LLaDA-MoE: `families.detect_family` lets these keys explain those.)
MARKER_KEYS = (
    "first_k_dense_replace",
    "moe_intermediate_size",
    "num_shared_experts",
    "n_group",
    "topk_group",
    "use_qkv_bias",
)
# Keys of LLaDA 2.x configs that other families use as their markers.
SHARED_KEYS = ("num_experts", "num_experts_per_tok")
_AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}
# The official config class's defaults (configuration_llada2_moe.py), which apply to keys a
# config.json leaves out. The sizes in `_REQUIRED` have no usable defaults there.
REFERENCE_DEFAULTS: dict[str, Any] = {
    "intermediate_size": None,
    "num_key_value_heads": 0,
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_bias": True,
    "rms_norm_eps": 1e-05,
    "norm_head": False,
    "tie_word_embeddings": False,
    "embedding_dropout": 0.1,
    "attention_dropout": 0.1,
    "output_dropout": 0.1,
    "initializer_range": 0.02,
    "max_position_embeddings": 16384,
    "rope_theta": 10000.0,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "rope_scaling": None,
    "pad_token_id": LLADA_8B.pad_id,  # sic: the official class defaults to LLaDA-8B's pad id
    "num_shared_experts": 0,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 0,
    "head_dim": None,
    "output_router_logits": False,
    "partial_rotary_factor": 0.5,
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
# Bounds that refuse a corrupt or hostile config.json at once (far beyond any released model).
_SIZE_LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "head_dim": 1 << 12,
    "num_experts": 1 << 14,
    "num_experts_per_tok": 1 << 14,
    "n_group": 1 << 14,
    "topk_group": 1 << 14,
    "max_position_embeddings": 1 << 24,
}
_OPTIONAL_SIZES = {"intermediate_size", "head_dim"}
# Non-negative counts (0 is meaningful: no dense layer; shared experts of width 0 as the
# reference builds them; num_key_value_heads 0 = one per query head, as the 2.1 config says).
_COUNTS = {
    "first_k_dense_replace": 1 << 12,
    "num_shared_experts": 1 << 10,
    "num_key_value_heads": 1 << 12,
}


@dataclass(frozen=True)
class LLaDA2Config(HFConfigNames):
    """Hyper-parameters of a LLaDA 2.x model, named as in the official config.json.

    The defaults are LLaDA2.1-mini's config.json (LLaDA2.0-mini has the same values): 20 layers,
    hidden 2048, 16 heads / 4 KV heads of 128, layer 0 dense (5120), 256 experts top-8 of 512 in
    8 groups (4 kept) plus 1 shared expert, vocabulary 157184. `from_hf_dict` gives the keys a
    config.json leaves out the official config class's defaults instead. Keys this version does
    not know are kept in `extra` and written back by `to_hf_dict`.
    """

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int | None = 5120
    moe_intermediate_size: int = 512
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-06
    norm_head: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    output_dropout: float = 0.0
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = 64
    use_cache: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int | None = 28
    pad_token_id: int | None = LLADA_MOE.pad_id
    num_experts: int = 256
    num_shared_experts: int | None = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    output_router_logits: bool = False
    moe_router_enable_expert_bias: bool = True
    norm_topk_prob: bool = True
    norm_softmax: bool = False
    router_dtype: str = "fp32"
    score_function: str = "sigmoid"
    use_rmsnorm: bool = True
    using_split_qkv_in_self_attention: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_config_values(
            self,
            sizes=_SIZE_LIMITS,
            optional=_OPTIONAL_SIZES,
            token_ids=("pad_token_id",),
            reals=(
                "rope_theta",
                "rms_norm_eps",
                "partial_rotary_factor",
                "attention_dropout",
                "routed_scaling_factor",
            ),
            bools=("tie_word_embeddings", "use_qkv_bias", "use_bias"),
        )
        for key, limit in _COUNTS.items():
            value = getattr(self, key)
            if key == "num_shared_experts" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(
                    f"config key '{key}' must be a non-negative integer, got {value!r}"
                )
            if value > limit:
                raise ValueError(
                    f"config key '{key}' = {value} is beyond what llada loads (at most {limit}: "
                    "is the file corrupt?)"
                )
        # Options of the config class that the official modeling code would honour but this
        # implementation does not; every released LLaDA 2.x config has the supported value.
        refusals = {
            "hidden_act": (self.hidden_act, "silu", "only SiLU-gated MLPs are implemented"),
            "rope_scaling": (self.rope_scaling, None, "RoPE scaling is not implemented"),
            "use_qkv_bias": (self.use_qkv_bias, False, "a query_key_value bias is not implemented"),
            "use_bias": (self.use_bias, False, "an attention output bias is not implemented"),
            "use_qk_norm": (
                self.extra.get("use_qk_norm", True),
                True,
                "attention without QK-norm is not implemented",
            ),
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
        if self.rope_dim % 2 or self.rope_dim == 0:
            raise ValueError(
                f"RoPE needs an even, non-zero rotary dimension; int(head_dim {self.dim_per_head} "
                f"x partial_rotary_factor {self.partial_rotary_factor}) = {self.rope_dim}"
            )
        if self.num_attention_heads % self.n_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.first_k_dense_replace > 0 and self.intermediate_size is None:
            raise ValueError(
                f"config key 'first_k_dense_replace' = {self.first_k_dense_replace} asks for dense "
                "layers but 'intermediate_size' is null"
            )
        # The group-limited router (LLaDA2MoeGate.group_limited_topk) scores a group by its two
        # best experts and must find k experts in the kept groups.
        if self.num_experts % self.n_group:
            raise ValueError(
                f"config key 'num_experts' ({self.num_experts}) must be a multiple of 'n_group' "
                f"({self.n_group})"
            )
        per_group = self.num_experts // self.n_group
        if per_group < 2:
            raise ValueError(
                f"the router scores each of 'n_group' ({self.n_group}) groups by its two best "
                f"experts: 'num_experts' ({self.num_experts}) must be at least 2 x n_group"
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"config key 'topk_group' ({self.topk_group}) exceeds 'n_group' ({self.n_group})"
            )
        if self.num_experts_per_tok > self.topk_group * per_group:
            raise ValueError(
                f"config key 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the "
                f"{self.topk_group * per_group} experts of the 'topk_group' ({self.topk_group}) "
                f"groups the router keeps"
            )

    # Derived sizes ------------------------------------------------------------------------

    @property
    def dim_per_head(self) -> int:
        """head_dim, or hidden_size // num_attention_heads when config.json says null."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head, as the reference derives them (the `rotary_dim` key is not
        read by the official code)."""
        return int(self.dim_per_head * self.partial_rotary_factor)

    @property
    def shared_intermediate_size(self) -> int | None:
        """Width of the shared-experts MLP; None when config.json says num_shared_experts null."""
        if self.num_shared_experts is None:
            return None
        return self.moe_intermediate_size * self.num_shared_experts

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def eos_token_id(self) -> int | None:
        # Not an official key either (`<|endoftext|>` in the tokenizer files).
        value = self.extra.get("eos_token_id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def num_parameters(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameters in total, or those one token uses (`active`: top-k experts only)."""
        d, hd = self.hidden_size, self.dim_per_head
        q, kv = self.num_attention_heads * hd, self.n_kv_heads * hd
        attention = d * (q + 2 * kv) + q * d + 2 * hd
        total = d
        for layer in range(self.num_hidden_layers):
            total += attention + 2 * d
            if self.is_moe_layer(layer):
                experts = self.num_experts_per_tok if active else self.num_experts
                total += d * self.num_experts + self.num_experts  # router and expert_bias
                total += experts * 3 * d * self.moe_intermediate_size
                total += 3 * d * (self.shared_intermediate_size or 0)
            else:
                total += 3 * d * self.intermediate_size
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    def with_changes(self, **changes: Any) -> LLaDA2Config:
        return replace(self, **changes)

    # config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LLaDA2Config:
        """Build from the dict of an official config.json; keys it leaves out take the official
        config class's defaults (`REFERENCE_DEFAULTS`), and the sizes must be there."""
        if not isinstance(data, dict):
            raise ValueError(
                f"a config must be a JSON object of keys and values, got {type(data).__name__}"
            )
        missing = [key for key in _REQUIRED if key not in data]
        if missing:
            raise ValueError(
                f"a LLaDA 2.x config.json must give {', '.join(repr(k) for k in missing)} "
                "(the official class has no usable defaults for them)"
            )
        if data["num_experts"] is None:
            raise ValueError(
                "config key 'num_experts' = None (a LLaDA 2.x model without experts) is not "
                "supported; every released LLaDA 2.x model is a MoE"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: data[k] for k in known if k in data}
        for key, default in REFERENCE_DEFAULTS.items():
            values.setdefault(key, default)
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> LLaDA2Config:
        return config_from_json_file(cls, path)

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """The official config.json (`"model_type": "llada2_moe"`, as the official folders say;
        the dtype under both the new `dtype` and the older `torch_dtype` key when given)."""
        data = dict(self.extra)
        data.update({k: v for k, v in asdict(self).items() if k != "extra"})
        data.setdefault("architectures", [ARCHITECTURES[0]])
        data.setdefault("auto_map", dict(_AUTO_MAP))
        data["model_type"] = "llada2_moe"
        if torch_dtype is not None:
            data["dtype"] = torch_dtype
            if "torch_dtype" in data:
                data["torch_dtype"] = torch_dtype
        data.setdefault("dtype", "float32")
        return dict(sorted(data.items()))


# The model -----------------------------------------------------------------------------------


class Router(nn.Module):
    """The gate of a MoE layer (official `mlp.gate`): its weight (E, D) and the expert_bias (E,)
    buffer. Calling it gives the router logits (T, E) in float32, as the reference computes
    them whatever the model dtype (a forward hook reads them from outside; see `routers`)."""

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A persistent float32 buffer in the official checkpoints, updated outside the gradient
        # (auxiliary-loss-free balancing); it steers the choice of experts, not their weights.
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    """Sigmoid, group-limited router; k of E SwiGLU experts stacked (E, F, D) / (E, D, F); and
    the shared experts (weight 1). first_expert: None when the layer holds every expert; the
    id of its first expert when it holds a contiguous share of them (expert parallelism,
    `llada.parallel`: the pairs routed to other experts are left to their ranks)."""

    first_expert: int | None = None

    def __init__(self, config: LLaDA2Config) -> None:
        super().__init__()
        e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.gate = Router(e, d)
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        shared = config.shared_intermediate_size
        # num_shared_experts 0 builds a width-0 MLP, as the reference does (it adds zeros).
        self.shared_experts = None if shared is None else SwiGLU(d, shared)
        self.experts_impl: ExpertsImpl = "auto"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> (router logits (T, E), expert ids (T, k), weights (T, k) float32);
        LLaDA2MoeGate.forward step by step."""
        logits = self.gate(x)  # (T, E) float32
        scores = torch.sigmoid(logits)
        biased = scores + self.gate.expert_bias.float()
        tokens = biased.shape[0]
        # A group's score: the sum of its two best biased scores; keep the topk_group best.
        group_scores = biased.view(tokens, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_keep = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # (T, n_group)
        per_group = biased.shape[1] // self.n_group
        expert_keep = group_keep.unsqueeze(-1).expand(tokens, self.n_group, per_group)
        expert_keep = expert_keep.reshape(tokens, -1)  # (T, E)
        ranked = biased.masked_fill(~expert_keep.bool(), float("-inf"))
        ids = torch.topk(ranked, k=self.top_k, dim=-1)[1]  # (T, k)
        weights = torch.gather(scores, 1, ids)  # the unbiased scores of the chosen experts
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, ids, weights * self.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, ids, weights = self.route(flat)
        # The reference weights and sums the k expert outputs in float32 and casts back.
        out = experts_forward(
            flat,
            ids,
            weights,
            self.gate_proj,
            self.up_proj,
            self.down_proj,
            self.experts_impl,
            accumulate_dtype=torch.float32,
            first_expert=self.first_expert,
        ).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class Attention(nn.Module):
    """Bidirectional (or block-masked) attention: fused QKV, QK-norm before partial RoPE, GQA."""

    def __init__(self, config: LLaDA2Config) -> None:
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.n_kv_heads
        self.head_dim, self.rotary_dim = config.dim_per_head, config.rope_dim
        self.dropout = config.attention_dropout
        # (H + 2 Hkv) * head_dim rows: every query head, then every key head, then every value
        # head, head_dim consecutive rows each (the official `query_key_value`).
        rows = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(d, rows, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        attention_bias: torch.Tensor | None,
        implementation: AttentionImplementation,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, -1, self.head_dim)  # (B, T, H + 2Hkv, hd)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary.rotate_leading(q, k, self.rotary_dim)
        k, v = cached_keys_values(cache, k, v)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, k, v, attention_bias, implementation, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm block (LLaDA2MoeDecoderLayer): attention, then a dense MLP or the MoE."""

    def __init__(self, config: LLaDA2Config, layer: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(d, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        attention_bias: torch.Tensor | None,
        implementation: AttentionImplementation,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rotary, attention_bias, implementation, cache)
        return x + self.mlp(self.ff_norm(x))


class LLaDA2Model(MaskPredictor):
    """The LLaDA 2.x mask predictor; `model(input_ids, attention_mask)` returns `LLaDAOutput`
    with float32 logits (as the reference, whatever the model dtype).

    attention_mask: (B, T) key padding, 1 = token, 0 = padding (bidirectional attention; the
    reference makes such a mask causal, see the module docstring), or a 4-D boolean (B or 1, 1,
    T, T), True = may attend: the block-diffusion mask of the LLaDA 2.x samplers
    (`block_attention_mask`).
    """

    block_diffusion = True

    def __init__(
        self, config: LLaDA2Config, attn_implementation: AttentionImplementation = "sdpa"
    ) -> None:
        super().__init__()
        self.config = config
        self.attn_implementation: AttentionImplementation = attn_implementation
        # The reference's embedding has padding_idx = pad_token_id: that row gets no gradient
        # (it is EOS in the released models) and is zero at initialisation.
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and pad < config.vocab_size else None
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        # HF-LLaMA RoPE: float32 tables cast to the activation dtype, the rotation in that dtype.
        self.rope = RotaryEmbedding(config.rope_dim, config.rope_theta, full_precision=False)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Resolved from the checkpoint folder by `load_model`; see llada.tokens.
        self.special_tokens = None

    def logits_out(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    def routers(self) -> list[Router]:
        """The router (`mlp.gate`) of each MoE layer, in layer order; its output is that layer's
        float32 router logits (tokens, experts), read by a forward hook from outside
        (llada.losses.recording_router_logits). The experts are chosen from their sigmoid plus
        the expert bias, not from a softmax."""
        return [block.mlp.gate for block in self.blocks if block.is_moe]

    def set_experts_impl(self, impl: ExpertsImpl) -> None:
        """Run every MoE layer's routed experts by `impl` ("loop" is the readable reference)."""
        for block in self.blocks:
            if block.is_moe:
                block.mlp.experts_impl = impl

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The reference init (LLaDA2MoePreTrainedModel._init_weights): Normal(0,
        initializer_range) for linear and embedding weights (the padding row zero), unit norms;
        the routers keep their own kaiming-uniform init (a = sqrt(5)) and a zero expert bias."""
        std = self.config.initializer_range
        for name, parameter in self.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            elif name.endswith("mlp.gate.weight"):
                nn.init.kaiming_uniform_(parameter, a=math.sqrt(5), generator=generator)
            else:
                parameter.normal_(0.0, std, generator=generator)
        if self.embed.padding_idx is not None:
            self.embed.weight[self.embed.padding_idx].zero_()
        for router in self.routers():
            router.expert_bias.zero_()


def block_attention_mask(
    length: int, block_length: int, device: torch.device | None = None
) -> torch.Tensor:
    """The block-diffusion mask of the LLaDA 2.x samplers, (1, 1, T, T) bool, True = may attend:
    query i sees key j iff j // block_length <= i // block_length (bidirectional inside a block,
    causal between blocks). The reference builds it as log of a 0/1 matrix in bfloat16; as a
    boolean it works in every model dtype."""
    blocks = torch.arange(length, device=device) // block_length  # (T,)
    return (blocks[None, :] <= blocks[:, None])[None, None]


def block_diffusion_training_mask(
    length: int, block_length: int, device: torch.device | None = None
) -> torch.Tensor:
    """The block-diffusion training mask of LLaDA 2.x (inclusionAI/dFactory,
    tasks/train_llada2_bd.py, block_diffusion_mode), (1, 1, 2n, 2n) bool, True = may attend,
    for the input [x_t ; x_0]: a noised copy and the clean sequence, n = `length` tokens each,
    both with positions 0..n-1. With b(i) the block of position i inside its half:
    - a noisy query sees the noisy keys of its own block and the clean keys of earlier blocks;
    - a clean query sees the clean keys of its own and earlier blocks (block-causal, as at
      inference), never a noisy key.
    So the noisy half of block b is denoised from the clean blocks before it, exactly the
    context the samplers give block b, and one forward trains every block at once."""
    blocks = torch.arange(length, device=device) // block_length  # (n,)
    same = blocks[:, None] == blocks[None, :]
    earlier = blocks[None, :] < blocks[:, None]
    noisy_rows = torch.cat([same, earlier], dim=1)  # (n, 2n): [noisy keys | clean keys]
    clean_rows = torch.cat([torch.zeros_like(same), same | earlier], dim=1)
    return torch.cat([noisy_rows, clean_rows], dim=0)[None, None]
