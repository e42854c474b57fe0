"""The published evaluation settings of LLaDA (EVAL.md of ML-GSAI/LLaDA) as presets.

`llada eval lm-eval --preset llada-8b-base/arc-c-cfg --model-args pretrained=PATH` runs the
task with exactly these settings. What is published, and what is chosen here:

* LLaDA-8B-Base was evaluated with lm-eval; the task names, shot counts, CFG scales, mc_num and
  MC batch sizes are those of the reference's eval_llada_lm_eval.sh (likelihood tasks: batch 8,
  or 1 with mc_num 1, no greedy check; generation tasks: gen_length = steps = block_length and
  the tasks' own shot counts, written out here: BBH 3, GSM8K 5, Math 4, HumanEval 0, MBPP 3).
* LLaDA-8B-Instruct and LLaDA 1.5 were evaluated with an internal toolkit and OpenCompass, so
  only the sampler settings (gen_length, block_length, EOS flags) are published. Their presets
  pair those settings with the closest generative lm-eval task, the chat template and the
  task's default shot count; steps = gen_length (one token per step) as in every published
  LLaDA setting. Their scores are the toolkit's, for orientation, not an lm-eval target.
  Instruct HellaSwag (gen_length 3) has no generative lm-eval task and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalPreset:
    """One published evaluation setting.

    name: '<model>/<benchmark>', e.g. 'llada-8b-instruct/gsm8k'.
    task: the lm-eval task (or group) name.
    num_fewshot: few-shot examples; None keeps the task's default.
    kind: 'likelihood' (conditional ELBO, multiple choice) or 'generation'.
    mc_num, batch_size: Monte Carlo samples and samples per stratified draw (likelihood).
    cfg: classifier-free guidance scale.
    gen_length, block_length, steps: the sampler's (generation).
    logits_eos_inf, confidence_eos_eot_inf: the reference sampler's EOS flags (generation).
    apply_chat_template: render prompts with the chat template (the Instruct models).
    scores: the published scores in percent, by source ('lm-eval', 'internal', 'opencompass').
    """

    name: str
    task: str
    num_fewshot: int | None
    kind: str
    mc_num: int | None = None
    batch_size: int | None = None
    cfg: float = 0.0
    gen_length: int | None = None
    block_length: int | None = None
    steps: int | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    apply_chat_template: bool = False
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("likelihood", "generation"):
            raise ValueError(f"kind must be 'likelihood' or 'generation', got {self.kind!r}")
        needed = (
            ("mc_num", "batch_size")
            if self.kind == "likelihood"
            else ("gen_length", "block_length", "steps")
        )
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"preset {self.name}: a {self.kind} preset needs {missing}")

    def model_args(self) -> dict[str, Any]:
        """The `llada` model_args this setting fixes (the user adds pretrained=...)."""
        if self.kind == "likelihood":
            return {
                "mc_num": self.mc_num,
                "batch_size": self.batch_size,
                "cfg": self.cfg,
                "is_check_greedy": False,
            }
        return {
            "gen_length": self.gen_length,
            "block_length": self.block_length,
            "steps": self.steps,
            "cfg": self.cfg,
            "temperature": 0.0,
            "remasking": "low_confidence",
            "logits_eos_inf": self.logits_eos_inf,
            "confidence_eos_eot_inf": self.confidence_eos_eot_inf,
            "preset": "reference",
        }

    def gen_kwargs(self) -> dict[str, Any] | None:
        """Generation kwargs that override the task's: the answer length is the published
        gen_length, whatever max_gen_toks the task's YAML names."""
        return {"max_gen_toks": self.gen_length} if self.kind == "generation" else None


def _likelihood(
    model: str,
    benchmark: str,
    task: str,
    shots: int,
    score: float,
    *,
    cfg: float = 0.0,
    mc_num: int = 128,
) -> EvalPreset:
    # eval_llada_lm_eval.sh: --batch_size 8 with mc_num 128, 1 with mc_num 1 (single-token).
    return EvalPreset(
        name=f"{model}/{benchmark}",
        task=task,
        num_fewshot=shots,
        kind="likelihood",
        mc_num=mc_num,
        batch_size=8 if mc_num >= 8 else mc_num,
        cfg=cfg,
        scores={"lm-eval": score},
    )


def _generation(
    model: str,
    benchmark: str,
    task: str,
    shots: int | None,
    gen_length: int,
    block_length: int,
    scores: dict[str, float],
    *,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    chat: bool = False,
) -> EvalPreset:
    return EvalPreset(
        name=f"{model}/{benchmark}",
        task=task,
        num_fewshot=shots,
        kind="generation",
        gen_length=gen_length,
        block_length=block_length,
        steps=gen_length,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        apply_chat_template=chat,
        scores=scores,
    )


