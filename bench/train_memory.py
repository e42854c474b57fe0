"""Training memory and throughput: the trainer's peak resident memory (RSS) against what the
run needs, and its tokens/s and MFU, in one process and in two processes under FSDP2 (gloo).

Every case runs the real trainer (`llada.train.loop.train`) in its own subprocess (under
`torch.distributed.run` for the 2-process cases) on a model of llada-tiny-base's shape
(models/llada-tiny-base/config.json, a new random initialisation) at 32 sequences x 256 tokens
per optimizer step, and reports:

- peak RSS: the largest `ru_maxrss` of the training processes (the whole run: setup, the
  steps, the validation pass and the final checkpoint);
- baseline: the RSS of a process that has imported torch and llada and built the trainer (model,
  data, optimizer) but not run a step, measured in the same kind of subprocess;
- need: baseline + gradients + AdamW's two float32 moments (parameters are in the baseline) +
  the tensors autograd saves for the backward pass of one micro-batch (counted by
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded) + the
  largest transient of the backward, the gradient of the logits (N x vocab float32, N the
  masked positions of the micro-batch). Under FSDP2 the gradients and AdamW moments are each
  process's shard (1/2), and the saved activations are those of the process's micro-batch;
- ratio = peak RSS / need;
- between steps: rank 0's RSS after step 2 and after the last step (what stays resident when
  only the weights, gradients and optimizer state are live: growth here is the heap keeping
  freed activations);
- tokens/s and MFU as the trainer logs them (metrics.jsonl), averaged over the steps after the
  first (the first warms up), against a peak FLOP/s measured once here per precision (the best
  of five 2048 x 2048 matmuls in float32 or bfloat16 on the same threads) and given to every
  case with --peak-flops.

  OMP_NUM_THREADS=1 .venv/bin/python bench/train_memory.py [--steps 8] [--cases fp32,bf16,...]
      [--src OTHER/src]  (run another checkout's llada, e.g. the commit before a change:
      git archive COMMIT src | tar -x -C /tmp/before; --src /tmp/before/src)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT / "src"))
MODEL = ROOT / "models" / "llada-tiny-base"
BATCH, SEQ = 32, 256

# name: (processes, micro-batch, grad_accum, precision, parallel)
CASES = {
    "fp32": (1, 32, 1, "fp32", "none"),
    "bf16": (1, 32, 1, "bf16", "none"),
    "fp32-accum2": (1, 16, 2, "fp32", "none"),
    "fsdp-fp32": (2, 16, 1, "fp32", "fsdp"),
    "fsdp-bf16": (2, 16, 1, "bf16", "fsdp"),
    "fsdp-fp32-accum2": (2, 8, 2, "fp32", "fsdp"),
    "fsdp-bf16-accum2": (2, 8, 2, "bf16", "fsdp"),
}


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_data(folder: Path, tokens_wanted: int) -> Path:
    """A token file of synthetic sentences in llada-tiny-base's tokenizer."""
    from llada.tokenizer import load_tokenizer
    from llada.tokens import resolve_special_tokens
    from llada.train.data import write_token_file

    tokenizer = load_tokenizer(MODEL)
    config = json.loads((MODEL / "config.json").read_text())
    eos = resolve_special_tokens(config, MODEL, config["vocab_size"]).eos_id
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "owl",
        "fox",
        "bee",
        "sat",
        "on",
        "mat",
        "log",
        "hill",
        "tree",
        "sea",
        "ran",
        "saw",
        "big",
        "small",
        "red",
    ]
    texts, count = [], 0
    while count < tokens_wanted:
        text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + ".\n"
        texts.append(text)
        count += len(text.split()) + 2  # a rough count; the file is checked below
    path = write_token_file(texts, tokenizer, folder / "corpus", eos_id=eos)
    return path


def child(args: argparse.Namespace) -> None:
    """One training process: baseline RSS after the trainer is built, then train, then
    report (rank 0 writes the report; every rank writes its peak RSS)."""
    import torch

    from llada.train import loop
    from llada.train.config import TrainConfig

    config = TrainConfig.from_dict(json.loads(Path(args.child).read_text()))
    rank = int(os.environ.get("RANK", "0"))
    report: dict = {"rank": rank}
    built = loop.Trainer.__init__
    loss = loop.Trainer._loss

    def init_and_measure(self, *a, **k):
        built(self, *a, **k)
        report["baseline_mib"] = _rss_mib()

    def first_loss_counted(self, batch, generator, crop, with_aux=False):
        # The first training micro-batch runs under the counting hooks.
        if not with_aux or "saved_bytes" in report:
            return loss(self, batch, generator, crop, with_aux)
        saved, out = saved_tensor_bytes(self, lambda: loss(self, batch, generator, crop, with_aux))
        model_config = self.base_model.config
        vocab = getattr(model_config, "padded_vocab_size", None) or model_config.vocab_size
        report["saved_bytes"] = saved
        report["logits_grad_bytes"] = out.num_targets * vocab * 4
        return out

    step = loop.Trainer.train_step
    between: list[float] = []

    def step_and_measure(self):
        record = step(self)
        between.append(_rss_mib())
        return record

    loop.Trainer.__init__ = init_and_measure
    loop.Trainer._loss = first_loss_counted
    loop.Trainer.train_step = step_and_measure
    started = time.perf_counter()
    loop.train(config, progress=False)
    report["seconds"] = time.perf_counter() - started
    report["peak_rss_mib"] = _peak_rss_mib()
    report["between_steps_mib"] = between
    report["threads"] = torch.get_num_threads()
    out = Path(args.report).with_suffix(f".rank{rank}.json")
    out.write_text(json.dumps(report))


