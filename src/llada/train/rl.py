"""Reinforcement learning with checkable rewards: group-relative policy optimisation (GRPO) of a
masked diffusion model, as diffu-GRPO does (Zhao et al. 2025, "d1: Scaling Reasoning in
Diffusion Large Language Models via Reinforcement Learning", arXiv 2504.12216; the GRPO
objective of Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300).

One step:
1. Rollouts. `prompts_per_step` questions of the generated tasks (`llada.eval.tasks`; never one
   of their evaluation questions), each answered `group_size` times by the batched fast sampler
   (`llada.sampling.fast.sample`, the `decode` preset) at `temperature`.
2. Rewards. 'tasks': 1.0 for an exact match with the task's answer (`is_correct`), else 0.0;
   or a user function named 'module:function', called as fn(prompt, reply, example) -> float.
3. Advantages, group-relative: A = (r - mean) / (std + eps) within each question's group
   (`group_advantages`), so no value network is needed.
4. `inner_updates` optimizer steps on the clipped objective with a KL penalty to the reference
   (the starting checkpoint, frozen, in the same process), per sequence
   (1/|o|) sum_t [min(rho_t A, clip(rho_t, 1 - clip, 1 + clip) A) - beta_kl KL_t], averaged
   over sequences and maximised (`clipped_objective`). rho is the ratio against the policy
   that made the rollouts (1 in the first inner update); KL_t is the k3 estimate
   exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, "Approximating KL divergence"), as GRPO.

A masked diffusion model has no cheap exact log p(answer | prompt); `estimator` chooses how
the policy's log-probabilities are estimated:
- 'one-step' (default; d1's estimator, §3.2 of the d1 paper): the whole answer is masked, each
  real prompt token is masked with probability `prompt_masking` (0.15 in d1), and one forward
  gives a per-token log-probability of every answer token. Tokens through the answer's first
  stop token count, as d1's completion mask does. Policy, rollout policy and reference read
  the same masked input, a new one per inner update (d1's random prompt masking).
- 'elbo': the Monte Carlo ELBO of `llada.likelihood` (LLaDA paper Eq. 6; the 1/p_mask
  weighted masked-token log-probabilities of `llada.diffusion.stratified_masking` draws, prompt
  never masked) over the whole answer window (EOS padding included, as SFT trains it), with
  `mc_num` draws shared by policy, rollout policy and reference (the shared noise of VRPO, Zhu
  et al. 2025, "LLaDA 1.5", arXiv 2505.19223). It bounds a sequence's log-probability, not a
  token's, so the ratio is the sequence-level one normalised by the answer length,
  exp((elbo - elbo_old) / L) (GSPO, Zheng et al. 2025, arXiv 2507.18071), and the KL term is
  on the same per-token means.

Every rollout row draws from its own generator, seeded from (seed, step, question index, answer
index) (LLaDA 2.x's block sampler: one call per question, seeded from (seed, step, question
index)), and the estimators' masks are drawn per question likewise: what a question gets does
not depend on the process that handles it or on the other questions. Under torchrun each process takes
a contiguous share of the step's questions, the policy is wrapped as `llada train` wraps it
(`llada.train.parallel`: DDP or FSDP2), the loss is the mean over all the step's answers, and
rewards and logs are all-reduced, so N processes follow the one-process run.

With `lora_rank`, only LoRA adapters (peft, `llada.train.lora`) train and the KL reference is the
policy with its adapters switched off: no second copy of the weights.

Checkpoints are `llada train`'s (`llada.train.checkpointing`): an official model folder in
float32 (LoRA: merged weights, the adapters in peft's format beside them), the sharded policy
and optimizer state, and `trainer_state.pt` (step, settings), written atomically. Every random
draw of a step (questions, rollouts, masks) comes from seeds of (seed, step, question), so
`resume` continues exactly as the run would have.

LLaDA 2.x (block diffusion): rollouts by its block sampler (`--decode llada2.0` or a 2.1 preset,
blocks of `block_length`), log-probabilities by the 'elbo' estimator on its block-diffusion ELBO
(`block_elbo_log_probs`: each group scored on its own, blocks counted from the row's first token
as the sampler counts them, one forward and backward per group); d1's one-step estimate is
refused. Under torchrun every process must hold as many questions (equal numbers of forwards).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..diffusion import block_masked_logits, stratified_masking
from ..eval.tasks import SYNTHETIC_TASKS, Example, held_out_prompts, is_correct
from ..model.checkpoint import load_model
from ..sampling.config import BLOCK_PRESETS, decode_preset
from ..sampling.fast import sample
from ..tokenizer import copy_tokenizer_files, encode_chat, left_pad, load_tokenizer
from .checkpointing import (
    SHARDED_FORMAT,
    BrokenCheckpoint,
    CheckpointWriteError,
    agree_on_failure,
    checkpoint_problem,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_shards,
    load_trainer_state,
    save_checkpoint,
    write_shards,
)
from .lora import add_lora, base_model_reference, merged_state_dict, save_peft_adapter
from .parallel import (
    Distributed,
    all_reduce_sum,
    barrier,
    full_model_state,
    init_distributed,
    load_sharded_state,
    sharded_state,
    shutdown,
    unwrap,
    wrap_model,
)
from .rl_config import RLConfig

logger = logging.getLogger(__name__)

Say = Callable[[str], None]

# GRPO's epsilon in the advantage's denominator (a group with equal rewards gets A = 0).
ADVANTAGE_EPS = 1e-4


class RewardError(RuntimeError):
    """The reward function failed or returned something that is not a finite number; the
    message names the function and the run's last good checkpoint."""


