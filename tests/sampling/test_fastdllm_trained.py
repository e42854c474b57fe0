"""The fastdllm-* settings give Fast-dLLM's tokens and forward-pass counts beyond the tiny-gqa
vectors: on the shipped instruct model (loaded in float32, chat prompts of its task formats) and
on a random multi-query-attention checkpoint (one KV head) with confident predictions.

The expected outputs in tests/data/fastdllm/ were recorded by running NVlabs/Fast-dLLM's
`generate`, `generate_with_prefix_cache` and `generate_with_dual_cache` (llada/generate.py @
24cc59e, its own modeling file loaded with these weights) on CPU at temperature 0; `nfe` is the
number of forward passes they returned. The instruct model runs in float32, not its shipped
bfloat16: CPUs' bfloat16 matmul kernels round differently (AMX on Intel Xeon, avx512_bf16 on AMD
EPYC), enough to flip near-tied confidences, so a bfloat16 recording holds on one kind of CPU only.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import DATA, TINY_GQA
from llada import load_model
from llada.sampling.config import PRESETS, DecodeConfig, GenerateConfig
from llada.sampling.fast import denoise, sample

FASTDLLM = DATA / "fastdllm"
INSTRUCT = Path(__file__).resolve().parents[2] / "models" / "llada-tiny-instruct"


def _recorded(name: str) -> dict:
    with open(FASTDLLM / name, encoding="utf-8") as f:
        return json.load(f)


def fastdllm_decode(function: str, threshold: float) -> DecodeConfig:
    """Our settings for one of Fast-dLLM's functions: the presets for the cached ones."""
    if function == "generate":  # no preset: the full forward of every step
        decode = DecodeConfig(
            source="full", commit="threshold", early_stop=False, fastdllm_numerics=True
        )
    else:
        cached = {"generate_with_prefix_cache": "prefix", "generate_with_dual_cache": "dual"}
        decode = PRESETS[f"fastdllm-{cached[function]}"]
    return dataclasses.replace(decode, threshold=threshold)


def _run(model, case: dict, mask_id: int):
    args = case["args"]
    config = GenerateConfig(
        steps=args["steps"], gen_length=args["gen_length"], block_length=args["block_length"]
    )
    decode = fastdllm_decode(case["function"], args["threshold"])
    return sample(model, torch.tensor(case["prompt"]), None, config, decode, mask_id=mask_id)


def mqa_state_dict(seed: int, config: dict) -> dict[str, torch.Tensor]:
    """Random weights in the official tensor layout, scaled (as the tiny-gqa vectors' weights)
    so that predictions are confident enough for thresholds to commit several tokens a step:
    unit-variance embeddings, 2/sqrt(d) for queries and keys, a 3/sqrt(d) LM head."""
    generator = torch.Generator().manual_seed(seed)
    d, f = config["d_model"], config["mlp_hidden_size"]
    kv = config["n_kv_heads"] * d // config["n_heads"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state = {"model.transformer.wte.weight": normal(config["vocab_size"], d, std=1.0)}
    for layer in range(config["n_layers"]):
        prefix = f"model.transformer.blocks.{layer}."
        state[prefix + "attn_norm.weight"] = 1 + normal(d, std=0.2)
        state[prefix + "q_proj.weight"] = normal(d, d, std=2 / d**0.5)
        state[prefix + "k_proj.weight"] = normal(kv, d, std=2 / d**0.5)
        state[prefix + "v_proj.weight"] = normal(kv, d, std=1 / d**0.5)
        state[prefix + "attn_out.weight"] = normal(d, d, std=1 / d**0.5)
        state[prefix + "ff_norm.weight"] = 1 + normal(d, std=0.2)
        state[prefix + "ff_proj.weight"] = normal(f, d, std=1 / d**0.5)
        state[prefix + "up_proj.weight"] = normal(f, d, std=1 / d**0.5)
        state[prefix + "ff_out.weight"] = normal(d, f, std=1 / f**0.5)
    state["model.transformer.ln_f.weight"] = 1 + normal(d, std=0.2)
    state["model.transformer.ff_out.weight"] = normal(config["vocab_size"], d, std=3 / d**0.5)
    return state


