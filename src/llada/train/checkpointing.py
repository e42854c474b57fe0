"""Training checkpoints: official model folders plus the trainer's state, written atomically.

`OUT/checkpoints/step-0000500/` is a complete LLaDA checkpoint folder (config.json, safetensors,
tokenizer files: `llada.load_model` and the official remote code read it) plus
`trainer_state.pt` (step, optimizer state, settings). A checkpoint appears by one atomic rename
of a fully written folder, and `OUT/checkpoints/latest` is replaced atomically after it, so a
kill at any moment leaves the previous checkpoint loadable. The trainer state holds only
tensors and plain containers and is read with `weights_only=True`: nothing is unpickled.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..model.checkpoint import save_pretrained

TRAINER_STATE = "trainer_state.pt"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def is_complete(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file() and (folder / "config.json").is_file()


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FOLDER.match(p.name))]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `latest`, or else the newest complete one."""
    pointer = checkpoints_dir(out_dir) / "latest"
    if pointer.is_file():
        folder = checkpoints_dir(out_dir) / pointer.read_text(encoding="utf-8").strip()
        if is_complete(folder):
            return folder
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    tokenizer_folder: str | os.PathLike | None,
    keep: int,
) -> Path:
    """Write checkpoint `step` (rank 0 only) and keep the newest `keep` checkpoints."""
    root = checkpoints_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    folder = root / f"step-{step:07d}"

    def add_trainer_state(staging: Path) -> None:
        torch.save(trainer_state, staging / TRAINER_STATE)

    save_pretrained(
        model,
        folder,
        state_dict=model_state,
        copy_from=tokenizer_folder,
        add_files=add_trainer_state,
    )
    pointer = root / "latest.partial"
    pointer.write_text(folder.name + "\n", encoding="utf-8")
    os.replace(pointer, root / "latest")
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_trainer_state(folder: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(folder) / TRAINER_STATE, map_location="cpu", weights_only=True)


def _remove_stale_staging(root: Path) -> None:
    """Folders left by a save that was killed (they never became checkpoints)."""
    for item in root.iterdir():
        if item.name.startswith(".") and (".saving-" in item.name or ".old-" in item.name):
            shutil.rmtree(item, ignore_errors=True)
