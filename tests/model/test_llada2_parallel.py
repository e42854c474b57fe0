"""Tensor + expert parallelism for LLaDA 2.x (llada.parallel) against the single-process model:
2 gloo processes on the CPU run the reference tiny checkpoint and a deeper random variant (two
dense layers, one KV head replicated on both ranks, 8 experts); their logits (full forward under
the block mask, the KV-cache forward) and their `block_sample` / `block_generate` tokens must be
the single process's. Plus the expert-parallel hook of `experts_forward` and the refusals of
sizes that do not split."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import llada
from conftest import REFERENCE
from llada.model.experts import experts_forward, experts_grouped, experts_loop
from llada.model.llada2 import LLaDA2Config, LLaDA2Model, block_attention_mask
from llada.parallel import check_tensor_parallel, qkv_rows, rank_parameters

LLADA2_TINY = REFERENCE / "llada2-tiny"
MASK, EOS = 511, 509  # the reference vectors' ids of the tiny checkpoint (it has no tokenizer)
IDS = dict(eos_id=EOS, mask_id=MASK)
WORLD = 2
# Float32 sums in another order (each rank's part, then the all-reduce): measured 3e-5 on logits
# of magnitude up to 16; a head or expert in the wrong place moves them by whole units.
LOGITS_ATOL = 1e-4


def _raw_config() -> dict:
    return json.loads((LLADA2_TINY / "config.json").read_text(encoding="utf-8"))


def _deeper() -> LLaDA2Model:
    """A random LLaDA 2.x: five layers (two dense), 4 query heads on ONE KV head (replicated on
    both ranks), 8 experts in 2 groups, a non-zero expert bias."""
    changes = dict(
        num_hidden_layers=5,
        first_k_dense_replace=2,
        num_key_value_heads=1,
        num_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
    )
    model = LLaDA2Model(LLaDA2Config.from_hf_dict(_raw_config() | changes))
    generator = torch.Generator().manual_seed(0)
    model.requires_grad_(False).init_weights(generator)
    for router in model.routers():
        router.expert_bias.normal_(0.0, 0.1, generator=generator)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ids (2, 12), their padding (row 1's first block is padding), two prompts."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 500, (2, 12), generator=generator)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :4] = 0
    prompts = [torch.randint(0, 500, (n,), generator=generator) for n in (5, 9)]
    return ids, padding, prompts


@torch.no_grad()
def _run(model: torch.nn.Module) -> dict:
    """Everything compared between the parallel and the single-process model."""
    ids, padding, prompts = _inputs()
    allowed = block_attention_mask(12, 4)  # (1, 1, 12, 12)
    full = allowed & padding.bool()[:, None, None, :]
    out = {"logits": model(ids, attention_mask=full).logits}
    model.attn_implementation = "eager"
    out["eager"] = model(ids, attention_mask=full).logits
    model.attn_implementation = "sdpa"
    cache = model.new_kv_cache(2, 12, attention_mask=padding)
    out["cache_first"] = model(ids[:, :8], attention_mask=allowed[:, :, :8], kv_cache=cache).logits
    out["cache_last"] = model(
        ids[:, 8:], attention_mask=allowed[:, :, 8:], kv_cache=cache.prefix(12), window_start=8
    ).logits
    out["cache_heads"] = cache.keys[0].shape[1]
    for version in ("2.0", "2.1"):
        options = dict(version=version, gen_length=16, block_length=4, steps=4, threshold=0.6)
        answers = llada.block_sample(model, prompts, **options, **IDS).answers
        out[f"sample {version}"] = [a.tolist() for a in answers]
        out[f"generate {version}"] = llada.block_generate(model, prompts[0][None], **options, **IDS)
    return out


def _shapes(model: LLaDA2Model) -> dict:
    """The local sizes of the sharded tensors on this rank."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> tuple[int, ...]:
        return tuple((t.to_local() if isinstance(t, DTensor) else t).shape)

    moe = next(b.mlp for b in model.blocks if b.is_moe)
    dense = next(b.mlp for b in model.blocks if not b.is_moe)
    return {
        "qkv": local(model.blocks[0].attn.qkv_proj.weight),
        "o": local(model.blocks[0].attn.o_proj.weight),
        "dense_gate": local(dense.gate_proj.weight),
        "dense_down": local(dense.down_proj.weight),
        "experts": local(moe.gate_proj),
        "shared_gate": local(moe.shared_experts.gate_proj.weight),
        "shared_down": local(moe.shared_experts.down_proj.weight),
        "router": local(moe.gate.weight),
        "lm_head": local(model.lm_head.weight),
        "state": sum(math.prod(local(t)) for t in model.state_dict().values()),
    }


