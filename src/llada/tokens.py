"""Special token ids: LLaDA's defaults, and their resolution from a checkpoint folder.

This is the only module that writes LLaDA-8B's token ids as numbers. Everything else asks a
`SpecialTokens` object, resolved once from a checkpoint's config.json and tokenizer files, so
that a small model with its own vocabulary (or a future release with other ids) works unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# The token strings of the LLaDA tokenizer (GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json).
# Ids are looked up by these strings.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"


@dataclass(frozen=True)
class SpecialTokens:
    """The special ids a sampler, a loss or a chat needs.

    mask_id: the diffusion mask token that every sampler starts from.
    eos_id: end of text; the Instruct model also pads its answers with it (ML-GSAI/LLaDA
        GUIDELINES.md).
    pad_id: used to left-pad batches (LLaDA uses EOS).
    bos_id: start of text, written by the chat template. None when the vocabulary has none.
    eot_id: end of turn (`<|eot_id|>`). None for models without a chat vocabulary.
    start_header_id, end_header_id: chat role headers, None when absent.
    """

    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    eot_id: int | None = None
    start_header_id: int | None = None
    end_header_id: int | None = None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an answer: EOS, and EoT when the vocabulary has it."""
        return tuple(i for i in (self.eos_id, self.eot_id) if i is not None)


# LLaDA-8B-Base/-Instruct and LLaDA 1.5 (GSAI-ML/LLaDA-8B-Instruct config.json and
# tokenizer_config.json).
LLADA_8B = SpecialTokens(
    mask_id=126336,
    eos_id=126081,
    pad_id=126081,
    bos_id=126080,
    eot_id=126348,
    start_header_id=126346,
    end_header_id=126347,
)


def _added_tokens(folder: Path, origins: dict[str, Path] | None = None) -> dict[str, int]:
    """Token string -> id for the special tokens declared in the tokenizer files, if any.

    Reads JSON only (tokenizer.json's `added_tokens`, tokenizer_config.json's
    `added_tokens_decoder`), so resolving ids never needs the tokenizer libraries. A file that
    is not what a tokenizer file should be is refused with a ValueError naming it. `origins`,
    if given, receives the file each token's id comes from.
    """
    found: dict[str, int] = {}
    origins = {} if origins is None else origins
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        data = _json_object(tokenizer_json)
        entries = data.get("added_tokens", [])
        if not isinstance(entries, list):
            raise _bad_file(tokenizer_json, "'added_tokens' is not a list")
        for entry in entries:
            token_id = entry.get("id") if isinstance(entry, dict) else None
            content, token_id = _token_entry(tokenizer_json, entry, token_id)
            found[content] = token_id
            origins[content] = tokenizer_json
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict):
            for token in (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, EOT_TOKEN):
                if token in vocab and token not in found:
                    found[token] = _token_id(tokenizer_json, token, vocab[token])
                    origins[token] = tokenizer_json
    config_json = folder / "tokenizer_config.json"
    if config_json.is_file():
        data = _json_object(config_json)
        decoder = data.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise _bad_file(config_json, "'added_tokens_decoder' is not an object")
        for token_id, entry in decoder.items():
            content, number = _token_entry(config_json, entry, token_id)
            if content not in found:
                found[content] = number
                origins[content] = config_json
    return found


def _bad_file(path: Path, what: str) -> ValueError:
    return ValueError(
        f"{path} is not a valid tokenizer file ({what}); copy the tokenizer files from the "
        "original checkpoint, or pass --model with another folder"
    )


