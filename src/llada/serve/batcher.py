"""The request scheduler: one thread that runs the sampler for queued requests, in batches.

Requests wait in a bounded FIFO queue. Whenever the model is free, the scheduler takes the
oldest waiting request and every other waiting request whose sampler settings it can share a
call with, up to `max_batch_size`, left-pads their prompts into one batch and runs `denoise`
once for all of them. Sharing needs the settings that shape the forward passes and the block
loop to be equal (block length, steps per block, guidance, the preset's cache and commit rule:
`shared_settings`); the canvas length (in whole blocks: a shorter one ends early, its tail
masked out of attention), temperature, remasking, the commit threshold and the seed are per row
(`denoise` takes them per row; a seeded row draws from its own generator, so its answer is
the one it gets alone). LLaDA 2.x's block sampler takes one setting per call: its requests
share a call only with identical settings, and a seeded one runs alone, as every request did
with `mixed_batches=False`. Requests that arrive while the model is busy share the next call;
with the fast presets' early stop, rows whose answer has ended leave the batch early.

The scheduler watches the loop through its per-step events (it never re-implements it). After
each step, a row whose next block of answer tokens has become final (a block completed, or the
row finished) sends the newly final text to its client. A row whose client has gone away, or
whose answer is complete for its client (max_tokens reached, a stop string seen), is no longer
followed and leaves the sampler call at the next step (`denoise(abandoned=...)`), so the other
rows go on with less work; when no row is wanted any more the call is stopped at that step.

A sampler call that fails, or that runs more steps than its canvas can need (a loop that
commits nothing, e.g. on non-finite model outputs), fails its own requests with a clear error
and the scheduler goes on with the next batch. `stalled_for()` tells how long the sampler has
made no progress while requests wait or run, which /health reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..sampling.config import BlockDecodeConfig, DecodeConfig, GenerateConfig, shared_settings
from ..sampling.events import StepEvent
from ..tokenizer import left_pad
from .lockstep import seeded_denoise
from .metrics import Metrics

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests already; the client should retry later."""


class ServerStopping(Exception):
    """The scheduler is shutting down and takes no more requests."""


class SamplerStuck(RuntimeError):
    """A sampler call ran more steps than its canvas can need without finishing."""


def step_limit(config: GenerateConfig, decode: DecodeConfig | BlockDecodeConfig) -> int:
    """Steps a sampler call may take at most: the schedule's steps, or one per answer position
    for the rules that commit at least one token per step, whichever is more (their sum, to be
    safe); a call past it is stuck. LLaDA 2.x: per block (the answer spans at most
    gen_length / block_length + 1 of them) one step per position, 2.1's post steps, and the
    event that ends the block."""
    if isinstance(decode, BlockDecodeConfig):
        blocks = config.gen_length // config.block_length + 2
        return blocks * (config.block_length + decode.max_post_steps + 2)
    return config.steps + config.gen_length


@dataclass
class Update:
    """What a client is sent after a step.

    text: the text that became final since the previous update (a delta).
    completion_tokens: answer tokens so far, up to the first EOS/EoT and at most max_tokens.
    finished: this is the job's last update.
    finish_reason: 'stop' (EOS/EoT or a stop string) or 'length' (max_tokens reached), when
        finished.
    error: set (with finished) when the sampler failed; the text is then incomplete.
    stopping: the error is the server's shutdown (the client may retry elsewhere or later),
        not a failed sampler call.
    """

    text: str
    completion_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    stopping: bool = False


