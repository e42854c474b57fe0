"""Special token ids: the defaults of each token family, and their resolution from a checkpoint.

This is the only module that writes token ids as numbers. Everything else asks a
`SpecialTokens` object, resolved once from a checkpoint's config.json and tokenizer files, so
that a small model with its own vocabulary (or a future release with other ids) works unchanged.

Two token families exist, told apart by their marker tokens (`token_family`):

- "llada-8b": LLaDA-8B-Base/-Instruct and LLaDA 1.5. Mask `<|mdm_mask|>`, end of turn
  `<|eot_id|>`, chat turns between `<|start_header_id|>` and `<|end_header_id|>` headers.
- "llada-moe": LLaDA-MoE-7B-A1B and LLaDA 2.x, which share the Ling tokenizer. Mask `<|mask|>`,
  end of turn `<|role_end|>`, chat turns opened by `<role>NAME</role>`.

The family follows the tokenizer files, not the architecture: a MoE model trained here with
LLaDA's tokenizer is in the "llada-8b" family. The architecture decides only for a folder whose
tokenizer files name no marker at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

# The token strings of the LLaDA tokenizer (GSAI-ML/LLaDA-8B-Instruct tokenizer_config.json).
# Ids are looked up by these strings.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"

# The token strings of LLaDA-MoE-7B-A1B and LLaDA 2.x that differ from LLaDA-8B's (the Ling
# tokenizer; inclusionAI/dInfer and llama.cpp's LLaDA-MoE converter). BOS and EOS have the
# same strings as LLaDA-8B's.
MOE_MASK_TOKEN = "<|mask|>"
ROLE_END_TOKEN = "<|role_end|>"
ROLE_OPEN_TOKEN = "<role>"
ROLE_CLOSE_TOKEN = "</role>"

TokenFamily = Literal["llada-8b", "llada-moe"]
LLADA_8B_FAMILY: TokenFamily = "llada-8b"
LLADA_MOE_FAMILY: TokenFamily = "llada-moe"

# Per family: the mask token, the end-of-turn markers (the first one is the EoT token).
_MARKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    LLADA_8B_FAMILY: (MASK_TOKEN, (EOT_TOKEN, START_HEADER_TOKEN)),
    LLADA_MOE_FAMILY: (MOE_MASK_TOKEN, (ROLE_END_TOKEN,)),
}

# config.json keys that only a mixture-of-experts LLaDA has (LLaDA-MoE's, then LLaDA 2.x's).
_MOE_CONFIG_KEYS = (
    "num_experts",
    "expert_intermediate_size",
    "moe_layer_freq",
    "moe_intermediate_size",
    "num_shared_experts",
)


@dataclass(frozen=True)
class SpecialTokens:
    """The special ids a sampler, a loss or a chat needs.

    mask_id: the diffusion mask token that every sampler starts from.
    eos_id: end of text; the Instruct model also pads its answers with it (ML-GSAI/LLaDA
        GUIDELINES.md).
    pad_id: used to left-pad batches (LLaDA uses EOS).
    bos_id: start of text, written by the chat template. None when the vocabulary has none.
    eot_id: end of turn: `<|eot_id|>` (llada-8b family) or `<|role_end|>` (llada-moe family).
        None for models without a chat vocabulary.
    start_header_id, end_header_id: llada-8b's chat role headers, None when absent (always for
        the llada-moe family, whose `<role>` markers are plain text to the sampler).
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

# LLaDA-MoE-7B-A1B-Base/-Instruct and LLaDA 2.0/2.1 (inclusionAI/dInfer's constants and llama.cpp's
# LLaDA-MoE converter; LLaDA2's config.json has pad_token_id 156892). Used only for a folder
# without tokenizer files: the other ids (BOS, `<|role_end|>`) come from the tokenizer files.
LLADA_MOE = SpecialTokens(mask_id=156895, eos_id=156892, pad_id=156892)

_DEFAULTS = {LLADA_8B_FAMILY: LLADA_8B, LLADA_MOE_FAMILY: LLADA_MOE}


