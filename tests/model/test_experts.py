"""The grouped experts (sorted tokens, grouped matmuls) against the readable expert loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llada.model.experts import (
    CPU_GROUPED_MM_BYTES,
    experts_forward,
    experts_grouped,
    experts_loop,
    grouped_mm_applies,
    pick_backend,
)

BACKENDS = ("grouped_mm", "slices")


def make_case(
    tokens: int,
    experts: int,
    k: int,
    d: int = 16,
    f: int = 32,
    dtype: torch.dtype = torch.float32,
    routing: str = "random",
    seed: int = 0,
):
    """x (T, D), topk_ids (T, k), topk_weights (T, k) float32, gate, up (E, F, D), down (E, D, F)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g).to(dtype)
    if routing == "random":
        scores = torch.rand(tokens, experts, generator=g)
    elif routing == "skewed":
        # Experts 0 and 1 take most of the tokens; the last experts get none.
        scores = torch.rand(tokens, experts, generator=g)
        scores[:, :2] += 1.0
        scores[:, -2:] -= 2.0
    else:
        raise AssertionError(routing)
    topk_weights, topk_ids = scores.softmax(-1).topk(k, dim=-1)
    gate = (torch.randn(experts, f, d, generator=g) / d**0.5).to(dtype)
    up = (torch.randn(experts, f, d, generator=g) / d**0.5).to(dtype)
    down = (torch.randn(experts, d, f, generator=g) / f**0.5).to(dtype)
    return x, topk_ids, topk_weights, gate, up, down


CASES = [
    # tokens, experts, k, routing
    (37, 8, 2, "random"),
    (1, 8, 2, "random"),
    (20, 6, 1, "random"),
    (9, 5, 5, "random"),  # k = E: every token to every expert
    (40, 8, 3, "skewed"),  # uneven, experts without tokens
    (3, 16, 2, "random"),  # most experts without tokens
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,experts,k,routing", CASES)
def test_grouped_equals_loop_float32(tokens, experts, k, routing, backend):
    x, ids, w, gate, up, down = make_case(tokens, experts, k, routing=routing)
    assert grouped_mm_applies(x, gate, up, down)
    expected = experts_loop(x, ids, w, gate, up, down)
    got = experts_grouped(x, ids, w, gate, up, down, backend=backend)
    if backend == "slices":
        # The same matmuls on the same rows, added in the same order: bit for bit.
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_skewed_case_has_idle_experts_and_a_crowded_one():
    _, ids, *_ = make_case(40, 8, 3, routing="skewed")
    counts = torch.bincount(ids.reshape(-1), minlength=8)
    assert (counts == 0).any() and counts.max() >= 30


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens,experts,k,routing", CASES)
def test_grouped_equals_loop_bfloat16(tokens, experts, k, routing, backend):
    x, ids, w, gate, up, down = make_case(tokens, experts, k, dtype=torch.bfloat16, routing=routing)
    w = w.to(torch.bfloat16)
    expected = experts_loop(x, ids, w, gate, up, down)
    got = experts_grouped(x, ids, w, gate, up, down, backend=backend)
    assert got.dtype == torch.bfloat16
    if backend == "slices":
        assert torch.equal(got, expected)
        return
    # grouped_mm rounds differently along the way: as close to the float64 answer as the loop,
    # within a few bf16 steps (2**-8 relative) of it.
    exact = experts_loop(x.double(), ids, w.double(), gate.double(), up.double(), down.double())
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    err_grouped = (got.double() - exact).abs().max()
    err_loop = (expected.double() - exact).abs().max()
    assert err_grouped <= 2 * err_loop + 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_under_bf16_autocast_grouped_runs_the_loops_bf16_matmuls(backend, requires_grad):
    # float32 weights and activations under autocast (bf16 mixed-precision training): the loop's
    # F.linear runs in bfloat16; grouped_mm is not an autocast op and must be cast the same way,
    # not left in float32 (which also ran 2-3x slower in training).
    x, ids, w, gate, up, down = make_case(64, 8, 2, d=64, f=48)
    for t in (gate, up, down):
        t.requires_grad_(requires_grad)
    full = experts_loop(x, ids, w, gate, up, down)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = experts_loop(x, ids, w, gate, up, down)
        got = experts_grouped(x, ids, w, gate, up, down, backend=backend)
    assert got.dtype == expected.dtype == torch.float32
    assert not torch.equal(expected, full)  # bf16 matmuls do differ from float32 ones here
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "dtype,d",
    [(torch.float64, 16), (torch.float32, 15)],  # dtype refused; rows not 16-byte aligned
)
def test_operands_grouped_mm_refuses_run_on_slices(dtype, d):
    x, ids, w, gate, up, down = make_case(23, 6, 2, d=d, f=12 if d == 15 else 32, dtype=dtype)
    w = w.to(dtype)
    assert not grouped_mm_applies(x, gate, up, down)
    assert torch.equal(
        experts_grouped(x, ids, w, gate, up, down), experts_loop(x, ids, w, gate, up, down)
    )


