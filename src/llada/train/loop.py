"""The trainer: one loop for pre-training, SFT and preference optimization (LLaDA 1.5's VRPO
and plain DPO on ELBOs), one process or many under torchrun.

Everything random is a pure function of (seed, step, sample slot): the data order
(`SampleOrder`), the masks (a generator seeded per micro-batch), the 1% random-length crop and
the model's dropout (the global generators, seeded per micro-batch inside `fork_rng`). So
`--resume` continues exactly, and N processes with grad_accum A see the same global batch,
masks and dropout included, as one process with grad_accum N * A. The global generators
(torch, CUDA, python, numpy) are saved in the trainer state as well and restored on resume, so
that anything else drawing from them continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..losses import (
    LossOutput,
    autoregressive_loss,
    block_diffusion_loss,
    load_balancing_loss,
    maybe_crop,
    preference_loss,
    pretraining_loss,
    recording_router_logits,
    sft_loss,
)
from ..model.checkpoint import load_model
from ..model.config import LLaDAConfig
from ..model.families import DENSE, LLADA2, Family, detect_family, family_of
from ..model.llada2 import LLaDA2Config
from ..model.llada_moe import LLaDAMoEConfig
from ..tokenizer import copy_tokenizer_files, load_tokenizer
from ..tokens import resolve_special_tokens
from .activation_checkpointing import apply_activation_checkpointing
from .checkpointing import (
    SHARDED_FORMAT,
    BrokenCheckpoint,
    CheckpointWriteError,
    agree_on_failure,
    checkpoint_problem,
    checkpoint_step,
    checkpoints_dir,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_shards,
    load_trainer_state,
    save_checkpoint,
    write_shards,
)
from .config import PREFERENCE_OBJECTIVES, TrainConfig
from .data import (
    ChatRecords,
    LengthGroups,
    PackedSequences,
    PreferencePairs,
    SampleOrder,
    TokenFile,
    split_token_file,
)
from .lora import (
    add_lora,
    base_model_reference,
    merged_state_dict,
    save_peft_adapter,
)
from .parallel import (
    Distributed,
    all_reduce_sum,
    barrier,
    full_model_state,
    gradient_sync,
    init_distributed,
    load_optimizer_state,
    load_sharded_state,
    sharded_state,
    shutdown,
    wrap_model,
)
from .throughput import Interval, peak_flops, sequence_flops

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the message says how to resume."""


Say = Callable[[str], None]

# What a run writes into its folder besides the tokenizer (`--overwrite` removes these).
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "tensorboard", "train_config.json")
# The dropouts each family's model applies. LLaDA-MoE's and LLaDA 2.x's references apply the
# attention dropout only (LLaDA 2.x's embedding_dropout and output_dropout keys are read by
# nothing, see llada.model.llada2).
_DROPOUT_KEYS = ("attention_dropout", "residual_dropout", "embedding_dropout")
_APPLIED_DROPOUT_KEYS = {DENSE.name: _DROPOUT_KEYS}
BOARD_KEYS = (
    "loss",
    "aux_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "val_loss",
    "val_bits_per_token",
    "val_preference_accuracy",
)
# The families trained by block diffusion (both objectives), with their default block length:
# LLaDA 2.x as inclusionAI/dFactory trains it (tasks/train_llada2_bd.py, block_size 32).
BLOCK_DIFFUSION_DEFAULTS: dict[str, int] = {LLADA2.name: 32}


def _log_line(line: str) -> None:
    """The default `say` of library calls: lines go to the logger."""
    (logger.warning if line.startswith("warning:") else logger.info)(line)


@dataclass
class TrainResult:
    step: int
    last_loss: float
    val_history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    is_main: bool = True


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine, warmup-stable-decay (paper §2.3: constant, then decay in
    the final stretch; linear here) or constant, down to lr * min_lr_ratio."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return peak
    if config.schedule == "cosine":
        span = max(1, config.max_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(config.max_steps * config.decay_fraction))
    decay_start = config.max_steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)