def _json_object(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise _bad_file(path, f"not JSON: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(data, dict):
        raise _bad_file(path, "not a JSON object")
    return data


def _token_id(path: Path, content: object, value: object) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad_file(path, f"token {content!r} has the id {value!r}, not a token id")
    return value


def _token_entry(path: Path, entry: object, token_id: object) -> tuple[str, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
        raise _bad_file(path, f"an added token has no string 'content': {str(entry)[:80]}")
    return entry["content"], _token_id(path, entry["content"], token_id)


def resolve_special_tokens(
    config: dict[str, Any], folder: str | Path | None = None, vocab_size: int | None = None
) -> SpecialTokens:
    """Resolve the special ids of a checkpoint from its config.json dict and tokenizer files.

    config.json decides mask, EOS and pad (that is what the reference code reads). BOS, EoT and the
    chat headers come from the tokenizer files by token string. Without tokenizer files, an id of
    `LLADA_8B` is used only if the model's vocabulary is large enough to hold it.
    """
    origins: dict[str, Path] = {}
    added = _added_tokens(Path(folder), origins) if folder is not None else {}
    vocab = vocab_size if vocab_size is not None else config.get("vocab_size")

    def pick(config_key: str | None, token: str, default: int | None) -> int | None:
        if config_key is not None and config.get(config_key) is not None:
            value = config[config_key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"config key '{config_key}' must be an integer token id, got {value!r}"
                )
            return value
        if token in added:
            return added[token]
        if added:
            # The model ships a tokenizer, and the token is not in it.
            return None
        if default is not None and vocab is not None and default < vocab:
            return default
        return None

    mask_id = pick("mask_token_id", MASK_TOKEN, LLADA_8B.mask_id)
    eos_id = pick("eos_token_id", EOS_TOKEN, LLADA_8B.eos_id)
    if mask_id is None or eos_id is None:
        missing = "mask_token_id" if mask_id is None else "eos_token_id"
        raise ValueError(
            f"cannot tell the {missing} of this model: config.json has no '{missing}' and the "
            f"tokenizer files declare no matching token. Add '{missing}' to config.json."
        )
    pad_id = pick("pad_token_id", EOS_TOKEN, None)
    tokens = SpecialTokens(
        mask_id=mask_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        bos_id=pick(None, BOS_TOKEN, LLADA_8B.bos_id),
        eot_id=pick(None, EOT_TOKEN, LLADA_8B.eot_id),
        start_header_id=pick(None, START_HEADER_TOKEN, LLADA_8B.start_header_id),
        end_header_id=pick(None, END_HEADER_TOKEN, LLADA_8B.end_header_id),
    )
    if vocab is not None:
        # An id the embedding has no row for would only fail later, inside a forward pass.
        strings = {
            "mask_id": MASK_TOKEN,
            "eos_id": EOS_TOKEN,
            "pad_id": EOS_TOKEN,
            "bos_id": BOS_TOKEN,
            "eot_id": EOT_TOKEN,
            "start_header_id": START_HEADER_TOKEN,
            "end_header_id": END_HEADER_TOKEN,
        }
        for name, value in vars(tokens).items():
            if value is None or 0 <= value < vocab:
                continue
            key = _CONFIG_KEYS.get(name)
            if key is not None and config.get(key) is not None:
                source = f"config key '{key}'"
                if folder is not None:
                    source += f" of {Path(folder) / 'config.json'}"
            elif strings[name] in origins:
                source = f"the token {strings[name]} in {origins[strings[name]]}"
            else:
                source = "LLaDA's default"
            raise ValueError(
                f"the {name} {value} from {source} is outside the model's vocabulary of {vocab} "
                "tokens; fix the id there, or pass --model with a folder whose tokenizer matches "
                "its weights"
            )
    return tokens


_CONFIG_KEYS = {"mask_id": "mask_token_id", "eos_id": "eos_token_id", "pad_id": "pad_token_id"}


def with_overrides(tokens: SpecialTokens, **ids: int | None) -> SpecialTokens:
    """A copy with some ids replaced; `None` values are ignored."""
    return replace(tokens, **{k: v for k, v in ids.items() if v is not None})


def special_tokens_of(model: object, mask_id: int | None = None) -> SpecialTokens:
    """The special ids of a loaded model, with an optional explicit mask id.

    A model that carries no `special_tokens` (e.g. one built by hand) is described by its
    config's ids when it has them; otherwise the mask id must be given.
    """
    tokens = getattr(model, "special_tokens", None)
    if tokens is None:
        config = getattr(model, "config", None)
        eos = getattr(config, "eos_token_id", None)
        mask = mask_id if mask_id is not None else getattr(config, "mask_token_id", None)
        if mask is None:
            raise ValueError("this model carries no special token ids; pass mask_id=...")
        pad = getattr(config, "pad_token_id", None)
        eos = mask if eos is None else eos
        tokens = SpecialTokens(mask_id=mask, eos_id=eos, pad_id=eos if pad is None else pad)
    if mask_id is not None:
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or mask_id < 0:
            raise ValueError(f"mask_id must be a non-negative integer token id, got {mask_id!r}")
        tokens = replace(tokens, mask_id=mask_id)
    return tokens
