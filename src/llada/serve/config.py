"""Server settings: one validated, frozen dataclass; `llada serve` flags derive from it.

The sampler's defaults are not here: they are a `GenerateConfig` and a preset name, given to
`create_app` next to this (and overridable per request).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..settings import require_non_negative_numbers, require_positive_ints


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the OpenAI-compatible server.

    host: interface to bind; the loopback default keeps the server private to this machine.
    port: TCP port to listen on.
    api_key: if set, every /v1 request needs `Authorization: Bearer <key>`. Prefer the
        LLADA_API_KEY environment variable, which `llada serve` reads: a key given as
        --api-key is visible to every user of the machine (`ps`).
    served_model_name: the model id clients ask for (default: the model folder's name).
    max_queue: requests waiting for the model at most; more are refused with 429.
    max_batch_size: rows (prompts) in one sampler call at most.
    batch_window_ms: when the model is idle, wait this long after a request arrives for others
        to join its batch (requests arriving while it is busy join the next batch anyway).
    max_prompt_tokens: tokens in one prompt at most; longer prompts get a 400.
    max_gen_length: answer tokens one request may ask for at most (max_tokens / gen_length).
    max_body_bytes: request bodies larger than this get a 413.
    retry_after: seconds a refused client is told to wait (the Retry-After header of a 429).
    allowed_hosts: comma-separated names clients may reach the server by (the Host header;
        '*' allows any), so that a web page cannot drive it through DNS rebinding. Default:
        the loopback names (localhost, 127.0.0.1, ::1) when bound to loopback, else any.
    request_read_timeout: seconds a client has to send a request's headers and body; a slower
        one gets a 408 and is disconnected (slowloris).
    keep_alive_timeout: seconds an idle keep-alive connection stays open.
    max_connections: open connections at most; more are answered 503 and closed at once.
    shutdown_grace: seconds that requests in flight get to finish after SIGTERM/SIGINT (no new
        connections are accepted meanwhile); the rest are then cancelled and the server exits.
    stall_timeout: seconds without progress of the sampler, while requests wait or run, after
        which /health answers 503 (a stuck scheduler).
    batch_invariant: every answer is exactly what its request gets alone, whatever else shares
        its sampler call (`DecodeConfig.batch_invariant`: each prompt length runs as its own
        unpadded batch). Off by default, as in other servers: in bfloat16, left padding changes
        a few answers in a hundred (float32 models are batch invariant without it), and the
        option costs about 1.2-2.4x the time of a mixed-length batch on CPU (BENCHMARKS.md).
    mixed_batches: requests whose sampler settings differ only in temperature, remasking, the
        commit threshold (factor, entropy bound) or the seed share sampler calls (LLaDA-8B and
        LLaDA-MoE; each row keeps its own settings, and a seeded row draws from its own
        generator, so its answer is the one it gets alone). Off: only requests with identical
        settings share a call and a seeded request runs alone (the scheduler before this
        option; for comparisons).
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
    allowed_hosts: str | None = None
    request_read_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 256
    shutdown_grace: float = 10.0
    stall_timeout: float = 120.0
    batch_invariant: bool = False
    mixed_batches: bool = True

    def __post_init__(self) -> None:
        require_positive_ints(
            self,
            "max_queue",
            "max_batch_size",
            "max_prompt_tokens",
            "max_gen_length",
            "max_body_bytes",
            "retry_after",
            "max_connections",
        )
        require_non_negative_numbers(
            self,
            "batch_window_ms",
            "request_read_timeout",
            "keep_alive_timeout",
            "shutdown_grace",
            "stall_timeout",
        )
        for name in ("request_read_timeout", "keep_alive_timeout", "stall_timeout"):
            if getattr(self, name) == 0:
                raise ValueError(f"{name} must be more than 0 seconds")
        for name in ("batch_invariant", "mixed_batches"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an integer, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; leave it unset to serve without a key")
        if self.allowed_hosts is not None and not self.allowed_hosts.replace(",", "").strip():
            raise ValueError("allowed_hosts is empty; name at least one host, or '*' for any")

    def host_allow_list(self) -> frozenset[str] | None:
        """The Host names a request may carry (lowercase, no port), or None for any."""
        if self.allowed_hosts is None:
            if _is_loopback(self.host):
                return frozenset({"localhost", "127.0.0.1", "::1", self.host.lower()})
            return None
        names = {host_name(n) for n in self.allowed_hosts.split(",") if n.strip()}
        return None if "*" in names else frozenset(names)


def host_name(value: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
