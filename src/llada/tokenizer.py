"""Tokenizers: loading from a checkpoint folder, the built-in chat templates (LLaDA-8B's and
LLaDA-MoE's), batch encoding, and training a byte-level BPE tokenizer with the special tokens of
either family for small models.

transformers is used for tokenization only, and imported on first use. Chat templates come
from the checkpoint folder, so they are untrusted: they are rendered here, in jinja2's
immutable sandbox, with bounds on time, output size and the size of what `*` and `**` build.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .tokens import (
    BOS_TOKEN,
    END_HEADER_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    LLADA_8B_FAMILY,
    LLADA_MOE_FAMILY,
    MASK_TOKEN,
    MOE_MASK_TOKEN,
    ROLE_CLOSE_TOKEN,
    ROLE_END_TOKEN,
    ROLE_OPEN_TOKEN,
    START_HEADER_TOKEN,
    TokenFamily,
    _json_object,
    token_family,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The chat template of GSAI-ML/LLaDA-8B-Instruct's tokenizer_config.json, verbatim. Its quirks
# are kept on purpose: BOS comes from the template, and the assistant header is always appended.
LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)

# The system text that LLaDA-MoE and LLaDA 2.x prompts carry when the chat has no system turn
# (inclusionAI/dInfer's LLaDA-MoE scripts, SGLang's LLaDA2 example). A system turn's text is
# written before it, on its own line, as the chat template of inclusionAI's Ling 2.0 models (the
# same tokenizer) does; that LLaDA-MoE's own template does the same is not verified.
LLADA_MOE_SYSTEM_DEFAULT = "detailed thinking off"

# Our chat template for the llada-moe token family (LLaDA-MoE-7B-A1B, LLaDA 2.x), used when such
# a checkpoint ships none. Every turn is `<role>NAME</role>text<|role_end|>` with the names
# SYSTEM, HUMAN and ASSISTANT; the chat opens with a system turn that ends in
# LLADA_MOE_SYSTEM_DEFAULT; the text is not trimmed; `add_generation_prompt` is honoured.
# One user turn renders as `<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>
# {q}<|role_end|><role>ASSISTANT</role>`.
LLADA_MOE_CHAT_TEMPLATE = (
    "{% set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} %}"
    "{% set turns = messages %}"
    "<role>SYSTEM</role>"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n' }}{% set turns = messages[1:] %}"
    "{% endif %}" + LLADA_MOE_SYSTEM_DEFAULT + "<|role_end|>"
    "{% for message in turns %}"
    "{% if message['role'] not in names %}"
    "{{ raise_exception('the role ' + message['role'] + ' is not one of system, user, assistant') }}"
    "{% endif %}"
    "{{ '<role>' + names[message['role']] + '</role>' + message['content'] + '<|role_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)

# The built-in template of each token family.
BUILTIN_CHAT_TEMPLATES: dict[str, str] = {
    LLADA_8B_FAMILY: LLADA_CHAT_TEMPLATE,
    LLADA_MOE_FAMILY: LLADA_MOE_CHAT_TEMPLATE,
}

# The files that make up a tokenizer in a checkpoint folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# Special tokens of a tokenizer trained here, in id order (ids 0..5), per token family.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN)
MOE_SPECIAL_TOKENS = (
    BOS_TOKEN,
    EOS_TOKEN,
    MOE_MASK_TOKEN,
    ROLE_OPEN_TOKEN,
    ROLE_CLOSE_TOKEN,
    ROLE_END_TOKEN,
)
_FAMILY_SPECIAL_TOKENS = {LLADA_8B_FAMILY: SPECIAL_TOKENS, LLADA_MOE_FAMILY: MOE_SPECIAL_TOKENS}
_FAMILY_MASK_TOKEN = {LLADA_8B_FAMILY: MASK_TOKEN, LLADA_MOE_FAMILY: MOE_MASK_TOKEN}


def load_tokenizer(path: str | os.PathLike | Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder (tokenizer.json + tokenizer_config.json).

    `path` may also be a model returned by `load_model`, whose folder is then used. The files
    are checked first (`check_tokenizer_files`): a broken one gets a ValueError naming it.
    """
    folder = getattr(path, "checkpoint_folder", None) or path
    from .model.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.json; LLaDA tokenizers ship as tokenizer.json + "
            "tokenizer_config.json. Copy them from the original checkpoint folder."
        )
    check_tokenizer_files(folder)
    from transformers import PreTrainedTokenizerFast

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - any parse failure gets the same advice
        raise ValueError(
            f"the tokenizer files in {folder} cannot be loaded ({type(error).__name__}: "
            f"{_one_line(error)}); copy them from the original checkpoint, or pass --model with "
            "another folder"
        ) from None
    tokenizer.padding_side = "left"
    return tokenizer


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """Check the tokenizer files of a folder without loading transformers.

    tokenizer.json must parse as a tokenizer, tokenizer_config.json must be a JSON object, and
    a chat template (in tokenizer_config.json or chat_template.jinja) must compile in the
    sandbox and render a short conversation within the time bound. Raises ValueError naming
    the file; absent files are fine (a folder may hold weights only).
    """
    folder = Path(folder)
    tokenizer_json = folder / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer_json))
        except Exception as error:  # noqa: BLE001 - the library raises plain Exceptions
            raise ValueError(
                f"{tokenizer_json} is not a valid tokenizer file ({_one_line(error)}); copy the "
                "tokenizer files from the original checkpoint, or pass --model with another folder"
            ) from None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            _json_object(folder / name)
    for source, origin in _chat_templates(folder):
        template = compile_chat_template(source, origin)
        trial = [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "How are you?"},
        ]
        # A template may refuse these messages on purpose (raise_exception), e.g. for a role
        # it does not support: it ran, within its bounds, which is what is checked here.
        with contextlib.suppress(ChatTemplateRefusal):
            _render(template, {"messages": trial, **_token_strings(folder)}, origin)


