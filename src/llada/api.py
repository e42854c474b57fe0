"""Text in, text out: the layer the command line, the server and the demo share.

It loads a model with its tokenizer, renders prompts (chat template or raw text), batches them
with left padding, runs a sampler and decodes the answers up to the first EOS/EoT.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .model.checkpoint import load_model, resolve_checkpoint
from .model.config import LLaDAConfig
from .model.transformer import LLaDAModel
from .sampling.config import BlockDecodeConfig, DecodeConfig, GenerateConfig, default_preset
from .sampling.events import StepEvent
from .sampling.fast import sample
from .tokenizer import encode_chat, left_pad, load_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

# The shipped models, in order of preference for commands run without --model.
DEFAULT_MODELS = ("llada-tiny-instruct", "llada-tiny-base")


def cache_dir() -> Path:
    base = os.environ.get("LLADA_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llada"
    )
    return Path(base)


def random_demo_checkpoint() -> Path:
    """A small random-weight LLaDA with a byte-level tokenizer, created once in the cache.

    It exists so that every command runs before a trained model is available; its output is
    noise. It goes through the same save/load path as a real checkpoint.
    """
    folder = cache_dir() / "random-tiny"
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    staging = cache_dir() / "random-tiny.tokenizer"
    train_tokenizer([], vocab_size=262, output_dir=staging)
    from .tokens import resolve_special_tokens

    tokens = resolve_special_tokens({}, staging, vocab_size=262)
    config = LLaDAConfig(
        d_model=128,
        n_heads=4,
        n_kv_heads=4,
        n_layers=2,
        mlp_hidden_size=256,
        vocab_size=262,
        embedding_size=384,
        max_sequence_length=1024,
        eos_token_id=tokens.eos_id,
        pad_token_id=tokens.pad_id,
        mask_token_id=tokens.mask_id,
    )
    model = LLaDAModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    model.special_tokens = tokens
    folder.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    if folder.exists():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, folder)
    return folder


def resolve_model_path(model: str | os.PathLike | None) -> tuple[Path, bool]:
    """The folder for a model argument, and whether it is the random stand-in.

    None means the first shipped model that this checkout has, or else the random stand-in.
    """
    if model is not None:
        return resolve_checkpoint(model), False
    for name in DEFAULT_MODELS:
        try:
            return resolve_checkpoint(name), False
        except FileNotFoundError:
            continue
    return random_demo_checkpoint(), True


Decoding = DecodeConfig | BlockDecodeConfig | str


def default_decode(model: torch.nn.Module, interactive: bool = True) -> str:
    """The decoding preset for `model` when none is named (`default_preset`): LLaDA-8B and
    LLaDA-MoE 'fast' (interactive) or 'reference' (evaluation); LLaDA 2.x its authors' setting,
    by the checkpoint's name."""
    name = str(getattr(model, "checkpoint_folder", "") or "")
    config = getattr(model, "config", None)
    name += " " + str(getattr(config, "extra", {}).get("_name_or_path", ""))
    return default_preset(bool(getattr(model, "block_diffusion", False)), interactive, name)


def generate_texts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    config: GenerateConfig,
    *,
    chat: bool = True,
    decode: Decoding | None = None,
) -> list[str]:
    """Answers to `prompts` (one batch), decoded up to the first EOS/EoT.

    decode: a preset name ('reference', 'fast', 'fastest', ...; for LLaDA 2.x 'llada2.0',
    'llada2.1-quality', 'llada2.1-speed'), a `DecodeConfig` or a `BlockDecodeConfig`; None:
    `default_decode(model, interactive=False)`."""
    if decode is None:
        decode = default_decode(model, interactive=False)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; pass [prompt]")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    tokens = model.special_tokens
    if chat:
        encoded = [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    else:
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, attention_mask = left_pad(encoded, tokens.pad_id)
    out = sample(model, ids, attention_mask, config, decode).tokens
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        for i, token in enumerate(row):
            if token in tokens.stop_ids:
                row = row[:i]
                break
        answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def load(model: str | os.PathLike | None = None, dtype=None, device="cpu"):
    """(model, tokenizer, is_random_stand_in) for a model argument (None: the default)."""
    folder, is_random = resolve_model_path(model)
    loaded = load_model(folder, dtype=dtype, device=device)
    return loaded, load_tokenizer(folder), is_random


class ChatSession:
    """A multi-turn conversation, kept as the reference chat.py keeps it (ML-GSAI/LLaDA
    chat.py).

    The history is token ids: each new user turn is rendered alone with the chat template and
    appended without its BOS; after each answer, the whole sequence minus every EOS (the
    answer's padding) becomes the history, so EoT tokens mark the turns.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        config: GenerateConfig,
        decode: Decoding | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.decode = default_decode(model) if decode is None else decode
        self.history: list[int] = []

    def reset(self) -> None:
        self.history = []

    def reply(self, text: str, on_step: Callable[[StepEvent], None] | None = None) -> str:
        """The answer to one user turn; `on_step` sees every denoising step."""
        tokens = self.model.special_tokens
        turn = encode_chat(self.tokenizer, [{"role": "user", "content": text}])
        if self.history and tokens.bos_id is not None and turn[:1] == [tokens.bos_id]:
            turn = turn[1:]
        prompt = self.history + turn
        out = sample(
            self.model, torch.tensor([prompt]), None, self.config, self.decode, on_step=on_step
        )
        out = out.tokens[0].tolist()
        self.history = [t for t in out if t != tokens.eos_id]
        answer = out[len(prompt) :]
        for i, token in enumerate(answer):
            if token in tokens.stop_ids:
                answer = answer[:i]
                break
        return self.tokenizer.decode(answer, skip_special_tokens=True)