@dataclass(eq=False)
class Job:
    """One prompt to answer, with its sampler settings and where its updates go.

    sink: called from the scheduler thread with each `Update`; it must not block.
    max_tokens: answer tokens the client wants at most (<= config.gen_length).
    stop: strings that end the answer; the text is cut before the first one.
    seed: if set, the row's random draws come from a generator seeded with it, so that the
        same request gives the same answer whatever else is queued.
    mixed: may share a sampler call with jobs whose per-row settings differ (`Batcher`).
    """

    prompt: list[int]
    config: GenerateConfig
    decode: DecodeConfig
    sink: Callable[[Update], None]
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    mixed: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The scheduler's bookkeeping.
    final_tokens: int = 0  # answer positions known to be final when last looked at
    sent: str = ""  # text sent so far
    done: bool = False  # no more updates will be sent
    enqueued_at: float = 0.0  # time.monotonic() when submitted (the queue-wait metric)

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a sampler call."""
        if self.mixed and isinstance(self.decode, DecodeConfig):
            return shared_settings(self.config, self.decode)
        if self.seed is not None:  # the block sampler draws from the global generator
            return (self.config, self.decode, self.seed, id(self))
        return (self.config, self.decode)


def _hold_back(text: str, stops: Sequence[str]) -> str:
    """The part of a not yet final text that is safe to send: without a trailing start of a
    stop string (the next tokens may complete it) or of a character whose bytes are split
    between tokens (decoded as U+FFFD)."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep].rstrip("\ufffd")


