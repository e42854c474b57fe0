"""The dense LLaDA mask predictor: a bidirectional LLaMA-style transformer, as in the reference
remote code (GSAI-ML/LLaDA-8B-Instruct modeling_llada.py).

One plain `nn.Module`, readable top to bottom, importing only torch. Numerics follow the
reference remote code exactly where it matters for parity: RMSNorm is computed in float32 and
cast back before the weight multiply, RoPE is rotate-half in float32, and positions are the
sequence index (padding included) as the reference does.

Parameter names here say what things are (`mlp.gate_proj` is the gate that the official
checkpoints call `ff_proj`); `checkpoint.py` maps them to the official names in one place.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLaDAConfig

AttentionImplementation = Literal["sdpa", "eager"]


@dataclass
class KVCache:
    """Every layer's keys (after RoPE) and values over a whole canvas of L positions, allocated up
    front (as gpt-fast's KVCache), for cached sampling. Make one with `model.new_kv_cache`.

    keys, values: one (B, Hkv, L, head_dim) buffer per layer, in the model's dtype and device.
    bias: the additive key-padding bias (B, 1, 1, L) of the sequence's attention_mask, given once
        when the cache is made; None when nothing is padded.
    A forward with the cache writes its keys and values to slots `[window_start, window_start
    + T)` and its queries attend over all L slots, the others as they were last written. A
    forward over the whole canvas is window_start=0, T=L; Fast-dLLM's prefix cache (window =
    current block to the end) and dual cache (window = current block) are the same operation
    over smaller windows. `canvas_written` only guards against a window forward reading slots
    that no forward has written yet. A cached forward may also take a 4-D boolean
    attention_mask (B or 1, 1, T, L) saying which slots each query reads (block diffusion:
    earlier blocks and its own); it then chooses its slots itself and the guard is off.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bias: torch.Tensor | None = None
    canvas_written: bool = False

    @classmethod
    def allocate(
        cls,
        n_layers: int,
        batch: int,
        length: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        attention_mask: torch.Tensor | None = None,
    ) -> KVCache:
        """Zeroed buffers for `n_layers` layers of (batch, n_kv_heads, length, head_dim), and the
        padding bias of `attention_mask` (batch, length), 1 = token, 0 = padding, or None."""
        for name, value in (("batch", batch), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"a KV cache needs a positive integer {name}, got {value!r}")
        bias = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (batch, length):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                    f"{(batch, length)} (one 1/0 entry per position of the cached canvas)"
                )
            bias = attention_bias_from_mask(attention_mask.to(device), dtype)
        # Stored position-major (B, L, Hkv, D) and viewed (B, Hkv, L, D): the memory layout of
        # the keys and values the projections make, so attention reads the cache exactly as it
        # reads a forward's own keys (the same kernel path, the same bits).
        shape = (batch, length, n_kv_heads, head_dim)

        def buffer() -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device).transpose(1, 2)

        keys = [buffer() for _ in range(n_layers)]
        values = [buffer() for _ in range(n_layers)]
        return cls(keys, values, bias)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def prefix(self, length: int) -> KVCache:
        """A cache over the first `length` slots that shares this one's buffers (views): a
        forward through it writes here and attends over those slots only, so a left-to-right
        decoder pays attention for the canvas decoded so far, not the whole one."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= self.length:
            raise ValueError(f"a cache prefix needs 0 < length <= {self.length}, got {length!r}")
        bias = None if self.bias is None else self.bias[..., :length]
        return KVCache(
            [k[:, :, :length] for k in self.keys],
            [v[:, :, :length] for v in self.values],
            bias,
            self.canvas_written,
        )

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (a row that finished early leaves the batch)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        if self.bias is not None:
            self.bias = self.bias.index_select(0, rows)


def new_kv_cache(
    model: nn.Module, batch: int, length: int, attention_mask: torch.Tensor | None = None
) -> KVCache:
    """A cache for any family's `model` (its blocks' attention name their K/V heads and head
    size), in the model's dtype and on its device; see `KVCache`."""
    attention = model.blocks[0].attn
    return KVCache.allocate(
        len(model.blocks),
        batch,
        length,
        attention.n_kv_heads,
        attention.head_dim,
        dtype=model.dtype,
        device=model.device,
        attention_mask=attention_mask,
    )


