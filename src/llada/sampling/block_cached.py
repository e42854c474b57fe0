"""The LLaDA 2.0 / 2.1 block sampler with an exact block KV cache, for batches of prompts.

Block diffusion attends bidirectionally inside a block and causally between blocks (the prompt
too is read block-causally), so the keys and values of the prompt and of every finished block
never change once their tokens are final. `block_sample` keeps them in a KV cache and runs each
denoising step over the current block only, where `block_generate` (block.py, the oracle)
re-runs the whole window x[:, :end] every step. It returns what `block_generate` returns, token
for token, for both versions (greedy and seeded sampling, eos_early_stop, editing, post steps).

Which positions a forward runs: from the first block whose cached keys and values were written
from other tokens than the canvas now holds (or never written) to the end of the current block.
So the first forward runs the prompt's blocks with the first block (one prefill, under the block
mask), and the first forward of a block also re-runs the block just finished when its final
commit came after its last forward: the cache then holds keys and values of the final tokens
before anything reads them. A forward attends over the slots up to the current block's end
(`KVCache.prefix`), under the rows of the block mask that belong to its window.

Batches: each prompt is left-padded by a whole number of blocks, so that every row's blocks,
counted from its own first token as in `block_generate`, line up with the batch's blocks, and
all rows begin decoding at the same block; the padding is refused as keys. Rows decode each
block in step: a forward runs every row still in the batch, and the rows still working on the
block propose and commit; a row whose block is done rides along (its final tokens' keys and
values are written by the first such forward). A row leaves the batch as soon as its answer is
final. RoPE positions shift with the padding (attention sees only their differences).

Randomness: seeded sampling draws, per forward and row, one `torch.multinomial` over the
block's positions, as `block_generate`; generator=None draws from the global generator (a
single prompt then reproduces `block_generate` after `torch.manual_seed`), and a list of
generators, one per prompt, makes every row's answer independent of the batch it is in.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..inputs import (
    check_context,
    check_prompt,
    context_of,
)
from ..model.llada2 import block_attention_mask
from .block import Version, checked_setup, propose, token_ids, transfer_schedule
from .config import BlockDecodeConfig, GenerateConfig, NonFiniteLogitsError
from .events import StepEvent


@dataclass
class BlockSampleResult:
    """answers: one (n,) LongTensor per prompt, in the prompts' order: `block_generate`'s
    answer row. forward_passes: model calls. work: running totals of `query_positions` (rows x
    window positions run through the blocks, padding and riding rows included),
    `layer_positions` (query_positions x layers, a FLOP proxy), `attended_pairs` ((query, key)
    pairs per layer) and `head_positions` (positions run through the LM head)."""

    answers: list[torch.Tensor]
    forward_passes: int = 0
    work: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockStepEvent:
    """One row's denoising step, for `block_sample(on_step=...)` (built only when watched).

    prompt: the prompt's index in the call; block: (start, end) of the block on that row's
    canvas, counted from its first token (as `block_generate` counts); tokens: the block's
    tokens after the step (B,); committed: bool (B,), positions that went from [MASK] to a
    token; edited: bool (B,), decoded positions that 2.1's editing rewrote."""

    prompt: int
    block: tuple[int, int]
    tokens: torch.Tensor
    committed: torch.Tensor
    edited: torch.Tensor


@dataclass
class _Row:
    """One prompt's place in the batch and its progress through the current block."""

    index: int  # the prompt's position in the input list
    prompt_length: int
    pad: int  # left padding, a whole number of blocks
    last_block: int  # the batch block holding the row's last canvas position
    generator: torch.Generator | None
    step: int = 0  # 2.0: steps taken in this block
    post_steps: int = 0  # 2.1: forwards that found the block free of [MASK]
    block_done: bool = False
    committed: torch.Tensor | None = None  # 2.0: the tokens its last step committed
    answer: torch.Tensor | None = None

    @property
    def answer_start(self) -> int:
        return self.pad + self.prompt_length


