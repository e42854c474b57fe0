"""Tokenizers: loading from a checkpoint folder, the LLaDA chat template, batch encoding,
and training a byte-level BPE tokenizer with LLaDA's special tokens for small models.

transformers is used for tokenization and chat rendering only, and imported on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .tokens import (
    BOS_TOKEN,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    MASK_TOKEN,
    START_HEADER_TOKEN,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The chat template of LLaDA-8B-Instruct's tokenizer_config.json, verbatim (SPEC §3). Its quirks
# are kept on purpose: BOS comes from the template, and the assistant header is always appended.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)

# The files that make up a tokenizer in a checkpoint folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# Special tokens of a tokenizer trained here, in id order (ids 0..5).
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)


def load_tokenizer(path: str | os.PathLike | Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder (tokenizer.json + tokenizer_config.json).

    `path` may also be a model returned by `load_model`, whose folder is then used.
    """
    folder = getattr(path, "checkpoint_folder", None) or path
    from .model.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json; LLaDA tokenizers ship as tokenizer.json + "
            "tokenizer_config.json. Copy them from the original checkpoint folder."
        )
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    return tokenizer


def copy_tokenizer_files(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy the tokenizer files of `source` into `destination` (created if needed)."""
    import shutil

    source, destination = Path(source), Path(destination)
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source} has no tokenizer.json to copy")
    destination.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and source.resolve() != destination.resolve():
            partial = destination / (name + ".partial")
            shutil.copyfile(source / name, partial)
            os.replace(partial, destination / name)
    return destination


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """Render chat messages with the tokenizer's template (LLaDA's, if the tokenizer has none).

    messages: [{"role": "user" | "assistant" | "system", "content": str}, ...]. The result ends
    with the assistant header, ready for generation.
    """
    if not messages:
        raise ValueError("messages is empty; pass at least one {'role': 'user', 'content': ...}")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise ValueError(
                f"messages[{i}] must be a dict with string 'role' and 'content', got {message!r}"
            )
    template = tokenizer.chat_template or LLADA_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> list[int]:
    """Token ids of a rendered chat (the template writes BOS; the tokenizer adds nothing)."""
    return tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (ids, attention_mask), both (B, max_len) int64, as LLaDA batches."""
    if not sequences:
        raise ValueError("no sequences to pad")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, width - len(sequence) :] = 1
    return ids, attention_mask


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike, min_frequency: int = 2
) -> Path:
    """Train a byte-level BPE tokenizer with LLaDA's special tokens and chat template.

    Writes tokenizer.json and tokenizer_config.json (the official layout) to output_dir. With
    no texts, the result is a pure byte tokenizer (256 byte tokens plus the special tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"))
    added = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "chat_template": LLADA_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(output / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return output