@dataclass
class LLaDAOutput:
    """What calling the model returns; `.logits` is (B, T, padded_vocab) in the model dtype."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on this device; the meta device has no autocast (nor anything to cast),
    and a forward there (shape inference; the no-host-sync test) must still run."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class RMSNorm(nn.Module):
    """RMSNorm as the reference computes it: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # The cast back happens before the weight multiply (as in modeling_llada.py); the
        # product then follows ordinary type promotion.
        return self.weight * normed.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with float32 tables, rebuilt lazily per device and length.

    The tables are a plain cache, not buffers: the official checkpoints hold none, and a model
    built on the meta device must not carry meta tables. The model looks them up once per
    forward (`at`) with lengths known on the host, and every layer rotates by the same rows, so
    the forward never reads a tensor back to size them.
    """

    def __init__(self, head_dim: int, theta: float, full_precision: bool = True) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.full_precision = full_precision
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _sin_cos(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (len(positions), head_dim) float32, of float positions."""
        device = positions.device
        with autocast_off(device):
            exponent = (
                torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float) / self.head_dim
            )
            inv_freq = 1.0 / (self.theta**exponent)
            freqs = torch.outer(positions, inv_freq)  # (length, head_dim/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (length, head_dim)
            return angles.sin(), angles.cos()

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sin, cos), each (length, head_dim) float32, for positions 0..length-1."""
        cached = self._tables.get(device)
        if cached is None or cached[0].shape[0] < length:
            cached = self._sin_cos(torch.arange(length, device=device, dtype=torch.float))
            self._tables[device] = cached
        return cached[0][:length], cached[1][:length]

    def at(
        self, start: int, length: int, positions: torch.Tensor | None, device: torch.device
    ) -> RotaryTables:
        """The rows for positions `start .. start + length - 1`, or for explicit `positions`
        (computed directly from them: their largest value is not known on the host)."""
        if positions is None:
            sin, cos = self.tables(start + length, device)
            sin, cos = sin[start:], cos[start:]
        else:
            sin, cos = self._sin_cos(positions.to(device=device, dtype=torch.float))
        return RotaryTables(sin, cos, self.full_precision)


@dataclass(frozen=True)
class RotaryTables:
    """One forward's RoPE rows (T, head_dim) float32, shared by all layers."""

    sin: torch.Tensor
    cos: torch.Tensor
    full_precision: bool

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q (B, H, T, D) and k (B, Hkv, T, D), both at this forward's positions."""
        work_dtype = torch.float32 if self.full_precision else q.dtype
        s, c = self.sin.to(work_dtype), self.cos.to(work_dtype)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            t_ = t.to(work_dtype)
            return (t_ * c + self._rotate_half(t_) * s).to(t.dtype)

        with autocast_off(q.device):
            return rotate(q), rotate(k)

    def rotate_leading(
        self, q: torch.Tensor, k: torch.Tensor, dims: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial RoPE (HF's partial_rotary_factor): rotate the first `dims` of each head (the
        tables' width), pass the rest through; all of them when `dims` is the head size."""
        if dims == q.shape[-1]:
            return self.rotate(q, k)
        q_rot, k_rot = self.rotate(q[..., :dims], k[..., :dims])
        return torch.cat((q_rot, q[..., dims:]), dim=-1), torch.cat((k_rot, k[..., dims:]), dim=-1)


class Attention(nn.Module):
    """Bidirectional multi-head attention with grouped K/V heads (GQA/MQA)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.effective_n_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        kv_dim = self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        attention_bias: torch.Tensor | None,
        implementation: AttentionImplementation,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary.rotate(q, k)
        k, v = cached_keys_values(cache, k, v)
        dropout = self.dropout if self.training else 0.0
        out = attend(q, k, v, attention_bias, implementation, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


# One layer's view of the KV cache: (cache, layer index, window start), all known on the host.
LayerCache = tuple[KVCache, int, int]


def cached_keys_values(
    cache: LayerCache | None, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values a layer attends over: this forward's own, or, with a cache, all of
    the cache's slots after this forward's are written to `[start, start + T)`."""
    if cache is None:
        return k, v
    kv_cache, layer, start = cache
    end = start + k.shape[2]
    kv_cache.keys[layer][:, :, start:end] = k
    kv_cache.values[layer][:, :, start:end] = v
    return kv_cache.keys[layer], kv_cache.values[layer]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_bias: torch.Tensor | None,
    implementation: AttentionImplementation,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Bidirectional attention (B, H, Tq, D) with grouped K/V heads, by SDPA or written out."""
    if implementation == "sdpa":
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attention_bias,
            dropout_p=dropout,
            is_causal=False,
            enable_gqa=k.shape[1] != q.shape[1],
        )
    return eager_attention(q, k, v, attention_bias, dropout)


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_bias: torch.Tensor | None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention written out: the readable reference backend that SDPA is tested against.

    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D); query head h reads K/V head h // (H / Hkv), as
    `repeat_interleave` does in the reference.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if attention_bias is not None:
        scores = scores + attention_bias
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    return weights @ v


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); `gate_proj` is the official `ff_proj`."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block (the reference `LLaDALlamaBlock`)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ff_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = SwiGLU(config.d_model, config.hidden_size)
        self.residual_dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        rotary: RotaryTables,
        attention_bias: torch.Tensor | None,
        implementation: AttentionImplementation,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), rotary, attention_bias, implementation, cache)
        x = x + self.residual_dropout(h)
        return x + self.residual_dropout(self.mlp(self.ff_norm(x)))


def attention_bias_from_mask(
    attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """An attention mask -> the additive bias SDPA takes, or None.

    A (B, T) keep-mask (1 = token, 0 = padding) becomes a key bias (B, 1, 1, T); a 4-D boolean
    mask (B or 1, 1, Tq, Tk), True = may attend, becomes a bias of its shape. Refused positions
    get the dtype's most negative finite value (a query that may attend to nothing gets uniform
    attention, not NaN). A given mask always becomes a bias, even without zeros: deciding
    otherwise would read the mask back to the host in the forward. Callers pass None when
    nothing is padded (the reference, modeling_llada.py, drops such a mask; so do our samplers,
    likelihood, server and eval).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        allowed = attention_mask
    else:
        allowed = attention_mask.to(torch.bool)[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def causal_attention_mask(
    attention_mask: torch.Tensor | None, length: int, device: torch.device | None = None
) -> torch.Tensor:
    """The 4-D boolean mask of a causal forward over `length` positions, True = may attend:
    (1, 1, T, T) lower-triangular, and with a (B, T) padding `attention_mask` (1 = token,
    0 = padding) also refusing padded keys: (B, 1, T, T).

    Pass it as the model's attention_mask to run the same network as an autoregressive model
    (masked-diffusion vs autoregressive comparisons; not part of LLaDA)."""
    if device is None and attention_mask is not None:
        device = attention_mask.device
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is None:
        return allowed
    return attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :] & allowed


def check_attention_mask_shape(
    attention_mask: torch.Tensor, batch: int, length: int, keys: int | None = None
) -> None:
    """A (B, T) padding mask, or a 4-D boolean (B or 1, 1, T, keys) one (keys = T without a
    cache, the cache's L with one); anything else is refused."""
    shape = tuple(attention_mask.shape)
    keys = length if keys is None else keys
    if len(shape) == 4:
        if (
            attention_mask.dtype != torch.bool
            or shape[0] not in (1, batch)
            or (shape[1:] != (1, length, keys))
        ):
            raise ValueError(
                f"a 4-D attention_mask must be boolean (True = may attend) of shape "
                f"({batch} or 1, 1, {length}, {keys}), got {attention_mask.dtype} {shape} "
                "(see causal_attention_mask)"
            )
    elif shape != (batch, length):
        raise ValueError(
            f"attention_mask has shape {shape}, expected {(batch, length)} (one 1/0 entry per "
            f"input token) or a 4-D boolean ({batch} or 1, 1, {length}, {length})"
        )


def forward_setup(
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor | None,
    kv_cache: KVCache | None,
    window_start: int,
    rope: RotaryEmbedding,
) -> tuple[RotaryTables, torch.Tensor | None, int]:
    """(RoPE rows, additive attention bias, window start) of a forward over embeddings x (B, T, D).

    Shared by every family's model: checks the mask's shape and the cache window; a forward
    with a cache takes its padding bias from the cache. Everything is decided from shapes and
    Python ints, never from a tensor's values, so the forward holds no host synchronisation.
    """
    batch, length = x.shape[:2]
    if isinstance(window_start, bool) or not isinstance(window_start, int):
        raise TypeError(f"window_start must be a Python int, got {type(window_start).__name__}")
    if kv_cache is None:
        if window_start != 0:
            raise ValueError(
                "window_start is a position in a KV cache: pass kv_cache=model.new_kv_cache(...)"
            )
        if attention_mask is not None:
            check_attention_mask_shape(attention_mask, batch, length)
        rotary = rope.at(0, length, positions, x.device)
        return rotary, attention_bias_from_mask(attention_mask, x.dtype), 0
    if positions is not None or (attention_mask is not None and attention_mask.dim() != 4):
        raise ValueError(
            "a forward with a KV cache takes no positions and no (B, T) attention_mask: give the "
            "padding once, as model.new_kv_cache(batch, length, attention_mask)"
        )
    if batch != kv_cache.batch_size:
        raise ValueError(f"the input has {batch} rows but the KV cache holds {kv_cache.batch_size}")
    if not 0 <= window_start <= kv_cache.length - length:
        raise ValueError(
            f"window [{window_start}, {window_start + length}) lies outside the cached "
            f"sequence of length {kv_cache.length}"
        )
    bias = kv_cache.bias
    if attention_mask is not None:
        # The queries' slots, chosen by the caller: no guard on unwritten slots.
        check_attention_mask_shape(attention_mask, batch, length, kv_cache.length)
        allowed = attention_bias_from_mask(attention_mask, x.dtype)
        # Refused by the padding or by the mask (a sum of two refusals would overflow to -inf).
        bias = allowed if bias is None else torch.minimum(bias, allowed)
    elif window_start == 0 and length == kv_cache.length:
        kv_cache.canvas_written = True
    elif not kv_cache.canvas_written:
        raise ValueError(
            f"a window forward over a KV cache reads every slot, but none has been written: run "
            f"the whole canvas (window_start=0, all {kv_cache.length} positions) first"
        )
    return rope.at(window_start, length, None, x.device), bias, window_start


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    rotary: RotaryTables,
    bias: torch.Tensor | None,
    implementation: AttentionImplementation,
    kv_cache: KVCache | None,
    start: int,
    *,
    output_hidden_states: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The residual stream through every block (any family's blocks take the same arguments),
    and each block's input when `output_hidden_states`."""
    hidden_states: list[torch.Tensor] = []
    for index, block in enumerate(blocks):
        if output_hidden_states:
            hidden_states.append(x)
        cache = None if kv_cache is None else (kv_cache, index, start)
        x = block(x, rotary, bias, implementation, cache)
    return x, hidden_states


def flat_positions(selected: torch.Tensor) -> torch.Tensor:
    """`logits_at` for a boolean (B, T) selection: its flat row-major positions into B*T (N,),
    in the order boolean indexing gives. Called by the model's callers: the read-back that
    sizes the selection happens there, not in the forward."""
    return selected.flatten().nonzero().squeeze(1)


def select_positions(x: torch.Tensor, logits_at: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, D), or its rows (N, D) at the flat row-major positions `logits_at` (N,)."""
    if logits_at is None:
        return x
    if logits_at.dtype == torch.bool or logits_at.is_floating_point() or logits_at.is_complex():
        raise TypeError(
            f"logits_at must be an integer tensor (N,) of flat row-major positions into B*T, "
            f"got {logits_at.dtype}; for a boolean (B, T) selection `mask` pass "
            "mask.flatten().nonzero().squeeze(1)"
        )
    if logits_at.dim() != 1:
        raise ValueError(
            f"logits_at must be one-dimensional (N,) flat positions into B*T, got shape "
            f"{tuple(logits_at.shape)}; for a boolean (B, T) selection `mask` pass "
            "mask.flatten().nonzero().squeeze(1)"
        )
    return x.flatten(0, 1).index_select(0, logits_at)


class MaskPredictor(nn.Module):
    """What every family's model shares: the call interface, the cache, saving, and one forward.

    A family's model builds `config`, `attn_implementation`, `embed` (nn.Embedding), `rope`
    (RotaryEmbedding), `blocks` (its blocks take `run_blocks`' arguments), `final_norm`,
    `lm_head` (None when tied to the embedding) and `special_tokens` (resolved by `load_model`;
    see llada.tokens), and may override `embedding_out` and `logits_out` for what differs.

    block_diffusion: the family generates by block diffusion (LLaDA 2.x: bidirectional inside a
    block, causal between blocks), so the samplers decode it with `BlockDecodeConfig`.
    """

    block_diffusion: bool = False

    def embedding_out(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings as the first block reads them (a family with embedding dropout)."""
        return x

    def logits_out(self, logits: torch.Tensor) -> torch.Tensor:
        """The LM head's output as the forward returns it (scaling, dtype)."""
        return logits

    def save_pretrained(self, folder, max_shard_size: int | str = "5GB", dtype=None, **options):
        """Write the official checkpoint layout (see `llada.model.checkpoint.save_pretrained`)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, folder, max_shard_size=max_shard_size, dtype=dtype, **options)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_kv_cache(
        self, batch: int, length: int, attention_mask: torch.Tensor | None = None
    ) -> KVCache:
        """A preallocated KV cache for `batch` rows of `length` positions, holding the padding
        of `attention_mask` (batch, length) if given; see `KVCache`."""
        return new_kv_cache(self, batch, length, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        window_start: int = 0,
        logits_at: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> LLaDAOutput:
        """input_ids (B, T) -> logits (B, T, vocab) (the vocabulary as the family's config
        pads it; in the model dtype unless the family says otherwise, `logits_out`).

        attention_mask: (B, T), 1 for tokens and 0 for padding (left padding is the intended
            use), or a 4-D boolean (B or 1, 1, T, T), True = may attend (`causal_attention_mask`
            builds the causal one of the autoregressive baseline). A given mask is always
            applied; pass None when nothing is padded (the maskless attention kernels, as the
            reference calls them).
        kv_cache: a `KVCache` from `new_kv_cache`; input_ids are then the positions
            `[window_start, window_start + T)` of the cached canvas, whose keys and values this
            forward writes before attending over all of the cache's slots (window_start=0 and
            all L positions: the whole canvas, which must come before any smaller window). The
            cache holds the padding: positions must be None, and attention_mask None or a 4-D
            boolean (B or 1, 1, T, L) choosing each query's slots (then any window may come
            first: the caller answers for the slots it reads).
        logits_at: integer (N,) flat row-major positions into B*T (for a boolean (B, T)
            selection: `mask.flatten().nonzero().squeeze(1)`); the LM head runs only there and
            logits are (N, V) (the losses need no others, and the head is a large share of a
            small model's compute).
        positions: (T,) RoPE positions; by default 0..T-1 over the padded sequence, as the
            reference (padding shifts all positions equally, and RoPE sees only offsets).
        The forward never reads a tensor's values back to the host: every shape comes from the
        inputs' shapes and Python ints.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        rotary, bias, start = forward_setup(
            x, attention_mask, positions, kv_cache, window_start, self.rope
        )
        x = self.embedding_out(x)
        x, hidden_states = run_blocks(
            self.blocks,
            x,
            rotary,
            bias,
            self.attn_implementation,
            kv_cache,
            start,
            output_hidden_states=output_hidden_states,
        )
        x = self.final_norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        x = select_positions(x, logits_at)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)
        return LLaDAOutput(
            logits=self.logits_out(logits),
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


class LLaDAModel(MaskPredictor):
    """The LLaDA mask predictor. `model(input_ids, attention_mask)` returns `LLaDAOutput`."""

    def __init__(
        self, config: LLaDAConfig, attn_implementation: AttentionImplementation = "sdpa"
    ) -> None:
        super().__init__()
        self.config = config
        self.attn_implementation: AttentionImplementation = attn_implementation
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_full_precision)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.weight_tying
            else nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        )
        # Resolved from the checkpoint folder by `load_model`; see llada.tokens.
        self.special_tokens = None

    def embedding_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed_dropout(x)

    def logits_out(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.scale_logits:
            return logits * (1.0 / math.sqrt(self.config.d_model))
        return logits

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The reference "mitchell" init (modeling_llada.py): truncated normal (±3σ),
        σ = 1/sqrt(fan_in), with the residual output projections scaled by 1/sqrt(2(layer+1))."""

        def normal_(weight: torch.Tensor, std: float) -> None:
            nn.init.trunc_normal_(
                weight, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator
            )

        d = self.config.d_model
        normal_(self.embed.weight, 1 / math.sqrt(d))
        if self.lm_head is not None:
            normal_(self.lm_head.weight, 1 / math.sqrt(d))
        for layer, block in enumerate(self.blocks):
            depth = 1 / math.sqrt(2 * (layer + 1))
            for linear in (
                block.attn.q_proj,
                block.attn.k_proj,
                block.attn.v_proj,
                block.mlp.gate_proj,
                block.mlp.up_proj,
            ):
                normal_(linear.weight, 1 / math.sqrt(d))
            normal_(block.attn.o_proj.weight, depth / math.sqrt(d))
            normal_(block.mlp.down_proj.weight, depth / math.sqrt(self.config.hidden_size))
            block.attn_norm.weight.fill_(1.0)
            block.ff_norm.weight.fill_(1.0)
        self.final_norm.weight.fill_(1.0)