@dataclass
class BlockForward:
    """What one forward of `iter_block_sample` did (or, with no events, the end of a block).

    block: the batch's block index (counted on the left-padded canvas); step: forwards taken
    in this block so far; events: one `BlockStepEvent` per row that proposed from this forward
    (empty after a block's end); confidence: per event, the (B,) probabilities of the block's
    proposals; finished: prompt index -> final answer, for the rows that just left."""

    block: int
    step: int
    events: list[BlockStepEvent]
    confidence: list[torch.Tensor]
    finished: dict[int, torch.Tensor]
    forward_passes: int
    work: dict[str, int]


@torch.no_grad()
def block_sample(
    model: torch.nn.Module,
    prompts: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
    *,
    on_step: Callable[[BlockStepEvent], None] | None = None,
    **options: object,
) -> BlockSampleResult:
    """`block_generate` for each prompt, with the block KV cache, in one batch (module
    docstring). prompts: a (B, Lp) tensor of unpadded prompts of one length, or a list of
    prompts of any lengths (1-D tensors or lists of ids). The options are `block_generate`'s
    (version, gen_length, block_length, steps, threshold, temperature, top_k, top_p,
    eos_early_stop, minimal_topk, editing_threshold, max_post_steps, num_to_transfer, eos_id,
    mask_id) and generator: None (the global generator), one generator shared by all rows, or
    one per prompt. on_step: called after every row's every step with a `BlockStepEvent` (what
    was committed and what was edited: a live view of 2.1's token editing)."""
    answers: dict[int, torch.Tensor] = {}
    last = None
    for last in iter_block_sample(model, prompts, watched=on_step is not None, **options):
        if on_step is not None:
            for event in last.events:
                on_step(event)
        answers |= last.finished
    assert last is not None  # the generator always reports the last rows leaving
    return BlockSampleResult(
        answers=[answers[i] for i in range(len(answers))],
        forward_passes=last.forward_passes,
        work=last.work,
    )