def _token_strings(folder: Path) -> dict[str, Any]:
    """The variables a template sees besides the messages, as tokenizer_config.json gives them."""
    config_json = folder / "tokenizer_config.json"
    data = _json_object(config_json) if config_json.is_file() else {}
    strings: dict[str, Any] = {"add_generation_prompt": True}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = data.get(name)
        strings[name] = value.get("content") if isinstance(value, dict) else value
    return strings


def _chat_templates(folder: Path) -> Iterator[tuple[str, str]]:
    """(template source, where it comes from) for each chat template of a folder."""
    config_json = folder / "tokenizer_config.json"
    if config_json.is_file():
        value = _json_object(config_json).get("chat_template")
        origin = f"the chat_template of {config_json}"
        if isinstance(value, str):
            yield value, origin
        elif isinstance(value, list):
            # The multi-template form: [{"name": ..., "template": ...}, ...].
            for entry in value:
                if not isinstance(entry, dict) or not isinstance(entry.get("template"), str):
                    raise ChatTemplateError(f"{origin} has an entry without a 'template' string")
                yield entry["template"], f"{origin} ('{entry.get('name')}')"
        elif value is not None:
            raise ChatTemplateError(f"{origin} is neither a string nor a list of templates")
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            text = jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ChatTemplateError(f"{jinja_file} is not UTF-8 text") from None
        yield text, str(jinja_file)


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