# Rewards -----------------------------------------------------------------------------------

RewardFunction = Callable[[str, str, Example], float]


def task_reward(prompt: str, reply: str, example: Example) -> float:
    """1.0 when the reply matches the task's answer exactly (after trimming), else 0.0."""
    return float(is_correct(example, reply))


def load_reward(name: str) -> tuple[str, RewardFunction]:
    """(display name, function) for RLConfig.reward: 'tasks' or 'module:function'."""
    if name == "tasks":
        return "tasks (exact match)", task_reward
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward {name!r}: cannot import module {module_name!r} ({error})"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"reward {name!r}: module {module_name!r} has no function {attribute!r}")
    return name, function


def score(
    reward: RewardFunction, name: str, examples: Sequence[Example], replies: Sequence[str]
) -> torch.Tensor:
    """Rewards (N,) float32 of the replies; RewardError naming `name` when the function raises
    or returns anything but a finite number."""
    values = []
    for example, reply in zip(examples, replies, strict=True):
        try:
            value = reward(example.prompt, reply, example)
        except Exception as error:
            raise RewardError(
                f"reward function {name} raised {type(error).__name__}: {error} (prompt "
                f"{example.prompt!r}, reply {reply!r})"
            ) from error
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise RewardError(
                f"reward function {name} returned {value!r} for prompt {example.prompt!r}; it "
                "must return a finite float"
            )
        values.append(float(value))
    return torch.tensor(values, dtype=torch.float32)


# The objective -----------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """GRPO's advantages: rewards (P, G), one row per question, standardised within the row,
    (r - mean) / (std + eps), with the sample standard deviation (n - 1), as TRL's GRPO
    trainer and d1 compute it."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def clipped_objective(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    clip: float,
    beta_kl: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (to minimise) and its parts.

    log_probs, old_log_probs, ref_log_probs, weights: (B, T) per answer token (weights 1 on the
    tokens that count, 0 elsewhere); advantages (B,). Per sequence,
    J = sum_t w_t [min(rho_t A, clip(rho_t, 1 - clip, 1 + clip) A) - beta_kl KL_t] / sum_t w_t
    with rho = exp(log_probs - old_log_probs) and KL the k3 estimate
    exp(ref - logp) - (ref - logp) - 1 (>= 0, 0 where policy and reference agree); the loss is
    -mean over sequences of J. ref_log_probs None: no KL term.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    advantage = advantages[:, None]
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip) * advantage
    per_token = torch.minimum(unclipped, clipped)
    if ref_log_probs is not None and beta_kl > 0:
        delta = ref_log_probs - log_probs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token - beta_kl * kl
    else:
        kl = torch.zeros_like(log_probs)
    counts = weights.sum(dim=1).clamp(min=1)
    per_sequence = (per_token * weights).sum(dim=1) / counts
    loss = -per_sequence.mean()
    with torch.no_grad():
        total = weights.sum().clamp(min=1)
        was_clipped = ((ratio - 1).abs() > clip) & (weights > 0)
        stats = {
            "kl": float(((kl * weights).sum(dim=1) / counts).mean()),
            "clip_fraction": float(was_clipped.sum() / total),
        }
    return loss, stats


# Log-probability estimators ------------------------------------------------------------------