class Batcher:
    """Runs the sampler for submitted jobs on one background thread (see the module docstring).

    tokenizer_lock: held around every tokenizer call of this thread; share it with other threads
    that use the same tokenizer (a fast tokenizer must not be used by two threads at once).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        metrics: Metrics,
        *,
        max_queue: int,
        max_batch_size: int,
        batch_window_s: float = 0.0,
        tokenizer_lock: threading.Lock | None = None,
        denoise: Callable[..., Iterator[StepEvent]] = seeded_denoise,
    ) -> None:
        """denoise: the sampler call, `seeded_denoise`'s signature (`Lockstep.denoise` on rank
        0 of a tensor-parallel model)."""
        self.denoise = denoise
        self.model = model
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self._special = model.special_tokens
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stopped_cleanly = True  # after stop(): the scheduler thread ended in time
        self._progress_at = time.monotonic()  # when the sampler last made progress
        metrics.set("llada_queue_capacity", max_queue)
        metrics.set("llada_queue_depth", 0)
        metrics.set("llada_running_rows", 0)

    # -- the event loop's side ----------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="llada-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, end the running sampler call at its next step, and tell every
        waiting or running job that the server stopped."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
            thread = self._thread
        for job in waiting:
            self._fail(job, "the server is shutting down", stopping=True)
        if thread is not None:
            thread.join(timeout)
        self.stopped_cleanly = thread is None or not thread.is_alive()
        self._thread = None
        self.metrics.set("llada_queue_depth", 0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def thread_ok(self) -> bool:
        """The scheduler thread is running, or has not been started yet."""
        thread = self._thread
        return thread is None or thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Taking jobs, and the scheduler thread (once started) is running."""
        return not self._stopping and self.thread_ok

    def stalled_for(self) -> float:
        """Seconds since the sampler last made progress (a token committed, a row or a call
        ended), while requests wait or run; 0 when there is no work."""
        with self._cond:
            if not self._waiting and not self._running:
                return 0.0
            return time.monotonic() - self._progress_at

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue `jobs` (all or none). Raises `QueueFull` or `ServerStopping`."""
        with self._cond:
            if self._stopping:
                raise ServerStopping("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            if not self._waiting and not self._running:
                self._progress_at = time.monotonic()  # idle time is no stall
            now = time.monotonic()
            for job in jobs:
                job.enqueued_at = now
            self._waiting.extend(jobs)
            self.metrics.set("llada_queue_depth", len(self._waiting))
            self._cond.notify_all()
        self.start()

    def cancel(self, job: Job) -> None:
        """The client of `job` has gone: drop it from the queue, or stop following its row
        (the sampler call stops at its next step if no other row is wanted)."""
        job.cancelled.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
                self.metrics.set("llada_queue_depth", len(self._waiting))
                self.metrics.inc("llada_rows_cancelled_total", where="queued")

    # -- the scheduler thread -----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                idle = not self._waiting
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            if idle and self.batch_window_s > 0:
                # The model was free: give requests sent at about the same time a moment to
                # join this batch.
                time.sleep(self.batch_window_s)
            with self._cond:
                batch = self._take_batch()
                self._running = batch
                self._progress_at = time.monotonic()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except SamplerStuck as error:
                logger.error("sampler call stopped: %s", error)
                for job in batch:
                    self._fail(job, f"generation failed: {error}")
            except Exception as error:  # the server must outlive a failed sampler call
                logger.exception("sampler call failed")
                for job in batch:
                    self._fail(job, f"generation failed: {type(error).__name__}: {error}")
            finally:
                with self._cond:
                    self._running = []
                    self._progress_at = time.monotonic()
                self.metrics.set("llada_running_rows", 0)

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job and the next waiting jobs with its settings (under the lock)."""
        if not self._waiting:
            return []
        key = self._waiting[0].key
        batch = [job for job in self._waiting if job.key == key][: self.max_batch_size]
        self._waiting = [job for job in self._waiting if job not in batch]
        self.metrics.set("llada_queue_depth", len(self._waiting))
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        # The settings of the job with the longest canvas (the call runs its blocks); the
        # canvas, temperature, remasking, threshold and seed are per row.
        longest = max(batch, key=lambda job: job.config.gen_length)
        config, decode = longest.config, longest.decode
        configs: GenerateConfig | list[GenerateConfig] = config
        decodes: DecodeConfig | BlockDecodeConfig | list[DecodeConfig] = decode
        if len({(job.config, job.decode) for job in batch}) > 1:
            configs, decodes = [job.config for job in batch], [job.decode for job in batch]
        seeds = [job.seed for job in batch]
        ids, attention_mask = left_pad([job.prompt for job in batch], self._special.pad_id)
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the plain (faster) attention path
        width = ids.shape[1]
        self.metrics.inc("llada_batches_total")
        self.metrics.observe_batch_size(len(batch))
        self.metrics.inc("llada_prompt_tokens_total", sum(len(job.prompt) for job in batch))
        self.metrics.set("llada_running_rows", len(batch))
        now = time.monotonic()
        for job in batch:
            self.metrics.observe("llada_queue_wait_seconds", now - job.enqueued_at)
        started = time.perf_counter()
        forward_passes = 0
        event = None
        # Rows whose request is over (answered, or its client gone) leave the sampler call at
        # the next step, so the rest of the batch goes on with less work.
        finished_rows = [False] * len(batch)  # as of the last event seen
        left_early: set[int] = set()
        limit = step_limit(config, decode)
        block_family = isinstance(decode, BlockDecodeConfig)
        steps = 0
        ended_at: list[int | None] = [None] * len(batch)  # the step each row's answer ended
        progress = (config.gen_length * len(batch), 0)  # (masked answer positions, finished)

        def abandoned() -> set[int]:
            gone = {row for row, job in enumerate(batch) if job.done or job.cancelled.is_set()}
            for row in gone - left_early:
                if not finished_rows[row]:
                    left_early.add(row)
                    self.metrics.inc("llada_rows_left_early_total")
            return gone

        # Unseeded rows (and LLaDA 2.x's block sampler) draw from the global generator; this
        # thread is its only user here.
        events = self.denoise(
            self.model, ids, attention_mask, configs, decodes, abandoned=abandoned, seeds=seeds
        )
        try:
            for event in events:
                self.metrics.inc("llada_denoise_steps_total")
                self.metrics.inc(
                    "llada_forward_passes_total", event.forward_passes - forward_passes
                )
                forward_passes = event.forward_passes
                finished_rows[:] = event.finished.tolist()
                answers = event.tokens[:, width:]  # (B, gen_length)
                is_masked = answers == self._special.mask_id
                now = (int(is_masked.sum()), int(event.finished.sum()))
                if now[0] < progress[0] or now[1] > progress[1]:
                    self._progress_at = time.monotonic()
                progress = now
                steps += 1
                if steps > limit:
                    raise SamplerStuck(
                        f"the sampler made no progress: {steps} steps for an answer canvas of "
                        f"{config.gen_length} tokens (the model may output NaN or infinity)"
                    )
                # Answer positions before the first mask are final (LLaDA never remasks);
                # LLaDA 2.x's may be edited until its block ends: those before the block the
                # step worked on are final (its proposals are the non-NaN confidences).
                if block_family:
                    current = ~event.confidence[:, width:].isnan()
                    leading = torch.where(current.any(-1), current.int().argmax(-1), -1)
                else:
                    leading = torch.where(
                        is_masked.any(-1), is_masked.int().argmax(-1), config.gen_length
                    )
                for row, job in enumerate(batch):
                    if job.done:
                        continue
                    if job.cancelled.is_set():
                        job.done = True
                        self.metrics.inc("llada_rows_cancelled_total", where="running")
                        continue
                    finished = bool(event.finished[row])
                    if finished:
                        final = job.config.gen_length
                    elif block_family:  # -1: this step did not work on the row
                        final = int(leading[row])
                    else:
                        blocks = int(leading[row]) // config.block_length
                        # A shorter canvas ends before the call's: its EOS tail is not its answer.
                        final = min(blocks * config.block_length, job.config.gen_length)
                    if final > job.final_tokens:
                        self._advance(job, answers[row, :final].tolist(), finished)
                for row, job in enumerate(batch):
                    if ended_at[row] is None and (job.done or job.cancelled.is_set()):
                        ended_at[row] = steps
                wanted = sum(not job.done for job in batch)
                self.metrics.set("llada_running_rows", wanted)
                if self._stopping:
                    for job in batch:
                        self._fail(job, "the server is shutting down", stopping=True)
                    break
                if wanted == 0:
                    break
        finally:
            events.close()
            self.metrics.inc("llada_batch_seconds_total", time.perf_counter() - started)
            for ended in ended_at:
                self.metrics.observe("llada_row_denoise_steps", steps if ended is None else ended)
        for row, job in enumerate(batch):  # the sampler ended; nothing may be left hanging
            if not job.done and not job.cancelled.is_set() and event is not None:
                answer = event.tokens[row, width : width + job.config.gen_length]
                self._advance(job, answer.tolist(), True)

    def _advance(self, job: Job, final_ids: list[int], finished: bool) -> None:
        """Send `job` the text of its answer's final tokens `final_ids` that is new."""
        job.final_tokens = len(final_ids)
        ids, reason = final_ids, None
        stop_at = next((i for i, t in enumerate(ids) if t in self._special.stop_ids), None)
        if stop_at is not None and stop_at <= job.max_tokens:
            ids, reason = ids[:stop_at], "stop"
        elif len(ids) >= job.max_tokens or finished:
            ids, reason = ids[: job.max_tokens], "length"
        with self.tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in job.stop) if i >= 0]
        if found:
            text, reason = text[: min(found)], "stop"
        if reason is None:
            text = _hold_back(text, job.stop)
        if text.startswith(job.sent):
            delta = text[len(job.sent) :]
            job.sent = text
        else:  # a decoder that rewrites earlier text; the stream keeps what it sent
            logger.warning("decoded text of a longer prefix does not extend the shorter one")
            delta = ""
        ended = reason is not None
        if ended:
            job.done = True
            self.metrics.inc("llada_completion_tokens_total", len(ids))
        if delta or ended:
            self._send(job, Update(delta, len(ids), ended, reason))

    def _fail(self, job: Job, message: str, stopping: bool = False) -> None:
        if job.done:
            return
        job.done = True
        self._send(job, Update("", 0, True, None, error=message, stopping=stopping))

    def _send(self, job: Job, update: Update) -> None:
        try:
            job.sink(update)
        except Exception:  # e.g. the event loop has closed: the client is gone
            logger.debug("could not deliver an update", exc_info=True)
            job.done = True
            job.cancelled.set()
