"""bench/device_check.py in its reduced mode on the CPU, so that the GPU check cannot rot: it runs,
prints one JSON line last, and its figures follow from its own definitions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "bench/device_check.py",
            "--device",
            "cpu",
            "--batches",
            "2",
            "--seqs",
            "16",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert sum(line.startswith("{") for line in lines) == 1  # one JSON line, the last
    return json.loads(lines[-1])


def test_it_runs_reduced_on_the_cpu_with_the_parity_tests(report):
    assert report["device"] == "cpu" and report["reduced"] is True
    parity = report["parity"]
    assert parity["device"] == "cpu" and parity["returncode"] == 0
    assert parity["passed"] >= 38 and parity["failed"] == 0


def test_the_shape_is_timed_eager_and_compiled(report):
    assert set(report["models"]) == {"llada-8b", "llada-moe-7b-a1b"}
    for model in report["models"].values():
        assert [(s["batch"], s["seq"]) for s in model["steps"]] == [(2, 16)]
        assert "cuda graphs: not a CUDA device" in model["skipped"]
        for step in model["steps"]:
            assert step["eager_s"] > 0 and step["compiled_s"] > 0
            assert "cuda_graphs_s" not in step


def test_floors_follow_from_the_measured_machine(report):
    machine = report["machine"]
    for model in report["models"].values():
        for step in model["steps"]:
            assert step["weight_floor_s"] == pytest.approx(
                model["weight_bytes"] / machine["copy_bandwidth"]
            )
            assert step["compute_floor_s"] == pytest.approx(step["flops"] / machine["matmul_flops"])


def test_dense_step_flops_count_matmuls_head_and_attention(report):
    # The reduced dense shape: d 64, 2 layers, MLP 128 (SwiGLU: 3 matrices), vocab 256, no GQA.
    d, layers, mlp, vocab = 64, 2, 128, 256
    per_layer = 4 * d * d + 3 * d * mlp
    for step in report["models"]["llada-8b"]["steps"]:
        b, s = step["batch"], step["seq"]
        expected = (
            2 * per_layer * layers * b * s + 2 * d * vocab * b * s + 4 * s * s * d * layers * b
        )
        assert step["flops"] == expected


def test_moe_step_flops_count_k_of_e_experts(report):
    # The reduced MoE shape: d 64, 2 MoE layers of 8 experts (intermediate 32) top-2, router.
    d, layers, f, experts, k, vocab = 64, 2, 32, 8, 2, 256
    per_layer = 4 * d * d + 3 * d * f * k + experts * d
    for step in report["models"]["llada-moe-7b-a1b"]["steps"]:
        b, s = step["batch"], step["seq"]
        expected = (
            2 * per_layer * layers * b * s + 2 * d * vocab * b * s + 4 * s * s * d * layers * b
        )
        assert step["flops"] == pytest.approx(expected)


def test_an_unknown_model_is_refused_by_name():
    done = subprocess.run(
        [sys.executable, "bench/device_check.py", "--models", "gpt-9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--models: unknown 'gpt-9'" in done.stderr
