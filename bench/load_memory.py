"""Peak host memory of `llada.load_model` compared with the checkpoint's size.

Writes a random-weight dense LLaDA checkpoint in the official layout (config.json +
model.safetensors, or ~2 GB shards with an index), then loads it in a fresh process and reads
the peak resident set size (`ru_maxrss`) before and after loading. A streaming loader should
need about one checkpoint's worth of memory on top of the imports: ratio ~1.0.

    python bench/load_memory.py --size-gb 1.0 --dtype bfloat16

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SHARD_BYTES = 2 * 10**9
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Runs in its own process so that the writer's memory never counts for the loader.
WRITER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from llada.model.checkpoint import INDEX_FILE, SINGLE_FILE, to_hf_name
    from llada.model.config import LLaDAConfig
    from llada.model.transformer import LLaDAModel

    folder, dtype_name, shard_bytes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    config = LLaDAConfig(**json.loads(sys.argv[4]))
    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = LLaDAModel(config)
    shapes = [(to_hf_name(n), tuple(p.shape)) for n, p in model.named_parameters()]
    size = torch.empty((), dtype=dtype).element_size()
    groups, current, current_bytes = [], [], 0
    for name, shape in shapes:
        nbytes = size * torch.Size(shape).numel()
        if current and current_bytes + nbytes > shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
    groups.append(current)

    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file_name = (
            SINGLE_FILE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        )
        tensors = {}
        for name, shape in group:
            tensor = torch.empty(shape, dtype=dtype)
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
            tensors[name] = tensor
            total += tensor.numel() * tensor.element_size()
            weight_map[name] = file_name
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    (folder / "config.json").write_text(
        json.dumps(config.to_hf_dict(torch_dtype=dtype_name), indent=2), encoding="utf-8"
    )
    """
)

# Runs in a fresh process: ru_maxrss is a high-water mark, so one measurement per process.
MEASURER = textwrap.dedent(
    """
    import json, resource, sys

    import torch  # noqa: F401
    import llada
    import llada.model.checkpoint  # noqa: F401  (import everything load_model needs first)

    def peak_bytes():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    baseline = peak_bytes()
    model = llada.load_model(sys.argv[1], dtype=sys.argv[2])
    peak = peak_bytes()
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"baseline": baseline, "peak": peak, "loaded_bytes": loaded}))
    """
)


def choose_config(target_bytes: int, dtype_bytes: int) -> dict:
    """A LLaMA-like shape (d_model 2048, SwiGLU 5632, vocab 32000) whose layer count hits the size.

    Targets too small for one such layer shrink the width; very large ones widen it.
    """
    target_params = target_bytes / dtype_bytes
    d_model, hidden, vocab = 2048, 5632, 32000
    while True:
        per_block = 4 * d_model * d_model + 3 * d_model * hidden + 2 * d_model
        fixed = 2 * vocab * d_model + d_model
        layers = round((target_params - fixed) / per_block)
        if layers < 1 and d_model > 128:
            d_model, hidden = d_model // 2, hidden // 2
            continue
        if layers > 64:
            d_model, hidden = d_model * 2, hidden * 2
            continue
        break
    return {
        "d_model": d_model,
        "n_heads": max(1, d_model // 128),
        "n_kv_heads": max(1, d_model // 128),
        "n_layers": max(1, layers),
        "mlp_hidden_size": hidden,
        "vocab_size": vocab,
        "embedding_size": vocab,
        "max_sequence_length": 4096,
        "eos_token_id": vocab - 2,
        "pad_token_id": vocab - 2,
        "mask_token_id": vocab - 1,
    }


def run_python(code: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"subprocess failed with exit status {result.returncode}")
    return result.stdout


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (10^9)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temp dir, removed)"
    )
    args = parser.parse_args(argv)

    config = choose_config(int(args.size_gb * 10**9), DTYPE_BYTES[args.dtype])
    owned = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="llada-load-memory-")) if owned else Path(args.dir)
    try:
        folder = root / "checkpoint"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        run_python(WRITER, str(folder), args.dtype, str(SHARD_BYTES), json.dumps(config))
        checkpoint_bytes = folder_bytes(folder)
        shards = len(list(folder.glob("*.safetensors")))
        measured = json.loads(
            run_python(MEASURER, str(folder), args.dtype).strip().splitlines()[-1]
        )
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)

    baseline, peak = measured["baseline"], measured["peak"]
    increase = peak - baseline
    ratio = increase / checkpoint_bytes
    rows = [
        (
            "config",
            f"d_model {config['d_model']}, {config['n_layers']} layers, "
            f"mlp {config['mlp_hidden_size']}, vocab {config['vocab_size']}, {args.dtype}",
        ),
        ("checkpoint", f"{mib(checkpoint_bytes)} in {shards} file(s)"),
        ("baseline RSS (torch+llada)", mib(baseline)),
        ("peak RSS after load_model", mib(peak)),
        ("peak - baseline", mib(increase)),
        ("(peak - baseline) / checkpoint", f"{ratio:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(
        json.dumps(
            {
                "checkpoint_bytes": checkpoint_bytes,
                "shards": shards,
                "dtype": args.dtype,
                "baseline_bytes": baseline,
                "peak_bytes": peak,
                "increase_bytes": increase,
                "ratio": round(ratio, 4),
                "loaded_bytes": measured["loaded_bytes"],
                "config": config,
            }
        )
    )


if __name__ == "__main__":
    main()