def write_mqa_checkpoint(seed: int, folder: Path) -> float:
    """The tiny-gqa configuration with a single KV head, random weights from `seed`, in the
    official layout. Returns the weights' fingerprint (sum of absolute values)."""
    config = json.loads((TINY_GQA / "config.json").read_text(encoding="utf-8"))
    config["n_kv_heads"] = 1
    state = mqa_state_dict(seed, config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return float(sum(t.double().abs().sum() for t in state.values()))


@pytest.fixture(scope="module")
def instruct_model():
    # float32: the recorded outputs must not depend on the CPU's bfloat16 kernels.
    return load_model(INSTRUCT, dtype=torch.float32)


@pytest.fixture(scope="module")
def mqa_models(tmp_path_factory):
    recorded = _recorded("tiny-mqa.json")
    models = {}
    for seed, fingerprint in recorded["fingerprints"].items():
        folder = tmp_path_factory.mktemp(f"mqa-{seed}")
        # The weights come from torch's CPU generator; if a torch release changed its stream,
        # the recorded outputs belong to other weights and this says so.
        assert write_mqa_checkpoint(int(seed), folder) == pytest.approx(fingerprint, rel=1e-9)
        models[int(seed)] = load_model(folder)
    return models


INSTRUCT_CASES = _recorded("instruct.json")["cases"]
MQA_CASES = _recorded("tiny-mqa.json")["cases"]


@pytest.mark.parametrize("case", INSTRUCT_CASES, ids=lambda c: c["name"])
def test_fastdllm_settings_match_fastdllm_on_the_instruct_model(instruct_model, case):
    result = _run(instruct_model, case, instruct_model.special_tokens.mask_id)
    assert result.tokens.tolist() == case["expected"]["output"]
    assert result.forward_passes == case["expected"]["nfe"]


@pytest.mark.parametrize("case", MQA_CASES, ids=lambda c: c["name"])
def test_fastdllm_settings_match_fastdllm_on_a_random_mqa_checkpoint(mqa_models, case):
    result = _run(mqa_models[case["seed"]], case, case["mask_id"])
    assert result.tokens.tolist() == case["expected"]["output"]
    assert result.forward_passes == case["expected"]["nfe"]


def test_without_fastdllm_numerics_a_block_full_after_its_fill_pass_ends_at_once(
    instruct_model,
):
    """Our loop's default leaves a block as soon as it is full: Fast-dLLM's tokens, with one
    forward pass fewer for each block that the cache-filling pass decoded completely."""
    case = next(c for c in INSTRUCT_CASES if c["name"] == "dual/reverse/gen64-block8-thr0.9")
    args = case["args"]
    config = GenerateConfig(
        steps=args["steps"], gen_length=args["gen_length"], block_length=args["block_length"]
    )
    ours = dataclasses.replace(PRESETS["fastdllm-dual"], fastdllm_numerics=False)
    events = list(
        denoise(
            instruct_model,
            torch.tensor(case["prompt"]),
            None,
            config,
            ours,
            mask_id=instruct_model.special_tokens.mask_id,
        )
    )
    steps_per_block = Counter(event.block for event in events)
    filled_at_once = sum(1 for steps in steps_per_block.values() if steps == 1)
    assert filled_at_once > 0  # the case has such blocks, else it shows nothing
    assert events[-1].tokens.tolist() == case["expected"]["output"]
    assert events[-1].forward_passes == case["expected"]["nfe"] - filled_at_once


def test_fastdllm_numerics_excludes_reference_numerics():
    with pytest.raises(ValueError, match="exclude each other"):
        DecodeConfig(reference_numerics=True, fastdllm_numerics=True)