def _base_presets() -> list[EvalPreset]:
    base = "llada-8b-base"
    # (benchmark, task, shots, w/o CFG, w/ CFG, cfg scale)
    likelihood = [
        ("arc-c", "arc_challenge", 0, 45.9, 47.9, 0.5),
        ("hellaswag", "hellaswag", 0, 70.5, 72.5, 0.5),
        ("truthfulqa", "truthfulqa_mc2", 0, 46.1, 46.4, 2.0),
        ("winogrande", "winogrande", 5, 74.8, 74.8, 0.0),
        ("gpqa", "gpqa_main_n_shot", 5, 25.2, 26.1, 0.5),
        ("piqa", "piqa", 0, 73.6, 74.4, 0.5),
    ]
    presets = []
    for benchmark, task, shots, plain, guided, scale in likelihood:
        presets.append(_likelihood(base, benchmark, task, shots, plain))
        presets.append(_likelihood(base, f"{benchmark}-cfg", task, shots, guided, cfg=scale))
    # Single-token answers: one Monte Carlo sample suffices (Appendix B.5).
    for benchmark, task, score in (
        ("mmlu", "mmlu", 65.9),
        ("cmmlu", "cmmlu", 69.9),
        ("ceval", "ceval-valid", 70.5),
    ):
        presets.append(_likelihood(base, benchmark, task, 5, score, mc_num=1))
    # gen_length = steps = block_length; lm-eval scores by length, OpenCompass at 256.
    generation = {
        "bbh": ("bbh", 3, {1024: 49.7, 512: 50.4, 256: 45.0}, 47.3),
        "gsm8k": ("gsm8k", 5, {1024: 70.3, 512: 70.8, 256: 70.0}, 71.9),
        "math": ("minerva_math", 4, {1024: 31.4, 512: 30.9, 256: 30.3}, 30.7),
        "humaneval": ("humaneval", 0, {1024: 35.4, 512: 32.9, 256: 32.9}, 34.1),
        "mbpp": ("mbpp", 3, {1024: 40.0, 512: 39.2, 256: 40.2}, 38.8),
    }
    for benchmark, (task, shots, by_length, opencompass) in generation.items():
        for length, score in by_length.items():
            scores = {"lm-eval": score}
            if length == 256:
                scores["opencompass"] = opencompass
            suffix = "" if length == 1024 else f"-{length}"
            presets.append(
                _generation(base, benchmark + suffix, task, shots, length, length, scores)
            )
    return presets


def _instruct_presets() -> list[EvalPreset]:
    model = "llada-8b-instruct"
    # Pure diffusion (block_length = gen_length): (benchmark, task, gen_length, logits_eos_inf,
    # confidence_eos_eot_inf, internal toolkit, OpenCompass).
    pure = [
        ("mmlu", "mmlu_generative", 3, False, False, 65.5, 65.4),
        ("mmlu-pro", "mmlu_pro", 256, False, False, 37.0, 36.6),
        ("arc-c", "arc_challenge_chat", 512, False, False, 88.5, 89.2),
        ("gsm8k", "gsm8k", 512, False, True, 69.4, 68.8),
        ("math", "minerva_math", 512, False, True, 31.9, 29.6),
        ("gpqa", "gpqa_main_generative_n_shot", 64, False, True, 33.3, 32.3),
        ("humaneval", "humaneval_instruct", 512, True, False, 49.4, 47.0),
        ("mbpp", "mbpp_instruct", 256, False, True, 41.0, 39.6),
    ]
    presets = [
        _generation(
            model,
            benchmark,
            task,
            None,
            length,
            length,
            {"internal": internal, "opencompass": opencompass},
            logits_eos_inf=eos,
            confidence_eos_eot_inf=eos_eot,
            chat=True,
        )
        for benchmark, task, length, eos, eos_eot, internal, opencompass in pure
    ]
    # Semi-autoregressive blocks, no EOS flags.
    presets.append(
        _generation(
            model,
            "gsm8k-block8",
            "gsm8k",
            None,
            256,
            8,
            {"internal": 78.6, "opencompass": 78.9},
            chat=True,
        )
    )
    presets.append(
        _generation(
            model,
            "math-block64",
            "minerva_math",
            None,
            512,
            64,
            {"internal": 42.2, "opencompass": 42.7},
            chat=True,
        )
    )
    return presets


def _llada_15_presets() -> list[EvalPreset]:
    # (benchmark, task, gen_length, block_length, confidence_eos_eot_inf, internal, OpenCompass);
    # logits_eos_inf is off everywhere.
    rows = [
        ("gsm8k", "gsm8k", 256, 16, True, 83.8, 83.6),
        ("math", "minerva_math", 1024, 128, True, 42.6, 42.3),
        ("gpqa", "gpqa_main_generative_n_shot", 256, 16, False, 36.9, 34.8),
        ("humaneval", "humaneval_instruct", 512, 32, True, 52.4, 51.2),
        ("mbpp", "mbpp_instruct", 512, 32, True, 42.8, 42.6),
        ("ifeval", "ifeval", 256, 16, True, 66.2, 65.2),
    ]
    return [
        _generation(
            "llada-1.5",
            benchmark,
            task,
            None,
            length,
            block,
            {"internal": internal, "opencompass": opencompass},
            confidence_eos_eot_inf=eos_eot,
            chat=True,
        )
        for benchmark, task, length, block, eos_eot, internal, opencompass in rows
    ]


PRESETS: dict[str, EvalPreset] = {
    p.name: p for p in _base_presets() + _instruct_presets() + _llada_15_presets()
}


def get_preset(name: str) -> EvalPreset:
    """The preset called `name`, or a ValueError that lists the choices."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown evaluation preset {name!r}; choose from: {', '.join(sorted(PRESETS))}"
        )
    return PRESETS[name]
