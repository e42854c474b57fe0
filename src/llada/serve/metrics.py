"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters, gauges and one histogram, all kept in memory behind one lock: the scheduler thread
and the event loop both update them, and /metrics renders them.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds of the batch-size histogram (rows per sampler call).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# name -> (type, help). Every metric the server reports, in the order /metrics shows them.
METRICS: dict[str, tuple[str, str]] = {
    "llada_requests_total": ("counter", "HTTP requests answered, by endpoint and status code."),
    "llada_request_duration_seconds": (
        "summary",
        "Time from request to the end of the response (streams included), by endpoint.",
    ),
    "llada_queue_depth": ("gauge", "Requests waiting for the model."),
    "llada_queue_capacity": ("gauge", "Requests that may wait before new ones get a 429."),
    "llada_running_rows": ("gauge", "Rows of the running sampler call still wanted by a client."),
    "llada_batches_total": ("counter", "Sampler calls run."),
    "llada_batch_size": ("histogram", "Rows per sampler call."),
    "llada_batch_seconds_total": ("counter", "Time spent in sampler calls."),
    "llada_denoise_steps_total": ("counter", "Denoising steps run (all sampler calls)."),
    "llada_forward_passes_total": ("counter", "Model forward passes run (all sampler calls)."),
    "llada_prompt_tokens_total": ("counter", "Prompt tokens of the rows that were run."),
    "llada_completion_tokens_total": (
        "counter",
        "Answer tokens returned (up to the first EOS/EoT), summed over requests.",
    ),
    "llada_rows_cancelled_total": (
        "counter",
        "Rows dropped because their client went away, by where they were (queued, running).",
    ),
    "llada_rows_left_early_total": (
        "counter",
        "Rows that left a sampler call before their answer was finished (client gone, "
        "max_tokens or a stop string reached), sparing the work of their remaining steps.",
    ),
    "llada_rejected_total": ("counter", "Requests refused before running, by reason."),
}

# Series shown as 0 from the start, so that rates and differences work from the first scrape.
INITIAL_SERIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("llada_batches_total", {}),
    ("llada_batch_seconds_total", {}),
    ("llada_denoise_steps_total", {}),
    ("llada_forward_passes_total", {}),
    ("llada_prompt_tokens_total", {}),
    ("llada_completion_tokens_total", {}),
    ("llada_rows_cancelled_total", {"where": "queued"}),
    ("llada_rows_cancelled_total", {"where": "running"}),
    ("llada_rows_left_early_total", {}),
    ("llada_rejected_total", {"reason": "queue_full"}),
    ("llada_rejected_total", {"reason": "stopping"}),
)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Metrics:
    """The server's counters and gauges; thread-safe."""

    def __init__(self, batch_size_buckets: Sequence[int] = BATCH_SIZE_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {name: {} for name in METRICS}
        self._buckets = tuple(batch_size_buckets)
        self._histogram = [0] * (len(self._buckets) + 1)  # the last one is +Inf
        self._histogram_sum = 0.0
        self._durations: dict[str, list[float]] = {}  # endpoint -> [sum of seconds, count]
        for name, labels in INITIAL_SERIES:
            self._values[name][self._key(labels)] = 0.0

    @staticmethod
    def _key(labels: dict[str, str]) -> Labels:
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][self._key(labels)] = float(value)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            requests = self._values["llada_requests_total"]
            key = (("endpoint", endpoint), ("status", str(status)))
            requests[key] = requests.get(key, 0.0) + 1
            total = self._durations.setdefault(endpoint, [0.0, 0.0])
            total[0] += seconds
            total[1] += 1

    def observe_batch_size(self, size: int) -> None:
        with self._lock:
            for i, bound in enumerate(self._buckets):
                if size <= bound:
                    self._histogram[i] += 1
                    break
            else:
                self._histogram[-1] += 1
            self._histogram_sum += size

    def get(self, name: str, **labels: str) -> float:
        """The current value of one series (0 when it was never touched)."""
        with self._lock:
            return self._values[name].get(self._key(labels), 0.0)

    def render(self) -> str:
        """All metrics as Prometheus text (HELP and TYPE lines, then the samples)."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in METRICS.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    lines.extend(self._render_histogram(name))
                elif kind == "summary":
                    for endpoint, (seconds, count) in sorted(self._durations.items()):
                        labels = _format_labels((("endpoint", endpoint),))
                        lines.append(f"{name}_sum{labels} {_format_value(seconds)}")
                        lines.append(f"{name}_count{labels} {_format_value(count)}")
                else:
                    for labels, value in sorted(self._values[name].items()):
                        lines.append(f"{name}{_format_labels(labels)} {_format_value(value)}")
        return "\n".join(lines) + "\n"

    def _render_histogram(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        bounds = [str(b) for b in self._buckets] + ["+Inf"]
        for bound, count in zip(bounds, self._histogram, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f"{name}_sum {_format_value(self._histogram_sum)}")
        lines.append(f"{name}_count {cumulative}")
        return lines


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, for tests and scripts (no type lines)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        samples[series] = float(value)
    return samples
