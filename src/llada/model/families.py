"""Model families: how a checkpoint folder says which model it holds, and each family's names.

A family is one model file (config class + `nn.Module`) and one name map between the official
checkpoint tensors and our parameters. Adding a family is one model file and one `Family` entry
in `FAMILIES`; the loader, the pre-allocation checks and the saver (`checkpoint.py`) ask the
family and nothing else.

The family is told from config.json's `architectures`, or from keys only one family has; never
from `model_type`: LLaDA-MoE's official config.json says `"model_type": "llada"`, as LLaDA-8B's
does (inclusionAI/LLaDA-MoE-7B-A1B-Base configuration_lladamoe.py). LLaDA 2.x configs carry
LLaDA-MoE's `num_experts` too; their own keys (`first_k_dense_replace`, `n_group`, ...) say which
family it is (`Family.shared_keys`).

A name map turns one official tensor into (our parameter name, index): index is None when the
tensor is the whole parameter, or the position along dim 0 of a stacked parameter (the routed
experts of LLaDA-MoE, one official tensor per expert). Saving splits stacked parameters again,
so `to_official(from_official(sd)) == sd`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import LLaDAConfig
from .llada2 import ARCHITECTURES as LLADA2_ARCHITECTURES
from .llada2 import MARKER_KEYS as LLADA2_KEYS
from .llada2 import SHARED_KEYS as LLADA2_SHARED_KEYS
from .llada2 import LLaDA2Config, LLaDA2Model
from .llada_moe import ARCHITECTURES as MOE_ARCHITECTURES
from .llada_moe import MARKER_KEYS as MOE_KEYS
from .llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from .transformer import LLaDAModel

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Family:
    """One model family: its config and model classes and its checkpoint name map.

    from_official_name: official tensor name -> (our name, index along dim 0 or None); raises
        ValueError for a name the family does not have.
    to_official_names: (our name, tensor) -> [(official name, tensor), ...] (stacked
        parameters are split).
    expected_tensors: config -> official tensor name -> shape, without building the model.
    describe: a short hint about the config keys that decide an official tensor's presence or
        shape, for error messages.
    """

    name: str
    architectures: tuple[str, ...]
    marker_keys: tuple[str, ...]
    config_class: type
    model_class: type
    from_official_name: Callable[[str], tuple[str, int | None]]
    to_official_names: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]
    expected_tensors: Callable[[Any], Shapes]
    describe: Callable[[str, Any], str]
    # Keys this family's configs share with other families' markers (LLaDA 2.x has LLaDA-MoE's
    # `num_experts`): with this family's own markers present, they mark nothing else.
    shared_keys: tuple[str, ...] = ()

    def from_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Official state dict -> ours (stacking what the family stacks)."""
        slices: dict[str, dict[int, torch.Tensor]] = {}
        ours: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            target, index = self.from_official_name(name)
            if index is None:
                ours[target] = tensor
            else:
                slices.setdefault(target, {})[index] = tensor
        for target, parts in slices.items():
            if sorted(parts) != list(range(len(parts))):
                raise ValueError(f"'{target}': the official tensors skip some of its indices")
            ours[target] = torch.stack([parts[i] for i in range(len(parts))])
        return ours

    def to_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> official (splitting stacked parameters)."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            out.update(self.to_official_names(name, tensor))
        return out


# Dense LLaDA (GSAI-ML/LLaDA-8B-Instruct modeling_llada.py) ------------------------------------

# Official name <-> our parameter name; `{}` is the block index.
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


def from_hf_name(name: str) -> str:
    """Official dense tensor name -> our parameter name. Raises ValueError for unknown names."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _BLOCK_PATTERN.match(name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    raise ValueError(f"unexpected tensor '{name}' in a dense LLaDA checkpoint")


def to_hf_name(name: str) -> str:
    """Our dense parameter name -> official tensor name."""
    if name in _OUR_TO_HF_TOP:
        return _OUR_TO_HF_TOP[name]
    match = _OUR_BLOCK_PATTERN.match(name)
    if match and match.group(2) in _OUR_TO_HF_BLOCK:
        return f"model.transformer.blocks.{match.group(1)}.{_OUR_TO_HF_BLOCK[match.group(2)]}"
    raise ValueError(f"parameter '{name}' has no official checkpoint name")


def dense_expected_tensors(config: LLaDAConfig) -> Shapes:
    """Official tensor name -> shape for a dense config."""
    d, hidden = config.d_model, config.hidden_size
    kv = config.effective_n_kv_heads * config.head_dim
    block = {
        "attn_norm.weight": (d,),
        "q_proj.weight": (d, d),
        "k_proj.weight": (kv, d),
        "v_proj.weight": (kv, d),
        "attn_out.weight": (d, d),
        "ff_norm.weight": (d,),
        "ff_proj.weight": (hidden, d),
        "up_proj.weight": (hidden, d),
        "ff_out.weight": (d, hidden),
    }
    shapes = {"model.transformer.wte.weight": (config.padded_vocab_size, d)}
    for i in range(config.n_layers):
        for name, shape in block.items():
            shapes[f"model.transformer.blocks.{i}.{name}"] = shape
    shapes["model.transformer.ln_f.weight"] = (d,)
    if not config.weight_tying:
        shapes["model.transformer.ff_out.weight"] = (config.padded_vocab_size, d)
    return shapes


def _dense_describe(name: str, config: LLaDAConfig) -> str:
    if name == "model.transformer.ff_out.weight":
        return f"weight_tying = {str(config.weight_tying).lower()}"
    return f"n_layers = {config.n_layers}"


DENSE = Family(
    name="LLaDA",
    architectures=("LLaDAModelLM",),
    marker_keys=("d_model", "n_layers", "n_heads", "mlp_hidden_size", "block_type"),
    config_class=LLaDAConfig,
    model_class=LLaDAModel,
    from_official_name=lambda name: (from_hf_name(name), None),
    to_official_names=lambda name, tensor: [(to_hf_name(name), tensor)],
    expected_tensors=dense_expected_tensors,
    describe=_dense_describe,
)


# LLaDA-MoE (HF-LLaMA names; ZHZisZZ/dllm modeling_lladamoe.py) --------------------------------

_MOE_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_MOE_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate.weight": "mlp.gate.weight",  # the router
    "mlp.expert_bias": "mlp.expert_bias",
    # A dense layer's MLP (moe_layer_freq 0) and the shared expert.
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "shared_expert.gate_proj.weight": "shared_expert.gate_proj.weight",
    "shared_expert.up_proj.weight": "shared_expert.up_proj.weight",
    "shared_expert.down_proj.weight": "shared_expert.down_proj.weight",
}
_MOE_LAYER_BACK = {ours: theirs for theirs, ours in _MOE_LAYER.items()}
_MOE_TOP_BACK = {ours: theirs for theirs, ours in _MOE_TOP.items()}
_MOE_LAYER_PATTERN = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MOE_EXPERT_PATTERN = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_OUR_STACKED_PATTERN = re.compile(r"^blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)$")


def moe_from_official_name(name: str) -> tuple[str, int | None]:
    """Official LLaDA-MoE tensor name -> (our name, expert index or None)."""
    if name in _MOE_TOP:
        return _MOE_TOP[name], None
    match = _MOE_LAYER_PATTERN.match(name)
    if match:
        layer, rest = match.groups()
        if rest in _MOE_LAYER:
            return f"blocks.{layer}.{_MOE_LAYER[rest]}", None
        expert = _MOE_EXPERT_PATTERN.match(rest)
        if expert:
            return f"blocks.{layer}.mlp.{expert.group(2)}", int(expert.group(1))
    raise ValueError(f"unexpected tensor '{name}' in a LLaDA-MoE checkpoint")


def moe_to_official_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Our LLaDA-MoE parameter -> its official tensors (one per expert when stacked)."""
    if name in _MOE_TOP_BACK:
        return [(_MOE_TOP_BACK[name], tensor)]
    stacked = _OUR_STACKED_PATTERN.match(name)
    if stacked:
        layer, projection = stacked.groups()
        return [
            (f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight", tensor[e])
            for e in range(tensor.shape[0])
        ]
    match = _OUR_BLOCK_PATTERN.match(name)
    if match and match.group(2) in _MOE_LAYER_BACK:
        return [(f"model.layers.{match.group(1)}.{_MOE_LAYER_BACK[match.group(2)]}", tensor)]
    raise ValueError(f"parameter '{name}' has no official checkpoint name")


def moe_expected_tensors(config: LLaDAMoEConfig) -> Shapes:
    """Official tensor name -> shape for a LLaDA-MoE config."""
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.n_kv_heads * hd
    shapes: Shapes = {"model.embed_tokens.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (q, d)
        shapes[p + "self_attn.k_proj.weight"] = (kv, d)
        shapes[p + "self_attn.v_proj.weight"] = (kv, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, q)
        if config.qk_layernorm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if config.is_moe_layer(i):
            f = config.expert_intermediate_size
            shapes[p + "mlp.gate.weight"] = (config.num_experts, d)
            if config.moe_router_enable_expert_bias:
                shapes[p + "mlp.expert_bias"] = (config.num_experts,)
            for e in range(config.num_experts):
                shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (f, d)
                shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (f, d)
                shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (d, f)
        else:
            f = config.dense_intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (f, d)
            shapes[p + "mlp.up_proj.weight"] = (f, d)
            shapes[p + "mlp.down_proj.weight"] = (d, f)
        if config.shared_expert_intermediate_size and config.is_moe_layer(i):
            s = config.shared_expert_intermediate_size
            shapes[p + "shared_expert.gate_proj.weight"] = (s, d)
            shapes[p + "shared_expert.up_proj.weight"] = (s, d)
            shapes[p + "shared_expert.down_proj.weight"] = (d, s)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _moe_describe(name: str, config: LLaDAMoEConfig) -> str:
    freq = None if config.moe_layer_freq is None else list(config.moe_layer_freq)
    if ".mlp.experts." in name or name.endswith("mlp.gate.weight"):
        return f"num_experts = {config.num_experts}, moe_layer_freq = {freq}"
    if name.endswith("expert_bias"):
        return (
            "moe_router_enable_expert_bias = " + str(config.moe_router_enable_expert_bias).lower()
        )
    if "shared_expert" in name:
        return f"shared_expert_intermediate_size = {config.shared_expert_intermediate_size}"
    if "_norm." in name and "self_attn" in name:
        return f"qk_layernorm = {str(config.qk_layernorm).lower()}"
    if ".mlp." in name:
        return f"moe_layer_freq = {freq}"
    if name == "lm_head.weight":
        return f"tie_word_embeddings = {str(config.tie_word_embeddings).lower()}"
    return f"num_hidden_layers = {config.num_hidden_layers}"


LLADA_MOE = Family(
    name="LLaDA-MoE",
    architectures=MOE_ARCHITECTURES,
    marker_keys=MOE_KEYS,
    config_class=LLaDAMoEConfig,
    model_class=LLaDAMoEModel,
    from_official_name=moe_from_official_name,
    to_official_names=moe_to_official_names,
    expected_tensors=moe_expected_tensors,
    describe=_moe_describe,
)


# LLaDA 2.0 / 2.1 (modeling_llada2_moe.py; ZHZisZZ/dllm dllm/pipelines/llada2/models/) -----------

_LLADA2_TOP = {
    "model.word_embeddings.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LLADA2_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "attention.query_key_value.weight": "attn.qkv_proj.weight",
    "attention.query_layernorm.weight": "attn.q_norm.weight",
    "attention.key_layernorm.weight": "attn.k_norm.weight",
    "attention.dense.weight": "attn.o_proj.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    # The dense layers' MLP (index < first_k_dense_replace).
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    # A MoE layer's router, its expert bias (a float32 buffer) and the shared experts.
    "mlp.gate.weight": "mlp.gate.weight",
    "mlp.gate.expert_bias": "mlp.gate.expert_bias",
    "mlp.shared_experts.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.down_proj.weight",
}
_LLADA2_LAYER_BACK = {ours: theirs for theirs, ours in _LLADA2_LAYER.items()}
_LLADA2_TOP_BACK = {ours: theirs for theirs, ours in _LLADA2_TOP.items()}


def llada2_from_official_name(name: str) -> tuple[str, int | None]:
    """Official LLaDA 2.x tensor name -> (our name, expert index or None)."""
    if name in _LLADA2_TOP:
        return _LLADA2_TOP[name], None
    match = _MOE_LAYER_PATTERN.match(name)
    if match:
        layer, rest = match.groups()
        if rest in _LLADA2_LAYER:
            return f"blocks.{layer}.{_LLADA2_LAYER[rest]}", None
        expert = _MOE_EXPERT_PATTERN.match(rest)
        if expert:
            return f"blocks.{layer}.mlp.{expert.group(2)}", int(expert.group(1))
    raise ValueError(f"unexpected tensor '{name}' in a LLaDA 2.x checkpoint")


def llada2_to_official_names(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Our LLaDA 2.x parameter -> its official tensors (one per expert when stacked)."""
    if name in _LLADA2_TOP_BACK:
        return [(_LLADA2_TOP_BACK[name], tensor)]
    stacked = _OUR_STACKED_PATTERN.match(name)
    if stacked:
        layer, projection = stacked.groups()
        return [
            (f"model.layers.{layer}.mlp.experts.{e}.{projection}.weight", tensor[e])
            for e in range(tensor.shape[0])
        ]
    match = _OUR_BLOCK_PATTERN.match(name)
    if match and match.group(2) in _LLADA2_LAYER_BACK:
        return [(f"model.layers.{match.group(1)}.{_LLADA2_LAYER_BACK[match.group(2)]}", tensor)]
    raise ValueError(f"parameter '{name}' has no official checkpoint name")


def llada2_expected_tensors(config: LLaDA2Config) -> Shapes:
    """Official tensor name -> shape for a LLaDA 2.x config."""
    d, hd = config.hidden_size, config.dim_per_head
    q = config.num_attention_heads * hd
    qkv = (config.num_attention_heads + 2 * config.n_kv_heads) * hd
    shapes: Shapes = {"model.word_embeddings.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "attention.query_key_value.weight"] = (qkv, d)
        shapes[p + "attention.query_layernorm.weight"] = (hd,)
        shapes[p + "attention.key_layernorm.weight"] = (hd,)
        shapes[p + "attention.dense.weight"] = (d, q)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        if config.is_moe_layer(i):
            f, e = config.moe_intermediate_size, config.num_experts
            shapes[p + "mlp.gate.weight"] = (e, d)
            shapes[p + "mlp.gate.expert_bias"] = (e,)
            for j in range(e):
                shapes[p + f"mlp.experts.{j}.gate_proj.weight"] = (f, d)
                shapes[p + f"mlp.experts.{j}.up_proj.weight"] = (f, d)
                shapes[p + f"mlp.experts.{j}.down_proj.weight"] = (d, f)
            s = config.shared_intermediate_size
            if s is not None:
                shapes[p + "mlp.shared_experts.gate_proj.weight"] = (s, d)
                shapes[p + "mlp.shared_experts.up_proj.weight"] = (s, d)
                shapes[p + "mlp.shared_experts.down_proj.weight"] = (d, s)
        else:
            f = config.intermediate_size
            shapes[p + "mlp.gate_proj.weight"] = (f, d)
            shapes[p + "mlp.up_proj.weight"] = (f, d)
            shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


def _llada2_describe(name: str, config: LLaDA2Config) -> str:
    dense = f"first_k_dense_replace = {config.first_k_dense_replace}"
    if "shared_experts" in name:
        return f"num_shared_experts = {config.num_shared_experts}, {dense}"
    if ".mlp.experts." in name or ".mlp.gate." in name:
        return f"num_experts = {config.num_experts}, {dense}"
    if ".mlp." in name:
        return dense
    if "query_key_value" in name:
        return (
            f"num_attention_heads = {config.num_attention_heads}, num_key_value_heads = "
            f"{config.num_key_value_heads}, head_dim = {config.head_dim}"
        )
    if name == "lm_head.weight":
        return f"tie_word_embeddings = {str(config.tie_word_embeddings).lower()}"
    return f"num_hidden_layers = {config.num_hidden_layers}"


LLADA2 = Family(
    name="LLaDA 2.x",
    architectures=LLADA2_ARCHITECTURES,
    marker_keys=LLADA2_KEYS,
    config_class=LLaDA2Config,
    model_class=LLaDA2Model,
    from_official_name=llada2_from_official_name,
    to_official_names=llada2_to_official_names,
    expected_tensors=llada2_expected_tensors,
    describe=_llada2_describe,
    shared_keys=LLADA2_SHARED_KEYS,
)

# The dense family comes first: a config.json that names no architecture and has no other
# family's keys is a dense LLaDA one (older exports carry no `architectures`).
FAMILIES: tuple[Family, ...] = (DENSE, LLADA_MOE, LLADA2)


def detect_family(config: dict[str, Any]) -> Family:
    """The family a config.json dict describes; ValueError naming the keys when they disagree."""
    present = {f.name: [k for k in f.marker_keys if k in config] for f in FAMILIES}
    # Keys another family present by its own markers accounts for (LLaDA 2.x's num_experts).
    explained = {k for f in FAMILIES if present[f.name] for k in f.shared_keys}
    counted = {name: [k for k in keys if k not in explained] for name, keys in present.items()}
    by_keys = [f for f in FAMILIES if counted[f.name]]
    architectures = config.get("architectures")
    if isinstance(architectures, str):
        architectures = [architectures]
    if not isinstance(architectures, list):
        architectures = []
    by_architecture = [
        f
        for f in FAMILIES
        if any(a in f.architectures for a in architectures if isinstance(a, str))
    ]
    if len(by_keys) > 1:
        keys = [k for f in by_keys for k in counted[f.name]]
        raise ValueError(
            f"config.json mixes the keys of several model families ({', '.join(keys)}: "
            f"{' and '.join(f.name for f in by_keys)}); keep only one family's keys"
        )
    if len(by_architecture) > 1:
        raise ValueError(
            f"config.json names architectures of several families ({architectures}); keep one"
        )
    if by_architecture and by_keys and by_architecture[0] is not by_keys[0]:
        keys = counted[by_keys[0].name]
        raise ValueError(
            f"config.json says architectures {architectures} ({by_architecture[0].name}) but has "
            f"the {by_keys[0].name} keys {', '.join(keys)}; fix 'architectures' or the keys"
        )
    if by_architecture:
        return by_architecture[0]
    if by_keys:
        return by_keys[0]
    return DENSE


def family_of(model_or_config: object) -> Family:
    """The family of a model or config object."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES:
        if isinstance(config, family.config_class):
            return family
    raise ValueError(f"{type(config).__name__} is not the config of a known model family")