def new_model_config(
    path: str | os.PathLike, tokenizer_folder: str | os.PathLike
) -> LLaDAConfig | LLaDAMoEConfig | LLaDA2Config:
    """The config of a new model: a config.json-style file of any family (told apart as
    `llada.load_model` does: `architectures` or the families' own keys), with the vocabulary
    size and the special ids taken from the tokenizer where the file leaves them out."""
    data = _read_json(path)
    family = detect_family(data)
    vocab_size = len(load_tokenizer(tokenizer_folder))
    # The config decides the token family when the tokenizer has no markers (a MoE -> <|mask|>).
    tokens = resolve_special_tokens(
        {k: data[k] for k in family.marker_keys + ("architectures",) if k in data},
        tokenizer_folder,
        vocab_size,
    )
    data.setdefault("vocab_size", vocab_size)
    if family is DENSE:
        # A multiple of 64 keeps the embedding and LM head matmuls aligned (126464 = 988 * 128).
        data.setdefault("embedding_size", -(-data["vocab_size"] // 64) * 64)
    # LLaDA-MoE has no official mask key: kept among its extra keys, written back on save.
    data.setdefault("mask_token_id", tokens.mask_id)
    data.setdefault("eos_token_id", tokens.eos_id)
    data.setdefault("pad_token_id", tokens.pad_id)
    try:
        return family.config_class.from_hf_dict(data)
    except ValueError as error:
        raise ValueError(f"--model-config {path} ({family.name}): {error}") from None


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of LLaDA config keys")
    return data


def dropout_note(
    config: LLaDAConfig | LLaDAMoEConfig | LLaDA2Config, given: dict[str, Any]
) -> str | None:
    """A line stating the model's dropout when there is any; `given` is the config file as
    written, so that a dropout the file left out (the reference's 0.1 defaults) is called so."""
    keys = _APPLIED_DROPOUT_KEYS.get(family_of(config).name, ("attention_dropout",))
    values = [getattr(config, key) for key in keys]
    if not any(values):
        return None
    line = "dropout: " + ", ".join(
        f"{key.removesuffix('_dropout')} {value:g}" for key, value in zip(keys, values, strict=True)
    )
    missing = [key for key in keys if key not in given]
    if missing:
        line += (
            " (the reference config's defaults for the keys the model config leaves out; set "
            f"{', '.join(missing)} to 0 in it to disable)"
        )
    return line


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators, in plain containers and tensors (loadable with weights_only)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any] | None, device: torch.device) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_global_generators(device: torch.device, seed: int) -> None:
    """Seed the generators that dropout draws from (CPU, and this process's CUDA device)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _metric_steps(out_dir: Path) -> list[int]:
    steps = []
    path = out_dir / "metrics.jsonl"
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
    return steps


def existing_run_step(out_dir: str | os.PathLike) -> int | None:
    """The step a run folder holds (its newest checkpoint or metrics line), None if no run."""
    out_dir = Path(out_dir)
    root = checkpoints_dir(out_dir)
    steps = _metric_steps(out_dir)
    if root.is_dir():
        steps += [s for p in root.iterdir() if (s := checkpoint_step(p)) is not None]
    return max(steps) if steps else None


def truncate_metrics(out_dir: str | os.PathLike, step: int) -> None:
    """Keep metrics.jsonl up to `step` (a resumed run rewrites the later steps), atomically:
    a kill leaves the old file or the new one. Lines cut by a kill are dropped too."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(partial, path)


def _mixed_seed(*parts: int) -> int:
    """A seed that depends on every part (boost-style hash combine), so that neighbouring
    (step, slot) pairs get unrelated random streams."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B9 + (value << 6) + (value >> 2))) & 0xFFFFFFFFFFFF
    return value


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`); False where there
    is no glibc (macOS, musl, Windows). The trainer calls it after every step and validation.

    Why: torch's CPU tensors come from malloc, and glibc serves blocks below its mmap threshold
    (which it raises to 32 MiB after the first large block is freed) from its heap, which it
    gives back only from the top. The activations of a step are 1-32 MiB each, in sizes that
    change every step with the number of masked positions, so the freed ones stay resident as
    holes: at llada-tiny-base's size and 32 x 256 tokens, the resident memory between steps
    grew by about 40 MB a step (1.8 GB after 2 steps, 3.1 GB after 40, bf16) while the live
    tensors were about 0.45 GB. Trimming keeps it there between steps, at no measurable cost
    per step; a fixed 1 MiB mmap threshold (mallopt) kept it there too but made each step
    about 1.5x slower (every activation a fresh mapping). BENCHMARKS.md, "Training memory and
    throughput", has the figures."""
    try:
        import ctypes

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    return bool(trim(0))


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_mixed_seed(*parts))


