"""Training data: tokenised, packed, memory-mapped text for pre-training; chat records for SFT;
preference pairs for VRPO/DPO; and a deterministic sample order that makes resume exact and any process count see the same
global batches.

A token file is `NAME.bin` (raw little-endian uint16 or uint32 ids, documents separated by EOS)
plus `NAME.json` (dtype, token count, tokenizer). It is written in a stream and read through a
memory map, so a corpus larger than RAM works.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import render_chat

_TEXT_CHUNK_BYTES = 1 << 20


def iter_corpus(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Text pieces of plain-text files (read in ~1 MB line-aligned chunks) and JSONL files
    (one {"text": ...} per line). A folder means every .txt/.jsonl file below it."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no corpus file or folder at {path}")
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            if file.suffix == ".jsonl":
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise ValueError(
                                f"{file}:{number}: expected a JSON object with a 'text' string"
                            )
                        yield record["text"]
                continue
            while True:
                chunk = f.read(_TEXT_CHUNK_BYTES)
                if not chunk:
                    break
                # Finish the current line so that no word is split between two pieces.
                chunk += f.readline()
                yield chunk


def write_token_file(
    texts: Iterable[str],
    tokenizer,
    out_path: str | os.PathLike,
    eos_id: int,
    documents: bool = True,
) -> Path:
    """Tokenise `texts` into OUT.bin + OUT.json. With `documents`, each text ends with EOS."""
    out = Path(out_path).with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    count = 0
    partial = out.with_name(out.name + ".bin.partial")
    with open(partial, "wb") as f:
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if documents:
                ids.append(eos_id)
            np.asarray(ids, dtype=dtype).tofile(f)
            count += len(ids)
    os.replace(partial, out.with_suffix(".bin"))
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": count,
        "vocab_size": vocab,
        "eos_id": eos_id,
    }
    with open(out.with_suffix(".json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return out.with_suffix(".bin")


class TokenFile:
    """A memory-mapped token file written by `write_token_file`."""

    def __init__(self, path: str | os.PathLike) -> None:
        base = Path(path).with_suffix("")
        meta_path = base.with_suffix(".json")
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found; make token files with `llada data tokenize` (pretraining "
                "reads tokenised text, not raw text)"
            )
        with open(meta_path, encoding="utf-8") as f:
            self.meta = json.load(f)
        self.tokens = np.memmap(base.with_suffix(".bin"), dtype=self.meta["dtype"], mode="r")

    def __len__(self) -> int:
        return len(self.tokens)


class PackedSequences:
    """Non-overlapping windows of seq_len tokens over [start, end) of a token file."""

    def __init__(self, tokens: np.ndarray, seq_len: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        if len(tokens) < seq_len:
            raise ValueError(f"only {len(tokens)} tokens, fewer than one sequence of {seq_len}")

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        rows = [
            np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len], dtype=np.int64)
            for i in indices
        ]
        return {"input_ids": torch.from_numpy(np.stack(rows))}


def split_token_file(
    file: TokenFile, val_fraction: float, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) token ranges: the validation part is the file's tail."""
    held_out = int(len(file) * val_fraction)
    if val_fraction > 0:
        held_out = max(held_out, seq_len)
    return file.tokens[: len(file) - held_out], file.tokens[len(file) - held_out :]


@dataclass(frozen=True)
class ChatRecord:
    input_ids: list[int]
    prompt_length: int


