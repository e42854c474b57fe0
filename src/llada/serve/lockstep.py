"""One server over a tensor-parallel model: rank 0 serves HTTP, the other ranks follow its
sampler calls step for step.

A model split over ranks (`llada.parallel`) runs a forward only when every rank runs it: each
layer ends in an all-reduce. Under `torchrun ... llada serve --tensor-parallel`, rank 0 runs the
server and its scheduler (`Batcher`); ranks 1..W-1 run `Lockstep.follow`, a loop with no server.
For every sampler call rank 0 sends its inputs (the padded batch, the settings, the seeds), and
after every step the rows its scheduler abandoned (answered, or their client gone), so every
rank makes the same call and drops the same rows at the same step; when rank 0 stops iterating
early it says so. The sampler is deterministic given these (the logits agree on every rank
after each all-reduce, and the random draws come from generators seeded alike), so no tokens
travel: only these small messages, with `torch.distributed.broadcast_object_list` from rank 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence

import torch
import torch.distributed as dist

from ..sampling.config import BlockDecodeConfig
from ..sampling.events import StepEvent
from ..sampling.fast import denoise

logger = logging.getLogger(__name__)

_RUN, _STEP, _CLOSE, _STOP = "run", "step", "close", "stop"


class _Closed(Exception):
    """Rank 0 left the sampler call before its end."""


def seeded_denoise(
    model: torch.nn.Module,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config,
    decode,
    *,
    abandoned: Callable[[], Collection[int]] | None = None,
    seeds: Sequence[int | None] | None = None,
) -> Iterator[StepEvent]:
    """`denoise` with a seed per row (None: unseeded), so that a seeded request's answer does
    not depend on what else is queued. LLaDA-8B's loop takes settings and seeds per row; LLaDA
    2.x's block sampler draws from torch's global generator, so a seeded request runs there as
    a batch of its own and the generator is seeded with it."""
    if isinstance(decode, BlockDecodeConfig):
        if seeds is not None and any(seed is not None for seed in seeds):
            if len(seeds) != 1:
                raise ValueError("a seeded LLaDA 2.x request runs as a batch of its own")
            torch.manual_seed(seeds[0])
        return denoise(model, ids, attention_mask, config, decode, abandoned=abandoned)
    if seeds is not None and all(seed is None for seed in seeds):
        seeds = None
    return denoise(model, ids, attention_mask, config, decode, abandoned=abandoned, seeds=seeds)


class Lockstep:
    """The messages between rank 0 (`denoise`, `stop`) and the other ranks (`follow`).

    device: where the collectives' buffers live: the CPU for gloo, the rank's GPU for NCCL."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device

    def _send(self, message: tuple) -> None:
        dist.broadcast_object_list([message], src=0, device=self.device)

    def _receive(self) -> tuple:
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]  # type: ignore[return-value]

    def denoise(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        config,
        decode,
        *,
        abandoned: Callable[[], Collection[int]] | None = None,
        seeds: Sequence[int | None] | None = None,
    ) -> Iterator[StepEvent]:
        """Rank 0's sampler call: `seeded_denoise`, with the call and every step's abandoned
        rows sent to the other ranks, and a last message when the call ends (run out or
        closed early)."""
        mask = None if attention_mask is None else attention_mask.cpu()
        self._send((_RUN, ids.cpu(), mask, config, decode, seeds))

        def shared() -> Collection[int]:
            gone = set(abandoned()) if abandoned is not None else set()
            self._send((_STEP, sorted(gone)))
            return gone

        try:
            yield from seeded_denoise(
                model, ids, attention_mask, config, decode, abandoned=shared, seeds=seeds
            )
        finally:
            self._send((_CLOSE,))

    def stop(self) -> None:
        """Rank 0 at shutdown: the other ranks leave `follow` (if they are still there)."""
        try:
            self._send((_STOP,))
        except Exception as error:  # a rank already gone (killed): nothing left to stop
            logger.warning("could not tell the other ranks to stop: %s", error)

    def follow(self, model: torch.nn.Module) -> None:
        """Ranks 1..W-1: make every sampler call rank 0 makes, until it stops. Ctrl-C and
        SIGTERM (which torchrun passes to every rank) are left to rank 0, which drains its
        requests and then stops the others; a rank that died would hang the rest."""
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        device = next(model.parameters()).device
        while True:
            message = self._receive()
            kind = message[0]
            if kind == _STOP:
                return
            if kind != _RUN:  # the end of a call this rank has already finished
                continue
            _, ids, mask, config, decode, seeds = message

            def shared() -> Collection[int]:
                reply = self._receive()
                if reply[0] != _STEP:
                    raise _Closed
                return set(reply[1])

            events = seeded_denoise(
                model,
                ids.to(device),
                None if mask is None else mask.to(device),
                config,
                decode,
                abandoned=shared,
                seeds=seeds,
            )
            try:
                for _ in events:
                    pass
            except _Closed:
                continue
            except Exception:  # rank 0 fails the same way and answers its clients
                logger.exception("a followed sampler call failed")
                continue
            # Ran to its end as rank 0's did: its closing message comes next.
            if self._receive()[0] != _CLOSE:
                raise RuntimeError("rank 0 and this rank disagree on a sampler call's steps")
