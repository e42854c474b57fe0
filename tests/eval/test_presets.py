"""Evaluation presets against the published settings (SPEC §12, the EVAL.md tables).

Where the reference folder is present, the tables are parsed from SPEC.md and every cell is
compared with its preset; a fixed sample of the tables is checked everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llada.eval.presets import PRESETS, EvalPreset, get_preset

SPEC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "SPEC.md"

# SPEC column names -> preset benchmark names.
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


def published_section() -> str:
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is not here (the reference folder is not part of the project)")
    text = SPEC.read_text(encoding="utf-8")
    return text[text.index("## 12. Published evaluation settings") :]


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of `text` as rows of stripped cells (separator rows dropped)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table_with(text: str, first_header: str, column: str) -> dict[str, dict[str, str]]:
    """{row label: {column: cell}} of the table whose header starts with first_header and
    names `column`."""
    for table in tables(text):
        header = table[0]
        if header[0] == first_header and column in header:
            return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in table[1:]}
    raise AssertionError(f"no table with header {first_header!r} and column {column!r}")


def number(cell: str) -> float | None:
    return None if cell in ("–", "-", "") else float(cell)


def test_base_likelihood_presets_are_the_published_ones():
    text = published_section()
    rows = table_with(text, "", "ARC-C")
    sentence = text.split("w/ CFG row:")[1].split("\n\n")[0]
    scales = {
        name: float(value) for name, value in re.findall(r"([\w-]+) (\d+(?:\.\d+)?)", sentence)
    }
    for column, benchmark in BENCHMARKS.items():
        if column not in rows["w/o CFG"]:
            continue
        preset = get_preset(f"llada-8b-base/{benchmark}")
        assert preset.kind == "likelihood"
        assert preset.scores == {"lm-eval": number(rows["w/o CFG"][column])}
        assert preset.cfg == 0
        assert preset.mc_num == (1 if benchmark in SINGLE_TOKEN else 128)
        guided = number(rows["w/ CFG"][column])
        if guided is None:
            assert f"llada-8b-base/{benchmark}-cfg" not in PRESETS
            continue
        with_cfg = get_preset(f"llada-8b-base/{benchmark}-cfg")
        assert with_cfg.scores == {"lm-eval": guided}
        assert with_cfg.cfg == scales[column]
        assert (with_cfg.task, with_cfg.num_fewshot, with_cfg.mc_num) == (
            preset.task,
            preset.num_fewshot,
            preset.mc_num,
        )


def test_base_generation_presets_are_the_published_ones():
    text = published_section()
    rows = table_with(text, "gen_length", "BBH")
    opencompass = dict(
        re.findall(
            r"([A-Za-z0-9]+) (\d+\.\d+)", text.split("OpenCompass at 256:")[1].split("\n")[0]
        )
    )
    for length, cells in rows.items():
        for column, score in cells.items():
            benchmark = BENCHMARKS[column]
            suffix = "" if length == "1024" else f"-{length}"
            preset = get_preset(f"llada-8b-base/{benchmark}{suffix}")
            assert preset.kind == "generation"
            assert preset.gen_length == preset.steps == preset.block_length == int(length)
            assert not preset.logits_eos_inf and not preset.confidence_eos_eot_inf
            assert not preset.apply_chat_template
            assert preset.scores["lm-eval"] == float(score)
            if length == "256":
                assert preset.scores["opencompass"] == float(opencompass[column])


def test_instruct_presets_are_the_published_ones():
    text = published_section()
    rows = table_with(text, "", "MMLU-pro")
    for column, length in rows["gen_length"].items():
        name = f"llada-8b-instruct/{BENCHMARKS[column]}"
        if column == "HellaSwag":  # no generative HellaSwag task in lm-eval
            assert name not in PRESETS
            continue
        preset = get_preset(name)
        assert preset.gen_length == preset.block_length == preset.steps == int(length)
        assert preset.logits_eos_inf == (rows["logits_eos_inf"][column] == "yes")
        assert preset.confidence_eos_eot_inf == (rows["confidence_eos_eot_inf"][column] == "yes")
        assert preset.scores == {
            "internal": float(rows["internal toolkit"][column]),
            "opencompass": float(rows["OpenCompass"][column]),
        }
        assert preset.apply_chat_template
    semi = re.findall(
        r"(GSM8K|Math) gen (\d+) / block (\d+): (\d+\.\d+)\s+\((?:OpenCompass )?(\d+\.\d+)\)", text
    )
    assert len(semi) == 2
    for column, length, block, internal, opencompass in semi:
        preset = get_preset(f"llada-8b-instruct/{BENCHMARKS[column]}-block{block}")
        assert (preset.gen_length, preset.block_length, preset.steps) == (
            int(length),
            int(block),
            int(length),
        )
        assert not preset.logits_eos_inf and not preset.confidence_eos_eot_inf
        assert preset.scores == {"internal": float(internal), "opencompass": float(opencompass)}


def test_llada_15_presets_are_the_published_ones():
    text = published_section()
    rows = table_with(text, "", "IFEval")
    for column, length in rows["gen_length"].items():
        preset = get_preset(f"llada-1.5/{BENCHMARKS[column]}")
        assert (preset.gen_length, preset.block_length, preset.steps) == (
            int(length),
            int(rows["block_length"][column]),
            int(length),
        )
        assert preset.logits_eos_inf == (rows["logits_eos_inf"][column] == "yes")
        assert preset.confidence_eos_eot_inf == (rows["confidence_eos_eot_inf"][column] == "yes")
        assert preset.scores == {
            "internal": float(rows["internal toolkit"][column]),
            "opencompass": float(rows["OpenCompass"][column]),
        }


def test_a_sample_of_the_published_settings():
    """Checked everywhere, with or without the reference folder."""
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
