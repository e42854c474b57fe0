"""The trainer: one loop for pre-training and SFT, one process or many under torchrun.

Everything random is a pure function of (seed, step, sample slot): the data order
(`SampleOrder`), the masks (a generator seeded per micro-batch) and the 1% random-length crop.
So `--resume` continues exactly, and N processes with grad_accum A see the same global batch,
masks included, as one process with grad_accum N * A.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..losses import LossOutput, autoregressive_loss, maybe_crop, pretraining_loss, sft_loss
from ..model.checkpoint import load_model
from ..model.config import LLaDAConfig
from ..model.transformer import LLaDAModel
from ..tokenizer import copy_tokenizer_files, load_tokenizer
from ..tokens import resolve_special_tokens
from .checkpointing import latest_checkpoint, load_trainer_state, save_checkpoint
from .config import TrainConfig
from .data import (
    ChatRecords,
    LengthGroups,
    PackedSequences,
    SampleOrder,
    TokenFile,
    split_token_file,
)
from .lora import adapter_state, add_lora, merged_state_dict
from .parallel import (
    Distributed,
    all_reduce_sum,
    barrier,
    full_state_dicts,
    init_distributed,
    load_optimizer_state,
    shutdown,
    wrap_model,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the message says how to resume."""


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


def new_model_config(path: str | os.PathLike, tokenizer_folder: str | os.PathLike) -> LLaDAConfig:
    """The config of a new model: a config.json-style file, with the vocabulary size and the
    special ids taken from the tokenizer where the file leaves them out."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab_size = len(load_tokenizer(tokenizer_folder))
    tokens = resolve_special_tokens({}, tokenizer_folder, vocab_size)
    data.setdefault("vocab_size", vocab_size)
    # A multiple of 64 keeps the embedding and LM head matmuls aligned (cf. 126464 = 988 * 128).
    data.setdefault("embedding_size", -(-data["vocab_size"] // 64) * 64)
    data.setdefault("mask_token_id", tokens.mask_id)
    data.setdefault("eos_token_id", tokens.eos_id)
    data.setdefault("pad_token_id", tokens.pad_id)
    return LLaDAConfig.from_hf_dict(data)


def _mixed_seed(*parts: int) -> int:
    """A seed that depends on every part (boost-style hash combine), so that neighbouring
    (step, slot) pairs get unrelated random streams."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B9 + (value << 6) + (value >> 2))) & 0xFFFFFFFFFFFF
    return value


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_mixed_seed(*parts))