def chat_template_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template `render_chat` uses for a tokenizer.

    The tokenizer's own template when it has one (for several named templates, the "default"
    one, as transformers picks it). Otherwise the built-in template of the tokenizer's token
    family (`llada.tokens.token_family` on its added tokens): LLaDA-MoE's `<role>` template
    when it declares `<|mask|>` (or, without a mask token, `<|role_end|>`), LLaDA-8B's
    otherwise. A tokenizer with the markers of both families and no template of its own is a
    `ChatTemplateError`: which format the model was trained on cannot be told.
    """
    source = tokenizer.chat_template
    if isinstance(source, dict):
        source = source.get("default")
    if source:
        return source
    name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
    get_added_vocab = getattr(tokenizer, "get_added_vocab", None)
    added = get_added_vocab() if callable(get_added_vocab) else {}
    try:
        family = token_family(added, where=f"the tokenizer {name}")
    except ValueError as error:
        raise ChatTemplateError(
            f"{error}; it has no chat template either: add a 'chat_template' to its "
            "tokenizer_config.json"
        ) from None
    return BUILTIN_CHAT_TEMPLATES[family or LLADA_8B_FAMILY]


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = True,
) -> str:
    """Render chat messages with the tokenizer's template, or the built-in one of its family.

    messages: [{"role": "user" | "assistant" | "system", "content": str}, ...]. The template is
    `chat_template_of(tokenizer)`. The result ends with the assistant header, ready for
    generation (LLaDA-8B's template writes it whatever `add_generation_prompt` says; templates
    that honour the flag, LLaDA-MoE's included, get it). The template runs sandboxed and
    bounded (`CHAT_TEMPLATE_SECONDS`); one that does not finish raises `ChatTemplateError`.
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
    source = chat_template_of(tokenizer)
    origin = f"the chat template of {getattr(tokenizer, 'name_or_path', None) or 'the tokenizer'}"
    context = {
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
        **{
            name: getattr(tokenizer, name, None)
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        },
    }
    return _render(compile_chat_template(source, origin), context, origin)


# Chat templates ------------------------------------------------------------------------------

# Bounds on rendering an untrusted template. Real templates render a chat in milliseconds and
# write a few KB; these stop a hostile one (nested loops, huge repetitions) in bounded time.
CHAT_TEMPLATE_SECONDS = 2.0
CHAT_TEMPLATE_MAX_CHARS = 20_000_000
_MAX_BUILT_ITEMS = 10_000_000


class ChatTemplateError(ValueError):
    """A chat template that is not valid, unsafe, or does not finish within its bounds."""


class ChatTemplateRefusal(ChatTemplateError):
    """The template itself refused the messages (its `raise_exception`)."""


class _Overrun(Exception):
    """Raised inside a template's frame when its time is up."""


def _make_environment():
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # `'x' * 10**10` or `2 ** 10**10` would run in C, out of reach of the time bound.
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if (
                        isinstance(sequence, (str, list, tuple))
                        and isinstance(count, int)
                        and len(sequence) * count > _MAX_BUILT_ITEMS
                    ):
                        raise ChatTemplateError(
                            f"builds a sequence of {len(sequence) * count} items with '*'"
                        )
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 256:
                raise ChatTemplateError(f"raises to the power {right}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: object) -> None:
        raise ChatTemplateRefusal(str(message))

    environment = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return environment


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    return _make_environment().from_string(source)


def compile_chat_template(source: str, origin: str = "the chat template"):
    """A sandboxed jinja2 template, or `ChatTemplateError` naming `origin`."""
    import jinja2

    try:
        return _compile(source)
    except (jinja2.TemplateError, RecursionError, MemoryError) as error:
        raise ChatTemplateError(
            f"{origin} is not a valid template ({_one_line(error)}); fix it, or remove it to "
            "use LLaDA's"
        ) from None


def _render(template, context: dict, origin: str) -> str:
    import jinja2

    chunks: list[str] = []
    size = 0
    try:
        with _time_bound(CHAT_TEMPLATE_SECONDS):
            for chunk in template.generate(**context):
                size += len(chunk)
                if size > CHAT_TEMPLATE_MAX_CHARS:
                    raise ChatTemplateError(
                        f"writes more than {CHAT_TEMPLATE_MAX_CHARS} characters"
                    )
                chunks.append(chunk)
    except ChatTemplateRefusal as error:
        raise ChatTemplateRefusal(f"{origin} refused these messages: {error}") from None
    except _Overrun:
        raise ChatTemplateError(
            f"{origin} did not finish within {CHAT_TEMPLATE_SECONDS:g} s (a runaway loop?); fix "
            "it, or remove it to use LLaDA's"
        ) from None
    except ChatTemplateError as error:
        raise ChatTemplateError(f"{origin} {error}; fix it, or remove it to use LLaDA's") from None
    except (jinja2.TemplateError, RecursionError, MemoryError) as error:
        raise ChatTemplateError(
            f"{origin} failed ({type(error).__name__}: {_one_line(error)}); fix it, or remove it "
            "to use LLaDA's"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as error:
        raise ChatTemplateError(
            f"{origin} failed on these messages ({type(error).__name__}: {_one_line(error)})"
        ) from None
    return "".join(chunks)


@contextlib.contextmanager
def _time_bound(seconds: float) -> Iterator[None]:
    """Raise `_Overrun` inside template code once `seconds` have passed.

    A line tracer is attached to the frames of compiled templates only (their file name is
    `<template>`), so a loop in a template is interrupted however it is nested, while other
    code runs untraced. The previous tracer (a debugger, coverage) is restored afterwards.
    """
    deadline = time.monotonic() + seconds

    def line_tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Overrun
        return line_tracer

    def call_tracer(frame, event, arg):
        return line_tracer if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(call_tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


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
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | os.PathLike,
    min_frequency: int = 2,
    family: TokenFamily = LLADA_8B_FAMILY,
) -> Path:
    """Train a byte-level BPE tokenizer with the special tokens and chat template of a family.

    family: "llada-8b" (LLaDA's `<|mdm_mask|>`, headers and `<|eot_id|>`, `SPECIAL_TOKENS`) or
    "llada-moe" (LLaDA-MoE's `<|mask|>`, `<role>`, `</role>` and `<|role_end|>`,
    `MOE_SPECIAL_TOKENS`); the special tokens get ids 0..5. Writes tokenizer.json and
    tokenizer_config.json (the official layout) to output_dir; tokenizer_config.json names the
    bos, eos, pad (= eos, as LLaDA pads) and mask tokens, so `AutoTokenizer` gives `mask_token`.
    With no texts, the result is a pure byte tokenizer (256 byte tokens plus the special tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if family not in _FAMILY_SPECIAL_TOKENS:
        raise ValueError(
            f"family must be one of {', '.join(map(repr, _FAMILY_SPECIAL_TOKENS))}, got {family!r}"
        )
    special_tokens = _FAMILY_SPECIAL_TOKENS[family]
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be at least {minimum} (256 bytes + {len(special_tokens)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
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
        for token in special_tokens
    }
    config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "chat_template": BUILTIN_CHAT_TEMPLATES[family],
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "mask_token": _FAMILY_MASK_TOKEN[family],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(output / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return output