def answer_weights(answers: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """(B, T) float: 1 on the answer tokens through the first stop token (EOS/EoT), 0 after it,
    as d1's completion mask (the rest is the padding early stop wrote, not sampled)."""
    is_stop = torch.isin(answers, torch.tensor(list(stop_ids), device=answers.device))
    before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stops strictly before each token
    return (before == 0).float()


def one_step_inputs(
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    mask_id: int,
    prompt_masking: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """d1's one-step input: sequences (B, Lp + T) with the answer (from prompt_length on)
    masked and every real prompt token (attention_mask 1) masked with probability
    prompt_masking."""
    noisy = sequences.clone()
    draws = torch.rand(sequences.shape, generator=generator, device=sequences.device)
    masked_prompt = (draws < prompt_masking) & attention_mask.bool()
    masked_prompt[:, prompt_length:] = False
    noisy[masked_prompt] = mask_id
    noisy[:, prompt_length:] = mask_id
    return noisy


def one_step_log_probs(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
) -> torch.Tensor:
    """(B, T): log p(answer token t | noisy) of every answer token, from one forward of the
    masked input (d1's per-token estimate)."""
    logits = model(noisy, attention_mask=attention_mask).logits[:, prompt_length:]
    targets = sequences[:, prompt_length:]
    return -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (B, T)


def elbo_inputs(
    sequences: torch.Tensor, prompt_length: int, mask_id: int, mc_num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """mc_num masked copies of each row for the ELBO: (noisy (mc_num, B, L), p_mask
    (mc_num, B, L)), each row's answer masked by `stratified_masking` (the likelihood's draws,
    from the global generator)."""
    prompt_index = torch.arange(sequences.shape[1], device=sequences.device) < prompt_length
    noisy, p_mask = [], []
    for row in sequences:
        x, p = stratified_masking(row[None].repeat(mc_num, 1), prompt_index, mask_id)
        noisy.append(x)
        p_mask.append(p)
    return torch.stack(noisy, dim=1), torch.stack(p_mask, dim=1)


def elbo_log_probs(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    p_mask: torch.Tensor,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    mask_id: int,
) -> torch.Tensor:
    """(B, 1): the Monte Carlo ELBO of each answer per answer token,
    mean over draws of sum over masked answer tokens of log p(token) / p_mask, divided by the
    answer length T (llada.likelihood's estimate, normalised)."""
    draws, batch, length = noisy.shape
    flat = noisy.reshape(draws * batch, length)
    logits = model(flat, attention_mask=attention_mask.repeat(draws, 1)).logits
    targets = sequences.repeat(draws, 1)
    token = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    is_masked = flat == mask_id
    is_masked[:, :prompt_length] = False
    weighted = torch.where(is_masked, token / p_mask.reshape(draws * batch, length), 0.0)
    elbo = weighted.sum(dim=1).reshape(draws, batch).mean(dim=0)
    return (elbo / (length - prompt_length))[:, None]


def block_elbo_log_probs(
    model: torch.nn.Module,
    noisy: torch.Tensor,
    p_mask: torch.Tensor,
    sequences: torch.Tensor,
    prompt_length: int,
    mask_id: int,
    block_length: int,
) -> torch.Tensor:
    """(B, 1): a LLaDA 2.x model's Monte Carlo ELBO of each answer per answer token, as
    `elbo_log_probs` but by block diffusion: each masked answer token is predicted from its own
    noisy block and the clean blocks before it (`llada.diffusion.block_masked_logits`, blocks
    counted from the row's first token as the block sampler counts them), so the estimate is
    `llada.likelihood`'s for LLaDA 2.x with the same draws, divided by the answer length T.
    sequences (B, L) hold no padding: every row is its prompt (the first prompt_length tokens)
    and its answer, and the last block ends with the answer, as the likelihood scores it."""
    draws, batch, length = noisy.shape
    flat = noisy.reshape(draws * batch, length)
    clean = sequences.repeat(draws, 1)
    is_masked = flat == mask_id
    is_masked[:, :prompt_length] = False
    logits = block_masked_logits(model, flat, clean, is_masked, block_length)  # (N, V)
    token = -F.cross_entropy(logits.float(), clean[is_masked], reduction="none")  # (N,)
    weights = p_mask.reshape(draws * batch, length)[is_masked]
    rows = is_masked.nonzero()[:, 0]  # the (draw, row) of each masked token, row-major
    per_draw = torch.zeros(draws * batch, device=flat.device, dtype=torch.float32)
    per_draw = per_draw.index_add(0, rows, token / weights)
    elbo = per_draw.view(draws, batch).mean(dim=0)
    return (elbo / (length - prompt_length))[:, None]


# The run -----------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 62-bit seed that depends on every part (so neighbouring steps are unrelated)."""
    return random.Random(":".join(map(str, parts))).getrandbits(62)


def step_examples(config: RLConfig, step: int, held_out: set[str]) -> list[Example]:
    """The questions of one step: a pure function of (seed, step); never a held-out one."""
    rng = random.Random(f"rl:{config.seed}:{step}")
    tasks = config.task_list()
    chosen = []
    while len(chosen) < config.prompts_per_step:
        example = SYNTHETIC_TASKS[rng.choice(tasks)](rng)
        if example.prompt not in held_out:
            chosen.append(example)
    return chosen


@dataclass
class RLResult:
    step: int
    checkpoint: Path | None
    metrics: list[dict[str, float]]


def group_share(groups: int, env: Distributed) -> tuple[int, int]:
    """[first, last) of the step's groups (questions) that process `env.rank` rolls out:
    contiguous, sizes differing by at most one."""
    return env.rank * groups // env.world_size, (env.rank + 1) * groups // env.world_size


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global generators (CPU, and `device`'s on CUDA) seeded with `seed`, inside a fork:
    the caller's generators are left as they were."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """`model` (with peft's LoRA layers injected) as its base: every adapter switched off,
    then on again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module, mode: str) -> Iterator[torch.nn.Module]:
    """The policy with all its weights in place for the rollouts, which each process runs on
    its own questions (its own number of forwards, so no collective may run inside them).
    DDP: the wrapped module. FSDP2: every sharded module unsharded (one all-gather each, in
    the same order on every process) and kept so through the sampler's forwards, resharded
    after."""
    if mode != "fsdp":
        yield unwrap(model)
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # The root keeps its weights after a forward anyway (FSDP2 sets it so); the blocks free
    # theirs after each forward unless told not to.
    blocks = [m for m in modules if m is not model]
    for module in blocks:
        module.set_reshard_after_forward(False, recurse=False)
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()
        for module in blocks:
            module.set_reshard_after_forward(True, recurse=False)


class RLTrainer:
    """The policy, its frozen reference, the optimizer and the step of one run (one process,
    or one of N under torchrun)."""

    def __init__(self, config: RLConfig, say: Say | None = None) -> None:
        self.config = config
        self.env: Distributed = init_distributed()
        env = self.env
        # Only the main process speaks.
        self.say: Say = (say or logger.info) if env.is_main else (lambda line: None)
        if env.world_size > config.prompts_per_step:
            raise ValueError(
                f"{env.world_size} processes but --prompts-per-step {config.prompts_per_step}: "
                "each process rolls out whole groups; ask at least one question per process "
                f"(--prompts-per-step {env.world_size} or more)"
            )
        self.out_dir = Path(config.out_dir)
        self.step = 0
        self.resume_from, state = self._resume_point()
        self.reward_name, self.reward = load_reward(config.reward)
        base = load_model(config.model, dtype=torch.float32)
        # LLaDA 2.x: rollouts by its block sampler, log-probabilities by its block-diffusion
        # ELBO over blocks of the rollouts' block_length.
        self.block_length = self._block_length(base)
        self.tokenizer_folder = self.out_dir / "tokenizer"
        if env.is_main:
            copy_tokenizer_files(base.checkpoint_folder, self.tokenizer_folder)
        barrier(env)
        self.tokenizer = load_tokenizer(self.tokenizer_folder)
        self.special_tokens = base.special_tokens
        self.reference: torch.nn.Module | None = None
        if config.lora_rank:
            policy = self._with_adapters(base)
        else:
            if config.beta_kl > 0:
                reference = copy.deepcopy(base)
                for parameter in reference.parameters():
                    parameter.requires_grad_(False)
                self.reference = reference.to(env.device).eval()
            policy = base
            if state is not None and not is_sharded(state):
                # A checkpoint of an earlier llada: the weights from its model folder.
                policy.load_state_dict(
                    load_model(self.resume_from, dtype=torch.float32).state_dict()
                )
            for parameter in policy.parameters():
                parameter.requires_grad_(True)
        policy.special_tokens = self.special_tokens
        # Eval mode throughout: no dropout, so the ratio of the first inner update is exactly 1.
        self.policy = policy.to(env.device).eval()
        mode = config.parallel
        if mode == "auto":
            mode = "fsdp" if env.enabled else "none"
        self.mode = mode if env.enabled else "none"
        self.model = wrap_model(self.policy, self.mode, env)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": [p for p in trainable if p.dim() >= 2],
                    "weight_decay": config.weight_decay,
                },
                {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=config.lr,
        )
        if state is not None:
            self._load_state(state)
            self.step = int(state["step"])
            self.say(f"resumed from step {self.step} ({self.resume_from})")
        self.held_out = held_out_prompts(config.task_list())
        self.groups = group_share(config.prompts_per_step, env)

    def _block_length(self, model: torch.nn.Module) -> int | None:
        """The block length of a LLaDA 2.x run (None for the other families), after checking
        that the settings fit the family."""
        config = self.config
        if not getattr(model, "block_diffusion", False):
            if config.decode in BLOCK_PRESETS:
                raise ValueError(
                    f"--decode {config.decode} is LLaDA 2.x's block sampler; {config.model} is "
                    "not a LLaDA 2.x model: pass a LLaDA-8B preset (e.g. --decode fast)"
                )
            return None
        name = f"{config.model} is a LLaDA 2.x (block diffusion) model"
        if config.decode not in BLOCK_PRESETS:
            raise ValueError(
                f"{name}: it samples with its block sampler; pass --decode "
                f"{' or '.join(sorted(BLOCK_PRESETS))}"
            )
        if config.estimator != "elbo":
            raise ValueError(
                f"{name}: d1's one-step estimate reads the whole answer in one forward, which a "
                "block-diffusion model never does; pass --estimator elbo (its block-diffusion "
                "ELBO)"
            )
        if config.prompts_per_step % self.env.world_size:
            raise ValueError(
                f"{name}: its ELBO takes one forward per question, and every process must run "
                f"as many: --prompts-per-step {config.prompts_per_step} must be a multiple of "
                f"the {self.env.world_size} processes"
            )
        return config.block_length

    def _with_adapters(self, base: torch.nn.Module) -> torch.nn.Module:
        """The base with LoRA adapters on every block linear (only they train); initialised
        from a seed of the run, so every process starts from the same adapters."""
        config = self.config
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        with _seeded(_seed(config.seed, "lora"), torch.device("cpu")):
            try:
                policy = add_lora(base, config.lora_rank, config.lora_alpha)
            except ValueError as error:
                raise ValueError(
                    f"--lora-rank {config.lora_rank}: {config.model} cannot take LoRA adapters "
                    f"({str(error).splitlines()[0]})"
                ) from None
        if not any(p.requires_grad for p in policy.parameters()):
            raise ValueError(
                f"--lora-rank {config.lora_rank}: {config.model} has no layer LoRA adapts "
                "(attention projections, MLP linears); drop --lora-rank"
            )
        return policy

    def _load_state(self, state: dict[str, Any]) -> None:
        """The policy's and the optimizer's state from the checkpoint being resumed."""
        if is_sharded(state):
            template = sharded_state(self.model, self.optimizer)
            try:
                load_shards(self.resume_from, template, self.env.enabled)
            except BrokenCheckpoint as error:
                raise BrokenCheckpoint(f"cannot resume from {self.resume_from}: {error}") from None
            load_sharded_state(self.model, self.optimizer, template)
        elif self.mode == "fsdp":
            raise ValueError(
                f"{self.resume_from} was written by an earlier llada (the whole optimizer in "
                "trainer_state.pt): resume it with --parallel ddp or in one process; its next "
                "checkpoint is sharded"
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])

    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        config, out_dir = self.config, self.out_dir
        found = latest_checkpoint(out_dir)
        if not config.resume:
            metrics = out_dir / "metrics.jsonl"
            if found is not None or metrics.exists():
                if not config.overwrite:
                    raise ValueError(
                        f"{out_dir} already holds a run: pass --resume to continue it, "
                        "--overwrite to start it over, or a new --out-dir"
                    )
                if self.env.is_main:
                    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
                    metrics.unlink(missing_ok=True)
            # Every process passes here, whether or not it saw the run before rank 0 removed it.
            barrier(self.env)
            return None, None
        if found is None:
            self.say(f"warning: --resume: no checkpoint in {out_dir} yet, starting from scratch")
            return None, None
        problem = checkpoint_problem(found)
        if problem is not None:
            raise BrokenCheckpoint(f"cannot resume from {found}: {problem}")
        state = load_trainer_state(found)
        saved = json.loads(state.get("config", "{}"))
        if saved.get("model") != config.model:
            raise ValueError(
                f"--resume: the run in {out_dir} started from {saved.get('model')!r}, not "
                f"{config.model!r}; pass --model {saved.get('model')} (it is the KL reference)"
            )
        if saved.get("lora_rank", 0) != config.lora_rank:
            raise ValueError(
                f"--resume: the run in {out_dir} trained with --lora-rank "
                f"{saved.get('lora_rank', 0)}, not {config.lora_rank}; pass --lora-rank "
                f"{saved.get('lora_rank', 0)}"
            )
        if self.env.is_main:
            self._truncate_metrics(int(state["step"]))
        return found, state

    def _truncate_metrics(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # One step ---------------------------------------------------------------------------------

    def rollouts(
        self, examples: Sequence[Example]
    ) -> tuple[torch.Tensor, torch.Tensor, int, list[str], int]:
        """(sequences (N, Lp + T), attention_mask (N, Lp + T), Lp, replies, forward passes) of
        group_size answers to each question of this process's share, N = share * group_size,
        grouped by question; `examples` are all the step's questions.

        Every row draws from its own generator, seeded from (seed, step, question index, answer
        index), and the prompts are left-padded to the longest prompt of the whole step: a
        question's answers are the same whichever process samples it and however many there
        are. LLaDA-8B / MoE: one call of the fast sampler for the process's whole share, seeds
        per row. LLaDA 2.x: its block sampler takes one generator per call, so one call per
        question (its group_size answers, one prompt, no padding), the global generator seeded
        from (seed, step, question index)."""
        config, tokens, env = self.config, self.special_tokens, self.env
        encoded = [
            encode_chat(self.tokenizer, [{"role": "user", "content": e.prompt}]) for e in examples
        ]
        prompt_ids, prompt_mask = left_pad(encoded, tokens.pad_id)  # (P, Lp): the whole step
        prompt_length = prompt_ids.shape[1]
        first, last = self.groups
        group = config.group_size
        decode = decode_preset(config.decode)
        with whole_weights(self.model, self.mode) as model:
            if self.block_length is None:
                ids = prompt_ids[first:last].repeat_interleave(group, dim=0).to(env.device)
                mask = prompt_mask[first:last].repeat_interleave(group, dim=0).to(env.device)
                seeds = [
                    _seed(config.seed, self.step, "rollout", index, member)
                    for index in range(first, last)
                    for member in range(group)
                ]
                out = sample(model, ids, mask, config.sampler_config(), decode, seeds=seeds)
                sequences = [out.tokens]  # (N, Lp + T)
                masks = [torch.cat([mask, torch.ones_like(out.tokens[:, prompt_length:])], 1)]
                passes = out.forward_passes
            else:
                sequences, masks, passes = [], [], 0
                for index in range(first, last):
                    ids = torch.tensor(encoded[index], device=env.device)[None]
                    ids = ids.repeat(group, 1)  # (G, Lp_i)
                    with _seeded(_seed(config.seed, self.step, "rollout", index), env.device):
                        out = sample(model, ids, None, config.sampler_config(), decode)
                    pad = prompt_length - ids.shape[1]
                    rows = F.pad(out.tokens, (pad, 0), value=tokens.pad_id)  # (G, Lp + T)
                    row_mask = torch.ones_like(rows)
                    row_mask[:, :pad] = 0
                    sequences.append(rows)
                    masks.append(row_mask)
                    passes += out.forward_passes
        sequences = torch.cat(sequences)
        replies = []
        for row in sequences[:, prompt_length:].tolist():
            for i, token in enumerate(row):
                if token in tokens.stop_ids:
                    row = row[:i]
                    break
            replies.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return sequences, torch.cat(masks), prompt_length, replies, passes

    def _estimates(self, model, noisy, sequences, attention_mask, prompt_length, p_mask):
        if self.block_length is not None:
            return self._block_estimates(
                model, noisy, sequences, attention_mask, prompt_length, p_mask
            )
        if self.config.estimator == "one-step":
            return one_step_log_probs(model, noisy, sequences, attention_mask, prompt_length)
        return elbo_log_probs(
            model, noisy, p_mask, sequences, attention_mask, prompt_length,
            self.special_tokens.mask_id,
        )  # fmt: skip

    def _block_estimates(self, model, noisy, sequences, attention_mask, prompt_length, p_mask):
        """LLaDA 2.x: `block_elbo_log_probs` of each group on its own, without the left
        padding (blocks count from each row's first token), concatenated: (N, 1)."""
        group = self.config.group_size
        out = []
        for start in range(0, sequences.shape[0], group):
            rows = slice(start, start + group)
            pad = int((attention_mask[start] == 0).sum())  # the group's rows share their prompt
            out.append(
                block_elbo_log_probs(
                    model,
                    noisy[:, rows, pad:],
                    p_mask[:, rows, pad:],
                    sequences[rows, pad:],
                    prompt_length - pad,
                    self.special_tokens.mask_id,
                    self.block_length,
                )
            )
        return torch.cat(out)

    def _reference_estimates(self, noisy, sequences, attention_mask, prompt_length, p_mask):
        """The reference's estimates: the frozen starting model, or with LoRA the policy with
        its adapters switched off (the same base weights)."""
        if self.reference is not None:
            model = self.reference
            return self._estimates(model, noisy, sequences, attention_mask, prompt_length, p_mask)
        with adapters_disabled(self.policy):
            return self._estimates(
                self.policy, noisy, sequences, attention_mask, prompt_length, p_mask
            )

    def _masked_inputs(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, inner: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The estimator's masked inputs of inner update `inner`, drawn group by group from
        seeds of (seed, step, inner, question index), so they do not depend on the process."""
        config, env = self.config, self.env
        mask_id = self.special_tokens.mask_id
        first, last = self.groups
        noisy, p_mask = [], []
        for index in range(first, last):
            rows = slice(
                (index - first) * config.group_size, (index - first + 1) * config.group_size
            )
            seed = _seed(config.seed, self.step, "masks", inner, index)
            if config.estimator == "one-step":
                generator = torch.Generator(device=env.device).manual_seed(seed)
                noisy.append(
                    one_step_inputs(
                        sequences[rows],
                        attention_mask[rows],
                        prompt_length,
                        mask_id,
                        config.prompt_masking,
                        generator,
                    )  # fmt: skip
                )
            else:
                with _seeded(seed, env.device):
                    x, p = elbo_inputs(sequences[rows], prompt_length, mask_id, config.mc_num)
                noisy.append(x)
                p_mask.append(p)
        if config.estimator == "one-step":
            return torch.cat(noisy), None
        return torch.cat(noisy, dim=1), torch.cat(p_mask, dim=1)  # (mc_num, N, L)

    def _scores(self, examples: Sequence[Example], replies: Sequence[str]) -> torch.Tensor:
        """Rewards (P * G,) of the whole step, on every process: each scores its own groups. A
        reward function that fails anywhere stops every process before the update."""
        config, env = self.config, self.env
        first, last = self.groups
        repeated = [e for e in examples[first:last] for _ in range(config.group_size)]
        failure, local = None, None
        try:
            local = score(self.reward, self.reward_name, repeated, replies)
        except RewardError as error:
            good = latest_checkpoint(self.out_dir)
            where = f"the last good checkpoint is {good}" if good else "no checkpoint was written"
            failure = RewardError(f"{error}; stopped at step {self.step} before updating, {where}")
            failure.__cause__ = error
        failed = all_reduce_sum([float(failure is not None)], env)[0]
        if failure is not None:
            raise failure
        if failed:
            raise RewardError(
                f"the reward function failed in another process at step {self.step}; stopped "
                "before updating"
            )
        # Each process fills its own slice: the sum is exact.
        everything = [0.0] * (config.prompts_per_step * config.group_size)
        everything[first * config.group_size : last * config.group_size] = local.tolist()
        return torch.tensor(all_reduce_sum(everything, env), dtype=torch.float32)

    def train_step(self) -> dict[str, float]:
        config, env = self.config, self.env
        started = time.perf_counter()
        examples = step_examples(config, self.step, self.held_out)
        sequences, attention_mask, prompt_length, replies, passes = self.rollouts(examples)
        rewards = self._scores(examples, replies)
        first, last = self.groups
        advantages = (
            group_advantages(rewards.view(config.prompts_per_step, config.group_size))[first:last]
            .reshape(-1)
            .to(env.device)
        )
        if config.estimator == "one-step":
            weights = answer_weights(sequences[:, prompt_length:], self.special_tokens.stop_ids)
        else:
            weights = torch.ones(sequences.shape[0], 1, device=env.device)
        # The masked inputs of every inner update, and the rollout policy's and the
        # reference's estimates on them, before any update.
        batches = []
        with torch.no_grad():
            for inner in range(config.inner_updates):
                noisy, p_mask = self._masked_inputs(sequences, attention_mask, prompt_length, inner)
                ref = None
                if config.beta_kl > 0:
                    ref = self._reference_estimates(
                        noisy, sequences, attention_mask, prompt_length, p_mask
                    )
                old = None
                if config.inner_updates > 1:
                    old = self._estimates(
                        self.policy, noisy, sequences, attention_mask, prompt_length, p_mask
                    )
                batches.append((noisy, p_mask, ref, old))
        total_rows = config.prompts_per_step * config.group_size
        tokens = float(weights.sum())
        # The optimizer's own parameters: after a forward without gradients FSDP2 leaves the
        # root module's weights unsharded, and the module then lists those instead.
        trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        losses, kls, clipped, norms = [], [], [], []
        for noisy, p_mask, ref, old in batches:
            self.optimizer.zero_grad(set_to_none=True)
            parts = self._objective_backward(
                noisy, p_mask, ref, old, sequences, attention_mask, prompt_length, advantages,
                weights,
            )  # fmt: skip
            norm = torch.nn.utils.clip_grad_norm_(
                trainable, config.grad_clip if config.grad_clip > 0 else math.inf
            )
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            summed = all_reduce_sum([*parts, max(tokens, 1.0)], env)
            step_loss, norm = summed[0] / total_rows, float(norm)
            if not (math.isfinite(step_loss) and math.isfinite(norm)):
                good = latest_checkpoint(self.out_dir)
                raise RuntimeError(
                    f"RL loss {step_loss} / gradient norm {norm} at step {self.step}: stopped "
                    f"before the update; the last good checkpoint is {good}. Resume with a "
                    "lower --lr"
                )
            self.optimizer.step()
            losses.append(step_loss)
            kls.append(summed[1] / total_rows)
            clipped.append(summed[2] / summed[3])
            norms.append(norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        answer_tokens, passes = all_reduce_sum([tokens, float(passes)], env)
        return {
            "step": self.step,
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "loss": sum(losses) / len(losses),
            "kl": sum(kls) / len(kls),
            "clip_fraction": sum(clipped) / len(clipped),
            "grad_norm": sum(norms) / len(norms),
            "answer_tokens": answer_tokens if config.estimator == "one-step" else 0.0,
            "rollout_forward_passes": passes,
            "seconds": time.perf_counter() - started,
        }

    def _objective_backward(
        self, noisy, p_mask, ref, old, sequences, attention_mask, prompt_length, advantages, weights
    ) -> list[float]:
        """Backpropagate this process's part of the step's loss (the clipped objective, mean
        over all the step's answers) and return its sums over this process's rows: the
        per-sequence loss, the KL term, and the clipped tokens.

        One forward of all the rows; LLaDA 2.x: one forward and backward per group (each is
        scored unpadded), the gradients synchronised between processes in the last one only."""
        config, env = self.config, self.env
        rows, group = sequences.shape[0], config.group_size
        if self.block_length is None:
            parts = [slice(0, rows)]
        else:
            parts = [slice(start, start + group) for start in range(0, rows, group)]
        # DDP and FSDP average the processes' gradients: each part of the mean over all the
        # step's answers is scaled by world_size / total rows.
        total_rows = config.prompts_per_step * group
        sums = [0.0, 0.0, 0.0]
        for index, part in enumerate(parts):
            one = self.block_length is None
            part_noisy = noisy if one else noisy[:, part]
            part_p_mask = p_mask if one else p_mask[:, part]
            log_probs = self._estimates(
                self.model, part_noisy, sequences[part], attention_mask[part], prompt_length,
                part_p_mask,
            )  # fmt: skip
            # One update per batch: the rollout policy is the policy itself (ratio 1).
            part_old = log_probs.detach() if old is None else old[part]
            part_ref = None if ref is None else ref[part]
            loss, stats = clipped_objective(
                log_probs, part_old, part_ref, advantages[part], weights[part], config.clip,
                config.beta_kl,
            )  # fmt: skip
            count = part.stop - part.start
            with self._gradient_sync(index == len(parts) - 1):
                (loss * (count * env.world_size / total_rows)).backward()
            sums[0] += float(loss.detach()) * count
            sums[1] += stats["kl"] * count
            sums[2] += stats["clip_fraction"] * max(float(weights[part].sum()), 1.0)
        return sums

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Backward passes inside keep their gradients in this process (DDP's no_sync, FSDP2's
        requires_gradient_sync off) unless `enabled`."""
        if enabled or self.mode == "none":
            yield
        elif self.mode == "ddp":
            with self.model.no_sync():
                yield
        else:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

    # Saving -----------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write checkpoint `self.step` as `llada train` does (llada.train.checkpointing):
        every process its shards of the policy and optimizer state, rank 0 the official folder
        (LoRA: the merged weights, and the adapters in peft's format beside them) from the
        weights gathered there. Every process raises CheckpointWriteError when any part fails;
        the previous checkpoints stay as they were. Returns the folder on rank 0."""
        env, config = self.env, self.config
        shards = write_shards(
            self.out_dir,
            self.step,
            lambda: sharded_state(self.model, self.optimizer),
            env,
        )
        model_state = full_model_state(self.model)
        folder, failure = None, None
        if env.is_main:
            state = {
                "format": SHARDED_FORMAT,
                "step": self.step,
                "config": json.dumps(config.to_dict()),
                "objective": "rl-grpo",
            }
            add_files = None
            if config.lora_rank:
                full_state = model_state

                def add_files(staging: Path) -> None:
                    base = base_model_reference(config.model)
                    save_peft_adapter(staging, self.policy, full_state, base)

                model_state = merged_state_dict(model_state, config.lora_rank, config.lora_alpha)
            try:
                folder = save_checkpoint(
                    self.out_dir,
                    self.step,
                    self.policy,
                    model_state,
                    state,
                    self.tokenizer_folder,
                    config.keep_checkpoints,
                    add_files,
                    shards=shards,
                )
            except CheckpointWriteError as error:
                failure = error
        agree_on_failure(failure, self.step, env)
        return folder


def train_rl(config: RLConfig, progress: bool = False, say: Say | None = None) -> RLResult:
    """Run (or resume) GRPO as configured, in this process or in each process of a torchrun
    launch; returns the final step, its checkpoint (on rank 0) and the metrics of the steps
    run here (also appended to out_dir/metrics.jsonl by rank 0)."""
    trainer = RLTrainer(config, say)
    env, say = trainer.env, trainer.say
    metrics_path = trainer.out_dir / "metrics.jsonl"
    if env.is_main:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, float]] = []
    folder = trainer.resume_from
    bar = None
    if progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=trainer.step, desc="rl", unit="step")
    try:
        while trainer.step < config.steps:
            record = trainer.train_step()
            records.append(record)
            if env.is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.3f}")
            else:
                say(
                    f"step {record['step']}: reward {record['reward']:.3f}, kl "
                    f"{record['kl']:.4f}, loss {record['loss']:.4f}, {record['seconds']:.1f} s"
                )
            last = trainer.step == config.steps
            if last or (config.save_every and trainer.step % config.save_every == 0):
                folder = trainer.save()
                say(f"checkpoint {folder}")
    finally:
        if bar is not None:
            bar.close()
    if folder is None and env.is_main:
        done = list_checkpoints(trainer.out_dir)
        folder = done[-1] if done else None
    shutdown(env)
    return RLResult(step=trainer.step, checkpoint=folder, metrics=records)
