"""Request bodies of the OpenAI-compatible endpoints, and their translation into sampler settings.

Bodies are validated strictly (no "5" for 5, no unknown fields) so that a typo in a LLaDA
extra field is an error, not a silently ignored setting. Every problem becomes a `RequestError`,
which the app turns into an OpenAI-style JSON error.

Sampler settings per request (extra body fields next to the OpenAI ones): preset, steps,
block_length, gen_length, cfg_scale, remasking, threshold, and the OpenAI temperature (0, greedy,
when not given). A LLaDA 2.x model takes its own presets and, instead of cfg_scale and
remasking, top_k, editing_threshold, max_post_steps, eos_early_stop and the OpenAI top_p (its
sampler filters with them). How the answer length is chosen:

- Without `max_tokens` (or `max_completion_tokens`) and `gen_length`, the answer may fill what
  the model's context leaves after the prompt, in whole blocks, up to the server's
  max_gen_length (the answer still ends at its EOS; the fast presets stop there).
- `max_tokens` (or `max_completion_tokens`) caps the answer. The sampler's canvas is max_tokens
  rounded up to a multiple of block_length, and the answer is cut at max_tokens; when
  block_length is not given and max_tokens is smaller than the default block, the block is
  max_tokens (one block).
- `gen_length` asks for the canvas itself; it must then be a multiple of block_length (400
  otherwise, with the sampler's own message). Given with max_tokens, it must be >= max_tokens.
- `steps` defaults to the server's steps per answer token times the canvas length, rounded to a
  multiple of the number of blocks.
- Whatever fields set them, the canvas (gen_length, after rounding up to whole blocks), the
  block and the steps must each stay within the server's `max_gen_length`: a 400 names the
  field otherwise.

Numbers must be finite (no NaN, Infinity or 1e400), `seed` must fit in 64 bits, and every
string must be valid Unicode (no lone UTF-16 surrogates such as "\ud800"): a 400 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling.config import (
    BLOCK_PRESETS,
    PRESETS,
    BlockDecodeConfig,
    DecodeConfig,
    GenerateConfig,
    decode_preset,
)
from .config import ServeConfig

# OpenAI allows at most this many stop sequences.
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 200
# `seed` is a signed 64-bit integer, the range torch's generator takes.
SEED_RANGE = (-(2**63), 2**63 - 1)
CHAT_ROLES = ("system", "developer", "user", "assistant")


class RequestError(ValueError):
    """A client error: HTTP status, message, and the OpenAI error fields `param` and `code`.

    A ValueError, so that invalid server defaults read as a plain settings error in the CLI."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplerFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Sent by OpenAI clients and SDK defaults; they change nothing in the answer here, so they
    # are accepted and named in the X-LLaDA-Ignored-Fields response header (`ignored_fields`).
    store: bool | None = None
    parallel_tool_calls: bool | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    # LLaDA's sampler, as extra body fields.
    preset: str | None = None
    steps: int | None = Field(default=None, ge=1)
    gen_length: int | None = Field(default=None, ge=1)
    block_length: int | None = Field(default=None, ge=1)
    cfg_scale: float | None = Field(default=None, ge=0)
    remasking: Literal["low_confidence", "random"] | None = None
    threshold: float | None = None
    # LLaDA 2.x's block sampler (with top_p above).
    top_k: int | None = Field(default=None, ge=0)
    editing_threshold: float | None = None
    max_post_steps: int | None = Field(default=None, ge=0)
    eos_early_stop: bool | None = None

    def check_unsupported(self) -> None:
        """Refuse OpenAI options this server cannot honour rather than ignore them."""
        if self.n not in (None, 1):
            raise RequestError(400, "only n=1 is supported; send n requests instead", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise RequestError(400, f"{name} is not supported", name)
        if self.logit_bias:
            raise RequestError(400, "logit_bias is not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise RequestError(400, "stream_options needs stream=true", "stream_options")

    def ignored_fields(self) -> list[str]:
        """The fields this request set that the server accepts but does not use (no effect on
        the answer): OpenAI's bookkeeping fields."""
        return [
            name
            for name in ("user", "store", "parallel_tool_calls", "service_tier", "metadata")
            if getattr(self, name) is not None
        ]

    def stop_strings(self) -> tuple[str, ...]:
        stop = self.stop
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError(400, "stop must be a string or a list of strings", "stop")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise RequestError(400, f"stop takes at most {MAX_STOP_SEQUENCES} strings", "stop")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
            raise RequestError(
                400, f"stop strings must be 1 to {MAX_STOP_LENGTH} characters long", "stop"
            )
        return tuple(stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplerFields):
    """POST /v1/completions. prompt: a string, a list of strings (one choice each), a list of
    token ids, or a list of such lists."""

    prompt: Any
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise RequestError(400, "echo is not supported", "echo")
        if self.logprobs is not None:
            raise RequestError(400, "logprobs is not supported", "logprobs")
        if self.suffix is not None:
            raise RequestError(400, "suffix is not supported", "suffix")
        if self.best_of not in (None, 1):
            raise RequestError(400, "only best_of=1 is supported", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(_is_int(t) for t in prompt):
                return [list(prompt)]
            if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
                return [list(p) for p in prompt]
        raise RequestError(
            400,
            "prompt must be a string, a non-empty list of strings, a list of token ids, or a "
            "list of such lists",
            "prompt",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ChatMessage(_Body):
    role: str
    content: Any = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message text; content parts of type 'text' are joined."""
        content = self.content
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            for part in content
        ):
            return "".join(part["text"] for part in content)
        raise RequestError(
            400,
            f"messages[{index}].content must be a string or a list of text parts "
            "({'type': 'text', 'text': ...}); other content is not supported",
            f"messages.{index}.content",
        )


class ChatCompletionRequest(SamplerFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs:
            raise RequestError(400, "logprobs is not supported", "logprobs")
        if self.tools or self.tool_choice not in (None, "none"):
            raise RequestError(400, "tools are not supported", "tools")
        if self.response_format not in (None, {"type": "text"}):
            raise RequestError(400, "only response_format type 'text' is supported")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise RequestError(
                400, "max_tokens and max_completion_tokens differ; send one", "max_tokens"
            )

    def chat_messages(self) -> list[dict[str, str]]:
        """{'role', 'content'} dicts for the chat template ('developer' is rendered as
        'system')."""
        if not self.messages:
            raise RequestError(400, "messages is empty; send at least one message", "messages")
        out = []
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                raise RequestError(
                    400,
                    f"messages[{i}].role must be one of {list(CHAT_ROLES)}, got {message.role!r}",
                    f"messages.{i}.role",
                )
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": message.text(i)})
        return out


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _short_repr(value: object) -> str:
    """A bounded repr for error messages: a huge or deeply nested value is abbreviated."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    return _REPR.repr(value)


def find_lone_surrogate(body: object) -> str | None:
    """The path ('messages.0.content') of the first string, or object key, in a decoded JSON
    value that holds a lone UTF-16 surrogate (JSON's "\ud800" escapes decode to one; it is
    not text and cannot be encoded), or None. Iterative: the nesting may be deep."""
    stack: list[tuple[object, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _has_surrogate(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if _has_surrogate(key):
                    return path or "body"
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(value))
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_body(cls: type[_Body], body: object) -> Any:
    """Validate a decoded JSON body into `cls`, or raise a `RequestError` naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    where = find_lone_surrogate(body)
    if where is not None:
        raise RequestError(
            400,
            f"{where} holds a lone UTF-16 surrogate (an escape such as \\ud800 without its "
            "pair); send valid Unicode text",
            where,
        )
    try:
        return cls.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"unrecognized request argument: {param}"
        elif first["type"] == "missing":
            message = f"missing required argument: {param}"
        else:
            message = (
                f"invalid value for {param}: {first['msg']} (got {_short_repr(first['input'])})"
            )
        raise RequestError(400, message, param) from None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What the scheduler needs to know about a request's sampler settings."""

    config: GenerateConfig
    decode: DecodeConfig | BlockDecodeConfig
    max_tokens: int


# The request fields of each family's sampler that the other family's lacks.
_DENSE_ONLY = ("cfg_scale", "remasking")
_BLOCK_ONLY = ("top_k", "editing_threshold", "max_post_steps", "eos_early_stop")


def _decoding(
    request: SamplerFields,
    preset: str | DecodeConfig | BlockDecodeConfig,
    limits: ServeConfig,
    block_diffusion: bool,
) -> DecodeConfig | BlockDecodeConfig:
    """The request's decoding: its preset (else the server's) with its overrides."""
    presets = BLOCK_PRESETS if block_diffusion else PRESETS
    if request.preset is not None and request.preset not in presets:
        family = "LLaDA 2.x" if block_diffusion else "LLaDA-8B / LLaDA-MoE"
        raise RequestError(
            400,
            f"unknown preset {request.preset!r} for this {family} model; choose from "
            f"{sorted(presets)}",
            "preset",
        )
    name = request.preset or preset
    decode = decode_preset(name) if isinstance(name, str) else name
    if block_diffusion:
        for field in _DENSE_ONLY:
            if getattr(request, field) is not None:
                raise RequestError(
                    400, f"{field} is a LLaDA-8B sampler setting; this LLaDA 2.x model's block "
                    "sampler has no such option", field,
                )  # fmt: skip
        overrides = {
            field: getattr(request, field)
            for field in ("threshold", "top_p", *_BLOCK_ONLY)
            if getattr(request, field) is not None
        }
    else:
        for field in _BLOCK_ONLY:
            if getattr(request, field) is not None:
                raise RequestError(
                    400, f"{field} is a LLaDA 2.x sampler setting; this model's sampler has no "
                    "such option", field,
                )  # fmt: skip
        if request.top_p not in (None, 1, 1.0):
            raise RequestError(
                400, "top_p is not supported by the LLaDA-8B / LLaDA-MoE samplers", "top_p"
            )
        overrides = {} if request.threshold is None else {"threshold": request.threshold}
        if limits.batch_invariant:
            overrides["batch_invariant"] = True
    try:
        return dataclasses.replace(decode, **overrides)
    except ValueError as error:
        raise RequestError(400, str(error), str(error).split(" ", 1)[0]) from None


def resolve_sampling(
    request: SamplerFields,
    defaults: GenerateConfig,
    preset: str | DecodeConfig | BlockDecodeConfig,
    limits: ServeConfig,
    max_tokens: int | None = None,
    block_diffusion: bool = False,
    room: int | None = None,
    default_length: int | None = None,
) -> Sampling:
    """The sampler settings of a request: the server's defaults, overridden by the request
    (see the module docstring for how the answer length is chosen). preset: the server's
    decoding, a preset name or a config; block_diffusion: the model is LLaDA 2.x; room: the
    answer tokens the model's context leaves after the request's longest prompt (None:
    unknown); default_length: the answer budget without max_tokens or gen_length (None: the
    room, up to limits.max_gen_length)."""
    decode = _decoding(request, preset, limits, block_diffusion)

    max_tokens = max_tokens if max_tokens is not None else request.max_tokens
    param = "max_tokens" if max_tokens is not None else "gen_length"
    wanted = (
        max_tokens
        or request.gen_length
        or default_length
        or _default_length(defaults, limits, room)
    )
    if wanted > limits.max_gen_length:
        raise RequestError(
            400,
            f"{param} ({wanted}) is more than this server allows ({limits.max_gen_length})",
            param,
        )
    if request.block_length is not None and request.block_length > limits.max_gen_length:
        raise RequestError(
            400,
            f"block_length ({request.block_length}) is more than this server allows "
            f"({limits.max_gen_length})",
            "block_length",
        )
    if request.gen_length is not None:
        if request.gen_length > limits.max_gen_length:
            raise RequestError(
                400,
                f"gen_length ({request.gen_length}) is more than this server allows "
                f"({limits.max_gen_length})",
                "gen_length",
            )
        if wanted > request.gen_length:
            raise RequestError(
                400,
                f"max_tokens ({wanted}) is more than gen_length ({request.gen_length})",
                "max_tokens",
            )
        gen_length = request.gen_length
        block_length = request.block_length or min(defaults.block_length, gen_length)
    else:
        block_length = request.block_length or min(defaults.block_length, wanted)
        gen_length = math.ceil(wanted / block_length) * block_length
        if gen_length > limits.max_gen_length:
            # Only a block_length the request chose can round the canvas past the limit.
            raise RequestError(
                400,
                f"{param} ({wanted}) in whole blocks of block_length ({block_length}) is a "
                f"canvas of {gen_length} tokens, more than this server allows "
                f"({limits.max_gen_length}); ask for a block_length that divides {param}",
                "block_length",
            )
    if request.steps is not None:
        steps = request.steps
        if steps > limits.max_gen_length:
            raise RequestError(
                400,
                f"steps ({steps}) is more than this server allows ({limits.max_gen_length})",
                "steps",
            )
    else:
        # The server's steps per answer token, on this canvas, whole steps for every block.
        blocks = max(1, gen_length // block_length)
        per_token = defaults.steps / defaults.gen_length
        steps = blocks * max(1, round(gen_length * per_token / blocks))
        if steps > limits.max_gen_length:
            raise RequestError(
                400,
                f"this request's canvas ({gen_length} tokens in blocks of {block_length}) needs "
                f"{steps} steps at the server's steps per token, more than it allows "
                f"({limits.max_gen_length}); pass a smaller steps",
                "steps",
            )
    temperature = defaults.temperature if request.temperature is None else request.temperature
    try:
        config = dataclasses.replace(
            defaults,
            steps=steps,
            gen_length=gen_length,
            block_length=block_length,
            temperature=temperature,
            cfg_scale=defaults.cfg_scale if request.cfg_scale is None else request.cfg_scale,
            remasking=request.remasking or defaults.remasking,
        )
    except ValueError as error:
        raise RequestError(400, str(error), _field_named_in(str(error))) from None
    return Sampling(config, decode, min(wanted, gen_length))


def _default_length(defaults: GenerateConfig, limits: ServeConfig, room: int | None) -> int:
    """The answer budget of a request that names neither max_tokens nor gen_length, as OpenAI
    servers do: what the model's context leaves after the prompt, in whole blocks (the canvas
    must fit), up to the server's max_gen_length. A prompt that leaves no room gets one token
    (the context check then says what is wrong)."""
    limit = limits.max_gen_length if room is None else min(limits.max_gen_length, room)
    block = defaults.block_length
    return max(1, limit // block * block if limit >= block else limit)


def _field_named_in(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return first if first in {f.name for f in dataclasses.fields(GenerateConfig)} else None
