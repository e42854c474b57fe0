"""The server's metrics, kept and rendered by prometheus_client.

Every app has its own `CollectorRegistry` (`Metrics.registry`), so several apps in one process
(tests, a tensor-parallel rank) never share or collide on a series. The scheduler thread and the
event loop update the metrics through the small `Metrics` façade (`inc`, `set`, `observe`, by
metric name); prometheus_client's metrics are thread-safe. `/metrics` renders the registry in
the format the scraper asks for (`render`, prometheus_client's `choose_encoder`: the Prometheus
text format 0.0.4 by default, OpenMetrics on request). Counters also show a `_created` series
(when they were created), as prometheus_client writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the server's /metrics needs prometheus_client: pip install 'llada-kit[serve]'"
    ) from error

# The content type of the default rendering (the Prometheus text format, version 0.0.4).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Upper bounds of the batch-size histogram (rows per sampler call).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Upper bounds (seconds) of the request latency histogram: from a /health answer to a long
# answer waiting behind a full queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Upper bounds (seconds) of the time to the first streamed chunk and of the queue wait.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Upper bounds of the denoising steps per row (a canvas needs up to one step per token).
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# name -> (kind, help, label names), in the order /metrics shows them. A counter's name is the
# name of its sample (with `_total`).
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "llada_requests_total": (
        "counter",
        "HTTP requests answered, by endpoint and status code.",
        ("endpoint", "status"),
    ),
    "llada_request_duration_seconds": (
        "histogram",
        "Time from a request's arrival to the end of its response (streams included), by "
        "endpoint and status class (2xx, 4xx, 5xx).",
        ("endpoint", "status_class"),
    ),
    "llada_time_to_first_chunk_seconds": (
        "histogram",
        "Streamed requests: time from the request's arrival to its first chunk of answer text "
        "(or to its finish chunk, for an empty answer).",
        (),
    ),
    "llada_queue_wait_seconds": (
        "histogram",
        "Per row (one prompt): time from entering the queue to the start of its sampler call.",
        (),
    ),
    "llada_row_denoise_steps": (
        "histogram",
        "Per row (one prompt): denoising steps of its sampler call until its answer was "
        "complete, its client left or the call ended.",
        (),
    ),
    "llada_batch_size": ("histogram", "Rows per sampler call.", ()),
    "llada_queue_depth": ("gauge", "Requests waiting for the model.", ()),
    "llada_queue_capacity": ("gauge", "Requests that may wait before new ones get a 429.", ()),
    "llada_running_rows": (
        "gauge",
        "Rows of the running sampler call still wanted by a client.",
        (),
    ),
    "llada_batches_total": ("counter", "Sampler calls run.", ()),
    "llada_batch_seconds_total": ("counter", "Time spent in sampler calls.", ()),
    "llada_denoise_steps_total": ("counter", "Denoising steps run (all sampler calls).", ()),
    "llada_forward_passes_total": (
        "counter",
        "Model forward passes run (all sampler calls).",
        (),
    ),
    "llada_prompt_tokens_total": ("counter", "Prompt tokens of the rows that were run.", ()),
    "llada_completion_tokens_total": (
        "counter",
        "Answer tokens returned (up to the first EOS/EoT), summed over requests.",
        (),
    ),
    "llada_rows_cancelled_total": (
        "counter",
        "Rows dropped because their client went away, by where they were (queued, running).",
        ("where",),
    ),
    "llada_rows_left_early_total": (
        "counter",
        "Rows that left a sampler call before their answer was finished (client gone, "
        "max_tokens or a stop string reached), sparing the work of their remaining steps.",
        (),
    ),
    "llada_rejected_total": (
        "counter",
        "Requests refused before running, by reason.",
        ("reason",),
    ),
}

# Labelled series shown as 0 from the start, so that rates and differences work from the first
# scrape (series without labels always are).
INITIAL_SERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("llada_rows_cancelled_total", {"where": "queued"}),
    ("llada_rows_cancelled_total", {"where": "running"}),
    ("llada_rejected_total", {"reason": "queue_full"}),
    ("llada_rejected_total", {"reason": "stopping"}),
)


def status_class(status: int) -> str:
    """'2xx' for 200, '4xx' for 499, and so on."""
    return f"{status // 100}xx"


class Metrics:
    """The server's metrics in a registry of their own; thread-safe.

    batch_size_buckets: upper bounds of the batch-size histogram.
    """

    def __init__(self, batch_size_buckets: Sequence[int] = BATCH_SIZE_BUCKETS) -> None:
        self.registry = CollectorRegistry()
        buckets = {
            "llada_request_duration_seconds": LATENCY_BUCKETS,
            "llada_time_to_first_chunk_seconds": WAIT_BUCKETS,
            "llada_queue_wait_seconds": WAIT_BUCKETS,
            "llada_row_denoise_steps": STEP_BUCKETS,
            "llada_batch_size": tuple(batch_size_buckets),
        }
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        for name, (kind, help_text, labels) in METRICS.items():
            common = {"labelnames": labels, "registry": self.registry}
            if kind == "counter":
                metric = Counter(name, help_text, **common)
            elif kind == "gauge":
                metric = Gauge(name, help_text, **common)
            else:
                metric = Histogram(name, help_text, buckets=buckets[name], **common)
            self._metrics[name] = metric
        for name, labels in INITIAL_SERIES:
            self._metrics[name].labels(**labels)

    def _series(self, name: str, labels: dict[str, str]):
        metric = self._metrics[name]
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add `value` to the counter `name`."""
        self._series(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set the gauge `name`."""
        self._series(name, labels).set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Count `value` in the histogram `name`."""
        self._series(name, labels).observe(value)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered HTTP request: its count by status and its latency by status class."""
        self.inc("llada_requests_total", endpoint=endpoint, status=str(status))
        self.observe(
            "llada_request_duration_seconds",
            seconds,
            endpoint=endpoint,
            status_class=status_class(status),
        )

    def observe_batch_size(self, size: int) -> None:
        self.observe("llada_batch_size", size)

    def get(self, name: str, **labels: str) -> float:
        """The current value of one sample (0 when it was never touched), e.g.
        get('llada_batches_total') or get('llada_batch_size_count')."""
        value = self.registry.get_sample_value(name, {k: str(v) for k, v in labels.items()})
        return 0.0 if value is None else value

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type): every metric in the format the Accept header `accept` asks
        for (prometheus_client's choice: text 0.0.4 unless OpenMetrics is accepted)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, read with prometheus_client's parser; labels
    in sorted order, values escaped as in the text format (for tests and scripts)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples
