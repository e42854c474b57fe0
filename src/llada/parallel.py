"""Tensor and expert parallelism for LLaDA 2.x inference: one model over W processes (one per
GPU, or W gloo processes on a CPU), launched by `torchrun --nproc-per-node W`.

LLaDA2.x-flash holds 102.9B parameters (191.6 GiB in bfloat16), more than any single GPU. Here
each rank holds a W-th of every large matrix and the ranks add their parts with all-reduces,
Megatron-style (Shoeybi et al. 2019, "Megatron-LM", section 3), plus expert parallelism for the
routed experts (GShard, Lepikhin et al. 2020):

- attention: rank r holds num_attention_heads / W query heads and the key/value heads they read.
  The official fused `query_key_value` rows are [all query heads, all key heads, all value
  heads], so a plain column-wise shard of it would hand rank 0 only query heads. Its rows are
  first reordered into W equal chunks [q heads of r ; k heads of r ; v heads of r], and then the
  built-in `ColwiseParallel` shards that reordered weight (each rank keeps chunk r); the output
  projection `dense` is `RowwiseParallel` (its input columns are the query heads in order), whose
  all-reduce gives every rank the full attention output. Key/value heads are split when
  num_key_value_heads % W == 0; when W is a multiple of num_key_value_heads (flash: 4 KV heads on
  8 GPUs) each KV head is replicated on the W / num_key_value_heads ranks whose query heads read
  it (grouped-query attention keeps a rank's query heads inside one group). Each rank's KV cache
  holds only its own KV heads (`model.new_kv_cache` reads the local head count).
- dense SwiGLU layers (the first `first_k_dense_replace`): gate/up `ColwiseParallel`, down
  `RowwiseParallel`.
- MoE layers (`ExpertParallelMoE`): the router (`mlp.gate`, with its expert_bias) is replicated,
  so every rank routes every token identically; rank r holds experts [r E/W, (r+1) E/W) and
  computes only the (token, slot) pairs routed to them (`experts_forward(first_expert=...)`);
  the shared experts are sliced column-wise (gate, up) / row-wise (down) as a dense SwiGLU. The
  routed and shared partial sums are added locally and summed over ranks by ONE all-reduce per
  layer. This does not fit the built-in styles (the stacked (E, F, D) expert weights are not a
  Linear, the routing must stay replicated, and two RowwiseParallel-style reductions would cost
  two all-reduces where one suffices), so it is a small explicit module over
  `torch.distributed.all_reduce`.
- embedding, norms, RoPE tables and lm_head are replicated. A vocabulary-parallel lm_head
  would save (W-1)/W of its 157184 x 4096 bf16 values per GPU (1.05 GiB of flash's 26.1 GiB at
  W = 8, docs/llada2-memory.md) but would need an all-gather of the float32 logits
  (B, T, 157184) after every forward, because every rank runs the same sampler on the full
  logits.

Every rank runs the same Python program (the sampler included) on the same inputs: after each
all-reduce the activations are the same on every rank, so the logits, and hence every greedy or
equally seeded decision, agree, and the ranks stay in lock-step through `block_sample` without
further communication. Only rank 0 should print.

The forward is the single-process model's, unchanged (`model(ids, attention_mask=...)`, the KV
cache forward, `logits_at`); the logits equal the single-process ones up to the order of
floating-point sums (float32: 3e-5 on the tiny checkpoint's logits of magnitude 16). In bfloat16 each rank's partial sum is rounded
to bfloat16 before the all-reduce, as in Megatron-LM. The sharded model is for inference: save
checkpoints from a single-process model.

Loading (`load_tensor_parallel`): every rank checks the folder as `llada.load_model` does, builds
the model on the meta device, shards it, allocates only its shares, and fills them from the
safetensors files: it reads its own experts (most of the bytes) and the rows or columns it keeps
of the split matrices, and every replicated tensor. Host memory beyond the rank's share: one
tensor at a time. `tensor_parallel(llada.load_model(...), mesh)` gives the same model but holds
the whole checkpoint on every rank first.

This module sits above `llada.model` (which imports only torch) and `llada.train.parallel`
(whose process-group setup it reuses), and below the CLI.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from .model.llada2 import Attention, LLaDA2Config, LLaDA2Model, MoE
from .model.transformer import AttentionImplementation, SwiGLU
from .train.parallel import Distributed, init_distributed

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "ExpertParallelMoE",
    "check_tensor_parallel",
    "load_tensor_parallel",
    "qkv_rows",
    "rank_parameters",
    "setup_from_env",
    "tensor_parallel",
]


def check_tensor_parallel(config: LLaDA2Config, world_size: int) -> None:
    """Raise one ValueError naming every size that cannot be split over `world_size` ranks."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"tensor parallelism needs a positive number of ranks, got {world_size!r}")
    w = world_size
    heads, kv_heads = config.num_attention_heads, config.n_kv_heads
    problems = []
    if heads % w:
        problems.append(f"num_attention_heads ({heads}) is not a multiple of {w}")
    if kv_heads % w and w % kv_heads:
        problems.append(
            f"num_key_value_heads ({kv_heads}) and {w} ranks: neither divides the other (the KV "
            "heads are either split over the ranks or each replicated on a group of ranks)"
        )
    if config.num_experts % w:
        problems.append(f"num_experts ({config.num_experts}) is not a multiple of {w}")
    if config.first_k_dense_replace > 0 and config.intermediate_size % w:
        problems.append(f"intermediate_size ({config.intermediate_size}) is not a multiple of {w}")
    shared = config.shared_intermediate_size
    if shared and shared % w:
        problems.append(
            f"the shared experts' width (moe_intermediate_size x num_shared_experts = {shared}) "
            f"is not a multiple of {w}"
        )
    if problems:
        raise ValueError(
            f"this LLaDA 2.x model cannot be split over {w} ranks: {'; '.join(problems)}; "
            "run with a number of processes (torchrun --nproc-per-node) that divides these sizes"
        )