class UnknownSpecialTokenError(ValueError):
    """The mask or EOS id of a checkpoint cannot be told from its files.

    `key` is the config.json key that would say it ('mask_token_id' or 'eos_token_id'). A
    loader may still load such a model for logits alone, leaving the id to each call
    (`mask_id=...`).
    """

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def is_moe_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json dict describes a mixture-of-experts LLaDA (LLaDA-MoE, LLaDA 2.x).

    Told by `architectures` and the MoE keys, never by model_type: LLaDA-MoE's official
    config.json says `"model_type": "llada"`, as LLaDA-8B's does.
    """
    architectures = config.get("architectures")
    if isinstance(architectures, list) and any(
        isinstance(name, str) and "moe" in name.lower() for name in architectures
    ):
        return True
    return any(config.get(key) is not None for key in _MOE_CONFIG_KEYS)


def token_family(
    added: Mapping[str, int],
    config: Mapping[str, Any] | None = None,
    where: str = "the tokenizer files",
) -> TokenFamily | None:
    """The token family of a tokenizer, from its added tokens (string -> id).

    The rule, first match wins:
    1. config.json's `mask_token_id` is the id of one family's mask token: that family.
    2. the mask tokens: `<|mdm_mask|>` alone is llada-8b, `<|mask|>` alone is llada-moe.
    3. the end-of-turn markers: `<|eot_id|>` or the header tokens alone are llada-8b,
       `<|role_end|>` alone is llada-moe.
    4. no marker: llada-moe if `config` describes a MoE model (`is_moe_config`), llada-8b if
       another config is given, None without a config.
    Markers of both families at the step that decides (both masks, or both kinds of end of
    turn) are a ValueError naming them: the ids would be a guess.
    """
    mask_key = config.get("mask_token_id") if config is not None else None
    if mask_key is not None:
        for family, (mask, _) in _MARKERS.items():
            if added.get(mask) == mask_key:
                return family
    for step, what in ((0, "mask tokens"), (1, "end-of-turn markers")):
        found = {
            family: [
                token for token in ((markers[0],) if step == 0 else markers[1]) if token in added
            ]
            for family, markers in _MARKERS.items()
        }
        present = [family for family, tokens in found.items() if tokens]
        if len(present) == 1:
            return present[0]
        if len(present) == 2:
            names = ", ".join(f"{t} (id {added[t]})" for tokens in found.values() for t in tokens)
            raise ValueError(
                f"{where} declare the {what} of both LLaDA-8B and LLaDA-MoE: {names}; "
                "add 'mask_token_id' to config.json to say which one the model uses, or use "
                "the tokenizer files of its checkpoint"
            )
    if config is None:
        return None
    return LLADA_MOE_FAMILY if is_moe_config(config) else LLADA_8B_FAMILY


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
            for token in (
                BOS_TOKEN,
                EOS_TOKEN,
                MASK_TOKEN,
                EOT_TOKEN,
                MOE_MASK_TOKEN,
                ROLE_END_TOKEN,
            ):
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

    config.json decides mask, EOS and pad (that is what the reference code reads). The other ids
    come from the tokenizer files by token string, those of the folder's token family
    (`token_family`): `<|mdm_mask|>`, `<|eot_id|>` and the chat headers for llada-8b,
    `<|mask|>` and `<|role_end|>` (as EoT) for llada-moe. Without tokenizer files, an id of the
    family's defaults (`LLADA_8B`, `LLADA_MOE`) is used only if the model's vocabulary is large
    enough to hold it. A mask or EOS id that cannot be told is an `UnknownSpecialTokenError`.
    """
    origins: dict[str, Path] = {}
    added = _added_tokens(Path(folder), origins) if folder is not None else {}
    vocab = vocab_size if vocab_size is not None else config.get("vocab_size")
    where = f"the tokenizer files of {folder}" if folder is not None else "the tokenizer files"
    family = token_family(added, config, where) or LLADA_8B_FAMILY
    defaults = _DEFAULTS[family]
    mask_token, (eot_token, *_) = _MARKERS[family]
    is_8b = family == LLADA_8B_FAMILY

    def pick(config_key: str | None, token: str | None, default: int | None) -> int | None:
        if config_key is not None and config.get(config_key) is not None:
            value = config[config_key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"config key '{config_key}' must be an integer token id, got {value!r}"
                )
            return value
        if token is None:
            return None
        if token in added:
            return added[token]
        if added:
            # The model ships a tokenizer, and the token is not in it.
            return None
        if default is not None and vocab is not None and default < vocab:
            return default
        return None

    mask_id = pick("mask_token_id", mask_token, defaults.mask_id)
    eos_id = pick("eos_token_id", EOS_TOKEN, defaults.eos_id)
    if mask_id is None or eos_id is None:
        missing, token = (
            ("mask_token_id", mask_token) if mask_id is None else ("eos_token_id", EOS_TOKEN)
        )
        raise UnknownSpecialTokenError(
            f"cannot tell the {missing} of this model: config.json has no '{missing}' and the "
            f"tokenizer files declare no {token}. Add '{missing}' to config.json.",
            missing,
        )
    pad_id = pick("pad_token_id", EOS_TOKEN, None)
    tokens = SpecialTokens(
        mask_id=mask_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        bos_id=pick(None, BOS_TOKEN, defaults.bos_id),
        eot_id=pick(None, eot_token, defaults.eot_id),
        start_header_id=pick(None, START_HEADER_TOKEN if is_8b else None, defaults.start_header_id),
        end_header_id=pick(None, END_HEADER_TOKEN if is_8b else None, defaults.end_header_id),
    )
    if vocab is not None:
        # An id the embedding has no row for would only fail later, inside a forward pass.
        strings = {
            "mask_id": mask_token,
            "eos_id": EOS_TOKEN,
            "pad_id": EOS_TOKEN,
            "bos_id": BOS_TOKEN,
            "eot_id": eot_token,
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
                source = "LLaDA's default" if is_8b else "LLaDA-MoE's default"
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
