"""Training checkpoints: official model folders plus the trainer's state, written atomically.

`OUT/checkpoints/step-0000500/` is a complete LLaDA checkpoint folder (config.json, safetensors,
tokenizer files: `llada.load_model` and the official remote code read it) plus
`trainer_state.pt` (step, optimizer state, settings). A checkpoint appears by one atomic rename
of a fully written folder, and `OUT/checkpoints/latest` is replaced atomically after it, so a
kill at any moment leaves the previous checkpoint loadable. The trainer state holds only
tensors and plain containers and is read with `weights_only=True`: nothing is unpickled.

A checkpoint damaged afterwards (a truncated copy, a file replaced by something else) is found
by `checkpoint_problem` before resuming, which names the file and the last good checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
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


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    match = _STEP_FOLDER.match(Path(folder).name)
    return int(match.group(1)) if match else None


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
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` (rank 0 only) and keep the newest `keep` checkpoints up to it.

    A failed write (disk full, ...) leaves no partial files behind and the previous checkpoints
    and `latest` untouched; it raises CheckpointWriteError, which says so.
    """
    root = checkpoints_dir(out_dir)
    folder = root / f"step-{step:07d}"
    pointer = root / "latest.partial"

    def add_trainer_state(staging: Path) -> None:
        if add_files is not None:
            add_files(staging)
        torch.save(trainer_state, staging / TRAINER_STATE)

    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(root)
        save_pretrained(
            model,
            folder,
            state_dict=model_state,
            copy_from=tokenizer_folder,
            add_files=add_trainer_state,
        )
        pointer.write_text(folder.name + "\n", encoding="utf-8")
        os.replace(pointer, root / "latest")
    except Exception as error:
        if root.is_dir():
            _remove_stale_staging(root)
            pointer.unlink(missing_ok=True)
        needed = sum(_tensor_bytes(x) for x in (model_state, trainer_state))
        raise CheckpointWriteError(_write_failure(root, step, error, needed)) from error
    # Checkpoints after this step (a resume from an earlier checkpoint) are left alone: the
    # run overwrites them when it gets there, and pruning must never remove the new one.
    done = [c for c in list_checkpoints(out_dir) if (checkpoint_step(c) or 0) <= step]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the last good one."""


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _write_failure(root: Path, step: int, error: Exception, needed: int) -> str:
    """One line on a failed save: disk full when the error or the free space says so (torch's
    own message for a full disk is e.g. 'basic_ios::clear: iostream error')."""
    previous = [c for c in list_checkpoints(root.parent) if (checkpoint_step(c) or 0) < step]
    intact = (
        f"the previous checkpoint (step {checkpoint_step(previous[-1])}, {previous[-1]}) is intact"
        if previous
        else "no earlier checkpoint exists"
    )
    try:
        free = shutil.disk_usage(root if root.is_dir() else root.parent).free
    except OSError:
        free = None
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
    if full or (free is not None and free < needed):
        return (
            f"no space left on the device of {root} while saving checkpoint step {step}; "
            f"{intact}; free space and resume with --resume"
        )
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"could not write checkpoint step {step} to {root} ({reason}); {intact}; "
        "fix the folder (space, permissions) and resume with --resume"
    )


class BrokenCheckpoint(ValueError):
    """A checkpoint that cannot be resumed from; the message says which file and what to do."""


def load_trainer_state(folder: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint, read without unpickling any object. With `mmap`, the
    tensors are mapped, not read: a cheap check of the whole file's structure."""
    path = Path(folder) / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, i.e. running the file's code: never.
        raise BrokenCheckpoint(
            f"{path} is not a llada trainer state (it holds objects that cannot be loaded "
            "safely); it was not loaded. Resume from another checkpoint or start a new run"
        ) from None
    except FileNotFoundError:
        raise BrokenCheckpoint(f"{path} is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise BrokenCheckpoint(
            f"{path} is truncated or corrupt ({str(error).strip().splitlines()[0][:120]})"
        ) from None
    if not isinstance(state, dict) or "step" not in state or "optimizer" not in state:
        raise BrokenCheckpoint(f"{path} is not a llada trainer state (no step/optimizer)")
    return state


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (one line), or None when it looks whole: every
    file is present, config.json parses, each safetensors file is as long as its header says,
    and the trainer state loads. Cheap: no tensor is read."""
    folder = Path(folder)
    config = folder / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{config} cannot be read ({type(error).__name__})"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        return f"{folder} holds no .safetensors weights"
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            return problem
    try:
        load_trainer_state(folder, mmap=True)
    except BrokenCheckpoint as error:
        return str(error)
    return None


def _safetensors_problem(file: Path) -> str | None:
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_length,) = struct.unpack("<Q", f.read(8))
            if header_length > size:
                return f"{file} is truncated ({size} bytes, its header alone claims more)"
            header = json.loads(f.read(header_length))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError):
        return f"{file} is not a readable safetensors file (truncated or corrupt)"
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        return f"{file} is truncated or corrupt ({size} bytes, its header says {expected})"
    return None


def _remove_stale_staging(root: Path) -> None:
    """Folders left by a save that was killed (they never became checkpoints)."""
    for item in root.iterdir():
        if item.name.startswith(".") and (".saving-" in item.name or ".old-" in item.name):
            shutil.rmtree(item, ignore_errors=True)