class Trainer:
    """Holds the model, data, optimizer and step of one run; `train()` drives it."""

    def __init__(self, config: TrainConfig, say: Say | None = None) -> None:
        self.config = config
        self.env: Distributed = init_distributed()
        # Only the main process speaks.
        self.say: Say = (say or _log_line) if self.env.is_main else (lambda line: None)
        # Anything that draws from the global generator (e.g. LoRA's initialisation) is seeded.
        torch.manual_seed(config.seed)
        self.out_dir = Path(config.out_dir)
        self.step = 0
        self.resume_from, state = self._resume_point()
        self._build_model(state)
        self._build_data()
        self._build_optimizer()
        if state is not None:
            if is_sharded(state):
                template = sharded_state(self.model, self.optimizer)
                try:
                    load_shards(self.resume_from, template, self.env.enabled)
                except BrokenCheckpoint as error:
                    raise BrokenCheckpoint(
                        f"cannot resume from {self.resume_from}: {error}. "
                        f"{self._fallback(self.resume_from)}"
                    ) from None
                load_sharded_state(self.model, self.optimizer, template)
            else:  # a checkpoint of an earlier llada: the whole optimizer state in one file
                load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.step = int(state["step"])
            self.val_history = list(state.get("val_history", []))
            _set_rng_state(state.get("rng"), self.env.device)
            self.say(f"resumed from step {self.step} (checkpoint {self.resume_from})")
        if config.warmup_steps > config.max_steps:
            self.say(
                f"warning: warmup_steps {config.warmup_steps} > max_steps {config.max_steps}: the "
                f"learning rate never reaches --lr {config.lr:g} (at most "
                f"{learning_rate(config, config.max_steps - 1):.3g}) and never decays; lower "
                "--warmup-steps"
            )

    # Setup ------------------------------------------------------------------------------------

    def _resume_point(self) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to continue from and its trainer state (None, None for a new run).
        A new run refuses a folder that holds one, unless --overwrite; a resume refuses a
        broken checkpoint and names the last good one."""
        config, out_dir = self.config, self.out_dir
        if not (config.resume or config.resume_from):
            held = existing_run_step(out_dir)
            if held is not None:
                if not config.overwrite:
                    raise ValueError(
                        f"{out_dir} already holds a run (step {held}): pass --resume to continue "
                        "it, or --overwrite to start it over, or a new --out-dir"
                    )
                if self.env.is_main:
                    for name in RUN_OUTPUTS:
                        path = out_dir / name
                        if path.is_dir():
                            shutil.rmtree(path)
                        elif path.exists():
                            path.unlink()
                    self.say(f"--overwrite: removed the run that was in {out_dir} (step {held})")
            # Every process passes here, whether or not it saw the run before rank 0 removed it.
            barrier(self.env)
            return None, None
        if config.resume_from:
            folder = Path(config.resume_from)
            if not folder.is_dir():
                raise FileNotFoundError(f"--resume-from {folder}: no such checkpoint folder")
        else:
            found = latest_checkpoint(out_dir)
            if found is None:
                self.say(
                    f"warning: --resume: no checkpoint in {out_dir} yet, starting from scratch"
                )
                return None, None
            folder = found
        problem = checkpoint_problem(folder)
        if problem is not None:
            raise BrokenCheckpoint(
                f"cannot resume from {folder}: {problem}. {self._fallback(folder)}"
            )
        return folder, load_trainer_state(folder)

    def _fallback(self, broken: Path) -> str:
        """Which earlier checkpoint of the run can be resumed from instead, and how."""
        limit = checkpoint_step(broken)
        for folder in reversed(list_checkpoints(self.out_dir)):
            step = checkpoint_step(folder)
            if limit is not None and step is not None and step >= limit:
                continue
            if checkpoint_problem(folder) is None:
                return (
                    f"The last good checkpoint is {folder} (step {step}): resume from it with "
                    f"--resume-from {folder}"
                )
        return (
            f"No earlier good checkpoint is in {checkpoints_dir(self.out_dir)}: start over "
            "with --overwrite or a new --out-dir"
        )

    def _build_model(self, state: dict[str, Any] | None) -> None:
        config = self.config
        # A LoRA run always rebuilds from its unchanged base; the adapters come from the state.
        source = (
            (config.model or None)
            if config.lora_rank
            else (self.resume_from or config.model or None)
        )
        if source is not None:
            try:
                model = load_model(source, dtype=torch.float32)
            except ValueError as error:
                if source != self.resume_from:
                    raise
                # Damage the cheap check cannot see (e.g. wrong shapes): still offer the way back.
                raise BrokenCheckpoint(
                    f"cannot resume from {source}: {error}. {self._fallback(source)}"
                ) from None
            self.tokenizer_folder = Path(model.checkpoint_folder)
            given = _read_json(self.tokenizer_folder / "config.json")
        else:
            self.tokenizer_folder = Path(config.tokenizer)
            given = _read_json(config.model_config)
            model_config = new_model_config(config.model_config, self.tokenizer_folder)
            model = family_of(model_config).model_class(model_config)
            model.init_weights(torch.Generator().manual_seed(config.seed))
            model.special_tokens = resolve_special_tokens(
                model_config.to_hf_dict(), self.tokenizer_folder, model_config.padded_vocab_size
            )
        # Checkpoints copy the tokenizer from the run folder: the folder the model came from may
        # be an older checkpoint of this run, which is pruned as training goes on.
        run_tokenizer = self.out_dir / "tokenizer"
        if self.env.is_main:
            copy_tokenizer_files(self.tokenizer_folder, run_tokenizer)
        barrier(self.env)
        self.tokenizer_folder = run_tokenizer
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        self.block_length = self._block_length(family_of(model))
        if config.lora_rank:
            model = add_lora(model, config.lora_rank, config.lora_alpha)
            if state is not None and "adapter" in state:  # an earlier llada's checkpoint
                adapters = state["adapter"]
                _, unexpected = model.load_state_dict(adapters, strict=False)
                if unexpected or len(adapters) != sum(
                    ".lora_" in n for n, _ in model.named_parameters()
                ):
                    raise ValueError(
                        f"{self.resume_from}: its adapters do not fit this LoRA setting (rank?)"
                    )
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        note = dropout_note(model.config, given)
        if note:
            self.say(note)
        self.aux_loss_coef = self._router_aux_loss(model)
        self.special_tokens = model.special_tokens
        self.tokenizer = load_tokenizer(self.tokenizer_folder)
        self.base_model: torch.nn.Module = model.to(self.env.device).train()
        mode = config.parallel
        if mode == "auto":
            mode = "fsdp" if self.env.enabled else "none"
        self.model = wrap_model(self.base_model, mode, self.env, config.precision)
        self.reference = self._reference_model() if self.preference else None

    @property
    def preference(self) -> bool:
        return self.config.objective in PREFERENCE_OBJECTIVES

    def _reference_model(self) -> torch.nn.Module:
        """The frozen reference of VRPO/DPO: the starting checkpoint (--model), loaded again
        and held in this process beside the policy (twice the weights, no gradients, no
        optimizer state).

        Why not precompute its ELBOs once: antithetic sampling scores the reference on the
        policy's own draws, and the draws are fresh every step (a function of seed, step and
        micro-batch); a table of reference estimates would need every future step's masks, as
        many forwards as computing them on the way, and would tie the run to its batch size and
        step count. A resumed run reloads the same --model, so the reference never changes.
        Under torchrun every process holds the whole reference (it is not sharded)."""
        config = self.config
        reference = load_model(config.model, dtype=torch.float32)
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        allocation, antithetic = self._preference_draws()
        self.say(
            f"objective: {config.objective}, beta {config.beta:g}, {config.vrpo_budget} draws per "
            f"ELBO ({'one per timestep' if allocation == 'timesteps' else 'one timestep'}, "
            f"{'shared with' if antithetic else 'independent of'} the reference); reference: "
            f"{config.model} (frozen, in this process)"
        )
        return reference.to(self.env.device).eval()

    def _preference_draws(self) -> tuple[str, bool]:
        """(allocation, antithetic) of the run: 'dpo' is the plain estimate."""
        if self.config.objective == "dpo":
            return "naive", False
        return self.config.vrpo_allocation, self.config.vrpo_antithetic

    def _block_length(self, family: Family) -> int | None:
        """The block length of the run's block-diffusion loss; None for a family trained on the
        whole sequence (its LLaDA loss) or an autoregressive run."""
        config = self.config
        default = BLOCK_DIFFUSION_DEFAULTS.get(family.name)
        if default is None:
            if config.block_length is not None:
                raise ValueError(
                    f"--block-length {config.block_length}: a {family.name} model trains on the "
                    f"whole sequence, not by block diffusion ({', '.join(BLOCK_DIFFUSION_DEFAULTS)} "
                    "only); drop the flag"
                )
            return None
        if config.autoregressive:
            return None
        block_length = config.block_length or default
        self.say(f"objective: block diffusion ({family.name}), block length {block_length}")
        return block_length

    def _router_aux_loss(self, model: torch.nn.Module) -> float | None:
        """The coefficient of the routers' load-balancing loss, None when it is not added.

        Like the reference, the loss belongs to the objective when config.json says
        output_router_logits (--router-aux-loss config), with router_aux_loss_coef from the
        same file; --router-aux-loss on/off decides instead. The reference itself never adds
        it (its loss path is off), and its layers do not return the router logits that its
        aux-loss code expects: llada computes the intended loss from the routers' outputs.
        """
        choice = self.config.router_aux_loss
        self.aux_per_layer = choice == "per-layer"
        has_routers = bool(model.routers()) if hasattr(model, "routers") else False
        if not has_routers:
            if choice in ("on", "per-layer"):
                raise ValueError(
                    f"--router-aux-loss {choice}: this model has no router (a dense LLaDA); "
                    "drop the flag"
                )
            return None
        model_config = model.config
        if getattr(model_config, "router_aux_loss_coef", None) is None:
            # LLaDA 2.x: sigmoid routers balanced by their expert bias (no auxiliary loss in its
            # config); the softmax formula of `load_balancing_loss` is not its objective.
            family = family_of(model_config).name
            if choice in ("on", "per-layer"):
                raise ValueError(
                    f"--router-aux-loss {choice}: {family} has no router load-balancing loss "
                    "(its config has no router_aux_loss_coef; its experts are balanced by the "
                    "routers' expert bias); drop the flag"
                )
            self.say(f"router load-balancing loss: none ({family} balances by the expert bias)")
            return None
        wanted = choice in ("on", "per-layer") or (
            choice == "config" and model_config.output_router_logits
        )
        if not wanted:
            self.say(
                "router load-balancing loss: off (config.json: output_router_logits false; "
                "--router-aux-loss on adds it)"
                if choice == "config"
                else "router load-balancing loss: off (--router-aux-loss off)"
            )
            return None
        coef = float(model_config.router_aux_loss_coef)
        scope = "per layer" if self.aux_per_layer else "layers pooled, as the reference"
        self.say(
            f"router load-balancing loss: on ({scope}), coefficient {coef:g} (router_aux_loss_coef)"
        )
        return coef

    def _build_data(self) -> None:
        config = self.config
        if self.preference:

            def pairs(path: str) -> PreferencePairs:
                return PreferencePairs(
                    path, self.tokenizer, self.special_tokens, config.seq_len, config.answer_tokens
                )

            self.train_data = pairs(config.data)
            self.val_data = pairs(config.val_data) if config.val_data else None
        elif config.objective == "sft":

            def records(path: str) -> ChatRecords:
                return ChatRecords(
                    path, self.tokenizer, self.special_tokens, config.seq_len, config.answer_tokens
                )

            self.train_data = records(config.data)
            self.val_data = records(config.val_data) if config.val_data else None
        else:
            tokens = TokenFile(config.data)
            if config.val_data:
                train_tokens, val_tokens = tokens.tokens, TokenFile(config.val_data).tokens
            else:
                train_tokens, val_tokens = split_token_file(
                    tokens, config.val_fraction, config.seq_len
                )
            self.train_data = PackedSequences(train_tokens, config.seq_len)
            self.val_data = (
                PackedSequences(val_tokens, config.seq_len)
                if len(val_tokens) >= config.seq_len
                else None
            )
        # With length groups, one item of the sample order is a whole micro-batch.
        self.items_per_micro_batch = config.batch_size
        if config.group_by_length and config.objective == "sft":
            self.train_data = LengthGroups(self.train_data, config.batch_size)
            self.items_per_micro_batch = 1
        self.order = SampleOrder(len(self.train_data), config.seed)
        self.val_history: list[dict[str, float]] = []

    def _build_optimizer(self) -> None:
        config = self.config
        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if not parameter.requires_grad:
                continue
            # Norm weights are not decayed (standard practice; the paper does not say).
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            fused=False,
        )

    # One step ---------------------------------------------------------------------------------

    def _loss(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        crop: torch.Generator | None,
        with_aux: bool = False,
    ) -> LossOutput:
        """The objective's loss on one micro-batch; with `with_aux` (and a router aux loss in
        this run), the load-balancing loss of the same forward in `aux_loss`."""
        if not (with_aux and self.aux_loss_coef is not None):
            return self._llada_loss(batch, generator, crop)
        with recording_router_logits(self.base_model) as router_logits:
            out = self._llada_loss(batch, generator, crop)
        model_config = self.base_model.config
        # Every token of a training batch is real (packed text, or EOS-padded answers that the
        # SFT loss trains on), so no token mask.
        out.aux_loss = load_balancing_loss(
            router_logits,
            model_config.num_experts,
            model_config.num_experts_per_tok,
            per_layer=self.aux_per_layer,
        )
        return out

    def _llada_loss(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
        crop: torch.Generator | None,
    ) -> LossOutput:
        config = self.config
        x0 = batch["input_ids"].to(self.env.device)
        prompt_lengths = batch.get("prompt_lengths")
        if prompt_lengths is not None:
            prompt_lengths = prompt_lengths.to(self.env.device)
        elif crop is not None:
            x0 = maybe_crop(x0, crop)
        self._batch_shape = tuple(x0.shape)  # (B, L) as trained, for the throughput figures
        autocast = torch.autocast(
            self.env.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"
        )
        with autocast:
            if self.preference:
                allocation, antithetic = self._preference_draws()
                # Rows: 2P answers, each scored on vrpo_budget noisy copies.
                self._batch_shape = (x0.shape[0] * config.vrpo_budget, x0.shape[1])
                return preference_loss(
                    self.model,
                    self.reference,
                    x0,
                    prompt_lengths,
                    self.special_tokens.mask_id,
                    beta=config.beta,
                    budget=config.vrpo_budget,
                    allocation=allocation,
                    antithetic=antithetic,
                    block_length=self.block_length,
                    generator=generator,
                )
            if config.autoregressive:
                return autoregressive_loss(self.model, x0, prompt_lengths)
            if self.block_length is not None:
                return block_diffusion_loss(
                    self.model,
                    x0,
                    self.special_tokens.mask_id,
                    block_length=self.block_length,
                    prompt_lengths=prompt_lengths,
                    generator=generator,
                )
            if prompt_lengths is not None:
                return sft_loss(
                    self.model, x0, prompt_lengths, self.special_tokens.mask_id, generator=generator
                )
            return pretraining_loss(
                self.model, x0, self.special_tokens.mask_id, generator=generator
            )

    def train_step(self) -> dict[str, float]:
        config, env, step = self.config, self.env, self.step
        lr = learning_rate(config, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss, total_aux, targets, tokens, flops = 0.0, 0.0, 0, 0, 0.0
        for micro in range(config.grad_accum):
            indices = self.order.micro_batch(
                step, micro, env.rank, env.world_size, self.items_per_micro_batch, config.grad_accum
            )
            batch = self.train_data.batch(indices)
            slot = micro * env.world_size + env.rank
            generator = _generator(env.device, config.seed, step, slot)
            crop = torch.Generator().manual_seed(_mixed_seed(config.seed, step, -1))
            # Dropout draws from the global generators: seed them per micro-batch, inside a
            # fork so that the caller's generators are left as they were.
            devices = [env.device.index or 0] if env.device.type == "cuda" else []
            # Gradients are reduced across processes once, in the last micro-batch's backward
            # (DDP decides it in the forward: both run inside).
            sync = gradient_sync(self.model, micro == config.grad_accum - 1)
            with torch.random.fork_rng(devices=devices, device_type="cuda"), sync:
                _seed_global_generators(env.device, _mixed_seed(config.seed, step, slot, -2))
                out = self._loss(batch, generator, crop, with_aux=True)
                objective = out.loss
                if out.aux_loss is not None:
                    objective = objective + self.aux_loss_coef * out.aux_loss
                (objective / config.grad_accum).backward()
            total_loss += float(out.loss.detach())
            if out.aux_loss is not None:
                total_aux += float(out.aux_loss.detach())
            targets += out.num_targets
            rows, length = self._batch_shape
            tokens += rows * length
            # Block diffusion runs the network on [x_t ; x_0]: twice the text.
            seen = length * (2 if self.block_length is not None else 1)
            # Preference runs add the frozen reference's forward: a third of forward + backward.
            flops += (
                rows
                * sequence_flops(self.base_model.config, seen)
                * (4 / 3 if self.preference else 1)
            )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, config.grad_clip if config.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        summed = all_reduce_sum([total_loss, float(targets), total_aux, float(tokens), flops], env)
        loss = summed[0] / (config.grad_accum * env.world_size)
        aux = summed[2] / (config.grad_accum * env.world_size)
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            good = latest_checkpoint(self.out_dir)
            where = (
                f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
            )
            raise TrainingDiverged(
                f"loss {loss} / gradient norm {grad_norm} at step {step}: training stopped before "
                f"the update, {where}. Resume it with a lower learning rate, e.g. "
                f"`llada train ... --resume --lr {config.lr / 2:g}` (the LLaDA paper resumed "
                "its pre-training after a NaN the same way)."
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # The step's activations are freed: their pages go back (see the function for why).
        release_freed_memory()
        self.step += 1
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "targets": summed[1],
            "tokens": summed[3],
            "flops": summed[4],
        }
        if self.aux_loss_coef is not None:
            # Reported apart: "loss" stays the LLaDA loss, comparable with the validation -ELBO.
            record["aux_loss"] = aux
        return record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean validation loss over fixed batches and fixed masks; for the diffusion
        objectives it estimates the negative ELBO per token, reported in bits per token."""
        if self.val_data is None:
            return None
        config, env = self.config, self.env
        self.model.eval()
        total, count, right, pairs = 0.0, 0, 0.0, 0.0
        span = len(self.val_data)
        needed = config.eval_batches * config.batch_size
        # Every process runs as many forwards (FSDP2 all-gathers the weights in each, and a
        # process that skipped one would leave the others waiting): with eval_batches not a
        # multiple of the processes, some run one batch more whose loss is not counted.
        rounds = -(-config.eval_batches // env.world_size)
        for batch_index in range(env.rank, rounds * env.world_size, env.world_size):
            counted = batch_index < config.eval_batches
            batch_index %= config.eval_batches
            indices = [
                ((batch_index * config.batch_size + j) * span) // needed % span
                for j in range(config.batch_size)
            ]
            out = self._loss(
                self.val_data.batch(indices), _generator(env.device, 12345, batch_index), None
            )
            if not counted:
                continue
            total += float(out.loss)
            count += 1
            if self.preference:
                right += float((out.scores > 0).sum())
                pairs += out.scores.numel()
        self.model.train()
        release_freed_memory()
        total, count, right, pairs = all_reduce_sum([total, float(count), right, pairs], env)
        nats = total / max(count, 1)
        if self.preference:
            # The DPO loss, and the share of pairs whose chosen answer the policy prefers over
            # the reference more than the rejected one (score > 0).
            return {"step": self.step, "val_loss": nats, "val_preference_accuracy": right / pairs}
        return {"step": self.step, "val_loss": nats, "val_bits_per_token": nats / math.log(2)}

    # Saving -----------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write checkpoint `self.step` (see llada.train.checkpointing for its contents): every
        process writes its shards of the model and optimizer state, rank 0 the official folder
        from the model state gathered on it, and the rest. Every process raises
        CheckpointWriteError when any part fails; the previous checkpoints stay as they were."""
        env = self.env
        shards = write_shards(
            self.out_dir,
            self.step,
            lambda: sharded_state(self.model, self.optimizer),
            env,
        )
        # Gathered on rank 0 for the official folder. Avoidable for models too large for one
        # process: each rank could gather and write whole tensors of its own safetensors files.
        model_state = full_model_state(self.model)
        folder, failure = None, None
        if env.is_main:
            state: dict[str, Any] = {
                "format": SHARDED_FORMAT,
                "step": self.step,
                "config": json.dumps(self.config.to_dict()),
                "val_history": self.val_history,
                "rng": _rng_state(env.device),
            }
            add_files = None
            if self.config.lora_rank:
                full_state = model_state

                def add_files(staging: Path) -> None:
                    base = base_model_reference(self.config.model)
                    save_peft_adapter(staging, self.base_model, full_state, base)

                model_state = merged_state_dict(
                    model_state, self.config.lora_rank, self.config.lora_alpha
                )
            try:
                folder = save_checkpoint(
                    self.out_dir,
                    self.step,
                    self.base_model,
                    model_state,
                    state,
                    self.tokenizer_folder,
                    self.config.keep_checkpoints,
                    add_files,
                    shards=shards,
                )
            except CheckpointWriteError as error:
                failure = error
        agree_on_failure(failure, self.step, env)
        return folder


def train(config: TrainConfig, progress: bool = True, say: Say | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns the final step and figures.

    say: receives the run's lines (resume, dropout, warnings, validations, checkpoints, and the
        losses every log_every steps when there is no progress bar); default: the logger.
    """
    trainer = Trainer(config, say)
    env = trainer.env
    out_dir = trainer.out_dir
    say = trainer.say
    metrics = None
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "train_config.json", "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
        # A resumed run redoes the steps after its checkpoint: their old lines go.
        truncate_metrics(out_dir, trainer.step)
        metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed below
    board = _tensorboard(out_dir, trainer.step) if env.is_main else None
    bar = None
    if progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=trainer.step, desc="train", dynamic_ncols=True)
    peak = None
    if env.is_main:
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        peak, source = peak_flops(env.device, dtype, config.peak_flops)
        say(f"MFU against a peak of {peak / 1e12:.4g} TFLOP/s per process ({source})")
    started = time.perf_counter()
    last: dict[str, float] = {"loss": float("nan")}
    interval = Interval()
    checkpoint = None
    try:
        while trainer.step < config.max_steps:
            step_started = time.perf_counter()
            last = trainer.train_step()
            interval.add(last, time.perf_counter() - step_started)
            step = trainer.step
            evaluate = config.eval_every and step % config.eval_every == 0
            save = config.save_every and step % config.save_every == 0
            final = step == config.max_steps
            # A line closes the interval at every checkpoint too, so that a resumed run's lines
            # cover the same steps as an uninterrupted run's.
            if not (step % config.log_every == 0 or evaluate or save or final):
                if bar is not None:
                    bar.update(1)
                continue
            record: dict[str, Any] = {
                "step": step,
                "lr": last["lr"],
                **interval.summary(peak, env.world_size),
                "elapsed": time.perf_counter() - started,
            }
            interval = Interval()
            if bar is None and step % config.log_every == 0:
                say(_console_line(record))
            if evaluate or final:
                evaluation = trainer.evaluate()
                if evaluation is not None:
                    trainer.val_history.append(evaluation)
                    record.update(evaluation)
                    if "val_bits_per_token" in evaluation:
                        say(
                            f"step {step}: validation {evaluation['val_bits_per_token']:.4f} "
                            f"bits/token ({evaluation['val_loss']:.4f} nats)"
                        )
                    else:
                        say(
                            f"step {step}: validation DPO loss {evaluation['val_loss']:.4f}, "
                            f"preference accuracy {evaluation['val_preference_accuracy']:.3f}"
                        )
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if board is not None:
                for key in BOARD_KEYS:
                    if key in record:
                        board.add_scalar(key, record[key], step)
            if bar is not None:
                bar.update(1)
                postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}"}
                if "tokens_per_s" in record:
                    postfix["tok/s"] = f"{record['tokens_per_s']:.3g}"
                bar.set_postfix(postfix)
            if save or final:
                checkpoint = trainer.save()
                if checkpoint is not None:
                    say(f"checkpoint: {checkpoint}")
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()
    if env.is_main:
        plot_metrics(out_dir)
    shutdown(env)
    return TrainResult(
        step=trainer.step,
        last_loss=last["loss"],
        val_history=trainer.val_history,
        checkpoint=checkpoint,
        is_main=env.is_main,
    )


def _console_line(record: dict[str, Any]) -> str:
    """step N: loss (the mean over the steps since the last line), lr, tokens/s, MFU."""
    line = f"step {record['step']}: loss {record['loss']:.4f}, lr {record['lr']:.2e}"
    if "tokens_per_s" in record:
        line += f", {record['tokens_per_s']:.4g} tokens/s"
    if "mfu" in record:
        line += f", MFU {100 * record['mfu']:.2f}%"
    return line


def _tensorboard(out_dir: Path, step: int):
    """A TensorBoard writer when the `tensorboard` package is installed, else None. A resumed
    run purges the events logged after its checkpoint, which it logs again."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=step or None)


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(out_dir: str | os.PathLike) -> Path | None:
    """loss.png: training and validation loss against steps (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(out_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        axis.plot(*zip(*val, strict=True), "o-", label="validation (-ELBO, nats/token)")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per token)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = Path(out_dir) / "loss.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