def qkv_rows(config: LLaDA2Config, world_size: int) -> torch.Tensor:
    """The row order of the fused query_key_value weight that puts rank r's rows in chunk r.

    Returns (W * (H / W + 2 max(Hkv / W, 1)) * head_dim,) int64 indices into the official rows
    [H query heads ; Hkv key heads ; Hkv value heads] (head_dim rows each): chunk r is rank r's
    query heads, then its key heads, then its value heads, all chunks of equal size. With
    W > Hkv each key/value head appears in the chunks of the W / Hkv ranks that read it.
    """
    check_tensor_parallel(config, world_size)
    w, hd = world_size, config.dim_per_head
    heads, kv_heads = config.num_attention_heads, config.n_kv_heads
    q_per_rank = heads // w
    kv_per_rank = max(kv_heads // w, 1)

    def head_rows(first_row: int, first_head: int, count: int) -> torch.Tensor:
        start = first_row + first_head * hd
        return torch.arange(start, start + count * hd)

    chunks = []
    for rank in range(w):
        # Grouped-query attention: query head h reads KV head h // (heads / kv_heads); rank r's
        # query heads read exactly KV heads [r kv_heads / W, ...) (one head when W > kv_heads).
        first_kv = rank * kv_heads // w
        chunks += [
            head_rows(0, rank * q_per_rank, q_per_rank),
            head_rows(heads * hd, first_kv, kv_per_rank),
            head_rows((heads + kv_heads) * hd, first_kv, kv_per_rank),
        ]
    return torch.cat(chunks)


def rank_parameters(config: LLaDA2Config, world_size: int = 1) -> dict[str, int]:
    """The parameters (and the expert_bias buffers) one rank holds under this module's layout,
    by part; the replicated parts count in full on every rank. world_size 1 sums to
    `config.num_parameters()`.

    Parts: "embedding", "lm_head" (0 when tied), "attention" (query_key_value and dense;
    key/value heads counted once per rank that holds them), "dense_mlp", "routed_experts",
    "shared_experts", and "replicated_small" (norms, routers, expert biases).
    """
    check_tensor_parallel(config, world_size)
    w, d, hd = world_size, config.hidden_size, config.dim_per_head
    q_heads = config.num_attention_heads // w
    kv_heads = max(config.n_kv_heads // w, 1)
    parts = dict.fromkeys(
        (
            "embedding",
            "lm_head",
            "attention",
            "dense_mlp",
            "routed_experts",
            "shared_experts",
            "replicated_small",
        ),
        0,
    )
    parts["embedding"] = config.vocab_size * d
    parts["lm_head"] = 0 if config.tie_word_embeddings else config.vocab_size * d
    parts["replicated_small"] = d  # the final norm
    for layer in range(config.num_hidden_layers):
        parts["attention"] += (q_heads + 2 * kv_heads) * hd * d + d * q_heads * hd
        parts["replicated_small"] += 2 * d + 2 * hd  # two block norms, QK-norms
        if config.is_moe_layer(layer):
            experts = config.num_experts // w
            parts["routed_experts"] += experts * 3 * d * config.moe_intermediate_size
            parts["shared_experts"] += 3 * d * (config.shared_intermediate_size or 0) // w
            parts["replicated_small"] += d * config.num_experts + config.num_experts
        else:
            parts["dense_mlp"] += 3 * d * config.intermediate_size // w
    return parts


class ExpertParallelMoE(MoE):
    """A LLaDA 2.x MoE layer's share on one rank: the replicated router, experts
    [first_expert, first_expert + E / W) of the stacked expert weights, a column/row slice of
    the shared experts, and one all-reduce of the summed partial outputs (module docstring).

    Parameter names and `route` are `MoE`'s (the routers stay visible to `model.routers()`,
    `set_experts_impl` still picks the experts' implementation)."""

    def __init__(self, moe: MoE, rank: int, world_size: int, group: dist.ProcessGroup) -> None:
        nn.Module.__init__(self)
        self.top_k, self.n_group, self.topk_group = moe.top_k, moe.n_group, moe.topk_group
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.experts_impl = moe.experts_impl
        self.gate = moe.gate  # replicated: every rank makes the same choice for every token
        per_rank = moe.gate_proj.shape[0] // world_size
        self.first_expert = rank * per_rank
        mine = slice(self.first_expert, self.first_expert + per_rank)
        self.gate_proj = _parameter(moe.gate_proj[mine])  # (E / W, F, D)
        self.up_proj = _parameter(moe.up_proj[mine])  # (E / W, F, D)
        self.down_proj = _parameter(moe.down_proj[mine])  # (E / W, D, F)
        shared = moe.shared_experts
        self.shared_experts = None if shared is None else _swiglu_share(shared, rank, world_size)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`MoE.forward` on this rank's experts and shared-expert slice, then the one sum over
        ranks."""
        out = super().forward(x)
        dist.all_reduce(out, group=self.group)
        return out


def tensor_parallel(model: LLaDA2Model, mesh: DeviceMesh | None) -> LLaDA2Model:
    """Shard a loaded LLaDA 2.x model in place over the 1-D device `mesh` (module docstring);
    returns it. mesh None or of size 1: the model unchanged.

    Call it on every rank, on the same weights, before any KV cache is made (a cache's shape
    is the rank's KV heads). The weights may be on the CPU: the sharded ones are moved to the
    mesh's device type by DTensor, the rest go where `model.to` sends them (the caller's move;
    `load_tensor_parallel` does it). The mesh is kept as `model.tensor_parallel_mesh`.
    """
    if mesh is None or mesh.size() == 1:
        return model
    if not isinstance(model, LLaDA2Model):
        raise ValueError(
            f"tensor parallelism is implemented for LLaDA 2.x models, got {type(model).__name__}"
        )
    if mesh.ndim != 1:
        raise ValueError(f"tensor parallelism takes a 1-D device mesh, got {mesh.ndim} dimensions")
    if getattr(model, "tensor_parallel_mesh", None) is not None:
        raise ValueError("this model is already split over ranks; split a freshly loaded model")
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    config, w, rank = model.config, mesh.size(), mesh.get_local_rank()
    rows = qkv_rows(config, w)  # checks every size first
    group = mesh.get_group()
    colwise, rowwise = ColwiseParallel(), RowwiseParallel()
    with torch.no_grad():
        for block in model.blocks:
            attention: Attention = block.attn
            weight = attention.qkv_proj.weight
            attention.qkv_proj.weight = _parameter(weight[rows.to(weight.device)])
            # src_data_rank None: every rank cuts its chunk from its own (identical) copy, no
            # communication.
            parallelize_module(
                attention, mesh, {"qkv_proj": colwise, "o_proj": rowwise}, src_data_rank=None
            )
            attention.n_heads = config.num_attention_heads // w
            attention.n_kv_heads = max(config.n_kv_heads // w, 1)
            if block.is_moe:
                block.mlp = ExpertParallelMoE(block.mlp, rank, w, group)
            else:
                parallelize_module(
                    block.mlp,
                    mesh,
                    {"gate_proj": colwise, "up_proj": colwise, "down_proj": rowwise},
                    src_data_rank=None,
                )
    model.tensor_parallel_mesh = mesh
    return model


def load_tensor_parallel(
    path_or_hub_id: str | os.PathLike,
    mesh: DeviceMesh | None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: AttentionImplementation = "sdpa",
) -> LLaDA2Model:
    """Load a LLaDA 2.x checkpoint folder straight into this rank's shards: what
    `tensor_parallel(llada.load_model(...), mesh)` gives, without the whole model in memory.

    The folder is checked first as `load_model` checks it (`inspect_checkpoint`), and the
    rank's share of the weights (`rank_parameters`) against the memory free on `device`. The
    model is then built on the meta device, sharded (`tensor_parallel`), allocated on `device`
    (default: the mesh's device, `cuda:<current>` for a CUDA mesh) and filled tensor by tensor
    from the safetensors files: a rank reads only its own experts (the bulk of the bytes) and
    the rows or columns of the split matrices that it keeps; the replicated tensors (embedding,
    lm_head, norms, routers) are read by every rank. Host memory beyond the rank's share: one
    tensor at a time. mesh None or of size 1: `load_model`.
    """
    from safetensors import safe_open

    from .model.checkpoint import (
        _ADVICE,
        _FLOAT_DTYPES,
        CheckpointError,
        _parse_dtype,
        _skip_weight_init,
        available_memory,
        inspect_checkpoint,
        load_model,
    )

    if mesh is None or mesh.size() == 1:
        return load_model(path_or_hub_id, dtype=dtype, device=device or "cpu",
                          attn_implementation=attn_implementation)  # fmt: skip
    device = torch.device(device) if device is not None else _mesh_device(mesh)
    # Everything checked and nothing allocated; the memory check is this rank's, below.
    plan = inspect_checkpoint(path_or_hub_id, dtype=dtype, device="meta")
    config = plan.config
    if not isinstance(config, LLaDA2Config):
        raise ValueError(
            f"{plan.folder} holds a {plan.family.name} model; tensor parallelism is implemented "
            "for LLaDA 2.x checkpoints only (run other families on one process)"
        )
    w, rank = mesh.size(), mesh.get_local_rank()
    check_tensor_parallel(config, w)
    target_dtype = _parse_dtype(dtype)
    # Our name -> the dtype it loads in: the requested one, else the file's (as load_model:
    # the official checkpoints keep expert_bias in float32 beside bfloat16 weights).
    dtypes = {
        plan.family.from_official_name(official)[0]: target_dtype or _FLOAT_DTYPES[entry.dtype]
        for official, (_, entry) in plan.tensors.items()
    }
    with torch.device("meta"), _skip_weight_init():
        model = LLaDA2Model(config, attn_implementation=attn_implementation)
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._buffers:
            owner._buffers[leaf] = tensor.to(dtypes[name])
        else:
            setattr(owner, leaf, nn.Parameter(tensor.to(dtypes[name]), requires_grad=False))
    tensor_parallel(model, mesh)
    share = sum(
        t.numel() * t.element_size() for t in map(_local, model.state_dict(keep_vars=True).values())
    )
    available = available_memory(device)
    if available is not None and share > available:
        raise CheckpointError(
            f"{plan.folder}: one rank's share of the weights needs {share / 2**30:.1f} GiB on "
            f"{device} but {available / 2**30:.1f} GiB are free; run on more GPUs "
            "(torchrun --nproc-per-node) or in a smaller dtype"
        )
    model.to_empty(device=device)
    model.requires_grad_(False)
    targets = {name: _local(t) for name, t in model.state_dict(keep_vars=True).items()}
    # Each target is written once, a rank's stacked experts once per expert it holds.
    pending = {name: 1 for name in targets}
    for layer, block in enumerate(model.blocks):
        if block.is_moe:
            for projection in ("gate_proj", "up_proj", "down_proj"):
                pending[f"blocks.{layer}.mlp.{projection}"] = block.mlp.gate_proj.shape[0]
    rows = qkv_rows(config, w)
    per_rank_rows = rows.numel() // w
    qkv_runs = _runs(rows[rank * per_rank_rows : (rank + 1) * per_rank_rows])
    by_file: dict[os.PathLike, list[tuple[str, tuple[int, ...]]]] = {}
    for official, (file, entry) in plan.tensors.items():
        by_file.setdefault(file, []).append((official, entry.shape))
    with torch.no_grad():
        for file, entries in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for official, full_shape in entries:
                    name, index = plan.family.from_official_name(official)
                    target = targets[name]
                    if index is not None:  # a routed expert: read only if this rank holds it
                        first = model.get_submodule(name.rpartition(".")[0]).first_expert
                        if not 0 <= index - first < target.shape[0]:
                            continue
                        target = target[index - first]
                    piece = handle.get_slice(official)
                    if name.endswith("attn.qkv_proj.weight"):
                        tensor = torch.cat([piece[a:b] for a, b in qkv_runs])
                    else:
                        tensor = _part(piece, full_shape, tuple(target.shape), rank)
                    target.copy_(tensor)
                    pending[name] -= 1
    unfilled = [name for name, count in pending.items() if count]
    if unfilled:
        raise CheckpointError(
            f"{plan.folder}: rank {rank} found no weights for '{unfilled[0]}'; {_ADVICE}"
        )
    model.special_tokens = plan.special_tokens
    model.checkpoint_folder = plan.folder
    return model.eval()


def setup_from_env(device: str | None = None) -> tuple[Distributed, DeviceMesh | None]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1: gloo on CPU, NCCL on
    CUDA, `llada.train.parallel.init_distributed`) and make the 1-D mesh over all ranks.

    Returns (the process's `Distributed`: rank, world size, device, `is_main`), and the mesh,
    None for a plain single process. device: "cpu" or "cuda" to choose; None picks CUDA when
    there is one.
    """
    from torch.distributed.device_mesh import init_device_mesh

    env = init_distributed(device)
    if not env.enabled:
        return env, None
    mesh = init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("tp",))
    return env, mesh


def _mesh_device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of a parameter or buffer (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted-or-not row indices as maximal runs [a, b) of consecutive rows, in order."""
    runs: list[tuple[int, int]] = []
    for row in rows.tolist():
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def _part(piece, full: tuple[int, ...], local: tuple[int, ...], rank: int) -> torch.Tensor:
    """Rank `rank`'s chunk of a tensor split along the one dimension where its local shape
    differs from the full one (rows for column-wise, columns for row-wise), or all of it."""
    split = [d for d, (a, b) in enumerate(zip(full, local, strict=True)) if a != b]
    if not split:
        return piece[:]
    (dim,) = split
    size = local[dim]
    index = [slice(None)] * len(full)
    index[dim] = slice(rank * size, (rank + 1) * size)
    return piece[tuple(index)]


def _parameter(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter of its own storage (a slice's copy: the full tensor can then be freed)."""
    return nn.Parameter(tensor.clone(), requires_grad=False)


def _swiglu_share(mlp: SwiGLU, rank: int, world_size: int) -> SwiGLU:
    """Rank `rank`'s column slice of gate/up and row slice of down; its output is a partial sum
    (the caller all-reduces)."""
    width = mlp.gate_proj.weight.shape[0] // world_size
    mine = slice(rank * width, (rank + 1) * width)
    with torch.device("meta"):
        share = SwiGLU(mlp.gate_proj.weight.shape[1], width)
    share.gate_proj.weight = _parameter(mlp.gate_proj.weight[mine])
    share.up_proj.weight = _parameter(mlp.up_proj.weight[mine])
    share.down_proj.weight = _parameter(mlp.down_proj.weight[:, mine])
    return share
