"""Server settings: one validated, frozen dataclass; `llada serve` flags derive from it.

The sampler's defaults are not here: they are a `GenerateConfig` and a preset name, given to
`create_app` next to this (and overridable per request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..settings import require_non_negative_numbers, require_positive_ints


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the OpenAI-compatible server.

    host: interface to bind; the loopback default keeps the server private to this machine.
    port: TCP port to listen on.
    api_key: if set, every /v1 request needs `Authorization: Bearer <key>`; `llada serve`
        reads the LLADA_API_KEY environment variable when the flag is not given.
    served_model_name: the model id clients ask for (default: the model folder's name).
    max_queue: requests waiting for the model at most; more are refused with 429.
    max_batch_size: rows (prompts) in one sampler call at most.
    batch_window_ms: when the model is idle, wait this long after a request arrives for others
        to join its batch (requests arriving while it is busy join the next batch anyway).
    max_prompt_tokens: tokens in one prompt at most; longer prompts get a 400.
    max_gen_length: answer tokens one request may ask for at most (max_tokens / gen_length).
    max_body_bytes: request bodies larger than this get a 413.
    retry_after: seconds a refused client is told to wait (the Retry-After header of a 429).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    served_model_name: str | None = None
    max_queue: int = 64
    max_batch_size: int = 16
    batch_window_ms: float = 5.0
    max_prompt_tokens: int = 2048
    max_gen_length: int = 512
    max_body_bytes: int = 1_000_000
    retry_after: int = 1

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            "max_queue",
            "max_batch_size",
            "max_prompt_tokens",
            "max_gen_length",
            "max_body_bytes",
            "retry_after",
        )
        require_non_negative_numbers(self, "batch_window_ms")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an integer, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; leave it unset to serve without a key")