def test_forward_casts_router_weights_as_the_model_passes_them():
    # The router's softmax is float32; the experts run in the model dtype.
    x, ids, w, gate, up, down = make_case(17, 8, 2, dtype=torch.bfloat16)
    assert w.dtype == torch.float32
    expected = experts_loop(x, ids, w.to(torch.bfloat16), gate, up, down)
    assert torch.equal(experts_forward(x, ids, w, gate, up, down, impl="loop"), expected)
    got = experts_forward(x, ids, w, gate, up, down, impl="auto")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    x32, *_ = make_case(17, 8, 2)
    torch.testing.assert_close(
        experts_forward(x32, ids, w, gate.float(), up.float(), down.float(), impl="grouped"),
        experts_loop(x32, ids, w, gate.float(), up.float(), down.float()),
        rtol=1e-5,
        atol=1e-5,
    )


def test_cpu_picks_grouped_mm_for_small_batches_and_slices_for_large_ones():
    d, f, k = 16, 32, 2
    gate, up, down = torch.empty(8, f, d), torch.empty(8, f, d), torch.empty(8, d, f)
    bytes_per_row = (d + 2 * f) * 4
    fits = CPU_GROUPED_MM_BYTES // bytes_per_row // k  # tokens whose intermediates just fit
    for tokens, expected in ((1, "grouped_mm"), (fits, "grouped_mm"), (fits + 1, "slices")):
        x, ids = torch.empty(tokens, d), torch.zeros(tokens, k, dtype=torch.int64)
        assert pick_backend(x, ids, gate, up, down) == expected, tokens
    # Operands grouped_mm refuses go to slices whatever their size.
    x, ids = torch.empty(1, d, dtype=torch.float64), torch.zeros(1, k, dtype=torch.int64)
    assert pick_backend(x, ids, gate.double(), up.double(), down.double()) == "slices"


def test_cpu_training_takes_grouped_mm_at_any_size():
    d, f, k, tokens = 16, 32, 2, 1 << 16  # far beyond the forward-only threshold
    gate, up, down = torch.empty(8, f, d), torch.empty(8, f, d), torch.empty(8, d, f)
    x, ids = torch.empty(tokens, d), torch.zeros(tokens, k, dtype=torch.int64)
    assert pick_backend(x, ids, gate, up, down) == "slices"
    gate.requires_grad_()
    assert pick_backend(x, ids, gate, up, down) == "grouped_mm"
    with torch.no_grad():
        assert pick_backend(x, ids, gate, up, down) == "slices"


def test_off_the_cpu_bf16_takes_grouped_mm_and_other_dtypes_slices():
    def meta(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    ids = meta(1 << 16, 2, dtype=torch.int64)  # far beyond the CPU's threshold
    for dtype, expected in ((torch.bfloat16, "grouped_mm"), (torch.float32, "slices")):
        weights = meta(8, 32, 16, dtype=dtype), meta(8, 32, 16, dtype=dtype)
        picked = pick_backend(
            meta(1 << 16, 16, dtype=dtype), ids, *weights, meta(8, 16, 32, dtype=dtype)
        )
        assert picked == expected


def test_forward_refuses_an_unknown_impl():
    x, ids, w, gate, up, down = make_case(4, 4, 2)
    with pytest.raises(ValueError, match="experts impl must be one of auto, loop, grouped"):
        experts_forward(x, ids, w, gate, up, down, impl="bmm")
    with pytest.raises(ValueError, match="experts backend"):
        experts_grouped(x, ids, w, gate, up, down, backend="bmm")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ["random", "skewed"])
def test_gradients_of_grouped_equal_the_loop(backend, routing):
    case = make_case(40, 8, 3, routing=routing, seed=1)

    def grads(fn):
        leaves = [t.clone().requires_grad_() if t.is_floating_point() else t for t in case]
        out = fn(*leaves)
        # A fixed random cotangent, so that every row and column matters.
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * cotangent).sum().backward()
        return [t.grad for t in leaves if t.is_floating_point()]

    expected = grads(experts_loop)
    got = grads(lambda *a: experts_grouped(*a, backend=backend))
    for name, g, e in zip(("x", "topk_weights", "gate", "up", "down"), got, expected, strict=True):
        assert g is not None, name
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
    # The skewed routing leaves experts unused: their weights get exactly zero gradient.
    if routing == "skewed":
        assert torch.equal(got[2][-1], torch.zeros_like(got[2][-1]))


