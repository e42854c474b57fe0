"""Evaluation presets against the published settings: every cell of the tables of EVAL.md in
ML-GSAI/LLaDA, transcribed into tests/eval/data/published_settings.json, is compared with its
preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llada.eval.presets import PRESETS, EvalPreset, get_preset

PUBLISHED = Path(__file__).parent / "data" / "published_settings.json"

# EVAL.md column names -> preset benchmark names.
BENCHMARKS = {
    "ARC-C": "arc-c",
    "HellaSwag": "hellaswag",
    "TruthfulQA": "truthfulqa",
    "WinoGrande": "winogrande",
    "GPQA": "gpqa",
    "PIQA": "piqa",
    "MMLU": "mmlu",
    "CMMLU": "cmmlu",
    "C-Eval": "ceval",
    "BBH": "bbh",
    "GSM8K": "gsm8k",
    "Math": "math",
    "HumanEval": "humaneval",
    "MBPP": "mbpp",
    "MMLU-pro": "mmlu-pro",
    "IFEval": "ifeval",
}
SINGLE_TOKEN = {"mmlu", "cmmlu", "ceval"}


def published() -> dict:
    with open(PUBLISHED, encoding="utf-8") as f:
        return json.load(f)


def test_base_likelihood_presets_are_the_published_ones():
    table = published()["llada-8b-base"]["likelihood"]
    assert len(table["without_cfg"]) == 9
    for column, score in table["without_cfg"].items():
        benchmark = BENCHMARKS[column]
        preset = get_preset(f"llada-8b-base/{benchmark}")
        assert preset.kind == "likelihood"
        assert preset.scores == {"lm-eval": score}
        assert preset.cfg == 0
        assert preset.mc_num == (1 if benchmark in SINGLE_TOKEN else 128)
        guided = table["with_cfg"][column]
        if guided is None:
            assert f"llada-8b-base/{benchmark}-cfg" not in PRESETS
            continue
        with_cfg = get_preset(f"llada-8b-base/{benchmark}-cfg")
        assert with_cfg.scores == {"lm-eval": guided}
        assert with_cfg.cfg == table["cfg_scales"][column]
        assert (with_cfg.task, with_cfg.num_fewshot, with_cfg.mc_num) == (
            preset.task,
            preset.num_fewshot,
            preset.mc_num,
        )


def test_base_generation_presets_are_the_published_ones():
    table = published()["llada-8b-base"]["generation"]
    opencompass = table["opencompass_gen_length_256"]
    assert sorted(table["lm_eval_by_gen_length"], key=int) == ["256", "512", "1024"]
    for length, cells in table["lm_eval_by_gen_length"].items():
        for column, score in cells.items():
            benchmark = BENCHMARKS[column]
            suffix = "" if length == "1024" else f"-{length}"
            preset = get_preset(f"llada-8b-base/{benchmark}{suffix}")
            assert preset.kind == "generation"
            assert preset.gen_length == preset.steps == preset.block_length == int(length)
            assert not preset.logits_eos_inf and not preset.confidence_eos_eot_inf
            assert not preset.apply_chat_template
            assert preset.scores["lm-eval"] == score
            if length == "256":
                assert preset.scores["opencompass"] == opencompass[column]


def test_instruct_presets_are_the_published_ones():
    table = published()["llada-8b-instruct"]
    columns = {k: v for k, v in table["pure_diffusion"].items() if k != "about"}
    assert len(columns) == 9
    for column, cell in columns.items():
        name = f"llada-8b-instruct/{BENCHMARKS[column]}"
        if column == "HellaSwag":  # no generative HellaSwag task in lm-eval
            assert name not in PRESETS
            continue
        preset = get_preset(name)
        assert preset.gen_length == preset.block_length == preset.steps == cell["gen_length"]
        assert preset.logits_eos_inf == cell["logits_eos_inf"]
        assert preset.confidence_eos_eot_inf == cell["confidence_eos_eot_inf"]
        assert preset.scores == {"internal": cell["internal"], "opencompass": cell["opencompass"]}
        assert preset.apply_chat_template
    assert len(table["semi_autoregressive"]) == 2
    for cell in table["semi_autoregressive"]:
        preset = get_preset(
            f"llada-8b-instruct/{BENCHMARKS[cell['benchmark']]}-block{cell['block_length']}"
        )
        assert (preset.gen_length, preset.block_length, preset.steps) == (
            cell["gen_length"],
            cell["block_length"],
            cell["gen_length"],
        )
        assert not preset.logits_eos_inf and not preset.confidence_eos_eot_inf
        assert preset.scores == {"internal": cell["internal"], "opencompass": cell["opencompass"]}


def test_llada_15_presets_are_the_published_ones():
    columns = {k: v for k, v in published()["llada-1.5"].items() if k != "about"}
    assert len(columns) == 6
    for column, cell in columns.items():
        preset = get_preset(f"llada-1.5/{BENCHMARKS[column]}")
        assert (preset.gen_length, preset.block_length, preset.steps) == (
            cell["gen_length"],
            cell["block_length"],
            cell["gen_length"],
        )
        assert preset.logits_eos_inf == cell["logits_eos_inf"]
        assert preset.confidence_eos_eot_inf == cell["confidence_eos_eot_inf"]
        assert preset.scores == {"internal": cell["internal"], "opencompass": cell["opencompass"]}


def test_a_sample_of_the_published_settings():
    """A few cells written out, as a reader of EVAL.md would check them."""
    gsm8k = get_preset("llada-8b-instruct/gsm8k")
    assert (gsm8k.task, gsm8k.gen_length, gsm8k.block_length, gsm8k.steps) == (
        "gsm8k",
        512,
        512,
        512,
    )
    assert gsm8k.confidence_eos_eot_inf and not gsm8k.logits_eos_inf and gsm8k.apply_chat_template
    assert gsm8k.gen_kwargs() == {"max_gen_toks": 512}
    humaneval = get_preset("llada-8b-instruct/humaneval")
    assert humaneval.logits_eos_inf and not humaneval.confidence_eos_eot_inf
    mmlu = get_preset("llada-8b-base/mmlu")
    assert (mmlu.task, mmlu.num_fewshot, mmlu.mc_num, mmlu.batch_size, mmlu.cfg) == (
        "mmlu",
        5,
        1,
        1,
        0.0,
    )
    assert mmlu.model_args() == {"mc_num": 1, "batch_size": 1, "cfg": 0.0, "is_check_greedy": False}
    truthful = get_preset("llada-8b-base/truthfulqa-cfg")
    assert (truthful.task, truthful.num_fewshot, truthful.cfg, truthful.mc_num) == (
        "truthfulqa_mc2",
        0,
        2.0,
        128,
    )
    assert get_preset("llada-8b-base/gpqa-cfg").task == "gpqa_main_n_shot"
    assert get_preset("llada-8b-base/winogrande").num_fewshot == 5
    base_gsm8k = get_preset("llada-8b-base/gsm8k-256")
    assert (base_gsm8k.gen_length, base_gsm8k.block_length, base_gsm8k.steps) == (256, 256, 256)
    assert base_gsm8k.scores == {"lm-eval": 70.0, "opencompass": 71.9}
    math15 = get_preset("llada-1.5/math")
    assert (math15.task, math15.gen_length, math15.block_length) == ("minerva_math", 1024, 128)
    assert get_preset("llada-8b-instruct/gsm8k-block8").block_length == 8


def test_presets_are_consistent():
    for name, preset in PRESETS.items():
        assert name == preset.name and "/" in name
        assert name.split("/")[0] in ("llada-8b-base", "llada-8b-instruct", "llada-1.5")
        assert preset.scores
        if preset.kind == "likelihood":
            assert preset.mc_num % preset.batch_size == 0
            assert preset.gen_kwargs() is None
        else:
            assert preset.gen_length % preset.block_length == 0
            assert preset.gen_kwargs() == {"max_gen_toks": preset.gen_length}
    with pytest.raises(ValueError, match="needs"):
        EvalPreset(name="x/y", task="t", num_fewshot=0, kind="likelihood")


def test_preset_model_args_are_accepted_by_the_harness_model():
    pytest.importorskip("lm_eval")
    from llada.eval.lm_eval import HarnessSettings

    for preset in PRESETS.values():
        settings = HarnessSettings.from_model_args(preset.model_args())
        for key, value in preset.model_args().items():
            assert getattr(settings, key) == value, (preset.name, key)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="llada-8b-instruct/gsm8k") as error:
        get_preset("llada-8b-instruct/gsm9k")
    assert "llada-8b-base/mmlu" in str(error.value)


def test_cli_rejects_an_unknown_preset_with_the_choices(capsys):
    from llada.cli.main import main

    assert main(["eval", "lm-eval", "--preset", "llada/nope"]) == 2
    message = capsys.readouterr().err
    assert "llada/nope" in message and "llada-8b-base/arc-c-cfg" in message


def test_cli_lists_the_presets(capsys):
    from llada.cli.main import main

    assert main(["eval", "lm-eval", "--list-presets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(PRESETS)


def test_cli_preset_sets_task_shots_and_model_args():
    pytest.importorskip("lm_eval")
    from llada.cli.eval import lm_eval_arguments
    from llada.cli.main import build_parser

    def arguments(*flags: str) -> dict:
        return lm_eval_arguments(build_parser().parse_args(["eval", "lm-eval", *flags]))

    kwargs = arguments(
        "--preset", "llada-8b-instruct/gsm8k", "--model-args", "pretrained=/models/instruct"
    )
    preset = get_preset("llada-8b-instruct/gsm8k")
    assert kwargs["tasks"] == ["gsm8k"]
    assert kwargs["num_fewshot"] is None
    assert kwargs["apply_chat_template"] is True
    assert kwargs["gen_kwargs"] == {"max_gen_toks": 512}
    assert kwargs["model_args"] == {
        **preset.model_args(),
        "pretrained": "/models/instruct",
        "seed": 1234,
    }
    base = arguments("--preset", "llada-8b-base/arc-c-cfg", "--model", "/models/base")
    assert base["tasks"] == ["arc_challenge"] and base["num_fewshot"] == 0
    assert base["model_args"]["cfg"] == 0.5 and base["model_args"]["pretrained"] == "/models/base"
    assert base["apply_chat_template"] is False and base["gen_kwargs"] is None
    # Explicit flags win over the preset.
    override = arguments(
        "--preset",
        "llada-8b-base/mmlu",
        "--num-fewshot",
        "0",
        "--model-args",
        "mc_num=2,batch_size=2",
    )
    assert override["num_fewshot"] == 0
    assert (override["model_args"]["mc_num"], override["model_args"]["batch_size"]) == (2, 2)
    with pytest.raises(ValueError, match="leave out --tasks"):
        arguments("--preset", "llada-8b-base/mmlu", "--tasks", "hellaswag")
    with pytest.raises(ValueError, match="--tasks"):
        arguments()