class Trainer:
    """Holds the model, data, optimizer and step of one run; `train()` drives it."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.env: Distributed = init_distributed()
        # Anything that draws from the global generator (e.g. LoRA's initialisation) is seeded.
        torch.manual_seed(config.seed)
        self.out_dir = Path(config.out_dir)
        self.step = 0
        self._build_model()
        self._build_data()
        self._build_optimizer()
        if self.resume_from is not None:
            state = load_trainer_state(self.resume_from)
            load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            self.step = int(state["step"])
            self.val_history = list(state.get("val_history", []))
            if self.env.is_main:
                logger.info("resumed from %s at step %d", self.resume_from, self.step)

    # Setup ------------------------------------------------------------------------------------

    def _build_model(self) -> None:
        config = self.config
        self.resume_from = latest_checkpoint(self.out_dir) if config.resume else None
        if config.resume and self.resume_from is None and self.env.is_main:
            logger.warning("--resume: no checkpoint in %s yet, starting from scratch", self.out_dir)
        # A LoRA run always rebuilds from its unchanged base; the adapters come from the state.
        source = (
            (config.model or None)
            if config.lora_rank
            else (self.resume_from or config.model or None)
        )
        if source is not None:
            model = load_model(source, dtype=torch.float32)
            self.tokenizer_folder = Path(model.checkpoint_folder)
        else:
            self.tokenizer_folder = Path(config.tokenizer)
            model_config = new_model_config(config.model_config, self.tokenizer_folder)
            model = LLaDAModel(model_config)
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
        if config.lora_rank:
            model = add_lora(model, config.lora_rank, config.lora_alpha)
            if self.resume_from is not None:
                adapters = load_trainer_state(self.resume_from)["adapter"]
                _, unexpected = model.load_state_dict(adapters, strict=False)
                if unexpected or len(adapters) != sum(
                    ".lora_" in n for n, _ in model.named_parameters()
                ):
                    raise ValueError(
                        f"{self.resume_from}: its adapters do not fit this LoRA setting (rank?)"
                    )
        model.activation_checkpointing = config.activation_checkpointing
        self.special_tokens = model.special_tokens
        self.tokenizer = load_tokenizer(self.tokenizer_folder)
        self.base_model: LLaDAModel = model.to(self.env.device).train()
        mode = config.parallel
        if mode == "auto":
            mode = "fsdp" if self.env.enabled else "none"
        self.model = wrap_model(self.base_model, mode, self.env)

    def _build_data(self) -> None:
        config = self.config
        if config.objective == "sft":

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
    ) -> LossOutput:
        config = self.config
        x0 = batch["input_ids"].to(self.env.device)
        prompt_lengths = batch.get("prompt_lengths")
        if prompt_lengths is not None:
            prompt_lengths = prompt_lengths.to(self.env.device)
        elif crop is not None:
            x0 = maybe_crop(x0, crop)
        autocast = torch.autocast(
            self.env.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"
        )
        with autocast:
            if config.autoregressive:
                return autoregressive_loss(self.model, x0, prompt_lengths)
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
        total_loss, targets = 0.0, 0
        for micro in range(config.grad_accum):
            indices = self.order.micro_batch(
                step, micro, env.rank, env.world_size, self.items_per_micro_batch, config.grad_accum
            )
            batch = self.train_data.batch(indices)
            slot = micro * env.world_size + env.rank
            generator = _generator(env.device, config.seed, step, slot)
            crop = torch.Generator().manual_seed(_mixed_seed(config.seed, step, -1))
            out = self._loss(batch, generator, crop)
            (out.loss / config.grad_accum).backward()
            total_loss += float(out.loss.detach())
            targets += out.num_targets
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, config.grad_clip if config.grad_clip > 0 else float("inf")
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        summed = all_reduce_sum([total_loss, float(targets)], env)
        loss = summed[0] / (config.grad_accum * env.world_size)
        grad_norm = float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
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
        self.step += 1
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "targets": summed[1],
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean validation loss over fixed batches and fixed masks; for the diffusion
        objectives it estimates the negative ELBO per token, reported in bits per token."""
        if self.val_data is None:
            return None
        config, env = self.config, self.env
        self.model.eval()
        total, count = 0.0, 0
        span = len(self.val_data)
        needed = config.eval_batches * config.batch_size
        for batch_index in range(env.rank, config.eval_batches, env.world_size):
            indices = [
                ((batch_index * config.batch_size + j) * span) // needed % span
                for j in range(config.batch_size)
            ]
            out = self._loss(
                self.val_data.batch(indices), _generator(env.device, 12345, batch_index), None
            )
            total += float(out.loss)
            count += 1
        self.model.train()
        total, count = all_reduce_sum([total, float(count)], env)
        nats = total / max(count, 1)
        return {"step": self.step, "val_loss": nats, "val_bits_per_token": nats / math.log(2)}

    # Saving -----------------------------------------------------------------------------------

    def save(self) -> Path | None:
        model_state, optimizer_state = full_state_dicts(self.model, self.optimizer)
        folder = None
        if self.env.is_main:
            state: dict[str, Any] = {
                "step": self.step,
                "optimizer": optimizer_state,
                "config": json.dumps(self.config.to_dict()),
                "val_history": self.val_history,
            }
            if self.config.lora_rank:
                state["adapter"] = adapter_state(model_state)
                model_state = merged_state_dict(
                    model_state, self.config.lora_rank, self.config.lora_alpha
                )
            folder = save_checkpoint(
                self.out_dir,
                self.step,
                self.base_model,
                model_state,
                state,
                self.tokenizer_folder,
                self.config.keep_checkpoints,
            )
        barrier(self.env)
        return folder


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; returns the final step and figures."""
    trainer = Trainer(config)
    env = trainer.env
    out_dir = trainer.out_dir
    metrics = None
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "train_config.json", "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
        metrics = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed below
    board = _tensorboard(out_dir) if env.is_main else None
    bar = None
    if progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=trainer.step, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    last: dict[str, float] = {"loss": float("nan")}
    checkpoint = None
    try:
        while trainer.step < config.max_steps:
            last = trainer.train_step()
            step = trainer.step
            record: dict[str, Any] = dict(last, elapsed=time.perf_counter() - started)
            if config.eval_every and step % config.eval_every == 0 or step == config.max_steps:
                evaluation = trainer.evaluate()
                if evaluation is not None:
                    trainer.val_history.append(evaluation)
                    record.update(evaluation)
            if metrics is not None and (
                step % config.log_every == 0 or "val_loss" in record or step == config.max_steps
            ):
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if board is not None:
                for key in ("loss", "lr", "grad_norm", "val_loss", "val_bits_per_token"):
                    if key in record:
                        board.add_scalar(key, record[key], step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}")
            if config.save_every and step % config.save_every == 0 or step == config.max_steps:
                checkpoint = trainer.save()
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


def _tensorboard(out_dir: Path):
    """A TensorBoard writer when the `tensorboard` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))


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