@torch.no_grad()
def iter_block_sample(
    model: torch.nn.Module,
    prompts: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
    *,
    version: Version = "2.0",
    gen_length: int,
    block_length: int = 32,
    steps: int = 32,
    threshold: float = 0.95,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_early_stop: bool = False,
    minimal_topk: int = 1,
    editing_threshold: float = 0.9,
    max_post_steps: int = 16,
    num_to_transfer: int = 1,
    eos_id: int | None = None,
    mask_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    watched: bool = True,
    abandoned: Callable[[], Collection[int]] | None = None,
) -> Iterator[BlockForward]:
    """`block_sample`, yielding a `BlockForward` after every forward and after every block end
    that finished rows. watched=False builds no step events (the work of `on_step`).
    abandoned: called before every forward and before the check that ends a block (so once
    after each yielded forward, before anything else is computed); the prompt indices it names
    leave the batch at once (their answer is what their canvas holds then, [MASK] included), so
    the other rows go on with less work and unchanged results (a server's disconnected
    clients). A consumer that stops iterating after an event runs no further forward."""
    vocab_size, mask_id, eos_id, device = checked_setup(
        model,
        mask_id,
        eos_id,
        version=version,
        gen_length=gen_length,
        block_length=block_length,
        steps=steps,
        threshold=threshold,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        minimal_topk=minimal_topk,
        editing_threshold=editing_threshold,
        max_post_steps=max_post_steps,
        num_to_transfer=num_to_transfer,
    )
    prompt_rows = _prompt_rows(prompts, vocab_size, device)
    generators = _generators(generator, len(prompt_rows))
    for ids in prompt_rows:
        blocks = -(-(len(ids) + gen_length) // block_length)
        check_context(model, blocks * block_length, len(ids), gen_length)

    rows, x = _layout(prompt_rows, generators, gen_length, block_length, mask_id, eos_id)
    canvas_length = x.shape[1]
    context, key = context_of(model)
    if context is not None and canvas_length > context:
        raise ValueError(
            f"aligning these prompts' blocks by left padding makes a canvas of {canvas_length} "
            f"positions, beyond the model's context of {context} ({key} in its config.json); "
            "sample prompts of very different lengths in separate calls"
        )
    pads = torch.tensor([row.pad for row in rows], device=device)
    positions = torch.arange(canvas_length, device=device)
    attention_mask = None  # (B, L), 1 = token, 0 = padding; None when nothing is padded
    if bool((pads > 0).any()):
        attention_mask = (positions[None, :] >= pads[:, None]).long()
    runner = _BlockRunner(model, x, attention_mask, block_length)
    steps = min(steps, gen_length // minimal_topk)  # as the reference caps it
    quotas = transfer_schedule(block_length, steps)
    sampling = (version, temperature, top_k, top_p)

    first_block = rows[0].pad // block_length + rows[0].prompt_length // block_length
    for block in range(first_block, max(row.last_block for row in rows) + 1):
        start, end = block * block_length, (block + 1) * block_length
        for row in rows:
            row.step, row.post_steps, row.block_done = 0, 0, False
        step = 0
        while True:
            # Before each forward (and the check that ends the block): a row abandoned while
            # its last event was handled leaves before any more work is done for it.
            if _abandon(rows, runner, abandoned):
                finished = {}
                rows = _leave(rows, runner, finished)
                yield BlockForward(
                    block - first_block, step, [], [], finished,
                    runner.forward_passes, dict(runner.work),
                )  # fmt: skip
                if not rows:
                    return
            working = [
                i
                for i, row in enumerate(rows)
                if _wants_forward(
                    row, runner.x[i, start:end], version, quotas, max_post_steps, mask_id
                )
            ]
            if not working:
                break
            logits = runner.block_logits(start, end, working)  # (len(working), B, V)
            step += 1
            events, confidence = [], []
            for logits_row, i in zip(logits, working, strict=True):
                row = rows[i]
                before = runner.x[i, start:end].clone() if watched else None
                x0, p = propose(logits_row, *sampling, generator=row.generator)
                if version == "2.0":
                    _commit_20(row, runner.x[i], start, end, x0, p, quotas, threshold, mask_id)
                    if eos_early_stop and row.answer is None:
                        row.answer = _early_answer_20(row, runner.x[i], end, eos_id, mask_id)
                else:
                    _commit_21(
                        row, runner.x[i], start, end, x0, p,
                        threshold, num_to_transfer, editing_threshold, mask_id,
                    )  # fmt: skip
                if watched:
                    events.append(_step_event(row, before, runner.x[i, start:end], start, mask_id))
                    confidence.append(p)
            finished: dict[int, torch.Tensor] = {}
            rows = _leave(rows, runner, finished)
            yield BlockForward(
                block - first_block, step, events, confidence, finished,
                runner.forward_passes, dict(runner.work),
            )  # fmt: skip
            if not rows:
                return
        for i, row in enumerate(rows):
            answer = runner.x[i, row.answer_start : end]
            if block == row.last_block or _stops_after_block(
                answer, version, eos_early_stop, eos_id, mask_id
            ):
                row.answer = _final_answer(runner.x[i], row, gen_length, eos_id)
        finished = {}
        rows = _leave(rows, runner, finished)
        if finished or not rows:
            yield BlockForward(
                block - first_block, step, [], [], finished,
                runner.forward_passes, dict(runner.work),
            )  # fmt: skip
        if not rows:
            return


def _abandon(
    rows: list[_Row], runner: _BlockRunner, abandoned: Callable[[], Collection[int]] | None
) -> bool:
    """Rows whose prompt index `abandoned()` names take what their canvas holds as answer;
    whether any did."""
    if abandoned is None:
        return False
    gone = set(abandoned())
    left = False
    for i, row in enumerate(rows):
        if row.index in gone and row.answer is None:
            row.answer = runner.x[i, row.answer_start :].clone()
            left = True
    return left


def _step_event(
    row: _Row, before: torch.Tensor, after: torch.Tensor, start: int, mask_id: int
) -> BlockStepEvent:
    was_masked = before == mask_id
    offset = start - row.pad  # the block's place on the row's own canvas
    return BlockStepEvent(
        prompt=row.index,
        block=(offset, offset + len(after)),
        tokens=after.clone(),
        committed=was_masked & (after != mask_id),
        edited=~was_masked & (after != before),
    )


def block_generate_cached(
    model: torch.nn.Module, prompt: torch.Tensor, **options: object
) -> torch.Tensor:
    """`block_generate` with the block KV cache: the same arguments, the same (1, n) answer."""
    return block_sample(model, prompt, **options).answers[0][None]


class _BlockRunner:
    """The canvas, the KV cache and the forwards over it, with their counts."""

    def __init__(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        block_length: int,
    ) -> None:
        self.model = model
        self.x = x  # (B, L) the canvas
        self.block_length = block_length
        self.cache = model.new_kv_cache(*x.shape, attention_mask=attention_mask)
        # The tokens whose keys and values the cache holds, -1 where never written.
        self.cached = torch.full_like(x, -1)
        self.allowed = block_attention_mask(x.shape[1], block_length, x.device)  # (1, 1, L, L)
        self.n_layers = len(model.blocks)
        self.forward_passes = 0
        self.work = dict(query_positions=0, layer_positions=0, attended_pairs=0, head_positions=0)

    def window_start(self, start: int) -> int:
        """The start of the first block before `start` whose cached keys and values are stale,
        else `start`."""
        stale = (self.cached[:, :start] != self.x[:, :start]).any(0).nonzero()
        if len(stale) == 0:
            return start
        return int(stale[0, 0]) // self.block_length * self.block_length

    def block_logits(self, start: int, end: int, working: list[int]) -> torch.Tensor:
        """One forward over the window up to `end`; float32 logits (len(working), B, V) of the
        block [start, end) for the batch rows `working`."""
        window_start = self.window_start(start)
        tokens = self.x[:, window_start:end]  # (rows, T)
        width = end - window_start
        rows = torch.tensor(working, device=self.x.device)
        at = (rows[:, None] * width + (start - window_start)) + torch.arange(
            end - start, device=self.x.device
        )  # (len(working), B) flat positions into rows x T
        logits = self.model(
            tokens,
            attention_mask=self.allowed[:, :, window_start:end, :end],
            kv_cache=self.cache.prefix(end),
            window_start=window_start,
            logits_at=at.flatten(),
        ).logits
        self.cached[:, window_start:end] = tokens
        self.forward_passes += 1
        self.work["query_positions"] += tokens.numel()
        self.work["layer_positions"] += tokens.numel() * self.n_layers
        self.work["attended_pairs"] += tokens.numel() * end
        self.work["head_positions"] += at.numel()
        if not bool((logits.amax(dim=-1) < torch.inf).all()):  # NaN or +inf somewhere
            raise NonFiniteLogitsError(
                f"the model produced NaN/inf logits for the block ending at position {end}; "
                f"check the checkpoint's weights for NaN/inf and its dtype ({logits.dtype})"
            )
        return logits.float().view(len(working), end - start, -1)

    def keep(self, kept: list[int]) -> None:
        """Only the batch rows `kept` go on."""
        index = torch.tensor(kept, device=self.x.device)
        self.x = self.x.index_select(0, index)
        self.cached = self.cached.index_select(0, index)
        self.cache.select_rows(index)


def _wants_forward(
    row: _Row,
    block: torch.Tensor,
    version: Version,
    quotas: list[int],
    max_post_steps: int,
    mask_id: int,
) -> bool:
    """Whether the row's block takes another step: the check at the top of `block_generate`'s
    step loop (2.1: counting a post step when the block holds no [MASK])."""
    if row.block_done:
        return False
    is_masked = bool((block == mask_id).any())
    if version == "2.0":
        row.block_done = row.step >= len(quotas) or not is_masked
    else:
        if not is_masked:
            row.post_steps += 1
        row.block_done = row.post_steps > max_post_steps
    return not row.block_done


def _commit_20(
    row: _Row,
    x: torch.Tensor,
    start: int,
    end: int,
    x0: torch.Tensor,
    p: torch.Tensor,
    quotas: list[int],
    threshold: float,
    mask_id: int,
) -> None:
    """2.0: commit the [MASK] positions above `threshold`, or the quota's most probable."""
    block = x[start:end]  # a view: commits land in the canvas
    is_masked = block == mask_id
    quota = quotas[row.step]
    row.step += 1
    confidence = torch.where(is_masked, p, -torch.inf)
    confident = confidence > threshold
    if int(confident.sum()) >= quota:
        commit = confident
    else:
        commit = torch.zeros_like(is_masked)
        commit[torch.topk(confidence, k=min(quota, int(is_masked.sum())))[1]] = True
    block[commit] = x0[commit]
    row.committed = x0[commit]


def _early_answer_20(
    row: _Row, x: torch.Tensor, end: int, eos_id: int, mask_id: int
) -> torch.Tensor | None:
    """2.0's eos_early_stop after a step that committed an EOS: the answer up to the first EOS
    of the whole window (prompt included, as the reference), if nothing before it is [MASK]."""
    if not bool((row.committed == eos_id).any()):
        return None
    eos_at = (x[row.pad : end] == eos_id).nonzero()
    if len(eos_at) == 0:
        return None
    first = row.pad + int(eos_at[0, 0])
    if not bool((x[row.answer_start : first] != mask_id).all()):
        return None
    return x[row.answer_start : first + 1].clone()  # not cut to gen_length


def _commit_21(
    row: _Row,
    x: torch.Tensor,
    start: int,
    end: int,
    x0: torch.Tensor,
    p: torch.Tensor,
    threshold: float,
    num_to_transfer: int,
    editing_threshold: float,
    mask_id: int,
) -> None:
    """2.1: commit the confident [MASK] positions (at least num_to_transfer) and edit decoded,
    non-prompt positions whose new proposal differs and exceeds editing_threshold."""
    block = x[start:end]  # a view: commits land in the canvas
    before = block.clone()
    is_masked = before == mask_id
    is_prompt = torch.arange(start, end, device=x.device) < row.answer_start
    commit = torch.zeros_like(is_masked)
    any_masked = bool(is_masked.any())
    if any_masked:
        confidence = torch.where(is_masked, p, -torch.inf)
        confident = (confidence > threshold) & is_masked
        if int(confident.sum()) >= num_to_transfer:
            commit = confident
        else:
            commit[torch.topk(confidence, k=min(num_to_transfer, int(is_masked.sum())))[1]] = True
    edit = ~is_masked & ~is_prompt & (p > editing_threshold) & (x0 != before)
    block[commit | edit] = x0[commit | edit]
    if not any_masked and not bool(edit.any()):
        row.block_done = True


def _stops_after_block(
    answer: torch.Tensor, version: Version, eos_early_stop: bool, eos_id: int, mask_id: int
) -> bool:
    """After a block, given the answer so far: 2.0 stops at any EOS in it, 2.1 only with
    eos_early_stop and a complete answer (no [MASK])."""
    has_eos = bool((answer == eos_id).any())
    if version == "2.0":
        return has_eos
    return eos_early_stop and has_eos and not bool((answer == mask_id).any())


def _final_answer(x: torch.Tensor, row: _Row, gen_length: int, eos_id: int) -> torch.Tensor:
    """The first gen_length tokens after the prompt, cut just after the first EOS."""
    answer = x[row.answer_start : row.answer_start + gen_length]
    eos_at = (answer == eos_id).nonzero()
    length = int(eos_at[0, 0]) + 1 if len(eos_at) else gen_length
    return answer[:length].clone()


def _leave(rows: list[_Row], runner: _BlockRunner, answers: dict[int, torch.Tensor]) -> list[_Row]:
    """Rows with a final answer leave the batch and its cache."""
    kept = [i for i, row in enumerate(rows) if row.answer is None]
    if len(kept) == len(rows):
        return rows
    for row in rows:
        if row.answer is not None:
            answers[row.index] = row.answer
    if kept:
        runner.keep(kept)
    return [rows[i] for i in kept]


def _prompt_rows(
    prompts: object, vocab_size: int | None, device: torch.device
) -> list[torch.Tensor]:
    """The prompts as a list of 1-D LongTensors on `device`."""
    if isinstance(prompts, torch.Tensor):
        return list(check_prompt(prompts, vocab_size).to(device))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(
            "prompts must be a (B, Lp) tensor or a non-empty list of prompts (1-D tensors or "
            f"lists of token ids), got {type(prompts).__name__}"
        )
    rows = []
    for prompt in prompts:
        ids = prompt if isinstance(prompt, torch.Tensor) else torch.as_tensor(prompt)
        rows.append(check_prompt(ids[None], vocab_size)[0].to(device))
    return rows


def _generators(generator: object, batch: int) -> list[torch.Generator | None]:
    """One generator (or None: the global one) per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    if isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator):
        if len(generator) != batch:
            raise ValueError(
                f"generator is a list of {len(generator)} generators for {batch} prompts: pass "
                "one per prompt, a single one, or None"
            )
        return list(generator)
    raise TypeError(
        f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}"
    )


def _layout(
    prompt_rows: list[torch.Tensor],
    generators: list[torch.Generator | None],
    gen_length: int,
    block_length: int,
    mask_id: int,
    eos_id: int,
) -> tuple[list[_Row], torch.Tensor]:
    """The rows and the left-padded canvas (B, L): each prompt shifted by whole blocks so that
    all rows begin decoding at the same block; [MASK] after the prompts, EOS as padding."""
    first = max(len(ids) // block_length for ids in prompt_rows)
    rows = []
    for index, (ids, generator) in enumerate(zip(prompt_rows, generators, strict=True)):
        pad = (first - len(ids) // block_length) * block_length
        blocks = -(-(len(ids) + gen_length) // block_length)  # the row's own canvas
        rows.append(_Row(index, len(ids), pad, pad // block_length + blocks - 1, generator))
    length = (max(row.last_block for row in rows) + 1) * block_length
    device = prompt_rows[0].device
    x = torch.full((len(rows), length), mask_id, dtype=torch.long, device=device)
    for i, (row, ids) in enumerate(zip(rows, prompt_rows, strict=True)):
        x[i, : row.pad] = eos_id
        x[i, row.pad : row.answer_start] = ids
    return rows, x


@torch.no_grad()
def denoise_blocks(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerateConfig,
    decode: BlockDecodeConfig,
    mask_id: int | None = None,
    abandoned: Callable[[], Collection[int]] | None = None,
) -> Iterator[StepEvent]:
    """`llada.denoise` for a LLaDA 2.x model: `block_sample` on the rows of a left-padded
    batch `prompt` (B, Lp) (`attention_mask` 1 = token, 0 = padding), yielding the same
    `StepEvent`s as the LLaDA-8B loop, one per forward: the canvas (B, Lp + gen_length) with
    the mask id where undecided, what the forward committed and (2.1) edited, and the
    probabilities of its proposals at every answer position of the row's current block (all
    are candidates: 2.1 may edit decided ones; NaN elsewhere, so the first non-NaN position of
    a row is where its current block starts: every answer position before it is final, as the
    samplers never go back to an earlier block). A finished row's answer is what
    `block_sample` returns, cut after its EOS with EOS after it (2.0's early answer can run
    past gen_length; the canvas keeps gen_length of it)."""
    options = decode.sampler_options(config)
    mask_id, eos_id = token_ids(model, mask_id, None)
    batch, width = prompt.shape
    if attention_mask is None:
        rows = list(prompt)
    else:
        pads = (attention_mask == 0).sum(dim=1).tolist()
        rows = [prompt[i, pad:] for i, pad in enumerate(pads)]
    gen_length = config.gen_length
    length = width + gen_length
    canvas = torch.cat([prompt, torch.full_like(prompt[:, :1], mask_id).expand(-1, gen_length)], 1)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for forward in iter_block_sample(
        model, rows, mask_id=mask_id, eos_id=eos_id, abandoned=abandoned, **options
    ):
        committed = torch.zeros(batch, length, dtype=torch.bool, device=prompt.device)
        edited = torch.zeros_like(committed)
        confidence = torch.full((batch, length), torch.nan, device=prompt.device)
        for event, p in zip(forward.events, forward.confidence, strict=True):
            i, prompt_length = event.prompt, len(rows[event.prompt])
            start, end = event.block
            low, high = max(start, prompt_length), min(end, prompt_length + gen_length)
            if low >= high:
                continue
            at = slice(width + low - prompt_length, width + high - prompt_length)
            inside = slice(low - start, high - start)
            canvas[i, at] = event.tokens[inside]
            committed[i, at] = event.committed[inside]
            edited[i, at] = event.edited[inside]
            confidence[i, at] = p[inside].float()
        for i, answer in forward.finished.items():
            n = min(len(answer), gen_length)
            canvas[i, width : width + n] = answer[:n]
            canvas[i, width + n :] = eos_id
            finished[i] = True
        yield StepEvent(
            block=forward.block,
            step=forward.step,
            forward_passes=forward.forward_passes,
            work=forward.work,
            tokens=canvas.clone(),
            committed=committed,
            confidence=confidence,
            finished=finished.clone(),
            edited=edited,
        )