def _texts(folder: str, model: torch.nn.Module) -> dict:
    """What `llada generate` prints (`generate_texts`, chat template, the LLaDA 2.x presets),
    greedy and seeded."""
    from llada.api import generate_texts
    from llada.sampling.config import GenerateConfig
    from llada.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    out = {}
    for decode in ("llada2.0", "llada2.1-speed"):
        for temperature in (0.0, 0.8):
            config = GenerateConfig(
                steps=16, gen_length=16, block_length=16, temperature=temperature
            )
            torch.manual_seed(0)
            out[decode, temperature] = generate_texts(
                model, tokenizer, ["To be, or not", "What is 2 + 3?"], config, decode=decode
            )
    return out


def _local_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: t.to_local() if isinstance(t, DTensor) else t for k, t in model.state_dict().items()}


def _worker(rank: int, port: int, folder: str, chat_folder: str) -> None:
    """One rank: join the group as torchrun would set it up, shard, run, save."""
    from llada.parallel import load_tensor_parallel, setup_from_env, tensor_parallel

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    env, mesh = setup_from_env("cpu")
    try:
        tiny = load_tensor_parallel(LLADA2_TINY, mesh, dtype=torch.float32)
        deeper = tensor_parallel(_deeper(), mesh)
        # The sliced loader holds what splitting the whole loaded model holds, bit for bit.
        split = tensor_parallel(llada.load_model(LLADA2_TINY, dtype=torch.float32), mesh)
        loaded, expected = _local_state(tiny), _local_state(split)
        bf16 = _local_state(load_tensor_parallel(LLADA2_TINY, mesh, dtype="bfloat16"))
        results = {
            "rank": env.rank,
            "loaders_agree": loaded.keys() == expected.keys()
            and all(torch.equal(loaded[k], expected[k]) for k in expected),
            "bf16_dtypes": {k: t.dtype for k, t in bf16.items()},
            "bf16_agrees": all(torch.equal(bf16[k], expected[k].bfloat16()) for k in expected),
            "tiny": _run(tiny),
            "deeper": _run(deeper),
            "tiny_shapes": _shapes(tiny),
            "deeper_shapes": _shapes(deeper),
            "texts": _texts(chat_folder, load_tensor_parallel(chat_folder, mesh, "float32")),
        }
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, llada2_chat_checkpoint) -> list[dict]:
    folder = tmp_path_factory.mktemp("tensor_parallel")
    arguments = (_free_port(), str(folder), str(llada2_chat_checkpoint))
    mp.spawn(_worker, args=arguments, nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    return {
        "tiny": _run(llada.load_model(LLADA2_TINY, dtype=torch.float32)),
        "deeper": _run(_deeper()),
    }


# Two processes against one -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny", "deeper"])
@pytest.mark.parametrize("what", ["logits", "eager", "cache_first", "cache_last"])
def test_parallel_logits_equal_the_single_process_logits(ranks, single, family, what):
    expected = single[family][what]
    # Row 1's first block is padding: those queries see nothing (any value, in both); the last
    # window (positions 8-11) has none of them.
    kept = (lambda t: t) if what == "cache_last" else (lambda t: torch.cat([t[0], t[1, 4:]]))
    for result in ranks:
        got = result[family][what]
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(kept(got), kept(expected), atol=LOGITS_ATOL, rtol=0)
    # Every rank holds the same logits, bit for bit: the samplers on the ranks stay in step.
    torch.testing.assert_close(ranks[0][family][what], ranks[1][family][what], atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny", "deeper"])
@pytest.mark.parametrize("version", ["2.0", "2.1"])
def test_parallel_sampling_gives_the_single_process_tokens(ranks, single, family, version):
    for result in ranks:
        assert result[family][f"sample {version}"] == single[family][f"sample {version}"]
        assert (
            result[family][f"generate {version}"].tolist()
            == single[family][f"generate {version}"].tolist()
        )
    # The sampler's answers are not all EOS or empty: the comparison has something to compare.
    assert any(len(set(a)) > 2 for a in single[family][f"sample {version}"])


@pytest.mark.slow
def test_generate_texts_gives_the_single_process_answers(ranks, llada2_chat_checkpoint):
    """The path of `llada generate` under torchrun: every rank decodes, greedy and seeded."""
    folder = str(llada2_chat_checkpoint)
    expected = _texts(folder, llada.load_model(folder, dtype=torch.float32))
    assert len({answer for answers in expected.values() for answer in answers}) > 2
    for result in ranks:
        assert result["texts"] == expected


@pytest.mark.slow
def test_the_sliced_loader_holds_the_split_model(ranks):
    for result in ranks:
        assert result["loaders_agree"]
        # A requested dtype applies to every tensor, the expert bias included.
        assert set(result["bf16_dtypes"].values()) == {torch.bfloat16}
        assert result["bf16_agrees"]


@pytest.mark.slow
def test_each_rank_holds_its_share(ranks):
    """Half of every split tensor per rank; the router, the head and the (single) KV head of the
    deeper model replicated. A model that ran replicated would pass the comparisons above."""
    hd, d = 16, 64
    assert [r["rank"] for r in ranks] == [0, 1]
    for result in ranks:
        tiny, deeper = result["tiny_shapes"], result["deeper_shapes"]
        # tiny: 4 query heads, 2 KV heads -> 2 query + 1 key + 1 value head per rank.
        assert tiny["qkv"] == ((2 + 1 + 1) * hd, d)
        assert tiny["o"] == (d, 2 * hd)
        assert tiny["dense_gate"] == (128 // 2, d) and tiny["dense_down"] == (d, 128 // 2)
        assert tiny["experts"] == (4 // 2, 32, d)
        assert tiny["shared_gate"] == (32 // 2, d) and tiny["shared_down"] == (d, 32 // 2)
        assert tiny["router"] == (4, d) and tiny["lm_head"] == (512, d)
        # deeper: 4 query heads on one KV head -> 2 query heads + the KV head on each rank.
        assert deeper["qkv"] == ((2 + 1 + 1) * hd, d)
        assert deeper["experts"] == (8 // 2, 32, d) and deeper["router"] == (8, d)
        # Each rank's KV cache holds its own KV heads only.
        # Each rank's KV cache holds its own KV heads only (the tiny model has 2).
        assert result["tiny"]["cache_heads"] == 1 and result["deeper"]["cache_heads"] == 1
        # The memory plan's count (bench/llada2_memory.py) is what a rank holds.
        tiny_config = LLaDA2Config.from_hf_dict(_raw_config())
        assert tiny["state"] == sum(rank_parameters(tiny_config, WORLD).values())
        assert deeper["state"] == sum(rank_parameters(_deeper().config, WORLD).values())
        assert tiny["state"] < tiny_config.num_parameters()


@pytest.mark.parametrize(
    "changes",
    [{}, dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=9216, moe_intermediate_size=1024, num_hidden_layers=32)],
    ids=["mini", "flash"],
)  # fmt: skip
def test_the_memory_plan_counts_the_stated_totals(changes):
    """One rank holds the whole model: 16.26B (mini) and 102.9B (flash) parameters, as the
    model cards' sizes; over 8 ranks the routed experts are an eighth."""
    config = LLaDA2Config(**changes)
    one = rank_parameters(config, 1)
    assert sum(one.values()) == config.num_parameters()
    assert round(sum(one.values()) / 1e9, 2 if not changes else 1) == (
        16.26 if not changes else 102.9
    )
    eight = rank_parameters(config, 8)
    assert eight["routed_experts"] * 8 == one["routed_experts"]
    assert eight["embedding"] == one["embedding"] and eight["lm_head"] == one["lm_head"]
    # Flash's 4 KV heads on 8 ranks: each rank keeps one, so attention is more than an eighth.
    assert eight["attention"] * 8 > one["attention"]


# The expert-parallel hook ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "run",
    [
        lambda *a, first: experts_forward(*a, "loop", first_expert=first),
        lambda *a, first: experts_forward(*a, "grouped", first_expert=first),
        lambda x, ids, w, g, u, d, first: experts_grouped(
            x, ids - first, w, g, u, d, "grouped_mm", partial=True
        ),
        lambda x, ids, w, g, u, d, first: experts_grouped(
            x, ids - first, w, g, u, d, "slices", partial=True
        ),
    ],
    ids=["forward-loop", "forward-grouped", "grouped_mm", "slices"],
)
def test_the_shares_of_the_experts_add_up_to_all_experts(run):
    generator = torch.Generator().manual_seed(0)
    tokens, k, experts, f, d = 37, 3, 8, 16, 32
    x = torch.randn(tokens, d, generator=generator)
    ids = torch.stack([torch.randperm(experts, generator=generator)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=generator)
    gate, up = (torch.randn(experts, f, d, generator=generator) / 4 for _ in range(2))
    down = torch.randn(experts, d, f, generator=generator) / 4
    full = experts_loop(x, ids, weights, gate, up, down)
    for shares in (2, 4):
        per = experts // shares
        parts = [
            run(x, ids, weights, gate[s : s + per], up[s : s + per], down[s : s + per], first=s)
            for s in range(0, experts, per)
        ]
        # Each share computes only its own experts' pairs: no share is the whole.
        assert all((part - full).abs().max() > 1e-3 for part in parts)
        torch.testing.assert_close(sum(parts), full, atol=1e-5, rtol=0)


# Sizes that do not split ----------------------------------------------------------------------


def test_the_tiny_model_splits_over_one_two_but_not_three_ranks():
    config = LLaDA2Config.from_hf_dict(_raw_config())
    check_tensor_parallel(config, 1)
    check_tensor_parallel(config, 2)
    with pytest.raises(ValueError) as error:
        check_tensor_parallel(config, 3)
    message = str(error.value)
    assert "\n" not in message and "--nproc-per-node" in message
    for part in (
        "num_attention_heads (4)",
        "num_key_value_heads (2)",
        "num_experts (4)",
        "intermediate_size (128)",
        "(moe_intermediate_size x num_shared_experts = 32)",
    ):
        assert part in message


def test_only_the_size_that_does_not_split_is_named():
    config = LLaDA2Config.from_hf_dict(_raw_config() | dict(num_experts=6, n_group=3))
    with pytest.raises(ValueError, match=r"num_experts \(6\) is not a multiple of 4") as error:
        check_tensor_parallel(config, 4)
    assert "num_attention_heads" not in str(error.value)
    # More ranks than KV heads: the KV heads are replicated (4 ranks on 2 KV heads), unless
    # neither count divides the other (6 heads on 4 ranks).
    wide = LLaDA2Config.from_hf_dict(
        _raw_config() | dict(num_attention_heads=12, num_key_value_heads=6, head_dim=16)
    )
    with pytest.raises(ValueError, match=r"num_key_value_heads \(6\) and 4 ranks"):
        check_tensor_parallel(wide, 4)
    check_tensor_parallel(LLaDA2Config.from_hf_dict(_raw_config() | dict(num_attention_heads=8)), 4)


@pytest.mark.parametrize(
    "heads, kv_heads, world", [(4, 2, 2), (4, 1, 2), (8, 2, 4), (32, 4, 8), (16, 4, 4), (16, 4, 2)]
)
def test_each_rank_gets_its_query_heads_and_the_kv_heads_they_read(heads, kv_heads, world):
    """Rank r's chunk of the reordered fused QKV rows: query heads r H/W .. (r+1) H/W - 1 and,
    for keys and values alike, exactly the KV heads those query heads read under grouped-query
    attention (query head h reads KV head h // (H / Hkv))."""
    hd = 2
    config = LLaDA2Config.from_hf_dict(
        _raw_config()
        | dict(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd,
               partial_rotary_factor=1.0, num_experts=8, n_group=2, intermediate_size=128)
    )  # fmt: skip
    rows = qkv_rows(config, world)
    chunks = rows.view(world, -1)
    for rank, chunk in enumerate(chunks):
        head_of_row = chunk[::hd] // hd  # the official head index (0..H + 2 Hkv - 1) of each head
        assert (chunk.view(-1, hd) == head_of_row[:, None] * hd + torch.arange(hd)).all()
        query = [h for h in head_of_row.tolist() if h < heads]
        keys = [h - heads for h in head_of_row.tolist() if heads <= h < heads + kv_heads]
        values = [h - heads - kv_heads for h in head_of_row.tolist() if h >= heads + kv_heads]
        per_rank = heads // world
        assert query == list(range(rank * per_rank, (rank + 1) * per_rank))
        assert keys == values == sorted({h // (heads // kv_heads) for h in query})
