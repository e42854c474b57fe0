"""`llada.compile_model`: torch.compile applied from outside gives the eager forward's logits
and the samplers' tokens, in one graph per kind of call.

Graph capture is checked with `fullgraph=True` (any graph break raises) on the "aot_eager"
backend (dynamo and AOTAutograd trace the forward; the graph then runs eagerly, so the
checks are quick). The MoE families (LLaDA-MoE, LLaDA 2.x) are one graph in bfloat16, where
the experts run as grouped matmuls; in float32 on the CPU their experts walk per-expert slices
sized on the host (llada.model.experts), a graph break by design, so their float32 parity
cases compile without fullgraph. Inductor's generated kernels are checked against the reference vectors on
the dense logits cases (CPU: C++ kernels; the box needs a C++ compiler, tests skip without).
Tolerances: aot_eager runs the same kernels as eager, so its logits equal eager's to 1e-6;
inductor fuses and reorders float32 sums, so it is held to the reference vectors' own 1e-4
(what the eager forward is held to in tests/test_reference_parity.py) and the same argmax.
The sampler's per-step host reads are counted at the end of this file.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import llada
from conftest import REFERENCE, TINY_GQA, reference_cases
from llada.compile import compile_model, default_mode, is_compiled
from llada.model.llada2 import block_attention_mask
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig
from llada.sampling.fast import sample


def _cases(file: str, mode: str) -> list[dict]:
    with open(REFERENCE / file, encoding="utf-8") as f:
        return [c for c in json.load(f) if c["request"]["mode"] == mode]


def _compiled(model: torch.nn.Module, **options) -> torch.nn.Module:
    """A fresh dynamo state (no graphs of earlier tests), then the model compiled to capture
    the whole forward as one graph."""
    torch._dynamo.reset()
    counters.clear()
    options = {"backend": "aot_eager", "fullgraph": True, **options}
    return compile_model(model, **options)


@pytest.fixture(scope="module")
def dense():
    return llada.load_model(TINY_GQA).eval()


@pytest.fixture(scope="module")
def moe():
    return {
        name: llada.load_model(REFERENCE / name, dtype=torch.float32).eval()
        for name in ("moe-tiny", "moe-tiny-opts")
    }


@pytest.fixture(scope="module")
def llada2():
    return llada.load_model(REFERENCE / "llada2-tiny", dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def eager_again(dense, moe, llada2):
    """Every test leaves the shared models eager and on sdpa."""
    yield
    for model in (dense, llada2, *moe.values()):
        vars(model).pop("forward", None)
        model.attn_implementation = "sdpa"


# compile_model itself ------------------------------------------------------------------------


def test_compile_model_replaces_the_instance_forward_only(dense):
    keys = list(dense.state_dict())
    assert not is_compiled(dense)
    assert compile_model(dense, backend="eager") is dense
    assert is_compiled(dense)
    assert type(dense).forward is llada.LLaDAModel.forward  # the class is untouched
    assert list(dense.state_dict()) == keys
    # Compiling again wraps the eager forward, not the compiled one.
    compile_model(dense, backend="eager")
    assert dense.forward._torchdynamo_orig_callable.__func__ is llada.LLaDAModel.forward
    del dense.forward
    assert not is_compiled(dense)


def test_mode_by_device_and_bad_arguments(dense):
    assert default_mode(torch.device("cuda", 0)) == "max-autotune-no-cudagraphs"
    assert default_mode(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="inductor setting"):
        compile_model(dense, mode="reduce-overhead", backend="eager")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compile_model(lambda x: x)
    assert llada.compile_model is compile_model


# Logits: every parity case, compiled as one graph ----------------------------------------------


def _assert_logits(logits, eager, expected, atol=1e-6):
    assert list(logits.shape) == expected["shape"]
    torch.testing.assert_close(logits, eager, atol=atol, rtol=0)
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == expected["argmax"]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_dense_logits_cases_compile_to_one_graph(dense, implementation):
    dense.attn_implementation = implementation
    _compiled(dense)
    for case in reference_cases("logits"):
        request = case["request"]
        ids = torch.tensor(request["input_ids"])
        mask = torch.tensor(request["attention_mask"]) if "attention_mask" in request else None
        with torch.no_grad():
            logits = dense(ids, attention_mask=mask).logits
            eager = type(dense).forward(dense, ids, attention_mask=mask).logits
        _assert_logits(logits, eager, case["expected"])
    assert sum(counters["graph_break"].values()) == 0


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_moe_logits_cases_compiled(moe, implementation):
    torch._dynamo.reset()
    for case in _cases("moe-cases.json", "logits"):
        model = moe[case["model"]]
        model.attn_implementation = implementation
        compile_model(model, backend="aot_eager")  # float32 experts: a break (module doc)
        request = case["request"]
        mask = torch.tensor(request["attention_mask"]) if "attention_mask" in request else None
        ids = torch.tensor(request["input_ids"])
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            eager = type(model).forward(model, ids, attention_mask=mask).logits
        _assert_logits(logits, eager, case["expected"])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llada2_logits_cases_compiled(llada2, implementation):
    llada2.attn_implementation = implementation
    _compiled(llada2, fullgraph=False)  # float32 experts: a break (module doc)
    for case in _cases("llada2-cases.json", "logits"):
        request = case["request"]
        ids = torch.tensor(request["input_ids"])
        block = request.get("block_length")
        mask = None if block is None else block_attention_mask(ids.shape[1], block)
        with torch.no_grad():
            logits = llada2(ids, attention_mask=mask).logits
            eager = type(llada2).forward(llada2, ids, attention_mask=mask).logits
        assert logits.dtype == torch.float32
        _assert_logits(logits, eager, case["expected"])


@pytest.mark.slow
def test_inductor_kernels_match_the_reference_vectors():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU kernels need a C++ compiler (g++/c++), and none is here")
    model = llada.load_model(TINY_GQA).eval()
    torch._dynamo.reset()
    compile_model(model, fullgraph=True)  # inductor, the default mode on CPU
    for case in reference_cases("logits"):
        request = case["request"]
        ids = torch.tensor(request["input_ids"])
        mask = torch.tensor(request["attention_mask"]) if "attention_mask" in request else None
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
            eager = type(model).forward(model, ids, attention_mask=mask).logits
        _assert_logits(logits, eager, case["expected"], atol=2e-5)


# Cached forwards: the KV cache fill, a window, logits_at ----------------------------------------


def _cached_forwards(model, ids, mask=None):
    """(whole-canvas fill logits, window logits at 3 positions) through a fresh cache."""
    cache = model.new_kv_cache(*ids.shape, attention_mask=mask)
    at = torch.tensor([0, 2, 5])  # flat positions into the (2, 4) window
    with torch.no_grad():
        filled = model(ids, kv_cache=cache).logits
        window = model(ids[:, 7:11], kv_cache=cache, window_start=7, logits_at=at).logits
    return filled, window


@pytest.mark.parametrize("family", ["dense", "moe", "llada2"])
def test_cached_forwards_compile_without_graph_breaks(dense, family):
    if family == "dense":
        model = dense
    else:  # bfloat16: the experts' grouped matmuls, one graph (module docstring)
        folder = {"moe": "moe-tiny", "llada2": "llada2-tiny"}[family]
        model = llada.load_model(REFERENCE / folder, dtype=torch.bfloat16).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :3] = 0  # left padding, held by the cache
    expected = [_cached_forwards(model, ids, m) for m in (None, mask)]
    _compiled(model)
    for m, (filled, window) in zip((None, mask), expected, strict=True):
        got_filled, got_window = _cached_forwards(model, ids, m)
        torch.testing.assert_close(got_filled, filled, atol=1e-6, rtol=0)
        torch.testing.assert_close(got_window, window, atol=1e-6, rtol=0)
    # A different window length and start reuse the traced sizes (dynamic after a change).
    cache = model.new_kv_cache(*ids.shape)
    with torch.no_grad():
        model(ids, kv_cache=cache)
        for start, width in ((2, 6), (5, 9), (9, 5)):
            model(ids[:, start : start + width], kv_cache=cache, window_start=start)
    assert sum(counters["graph_break"].values()) == 0


# Samplers: the same tokens, no graph break, few graphs -----------------------------------------

PROMPT = torch.tensor([[5, 9, 11, 2, 7, 8, 1, 4], [4, 6, 3, 3, 9, 2, 8, 7]])


@pytest.mark.parametrize(
    "preset", ["reference", "fast", "fastest", "fastdllm-dual", "fastdllm-prefix"]
)
def test_sampler_on_a_compiled_model_gives_the_eager_tokens(dense, preset):
    config = GenerateConfig(steps=16, gen_length=32, block_length=8)
    torch.manual_seed(1)
    eager = sample(dense, PROMPT, None, config, preset)
    _compiled(dense)
    torch.manual_seed(1)
    compiled = sample(dense, PROMPT, None, config, preset)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert compiled.forward_passes == eager.forward_passes
    assert sum(counters["graph_break"].values()) == 0
    # Each kind of call (no cache / cache fill / cache window) is traced for its first sizes
    # and once more with the sizes that changed as symbols: at most two graphs per kind.
    kinds = 1 if PRESETS[preset].source == "full" else 2
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 * kinds


def test_padded_batch_with_guidance_on_a_compiled_model(dense):
    config = GenerateConfig(steps=8, gen_length=16, block_length=8, cfg_scale=1.0)
    mask = torch.ones_like(PROMPT)
    mask[1, :3] = 0
    decode = DecodeConfig(source="dual", commit="threshold")
    eager = sample(dense, PROMPT, mask, config, decode)
    _compiled(dense)
    compiled = sample(dense, PROMPT, mask, config, decode)
    assert torch.equal(compiled.tokens, eager.tokens)


def test_block_sampler_on_a_compiled_llada2_gives_the_eager_tokens():
    # bfloat16: the experts' grouped matmuls, one graph (module docstring).
    model = llada.load_model(REFERENCE / "llada2-tiny", dtype=torch.bfloat16).eval()
    case = _cases("llada2-cases.json", "llada2_generate")[0]
    arguments = {k: v for k, v in case["request"].items() if k not in ("mode", "seed")}
    arguments["prompt"] = torch.tensor(arguments["prompt"])
    torch.manual_seed(case["request"].get("seed", 0))
    eager = llada.block_generate_cached(model, **arguments)
    _compiled(model)
    torch.manual_seed(case["request"].get("seed", 0))
    compiled = llada.block_generate_cached(model, **arguments)
    assert compiled.tolist() == eager.tolist()
    assert sum(counters["graph_break"].values()) == 0


# The fast loop's host reads --------------------------------------------------------------------


class ReadCounter:
    """Counts every read of a tensor's values back to the host that Python code makes: the
    conversions (`tolist`, `item`, `bool`, `int`, `float`, `__index__`), `nonzero`, and indexing
    or assigning with a boolean tensor (whose result size is read back)."""

    CONVERSIONS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero")

    def __init__(self, monkeypatch) -> None:
        self.reads: list[str] = []
        for name in self.CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(name))
        monkeypatch.setattr(torch, "nonzero", self._counting("nonzero", torch.nonzero))
        for name in ("__getitem__", "__setitem__"):
            monkeypatch.setattr(torch.Tensor, name, self._indexing(name))

    def _counting(self, name, original=None):
        original = original or getattr(torch.Tensor, name)

        def counted(*args, **kwargs):
            self.reads.append(name)
            return original(*args, **kwargs)

        return counted

    def _indexing(self, name):
        original = getattr(torch.Tensor, name)

        def indexed(tensor, index, *rest):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.reads.append(f"bool {name}")
            return original(tensor, index, *rest)

        return indexed


@pytest.mark.parametrize(
    "decode",
    [
        DecodeConfig(source="block", commit="threshold", early_stop=False),
        DecodeConfig(source="dual", commit="factor", early_stop=False),
        DecodeConfig(source="prefix", commit="entropy", early_stop=False),
        DecodeConfig(source="full", commit="schedule", early_stop=False),
        DecodeConfig(source="dual", commit="threshold", early_stop=False, refresh=4),
    ],
    ids=["block-threshold", "dual-factor", "prefix-entropy", "full-schedule", "refresh"],
)
def test_the_fast_loop_reads_back_once_per_step_and_once_per_block(dense, monkeypatch, decode):
    config = GenerateConfig(steps=12, gen_length=24, block_length=8, cfg_scale=0.5)
    counter = ReadCounter(monkeypatch)
    result = sample(dense, PROMPT, None, config, decode)
    monkeypatch.undo()
    # Once per call, the prompt's id range is checked (min and max, llada.inputs); then one
    # read per block (its mask counts) and one per step, nothing else.
    expected = ["__int__", "__int__"] + ["tolist"] * (result.steps + config.num_blocks)
    assert counter.reads == expected
