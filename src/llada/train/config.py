"""Training settings: one validated, frozen dataclass; `llada train` flags derive from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..settings import require_positive_ints, settings_from_dict

Objective = Literal["pretrain", "sft", "vrpo", "dpo"]
Allocation = Literal["timesteps", "naive"]
# The objectives trained on preference pairs against a frozen reference model.
PREFERENCE_OBJECTIVES = ("vrpo", "dpo")
Schedule = Literal["cosine", "wsd", "constant"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
Precision = Literal["fp32", "bf16"]
RouterAuxLoss = Literal["config", "on", "per-layer", "off"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    objective: 'pretrain' (masked diffusion on packed text), 'sft' (chat records; the prompt
        is never masked), 'vrpo' (LLaDA 1.5's preference optimization, arXiv 2505.19223: DPO on
        masked-diffusion ELBO estimates against the frozen starting model, with the variance
        reductions below) or 'dpo' (the same on plain estimates: vrpo_allocation 'naive' and
        vrpo_antithetic off whatever they say, the ablation baseline). Both read preference
        pairs and need --model.
    autoregressive: train the same network as a causal next-token model instead, for
        masked-diffusion vs autoregressive comparisons at equal compute.
    model: a checkpoint folder to start from; empty for a new model from --model-config.
    model_config: JSON file with the config.json keys of a new model, of any family: dense
        LLaDA, LLaDA-MoE or LLaDA 2.x (told apart by `architectures` or the families' own keys).
    tokenizer: folder with the tokenizer files of a new model.
    data: training data: a token file made by `llada data` (pretrain), a JSONL file of chat
        records with a 'messages' list (sft), or of preference pairs (vrpo, dpo: 'prompt' text or
        'messages' before the answer, 'chosen' and 'rejected' answer texts).
    val_data: held-out data of the same kind; empty: none (pretrain: the last val_fraction).
    val_fraction: share of a pretraining token file held out when val_data is empty.
    out_dir: run folder: checkpoints/, metrics.jsonl, loss.png, TensorBoard events.
    seq_len: tokens per training sequence (sft: longer records are cut).
    group_by_length: sft: build micro-batches of records of similar length (less EOS padding
        per batch; the groups are fixed, their order is shuffled every epoch).
    answer_tokens: sft: pad every answer with EOS to at least this many tokens, so that training
        sees the answer window that generation will use (its gen_length); 0: pad to the batch.
    batch_size: sequences per micro-batch in each process.
    grad_accum: micro-batches per optimizer step; the global batch is
        batch_size * grad_accum * processes. Under torchrun the gradients are reduced across
        processes once per step, in the last micro-batch's backward.
    max_steps: optimizer steps in total.
    lr: peak learning rate.
    min_lr_ratio: final learning rate as a fraction of lr.
    warmup_steps: linear warm-up steps.
    schedule: 'cosine' decay, 'wsd' (warmup-stable-decay, the paper's schedule), or 'constant'.
    decay_fraction: share of max_steps spent decaying in 'wsd'.
    weight_decay: AdamW weight decay (paper: 0.1).
    beta1, beta2: AdamW betas (paper: 0.9, 0.95).
    grad_clip: clip the global gradient norm to this; 0 turns clipping off.
    precision: 'bf16' runs the forward under bfloat16 autocast (weights stay float32); under
        --parallel fsdp, FSDP2's mixed precision as well: the blocks' weights are gathered and
        used in bfloat16, the gradients reduced and the optimizer state kept in float32.
    activation_checkpointing: recompute block activations in the backward pass.
    parallel: 'none', 'ddp' or 'fsdp' under torchrun; 'auto' is fsdp with several processes.
    eval_every: validate every this many steps (0: only at the end).
    eval_batches: validation micro-batches per evaluation.
    save_every: write a checkpoint every this many steps (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    log_every: write metrics every this many steps (and print them when there is no progress
        bar): the loss, aux loss and gradient norm averaged over the steps since the previous
        line, the tokens trained on, tokens per second and MFU. A line is also written at each
        validation and checkpoint; validations and checkpoints are printed as they happen.
    beta: vrpo, dpo: the DPO temperature on the preference score (0.1: a common DPO setting,
        ours; LLaDA 1.5's own value is not restated here).
    vrpo_budget: vrpo, dpo: Monte Carlo draws per ELBO estimate (policy and reference each;
        LLaDA 1.5 reports 8 as its default budget, unverified here).
    vrpo_allocation: vrpo: 'timesteps' spends the budget on n distinct timesteps with one mask
        each (LLaDA 1.5's optimal allocation); 'naive' on one timestep with n masks.
    vrpo_antithetic: vrpo: score the reference on the policy's own timesteps and masks
        (LLaDA 1.5's antithetic sampling); off: independent draws for the reference.
    peak_flops: the peak FLOP/s of one process's device for the MFU figure; empty: a GPU's
        datasheet bfloat16 peak where known, else measured by one large matmul in the training
        dtype at the start (any CPU).
    seed: seeds the initialisation, the data order, the masking and the dropout.
    resume: continue from the latest checkpoint in out_dir, exactly (losses, weights and
        random draws as without the interruption); metrics after that checkpoint are dropped.
    resume_from: continue from this checkpoint folder instead of the latest (e.g. the last good
        one when the latest is broken); implies resume.
    overwrite: start a new run in an out_dir that holds one, deleting its checkpoints and
        metrics (without it, such an out_dir is refused).
    lora_rank: > 0 fine-tunes LoRA adapters of this rank (through peft) instead of all weights.
        On LLaDA-MoE the adapters cover the attention projections, the dense layers' MLPs and
        the shared expert; the routed experts (stacked parameters) and the routers stay frozen.
    lora_alpha: LoRA scaling numerator.
    router_aux_loss: mixture-of-experts models: add the routers' load-balancing loss times
        the config's router_aux_loss_coef to the LLaDA loss. 'config': when config.json says
        output_router_logits (as the reference does), 'on': always, 'off': never. These take
        the reference's formula, which pools all MoE layers' routers (it evens out each expert
        index's load summed over the layers, not each layer's); 'per-layer': always, as the mean
        of every MoE layer's own loss, which evens out each layer.
    block_length: LLaDA 2.x, whose objectives ('pretrain' and 'sft') are block diffusion: the
        block length of its training mask (each block is denoised from the clean blocks before
        it). Empty: the family's default, 32 as in inclusionAI/dFactory. Other families train
        on the whole sequence and refuse it.
    """

    objective: Objective = "pretrain"
    autoregressive: bool = False
    model: str = ""
    model_config: str = ""
    tokenizer: str = ""
    data: str = ""
    val_data: str = ""
    val_fraction: float = 0.02
    out_dir: str = "runs/llada"
    seq_len: int = 256
    group_by_length: bool = False
    answer_tokens: int = 0
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Schedule = "wsd"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Precision = "fp32"
    activation_checkpointing: bool = False
    parallel: Parallel = "auto"
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    resume_from: str = ""
    overwrite: bool = False
    lora_rank: int = 0
    lora_alpha: float = 16.0
    router_aux_loss: RouterAuxLoss = "config"
    block_length: int | None = None
    peak_flops: float | None = None
    beta: float = 0.1
    vrpo_budget: int = 8
    vrpo_allocation: Allocation = "timesteps"
    vrpo_antithetic: bool = True

    def __post_init__(self) -> None:
        require_positive_ints(
            self, "seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"
        )
        for name in ("warmup_steps", "eval_every", "save_every", "lora_rank"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.keep_checkpoints < 1:
            raise ValueError(
                "keep_checkpoints must be at least 1, so a good checkpoint always exists"
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("min_lr_ratio", "decay_fraction", "val_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.data:
            raise ValueError("data is required: a token file (pretrain) or a JSONL file (sft)")
        if not self.model and not (self.model_config and self.tokenizer):
            raise ValueError(
                "say what to train: --model FOLDER to start from a checkpoint, or --model-config "
                "JSON and --tokenizer FOLDER for a new model"
            )
        if self.overwrite and (self.resume or self.resume_from):
            raise ValueError(
                "--overwrite starts the run over and --resume continues it: pass only one"
            )
        if self.objective not in ("pretrain", "sft") + PREFERENCE_OBJECTIVES:
            raise ValueError(
                f"objective must be 'pretrain', 'sft', 'vrpo' or 'dpo', got {self.objective!r}"
            )
        require_positive_ints(self, "vrpo_budget")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the DPO temperature, e.g. 0.1), got {self.beta!r}")
        if self.vrpo_allocation not in ("timesteps", "naive"):
            raise ValueError(
                f"vrpo_allocation must be 'timesteps' or 'naive', got {self.vrpo_allocation!r}"
            )
        if self.objective in PREFERENCE_OBJECTIVES:
            if not self.model:
                raise ValueError(
                    f"--objective {self.objective} fine-tunes a checkpoint against itself (the "
                    "frozen reference): pass --model FOLDER"
                )
            if self.autoregressive:
                raise ValueError(
                    f"--objective {self.objective} scores answers by the masked-diffusion ELBO; "
                    "drop --autoregressive"
                )
            if self.group_by_length:
                raise ValueError(
                    "--group-by-length groups SFT records; preference pairs are not grouped: "
                    "drop it"
                )
        if self.block_length is not None:
            require_positive_ints(self, "block_length")
            if self.autoregressive:
                raise ValueError(
                    "block_length sets the block-diffusion objective, and autoregressive training "
                    "has none: drop one of --block-length and --autoregressive"
                )
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(
                f"peak_flops must be > 0 (FLOP/s, e.g. 989e12), got {self.peak_flops!r}"
            )
        if self.router_aux_loss not in ("config", "on", "per-layer", "off"):
            raise ValueError(
                "router_aux_loss must be 'config', 'on', 'per-layer' or 'off', got "
                f"{self.router_aux_loss!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return settings_from_dict(cls, data, "training")