class ChatRecords:
    """SFT records from a JSONL file of {"messages": [...]} objects.

    The last message must be the assistant's answer. The prompt is every earlier message
    rendered with the chat template (which ends with the assistant header); the answer is the
    reply followed by EoT and EOS, and batches pad it with EOS (ML-GSAI/LLaDA GUIDELINES.md,
    SFT: the padding belongs to the answer and is trained on, as LLaDA's SFT does).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer,
        special_tokens,
        seq_len: int,
        min_answer_tokens: int = 0,
    ) -> None:
        self.seq_len = seq_len
        self.pad_id = special_tokens.eos_id
        end = [special_tokens.eot_id] if special_tokens.eot_id is not None else []
        end.append(special_tokens.eos_id)
        self.records: list[ChatRecord] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                messages = json.loads(line).get("messages")
                if not messages or messages[-1].get("role") != "assistant" or len(messages) < 2:
                    raise ValueError(
                        f"{path}:{number}: 'messages' must end with an assistant reply after a prompt"
                    )
                prompt = tokenizer(render_chat(tokenizer, messages[:-1]), add_special_tokens=False)[
                    "input_ids"
                ]
                answer = (
                    tokenizer(messages[-1]["content"].strip(), add_special_tokens=False)[
                        "input_ids"
                    ]
                    + end
                )
                answer += [self.pad_id] * (min_answer_tokens - len(answer))
                if len(prompt) >= seq_len:
                    raise ValueError(
                        f"{path}:{number}: the prompt alone has {len(prompt)} tokens >= seq_len {seq_len}"
                    )
                self.records.append(ChatRecord((prompt + answer)[:seq_len], len(prompt)))
        if not self.records:
            raise ValueError(f"{path} holds no chat records")

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        chosen = [self.records[i] for i in indices]
        width = max(len(r.input_ids) for r in chosen)
        ids = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        for row, record in enumerate(chosen):
            ids[row, : len(record.input_ids)] = torch.tensor(record.input_ids)
        prompt_lengths = torch.tensor([r.prompt_length for r in chosen], dtype=torch.long)
        return {"input_ids": ids, "prompt_lengths": prompt_lengths}


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


class PreferencePairs:
    """Preference pairs (LLaDA 1.5's VRPO, `llada train --objective vrpo`) from a JSONL file of
    {"prompt": text, "chosen": text, "rejected": text} objects, or {"messages": [...], "chosen",
    "rejected"} with the conversation before the answer ('prompt' is one user message). Other
    keys (e.g. "task") are ignored.

    The prompt and the answers are rendered as `ChatRecords` renders an SFT record: the prompt
    through the chat template, each answer as its stripped text followed by EoT and EOS. A
    micro-batch holds its pairs' chosen answers in rows [0, P) and their rejected ones in rows
    [P, 2P), each after its prompt, all padded with EOS to the batch width (and to
    `min_answer_tokens` answer tokens); as in SFT the padding belongs to the answer, and it is
    scored, so both answers of a pair are scored over the same window.

    Refused before training, with the file and line: a record without the keys, an empty
    answer, a pair whose two answers tokenise the same, and a prompt plus answer longer than
    seq_len (cutting it would change what is compared).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer,
        special_tokens,
        seq_len: int,
        min_answer_tokens: int = 0,
    ) -> None:
        self.seq_len = seq_len
        self.pad_id = special_tokens.eos_id
        self.min_answer_tokens = min_answer_tokens
        end = [special_tokens.eot_id] if special_tokens.eot_id is not None else []
        end.append(special_tokens.eos_id)
        self.records: list[PreferencePair] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: not a JSON object ({error})") from None
                self.records.append(self._pair(record, where, tokenizer, end))
        if not self.records:
            raise ValueError(f"{path} holds no preference pairs")

    def _pair(self, record: object, where: str, tokenizer, end: list[int]) -> PreferencePair:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with 'prompt', 'chosen', 'rejected'")
        if isinstance(record.get("messages"), list) and record["messages"]:
            messages = record["messages"]
            if messages[-1].get("role") == "assistant":
                raise ValueError(
                    f"{where}: 'messages' is the conversation before the answer; put the answers "
                    "in 'chosen' and 'rejected', not in a last assistant message"
                )
        elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
            messages = [{"role": "user", "content": record["prompt"]}]
        else:
            raise ValueError(f"{where}: needs a non-empty 'prompt' text or 'messages' list")
        answers = []
        for key in ("chosen", "rejected"):
            text = record.get(key)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty answer text, got {text!r}")
            answers.append(tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + end)
        chosen, rejected = answers
        if chosen == rejected:
            raise ValueError(
                f"{where}: 'chosen' and 'rejected' are the same answer; a pair must differ"
            )
        prompt = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
        longest = len(prompt) + max(len(chosen), len(rejected), self.min_answer_tokens)
        if longest > self.seq_len:
            raise ValueError(
                f"{where}: prompt ({len(prompt)} tokens) plus the longer answer is {longest} "
                f"tokens > seq_len {self.seq_len}; raise --seq-len or drop the pair"
            )
        return PreferencePair(prompt, chosen, rejected)

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        pairs = [self.records[i] for i in indices]
        rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        width = max(
            len(prompt) + max(len(answer), self.min_answer_tokens) for prompt, answer in rows
        )
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        prompt_lengths = torch.tensor([len(prompt) for prompt, _ in rows], dtype=torch.long)
        return {"input_ids": ids, "prompt_lengths": prompt_lengths}


class LengthGroups:
    """Micro-batches of chat records of similar length, so that batches carry little EOS
    padding: records are sorted by length and cut into groups of `batch_size`; the sample order
    then shuffles whole groups (one group is one item)."""

    def __init__(self, records: ChatRecords, batch_size: int) -> None:
        by_length = sorted(
            range(len(records)), key=lambda i: (len(records.records[i].input_ids), i)
        )
        self.groups = [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
        self.records = records

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return self.records.batch([i for group in indices for i in self.groups[group]])


class SampleOrder:
    """Which items make up each micro-batch, as a pure function of (seed, step).

    Items are visited in a fresh random permutation per epoch. Global step s uses samples
    [s * G, (s + 1) * G) of that stream, G = micro_batch * grad_accum * world_size; process r
    takes, for micro-batch m, the slice starting at (m * world_size + r) * micro_batch. So a
    resumed run sees exactly the batches it would have seen, and N processes together see the
    same global batch as one process with N times the accumulation.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        self.num_items = num_items
        self.seed = seed
        self._epoch = -1
        self._permutation: torch.Tensor | None = None

    def _item(self, sample: int) -> int:
        epoch, offset = divmod(sample, self.num_items)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutation = torch.randperm(self.num_items, generator=generator)
            self._epoch = epoch
        return int(self._permutation[offset])

    def micro_batch(
        self, step: int, micro: int, rank: int, world_size: int, micro_batch: int, grad_accum: int
    ) -> list[int]:
        global_batch = micro_batch * grad_accum * world_size
        start = step * global_batch + (micro * world_size + rank) * micro_batch
        return [self._item(sample) for sample in range(start, start + micro_batch)]
