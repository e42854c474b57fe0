"""Training checkpoints: official model folders plus the trainer's state, written atomically.

`OUT/checkpoints/step-0000500/` holds
- a complete LLaDA checkpoint folder (config.json, safetensors, tokenizer files:
  `llada.load_model` and the official remote code read it), written by rank 0 from the model
  state gathered there;
- LoRA runs: the adapters in peft's format (adapter_config.json, adapter_model.safetensors);
- `trainer_state/`: the model and optimizer state as torch.distributed.checkpoint writes it,
  sharded (each process writes its own part, `__RANK_0.distcp`, and rank 0 the `.metadata`
  index), loadable by any number of processes;
- `trainer_state.pt`: step, settings, validation history and the global generators (small).

The shards are written into a staging folder by every process, then rank 0 moves them into the
staging folder of the checkpoint with the rest; the checkpoint appears by one atomic rename of
that fully written folder, and `OUT/checkpoints/latest` is replaced atomically after it, so a
kill at any moment leaves the previous checkpoint loadable. Nothing is unpickled on loading:
`trainer_state.pt` holds only tensors and plain containers and is read with
`weights_only=True`, the shards' index is read by an unpickler that only builds the index's own
classes, and the shards' tensors are read with `weights_only=True` by torch itself.

Checkpoints of earlier llada versions (the whole optimizer state inside `trainer_state.pt`, no
`trainer_state/`) are still resumed from (`is_sharded` tells them apart).

A checkpoint damaged afterwards (a truncated copy, a file replaced by something else) is found
by `checkpoint_problem` before resuming, which names the file and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..model.checkpoint import save_pretrained
from .parallel import Distributed, all_reduce_sum

TRAINER_STATE = "trainer_state.pt"
TRAINER_SHARDS = "trainer_state"
# trainer_state.pt's "format": 2 with the model and optimizer in TRAINER_SHARDS; absent in the
# earlier, single-file format (the full optimizer state in "optimizer", LoRA adapters in
# "adapter").
SHARDED_FORMAT = 2
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
    shards: Path | None = None,
) -> Path:
    """Write checkpoint `step` (rank 0 only) and keep the newest `keep` checkpoints up to it.

    shards: the trainer state's shards, written by `save_shards`: moved into the checkpoint.
    A failed write (disk full, ...) leaves no partial files behind and the previous checkpoints
    and `latest` untouched; it raises CheckpointWriteError, which says so.
    """
    root = checkpoints_dir(out_dir)
    folder = root / f"step-{step:07d}"
    pointer = root / "latest.partial"

    def add_trainer_state(staging: Path) -> None:
        if add_files is not None:
            add_files(staging)
        if shards is not None:
            # A checkpoint this step overwrites (a resume from an earlier one) had its files
            # copied into the staging folder: its shards go, the new ones take their place.
            shutil.rmtree(staging / TRAINER_SHARDS, ignore_errors=True)
            os.replace(shards, staging / TRAINER_SHARDS)
        torch.save(trainer_state, staging / TRAINER_STATE)

    try:
        root.mkdir(parents=True, exist_ok=True)
        if shards is None:
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
        if shards is not None:
            needed *= 2  # the shards hold the model once more, and the optimizer
        raise CheckpointWriteError(_write_failure(root, step, error, needed)) from error
    # Checkpoints after this step (a resume from an earlier checkpoint) are left alone: the
    # run overwrites them when it gets there, and pruning must never remove the new one.
    done = [c for c in list_checkpoints(out_dir) if (checkpoint_step(c) or 0) <= step]
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def shards_staging(out_dir: str | os.PathLike, step: int) -> Path:
    """Where every process writes its shards of checkpoint `step` before it is assembled (a
    staging name: removed as stale by the next save when a kill leaves it)."""
    return checkpoints_dir(out_dir) / f".step-{step:07d}.saving-shards"


def prepare_shards(out_dir: str | os.PathLike, step: int) -> Path:
    """Rank 0, before `save_shards`: the checkpoints folder exists and holds no stale staging
    (left by a killed save), the staging folder of the shards included."""
    root = checkpoints_dir(out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(root)
    except OSError as error:
        raise CheckpointWriteError(_write_failure(root, step, error, 0)) from error
    return shards_staging(out_dir, step)


def save_shards(
    out_dir: str | os.PathLike, step: int, state: dict[str, Any], distributed: bool
) -> None:
    """Every process: write its part of `state` (see `parallel.sharded_state`) with
    torch.distributed.checkpoint into `shards_staging`. Raises CheckpointWriteError (on every
    process: torch gathers the failures) when a part cannot be written."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException

    staging = shards_staging(out_dir, step)
    try:
        with _one_process_quietly():
            dcp_save(state, storage_writer=FileSystemWriter(staging), no_dist=not distributed)
    # torch's CheckpointException (the failures of all processes) is a BaseException.
    except (Exception, CheckpointException) as error:
        root = checkpoints_dir(out_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointWriteError(
            _write_failure(root, step, _first_cause(error), _tensor_bytes(state))
        ) from error


def agree_on_failure(failure: CheckpointWriteError | None, step: int, env: Distributed) -> None:
    """Every process learns whether a part of a save failed anywhere (no one waits on a failed
    process) and raises CheckpointWriteError then: the failure's own message where it happened."""
    failed = all_reduce_sum([float(failure is not None)], env)[0]
    if failure is not None:
        raise failure
    if failed:
        raise CheckpointWriteError(f"another process could not save step {step}")


def write_shards(
    out_dir: str | os.PathLike,
    step: int,
    state: Callable[[], dict[str, Any]],
    env: Distributed,
) -> Path | None:
    """Every process: the shard phases of a checkpoint (`prepare_shards` on rank 0, then
    `save_shards` of `state()`), each ended by `agree_on_failure`. Returns the staged shards
    folder on rank 0 (None elsewhere), for `save_checkpoint(shards=...)`."""
    shards, failure = None, None
    if env.is_main:
        try:
            shards = prepare_shards(out_dir, step)
        except CheckpointWriteError as error:
            failure = error
    agree_on_failure(failure, step, env)
    try:
        save_shards(out_dir, step, state(), env.enabled)
    except CheckpointWriteError as error:
        failure = error
    agree_on_failure(failure, step, env)
    return shards


def _first_cause(error: BaseException) -> BaseException:
    """The error of the first failed process inside torch's CheckpointException (its failures:
    rank -> (exception, traceback)), else the error itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, BaseException):
                return inner
    return error


def is_sharded(state: dict[str, Any]) -> bool:
    return state.get("format") == SHARDED_FORMAT


def load_shards(folder: str | os.PathLike, template: dict[str, Any], distributed: bool) -> None:
    """Every process: fill `template` (this process's `parallel.sharded_state`) from the
    checkpoint's shards, whatever number of processes wrote them."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException

    shards = Path(folder) / TRAINER_SHARDS
    try:
        with _one_process_quietly():
            dcp_load(template, storage_reader=_safe_reader(shards), no_dist=not distributed)
    except (Exception, CheckpointException) as error:
        cause = _first_cause(error)
        if isinstance(cause, BrokenCheckpoint):
            raise cause from None
        reason = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ""
        raise BrokenCheckpoint(
            f"{shards} cannot be loaded into this model and optimizer "
            f"({type(cause).__name__}: {reason})"
        ) from None


@contextlib.contextmanager
def _one_process_quietly():
    """Without a process group torch warns that it assumes one process: llada means that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _safe_reader(path: Path):
    """torch's file system reader, with the index read by `read_shard_index`, not pickle.load
    (defined here: torch.distributed.checkpoint is imported only when a checkpoint is read)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_shard_index(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


class _IndexUnpickler(pickle.Unpickler):
    """Builds only what torch.distributed.checkpoint's index holds: its metadata classes, the
    storage records of the file system writer, torch sizes, dtypes and layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.metadata as metadata

        if module == "torch.distributed.checkpoint.metadata" and isinstance(
            getattr(metadata, name, None), type
        ):
            return getattr(metadata, name)
        if (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            return _StorageInfo
        if module == "torch" and (
            name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath"):
            import pathlib

            return getattr(pathlib, name)
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def read_shard_index(folder: str | os.PathLike):
    """The `.metadata` index of a torch.distributed.checkpoint folder, built without running
    anything it names; BrokenCheckpoint when it is missing, truncated or holds anything else."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _IndexUnpickler(f).load()
    except FileNotFoundError:
        raise BrokenCheckpoint(f"{path} is missing") from None
    except pickle.UnpicklingError as error:
        raise BrokenCheckpoint(
            f"{path} is not a llada trainer state index ({error}); it was not loaded. Resume "
            "from another checkpoint or start a new run"
        ) from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise BrokenCheckpoint(f"{path} is truncated or corrupt ({type(error).__name__})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise BrokenCheckpoint(f"{path} is not a torch.distributed.checkpoint index")
    return metadata


def shards_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint's shards (one line), or None: the index reads, and every
    byte range it lists lies inside its shard file."""
    shards = Path(folder) / TRAINER_SHARDS
    if not shards.is_dir():
        return f"{shards} is missing"
    try:
        metadata = read_shard_index(shards)
    except BrokenCheckpoint as error:
        return str(error)
    sizes: dict[str, int] = {}
    for info in metadata.storage_data.values():
        name = str(getattr(info, "relative_path", ""))
        file = shards / name
        if not name or Path(name).name != name:
            return f"{shards / '.metadata'} names an unexpected shard file {name!r}"
        if name not in sizes:
            if not file.is_file():
                return f"{file} is missing"
            sizes[name] = file.stat().st_size
        if info.offset + info.length > sizes[name]:
            return f"{file} is truncated or corrupt ({sizes[name]} bytes, its index says more)"
    return None


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
    if not isinstance(state, dict) or "step" not in state:
        raise BrokenCheckpoint(f"{path} is not a llada trainer state (no step)")
    if not is_sharded(state) and "optimizer" not in state:
        raise BrokenCheckpoint(
            f"{path} is not a llada trainer state (no optimizer state, and no {TRAINER_SHARDS}/)"
        )
    return state


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (one line), or None when it looks whole: every
    file is present, config.json parses, each safetensors file is as long as its header says,
    the trainer state loads and its shards are as long as their index says. Cheap: no tensor
    is read."""
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
        state = load_trainer_state(folder, mmap=True)
    except BrokenCheckpoint as error:
        return str(error)
    return shards_problem(folder) if is_sharded(state) else None


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