def saved_tensor_bytes(trainer, forward):
    """(bytes, output) of `forward()`: the bytes autograd saves for its backward, each storage
    once, the parameters' own storages excluded (they are counted as parameters); a bfloat16
    copy of a weight made by autocast is counted, it is real memory."""
    import torch

    # FSDP2's parameters are DTensors: their local shards are the storages.
    local = [getattr(p, "to_local", lambda p=p: p)() for p in trainer.base_model.parameters()]
    parameter_storages = {p.untyped_storage().data_ptr() for p in local if p.numel()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout == torch.strided:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer and pointer not in parameter_storages:
                seen[pointer] = max(seen.get(pointer, 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return sum(seen.values()), out


def run_case(name: str, args: argparse.Namespace, data: Path, work: Path, peak: float) -> dict:
    processes, micro, accum, precision, parallel = CASES[name]
    out_dir = work / name
    settings = dict(
        model_config=str(MODEL / "config.json"),
        tokenizer=str(MODEL),
        data=str(data),
        out_dir=str(out_dir),
        overwrite=True,
        seq_len=SEQ,
        batch_size=micro,
        grad_accum=accum,
        max_steps=args.steps,
        warmup_steps=1,
        eval_every=0,
        # 2: a multiple of the processes, so that checkouts before the fix of uneven validation
        # batches under torchrun (commit 6f6475d) run too.
        eval_batches=2,
        save_every=0,
        log_every=1,
        precision=precision,
        parallel=parallel,
        peak_flops=peak,
        val_fraction=0.1,
    )
    config_file = work / f"{name}.json"
    config_file.write_text(json.dumps(settings))
    report = work / f"{name}.report"
    command = [sys.executable, __file__, "--child", str(config_file), "--report", str(report)]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            *command[1:],
        ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    # The children import llada from this checkout's src/, or from --src.
    env["PYTHONPATH"] = str(Path(args.src or ROOT / "src").resolve())
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads(report.with_suffix(f".rank{r}.json").read_text()) for r in range(processes)]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > 1 and "tokens_per_s" in r]
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    flops_share = sum(r["mfu"] * r["tokens"] / r["tokens_per_s"] for r in timed)
    return dict(
        name=name,
        processes=processes,
        micro=micro,
        accum=accum,
        precision=precision,
        peak_rss_mib=max(r["peak_rss_mib"] for r in ranks),
        baseline_mib=max(r["baseline_mib"] for r in ranks),
        # Resident memory between steps (rank 0): after step 2, after the last step.
        between_mib=(ranks[0]["between_steps_mib"][1], ranks[0]["between_steps_mib"][-1]),
        saved_mib=max(r.get("saved_bytes", 0) for r in ranks) / 2**20,
        logits_grad_mib=max(r.get("logits_grad_bytes", 0) for r in ranks) / 2**20,
        tokens_per_s=tokens / seconds,
        mfu=flops_share / seconds,
    )


def parameter_count() -> int:
    from llada.model.config import LLaDAConfig

    config = LLaDAConfig.from_hf_dict(json.loads((MODEL / "config.json").read_text()))
    return config.num_parameters()


def measure_peaks(threads: int) -> dict[str, float]:
    """The best of five measurements of a 2048 x 2048 matmul, per training precision."""
    import torch

    torch.set_num_threads(threads)
    from llada.train.throughput import measure_peak

    cpu = torch.device("cpu")
    return {
        name: max(measure_peak(cpu, dtype) for _ in range(5))
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cases", default="all", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--src", default="", help="another checkout's src/ folder to run")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--report", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    names = list(CASES) if args.cases == "all" else args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    peaks = measure_peaks(args.threads)
    parameters = parameter_count()
    print(
        f"model: llada-tiny-base shape, {parameters / 1e6:.2f}M parameters; "
        f"{BATCH} x {SEQ} tokens per step; {args.threads} thread(s) per process; "
        f"peak {peaks['fp32'] / 1e9:.1f} GFLOP/s float32, {peaks['bf16'] / 1e9:.1f} bfloat16 "
        "(2048 x 2048 matmul, measured here)"
    )
    header = (
        f"{'case':<18} {'proc':>4} {'micro x accum':>13} {'peak RSS':>9} {'baseline':>9} "
        f"{'saved':>7} {'need':>7} {'ratio':>6} {'between steps':>14} {'tokens/s':>9} {'MFU':>6}"
    )
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = make_data(work, BATCH * SEQ * (args.steps + 2) * 12 // 10)
        for name in names:
            row = run_case(name, args, data, work, peaks[CASES[name][3]])
            # Gradients + AdamW's two moments, float32, this process's shard.
            state_mib = 3 * 4 * parameters / row["processes"] / 2**20
            row["state_mib"] = state_mib
            row["need_mib"] = (
                row["baseline_mib"] + state_mib + row["saved_mib"] + row["logits_grad_mib"]
            )
            row["ratio"] = row["peak_rss_mib"] / row["need_mib"]
            rows.append(row)
            print(
                f"{name:<18} {row['processes']:>4} {row['micro']:>8} x {row['accum']:<2} "
                f"{row['peak_rss_mib']:>7.0f}M {row['baseline_mib']:>7.0f}M "
                f"{row['saved_mib']:>6.0f}M {row['need_mib']:>6.0f}M {row['ratio']:>6.2f} "
                f"{row['between_mib'][0]:>6.0f}->{row['between_mib'][1]:<6.0f} "
                f"{row['tokens_per_s']:>9.0f} {100 * row['mfu']:>5.1f}%",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