def test_grouped_mm_path_never_reads_back_to_the_host():
    # On the meta device any host read (.tolist(), int(tensor), torch.where) raises: the
    # grouped_mm path runs there in full, so it has no synchronisation; the loop does not.
    tokens, experts, k, d, f = 24, 8, 2, 16, 32

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    args = (
        meta(tokens, d),
        meta(tokens, k, dtype=torch.int64),
        meta(tokens, k),
        meta(experts, f, d),
        meta(experts, f, d),
        meta(experts, d, f),
    )
    out = experts_grouped(*args, backend="grouped_mm")
    assert out.shape == (tokens, d) and out.dtype == torch.bfloat16
    # Off the CPU, "auto" takes this path for bf16.
    assert experts_forward(*args, impl="auto").shape == (tokens, d)
    with pytest.raises((NotImplementedError, RuntimeError)):
        experts_grouped(*args, backend="slices")
    with pytest.raises((NotImplementedError, RuntimeError)):
        experts_loop(*args)


def test_a_view_whose_rows_start_off_16_bytes_is_refused():
    x, ids, w, gate, up, down = make_case(23, 6, 2, d=16, f=32)
    # The same stacked weights, one float32 (4 bytes) into a larger buffer: misaligned.
    shifted = torch.empty(gate.numel() + 1)[1:].view_as(gate).copy_(gate)
    assert shifted.is_contiguous() and shifted.storage_offset() == 1
    assert grouped_mm_applies(x, gate, up, down)
    assert not grouped_mm_applies(x, shifted, up, down)
    assert torch.equal(
        experts_grouped(x, ids, w, shifted, up, down), experts_loop(x, ids, w, gate, up, down)
    )


@pytest.mark.slow
def test_cpu_inference_compiles_into_one_graph():
    # Large enough that eager CPU inference takes the slices (a host read of their sizes);
    # compiled, "auto" must take grouped_mm instead (bf16), with no graph break.
    tokens, experts, k, d, f = 8192, 8, 2, 64, 256
    x, ids, w, gate, up, down = make_case(tokens, experts, k, d=d, f=f, dtype=torch.bfloat16)
    assert pick_backend(x, ids, gate, up, down) == "slices"
    compiled = torch.compile(experts_forward, fullgraph=True, backend="eager")
    got = compiled(x, ids, w, gate, up, down)
    expected = experts_grouped(x, ids, w.to(x.dtype), gate, up, down, backend="grouped_mm")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_float32_accumulation_weighs_and_sums_bf16_expert_outputs_in_float32(impl):
    # LLaDA 2.x's reference: the k expert outputs (bf16) are weighted by float32 weights and
    # summed in float32, and only the sum is cast back.
    x, ids, w, gate, up, down = make_case(64, 8, 3, d=32, f=48, dtype=torch.bfloat16)
    got = experts_forward(x, ids, w, gate, up, down, impl, accumulate_dtype=torch.float32)
    expected = torch.zeros(x.shape)
    for t in range(x.shape[0]):
        for j in ids[t].argsort().tolist():  # added in expert order, as index_add_ does
            e = ids[t, j]
            h = x[t : t + 1]
            y = F.linear(F.silu(F.linear(h, gate[e])) * F.linear(h, up[e]), down[e])
            expected[t] += w[t, j] * y[0].float()
    assert got.dtype == torch.bfloat16
    expected = expected.to(torch.bfloat16)
    default = experts_forward(x, ids, w, gate, up, down, impl)  # LLaDA-MoE's: sums in bf16
    # The same bits but where one row's matmul rounds otherwise than a batch's (1 bf16 step).
    assert (got != expected).sum() <= 2
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)
    assert (default != expected).sum() > 50


def test_a_float64_llada2_accumulates_its_experts_in_float32():
    """LLaDA 2.x sums its expert outputs in float32 (as its reference); a float64 model's
    float64 expert outputs are cast into that sum instead of failing in index_add_."""
    import llada
    from conftest import REFERENCE

    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    double = llada.load_model(REFERENCE / "llada2-tiny", dtype=torch.float64)(ids).logits
    single = llada.load_model(REFERENCE / "llada2-tiny", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(double, single, atol=1e-4, rtol=1e-4)
