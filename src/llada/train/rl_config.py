"""Settings of `llada rl` (GRPO with checkable rewards, `llada.train.rl`): one validated,
frozen dataclass; the command's flags derive from it. Imports no torch, so `llada --help` stays
fast."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from ..eval.tasks import SYNTHETIC_TASKS
from ..sampling.config import BLOCK_PRESETS, PRESETS, GenerateConfig
from ..settings import require_positive_ints, settings_from_dict
from .config import Parallel

Estimator = Literal["one-step", "elbo"]


@dataclass(frozen=True)
class RLConfig:
    """Settings of one reinforcement-learning run (GRPO with checkable rewards).

    model: the checkpoint to start from (folder or shipped name); it is also the frozen
        reference of the KL penalty.
    out_dir: run folder: checkpoints/ and metrics.jsonl.
    tasks: comma-separated generated tasks whose questions are asked (arithmetic, copy,
        reverse, sort); evaluation questions of `llada eval tasks` are never asked.
    reward: 'tasks' (1 for an exact match with the task's answer, else 0) or 'module:function',
        a function (prompt, reply, example) -> float, imported by that path.
    group_size: answers sampled per question (G); advantages are relative within the group.
    prompts_per_step: questions per step; a step samples prompts_per_step * group_size answers.
    steps: optimizer rollout steps in total (each with inner_updates optimizer updates).
    inner_updates: optimizer updates per batch of rollouts (d1's mu); with more than one, the
        importance ratio against the rollout policy and its clipping take effect.
    lr: AdamW learning rate (constant).
    weight_decay: AdamW weight decay of matrices.
    grad_clip: clip the gradient norm to this; 0 turns clipping off.
    beta_kl: weight of the KL penalty to the reference model.
    clip: the ratio is clipped to [1 - clip, 1 + clip].
    estimator: 'one-step' (d1: answer masked, prompt masked with prompt_masking, one forward,
        per-token log-probs) or 'elbo' (Monte Carlo ELBO of the answer, mc_num draws).
    prompt_masking: 'one-step': probability of masking each prompt token (d1: 0.15).
    mc_num: 'elbo': masked draws per answer.
    temperature: sampling temperature of the rollouts (> 0, so that a group's answers differ).
    decode: decoding preset of the rollouts (e.g. 'fast', 'reference'; LLaDA 2.x: 'llada2.0',
        'llada2.1-quality', 'llada2.1-speed', its block sampler).
    gen_length: answer tokens per rollout.
    block_length: block length of the rollout sampler (LLaDA 2.x: also the blocks of its
        block-diffusion ELBO).
    sampler_steps: steps of the rollout sampler (its schedule; 'fast' takes what it needs).
    seed: seeds the questions, the rollouts and the masks of every step.
    parallel: under torchrun, how the policy is wrapped: 'ddp', 'fsdp' (FSDP2) or 'none';
        'auto' is fsdp with several processes. Each process rolls out and scores its share of
        the step's questions (whole groups), so prompts_per_step must be at least the number
        of processes.
    lora_rank: > 0 trains LoRA adapters of this rank (through peft, as `llada train
        --lora-rank`) instead of all weights; the KL reference is then the same model with its
        adapters switched off (no second copy).
    lora_alpha: LoRA scaling numerator.
    save_every: write a checkpoint every this many steps (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    resume: continue the run in out_dir from its latest checkpoint, exactly.
    overwrite: start a new run in an out_dir that holds one, deleting it.
    """

    model: str = "llada-tiny-instruct"
    out_dir: str = "runs/rl"
    tasks: str = "arithmetic,copy,reverse,sort"
    reward: str = "tasks"
    group_size: int = 8
    prompts_per_step: int = 8
    steps: int = 100
    inner_updates: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    beta_kl: float = 0.04
    clip: float = 0.2
    estimator: Estimator = "one-step"
    prompt_masking: float = 0.15
    mc_num: int = 4
    temperature: float = 1.0
    decode: str = "fast"
    gen_length: int = 32
    block_length: int = 32
    sampler_steps: int = 32
    seed: int = 0
    parallel: Parallel = "auto"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        require_positive_ints(
            self, "group_size", "prompts_per_step", "steps", "inner_updates", "mc_num",
            "keep_checkpoints",
        )  # fmt: skip
        if self.group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (advantages compare answers within a group), "
                f"got {self.group_size}"
            )
        if not self.model:
            raise ValueError("model is required: the checkpoint to start from (--model)")
        self.task_list()
        if self.reward != "tasks" and self.reward.count(":") != 1:
            raise ValueError(
                f"reward must be 'tasks' or 'module:function' (e.g. mypkg.rewards:score), "
                f"got {self.reward!r}"
            )
        if self.estimator not in ("one-step", "elbo"):
            raise ValueError(f"estimator must be 'one-step' or 'elbo', got {self.estimator!r}")
        if self.decode not in PRESETS and self.decode not in BLOCK_PRESETS:
            raise ValueError(
                f"decode must be one of {sorted(PRESETS)} (LLaDA, LLaDA-MoE) or "
                f"{sorted(BLOCK_PRESETS)} (LLaDA 2.x), got {self.decode!r}"
            )
        for name, low, high in (
            ("lr", 0.0, math.inf),
            ("temperature", 0.0, 10.0),
        ):
            value = getattr(self, name)
            if not low < value <= high:
                raise ValueError(f"{name} must be in ({low:g}, {high:g}], got {value!r}")
        if self.parallel not in get_args(Parallel):
            raise ValueError(
                f"parallel must be 'auto', 'none', 'ddp' or 'fsdp', got {self.parallel!r}"
            )
        if self.lora_rank and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        for name in ("weight_decay", "grad_clip", "beta_kl", "clip", "save_every", "lora_rank"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.prompt_masking < 1:
            raise ValueError(f"prompt_masking must be in [0, 1), got {self.prompt_masking!r}")
        if self.resume and self.overwrite:
            raise ValueError("--overwrite starts the run over and --resume continues it: pass one")
        self.sampler_config()

    def task_list(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in names if t not in SYNTHETIC_TASKS]
        if not names or unknown:
            raise ValueError(
                f"tasks must name generated tasks among {', '.join(SYNTHETIC_TASKS)}, got "
                f"{self.tasks!r}"
            )
        return names

    def sampler_config(self) -> GenerateConfig:
        return GenerateConfig(
            steps=self.sampler_steps,
            gen_length=self.gen_length,
            block_length=self.block_length,
            temperature=self.temperature,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RLConfig:
        return settings_from_dict(cls, data, "RL")
