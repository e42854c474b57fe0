"""The fast sampling loop: one semi-autoregressive block loop with exchangeable parts.

The loop is the reference algorithm (`reference.py`) with three parts passed in: where logits
come from (`sources.py`: full forward or a KV cache), what is proposed, and which proposals are
committed (`decoding.py`). On top it adds what the reference lacks: batched rows leave as soon
as their answer has ended, the LM head runs only on the candidate positions, and every step is
observable (`denoise` yields an event per step; `sample` collects the result).

With `DecodeConfig(source="full", commit="schedule", reference_numerics=True)` (the
`reference` preset) it returns exactly what `llada.generate` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..inputs import (
    check_attention_mask,
    check_context,
    check_mask_id,
    check_prompt,
    check_token_ids,
    device_of,
    vocab_size_of,
)
from ..model.transformer import flat_positions
from ..tokens import special_tokens_of
from .config import (
    BLOCK_PRESETS,
    PRESETS,
    ROW_DECODE_FIELDS,
    BlockDecodeConfig,
    DecodeConfig,
    GenerateConfig,
    NonFiniteLogitsError,
    check_shared_settings,
    decode_preset,
    nonfinite_logits_message,
)
from .decoding import (
    commit_entropy,
    commit_factor,
    commit_schedule,
    commit_threshold,
    has_nonfinite_logits,
    propose,
)
from .events import StepEvent
from .sources import make_source


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B, prompt_length + gen_length)
    forward_passes: int
    steps: int
    work: dict[str, int]


def _answer_ended(answer: torch.Tensor, mask_id: int, stop: torch.Tensor) -> torch.Tensor:
    """(B,) rows with a committed stop token that has no mask before it."""
    is_stop = torch.isin(answer, stop)
    masks_before = (answer == mask_id).cumsum(-1) - (answer == mask_id).long()
    return (is_stop & (masks_before == 0)).any(-1)


@torch.no_grad()
def denoise(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerateConfig | None = None,
    decode: DecodeConfig | str = "fast",
    mask_id: int | None = None,
    answer: torch.Tensor | None = None,
    abandoned: Callable[[], Collection[int]] | None = None,
    seeds: Sequence[int | None] | None = None,
) -> Iterator[StepEvent]:
    """Generate as `sample` does, yielding a `StepEvent` after every step.

    Rows with settings of their own (LLaDA-8B's loop): `config` and `decode` may be sequences,
    one per batch row, that differ only in temperature, remasking, threshold, factor and
    entropy_bound (`llada.sampling.config.ROW_GENERATE_FIELDS`, `ROW_DECODE_FIELDS`); the rows
    share every forward pass. seeds: one per row (None: torch's global generator); a seeded
    row draws its random numbers from its own generator, so its answer is the one it gets
    alone with that seed, whatever the other rows draw.

    abandoned: called after every step; the batch rows it names are no longer wanted (e.g. a
    server's client disconnected). They leave the batch and the cache as ended rows do (their
    undecided positions become EOS and they count as finished), so the other rows go on with
    less work and unchanged results.

    With `decode.batch_invariant` and a padded batch, the rows of each prompt length run as
    their own batch without padding, one step of each group per event (see `DecodeConfig`)."""
    config, decode, rows = _row_settings(config, decode, seeds, prompt, device_of(model))
    _check_family(model, decode)
    if isinstance(decode, BlockDecodeConfig):
        if answer is not None:
            raise ValueError(
                "answer= (fixed answer tokens) is a LLaDA-8B sampler option; LLaDA 2.x's block "
                "sampler starts every answer from [MASK]"
            )
        from .block_cached import denoise_blocks

        yield from denoise_blocks(model, prompt, attention_mask, config, decode, mask_id, abandoned)
    elif decode.batch_invariant and attention_mask is not None:
        yield from _denoise_by_length(
            model, prompt, attention_mask, config, decode, mask_id, answer, abandoned, rows
        )
    else:
        yield from _denoise(
            model, prompt, attention_mask, config, decode, mask_id, answer, abandoned, per_row=rows
        )


class _Rows:
    """The settings of each row of one sampler call, where they differ (see `denoise`): each
    row's GenerateConfig and random generator for its proposals, and each commit parameter
    that differs between rows as an (R, 1) tensor (one that does not stays a number, so a
    uniform batch computes exactly what it did)."""

    def __init__(
        self,
        configs: list[GenerateConfig],
        decodes: list[DecodeConfig],
        generators: list[torch.Generator | None],
        device: torch.device,
    ) -> None:
        self.configs = configs
        self.generators = generators
        self.device = device
        self.gen_lengths = [c.gen_length for c in configs]
        self.ragged = len(set(self.gen_lengths)) > 1
        self.own_proposals = any(g is not None for g in generators) or (
            len({(c.temperature, c.remasking) for c in configs}) > 1
        )
        self.draws = any(c.temperature > 0 or c.remasking == "random" for c in configs)
        self.params: dict[str, float | torch.Tensor] = {}
        for name in ROW_DECODE_FIELDS:
            values = [getattr(d, name) for d in decodes]
            if len(set(values)) == 1:
                self.params[name] = values[0]
            else:
                self.params[name] = torch.tensor(
                    values, dtype=torch.get_default_dtype(), device=device
                )[:, None]
        self.decodes = decodes

    def subset(self, rows: list[int]) -> _Rows:
        return _Rows(
            [self.configs[r] for r in rows],
            [self.decodes[r] for r in rows],
            [self.generators[r] for r in rows],
            self.device,
        )

    def param(self, name: str, rows: torch.Tensor) -> float | torch.Tensor:
        """The commit parameter `name` for the batch rows `rows` (indices into the call's batch)."""
        value = self.params[name]
        return value[rows] if isinstance(value, torch.Tensor) else value

    def propose(
        self,
        logits: torch.Tensor,
        flat_at: torch.Tensor,
        width: int,
        row_ids: list[int],
        padding: list[tuple[int, int]] | None,
        **kw,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`propose` for each row's positions with its own settings and generator. The logits
        (N, V) are at the flat positions `flat_at` of an (R, width) selection, in row order;
        one read-back sizes each row's share. padding: when the selection is the whole window
        (the reference's draws over every position), each row's (left padding, positions past
        its canvas) in it: no draws are made there, so a seeded row draws what it draws alone."""
        counts = torch.bincount(flat_at // width, minlength=len(row_ids)).tolist()
        parts = []
        for i, (row, chunk) in enumerate(zip(row_ids, logits.split(counts), strict=True)):
            lead, trail = padding[i] if padding is not None else (0, 0)
            own = chunk[lead : len(chunk) - trail]
            part = propose(own, self.configs[row], generator=self.generators[row], **kw)
            if lead or trail:  # never candidates: any value will do
                part = tuple(
                    None if t is None else torch.cat([t.new_zeros(lead), t, t.new_zeros(trail)])
                    for t in part
                )
            parts.append(part)
        proposal = torch.cat([part[0] for part in parts])
        confidence = torch.cat([part[1] for part in parts])
        entropy = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
        return proposal, confidence, entropy


def _row_settings(
    config: object, decode: object, seeds: object, prompt: object, device: torch.device
) -> tuple[GenerateConfig, DecodeConfig | BlockDecodeConfig, _Rows | None]:
    """The batch's settings (those of the row with the longest canvas where they are per row)
    and, if rows differ or are seeded, their `_Rows`; a ValueError or TypeError says what is
    wrong."""
    per_row = isinstance(config, (list, tuple)) or isinstance(decode, (list, tuple))
    if not per_row and seeds is None:
        return (*_settings(config, decode), None)
    batch = prompt.shape[0] if isinstance(prompt, torch.Tensor) and prompt.dim() == 2 else None
    if batch is None:
        raise ValueError("settings or seeds per row need a 2-D prompt batch (B, prompt_length)")
    configs = list(config) if isinstance(config, (list, tuple)) else [config] * batch
    decodes = list(decode) if isinstance(decode, (list, tuple)) else [decode] * batch
    seed_list = list(seeds) if seeds is not None else [None] * batch
    for name, items in (("config", configs), ("decode", decodes), ("seeds", seed_list)):
        if len(items) != batch:
            raise ValueError(
                f"{name} has {len(items)} entries for a batch of {batch} rows; give one per row"
            )
    pairs = [_settings(c, d) for c, d in zip(configs, decodes, strict=True)]
    configs, decodes = [p[0] for p in pairs], [p[1] for p in pairs]
    if any(isinstance(d, BlockDecodeConfig) for d in decodes):
        raise ValueError(
            "settings and seeds per row are for LLaDA-8B's sampler loop; LLaDA 2.x's block "
            "sampler takes one GenerateConfig and BlockDecodeConfig for the batch (seed "
            "torch's generator with torch.manual_seed)"
        )
    check_shared_settings(configs, decodes)
    longest = max(range(batch), key=lambda row: configs[row].gen_length)
    generators: list[torch.Generator | None] = []
    for row, seed in enumerate(seed_list):
        if seed is None:
            generators.append(None)
            continue
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise ValueError(f"seeds[{row}] must be an integer that fits in 64 bits, got {seed!r}")
        generators.append(torch.Generator(device=device).manual_seed(seed))
    # The loop runs the longest canvas's blocks; what is per row comes from `_Rows`.
    return configs[longest], decodes[longest], _Rows(configs, decodes, generators, device)


def _denoise(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerateConfig,
    decode: DecodeConfig,
    mask_id: int | None,
    answer: torch.Tensor | None,
    abandoned: Callable[[], Collection[int]] | None,
    whole_batch: bool = True,
    per_row: _Rows | None = None,
) -> Iterator[StepEvent]:
    """`denoise` for one batch (whole_batch=False: one group of a larger batch, whose answers
    may all be fixed).

    Host synchronisation (reads of tensor values back to the host; the forwards themselves hold
    none). Once per block: each row's masks in the block (the schedule's quota follows on the
    host) and the masks before it, in one read. Once per step, by design: one read at the end
    of the step, of whether a row ended (rows then leave the batch: shapes change), whether the
    logits are broken (raise), and how many masks are left in the block and before it (the loop
    ends the block when none are left, and the next step's LM-head selection is sized from that
    count with `nonzero_static`, so it reads nothing back); with `refresh`, the most commits in
    a row rides along. Rarely: when masks are left before the block (the reference's fixed
    steps can leave one, when its proposal is the mask itself) the next selection is sized by
    a read-back; when rows end, selecting the rows that go on reads `ended`; `abandoned` and
    events are host-side. Counters (forward passes, work) are Python ints from shapes. Rows
    that draw their proposals with settings of their own (`_Rows.own_proposals`) add one read
    per step: how many of the step's positions are each row's."""
    tokens = special_tokens_of(model, mask_id)
    mask_id = tokens.mask_id
    vocab_size = vocab_size_of(model)
    check_mask_id(mask_id, vocab_size)
    device = device_of(model)
    prompt = check_prompt(prompt, vocab_size).to(device)
    batch, prompt_length = prompt.shape
    length = prompt_length + config.gen_length
    check_context(model, length, prompt_length, config.gen_length)
    x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    x[:, :prompt_length] = prompt
    ragged = per_row is not None and per_row.ragged
    if answer is not None:
        if ragged:
            raise ValueError(
                "answer= (fixed answer tokens) needs one gen_length for every row; these rows "
                "have several"
            )
        # An answer of mask ids only is the same as answer=None: every position is free.
        answer = _checked_answer(answer, batch, config, mask_id, vocab_size, whole_batch)
        x[:, prompt_length:] = answer.to(device)
    if attention_mask is not None:
        attention_mask = check_attention_mask(attention_mask, (batch, prompt_length)).to(device)
    # Each row's canvas ends at canvas_end[row]; with gen_lengths per row the shorter canvases
    # end in EOS that no position attends to (their keys are masked out) and that is never a
    # candidate, so the row computes what it computes alone (and, with early stop, ends once
    # its own canvas is complete).
    canvas_end = [length] * batch
    answer_mask = None
    if ragged:
        canvas_end = [prompt_length + gen for gen in per_row.gen_lengths]
        ends = torch.tensor(canvas_end, device=device)
        beyond = torch.arange(length, device=device)[None, :] >= ends[:, None]
        x.masked_fill_(beyond, tokens.eos_id)
        answer_mask = (~beyond[:, prompt_length:]).long()
    if attention_mask is not None or answer_mask is not None:
        if attention_mask is None:
            attention_mask = torch.ones((batch, prompt_length), dtype=torch.long, device=device)
        if answer_mask is None:
            answer_mask = attention_mask.new_ones((batch, config.gen_length))
        attention_mask = torch.cat([attention_mask, answer_mask.to(attention_mask.dtype)], dim=-1)
    source = make_source(
        decode.source,
        model,
        attention_mask,
        x != mask_id,
        mask_id,
        config.cfg_scale,
        vicinity=decode.vicinity,
        refresh=decode.refresh,
    )
    stop = torch.tensor(tokens.stop_ids, device=device)
    rows = torch.arange(batch, device=device)  # the batch rows still decoding
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    positions = torch.arange(length, device=device)
    softmax_dtype = None
    if decode.reference_numerics:
        softmax_dtype = model.dtype if isinstance(model.dtype, torch.dtype) else torch.float32
    elif decode.fastdllm_numerics:
        softmax_dtype = torch.float64
    # Random draws follow the reference only when they cover every position.
    draws_all = decode.reference_numerics and (
        per_row.draws
        if per_row is not None
        else config.temperature > 0 or config.remasking == "random"
    )
    row_ids = list(range(batch))  # `rows` on the host, for the settings per row
    row_padding = [0] * batch
    if per_row is not None and draws_all and attention_mask is not None:
        row_padding = (attention_mask[:, :prompt_length] == 0).sum(-1).tolist()
    never_propose = None if decode.reference_numerics else mask_id
    proposing = {
        "softmax_dtype": softmax_dtype,
        "need_entropy": decode.commit == "entropy",
        "never_propose": never_propose,
    }

    def commit_param(name: str) -> float | torch.Tensor:
        return getattr(decode, name) if per_row is None else per_row.param(name, rows)

    step_limit = config.steps_per_block if decode.commit == "schedule" else config.block_length
    step_limit = max(step_limit, config.steps_per_block if decode.reference_numerics else 0)
    step_limit = max(step_limit, _least_passes(decode))
    for block in range(config.num_blocks):
        block_start = prompt_length + block * config.block_length
        block_end = block_start + config.block_length
        # The once-per-block read: each row's masks in the block, and the masks before it.
        block_masks = (x[rows, block_start:block_end] == mask_id).sum(dim=-1)  # (R,)
        reads = torch.cat([block_masks, _masks_left(x, rows, block_start, block_end, mask_id)])
        *row_masks, masks_in_block, masks_before = reads.tolist()
        # Each row's quota per step, the reference's linear schedule (`get_num_transfer_tokens`)
        # computed on the host from the counts just read.
        quota_rows = [schedule_quota(masks, config.steps_per_block) for masks in row_masks]
        step = 0
        while True:
            if _block_done(masks_in_block, decode, step, config):
                break
            if step >= step_limit:
                # Every rule commits at least one candidate of each unfinished row per step,
                # so a block of block_length positions fills within block_length steps.
                raise RuntimeError(
                    f"block {block} is still not full after {step} steps (at most "
                    f"{step_limit} are possible with commit={decode.commit!r}): a step "
                    "committed nothing. This is a bug in llada; please report it with the "
                    "settings used"
                )
            window = source.window(block_start, block_end, length, first_step=step == 0)
            span = positions[window.start : window.end]
            canvas = x[rows]
            is_masked = canvas[:, window.start : window.end] == mask_id
            candidate = is_masked & (span < block_end)[None, :]
            logits_at = torch.ones_like(candidate) if draws_all else candidate
            if draws_all:
                selected = logits_at.numel()
            elif masks_before == 0:  # every window covers the block: its masks are the candidates
                selected = masks_in_block
            else:
                selected = None  # sized by a read-back (rare; see the docstring)
            if selected is None:
                flat_at = flat_positions(logits_at)
            else:
                flat_at = torch.nonzero_static(logits_at.flatten(), size=selected).squeeze(1)
            logits = source.logits(canvas, window, logits_at, flat_at)
            if per_row is not None and per_row.own_proposals:
                padding = None
                if draws_all and attention_mask is not None:
                    padding = [
                        (
                            max(0, row_padding[r] - window.start),
                            max(0, window.end - max(window.start, canvas_end[r])),
                        )
                        for r in row_ids
                    ]
                proposal, confidence, entropy = per_row.propose(
                    logits,
                    flat_at,
                    candidate.shape[1],
                    row_ids,
                    padding,
                    tokens=tokens,
                    **proposing,
                )
            else:
                proposal, confidence, entropy = propose(logits, config, tokens, **proposing)
            nonfinite = has_nonfinite_logits(logits, confidence)
            dense_token = torch.full_like(candidate, mask_id, dtype=torch.long)
            dense_conf = torch.full(candidate.shape, -torch.inf, device=device)
            # Scattered by flat positions: a boolean-mask assignment would read its size back.
            dense_token.view(-1)[flat_at] = proposal
            dense_conf.view(-1)[flat_at] = confidence.to(dense_conf.dtype)
            dense_conf = dense_conf.masked_fill(~candidate, -torch.inf)
            early_end = None
            if decode.eos_in_order:
                masked_before = (is_masked.cumsum(-1) - is_masked.long()) > 0
                early_end = torch.isin(dense_token, stop) & masked_before
                # Ranked below every other candidate (confidences lie in [0, 1]) and below any
                # threshold, but still candidates: a schedule's quota can always be met.
                dense_conf = torch.where(early_end, dense_conf - 2, dense_conf)
            if decode.commit == "schedule":
                commit = commit_schedule(dense_conf, [quota[step] for quota in quota_rows])
            elif decode.commit == "threshold":
                commit = commit_threshold(dense_conf, commit_param("threshold"))
            elif decode.commit == "factor":
                commit = commit_factor(dense_conf, commit_param("factor"))
            else:
                dense_entropy = torch.full(candidate.shape, torch.inf, device=device)
                dense_entropy.view(-1)[flat_at] = entropy
                if early_end is not None:  # last in line, and over any entropy bound
                    dense_entropy = torch.where(early_end, dense_entropy + 1e4, dense_entropy)
                commit = commit_entropy(dense_conf, dense_entropy, commit_param("entropy_bound"))
            commit &= candidate
            updated = canvas[:, window.start : window.end]
            updated = torch.where(commit, dense_token, updated)
            x[rows, window.start : window.end] = updated
            step += 1

            ended = torch.zeros(len(rows), dtype=torch.bool, device=device)
            if decode.early_stop:
                ended = _answer_ended(x[rows, prompt_length:], mask_id, stop)
            if abandoned is not None and (gone := abandoned()):
                ended |= torch.isin(rows, torch.tensor(sorted(gone), device=device))
            committed = torch.zeros((batch, length), dtype=torch.bool, device=device)
            committed[rows, window.start : window.end] = commit
            shown = torch.full((batch, length), torch.nan, device=device)
            shown[rows, window.start : window.end] = torch.where(
                candidate, dense_conf, torch.nan
            ).float()
            # The one host sync of the step (see the docstring): masks are counted in the rows
            # that go on.
            live_rows = ~ended
            step_reads = [
                ended.any().long()[None],
                nonfinite.long()[None],
                _masks_left(x, rows, block_start, block_end, mask_id, live_rows),
            ]
            if decode.refresh:
                step_reads.append(commit.sum(dim=-1).max()[None])
            any_ended, broken, masks_in_block, masks_before, *most = torch.cat(step_reads).tolist()
            if decode.refresh:
                source.note_commits(most[0])
            if broken:
                raise NonFiniteLogitsError(
                    nonfinite_logits_message(  # `step` already counts this step
                        block, step - 1, source.forward_passes, config.cfg_scale, logits.dtype
                    )
                )
            if any_ended:
                done = rows[ended]
                answer = x[done, prompt_length:]
                x[done, prompt_length:] = answer.masked_fill(answer == mask_id, tokens.eos_id)
                finished[done] = True
                rows = rows[live_rows]
                gone_rows = ended.tolist()
                quota_rows = [q for q, gone in zip(quota_rows, gone_rows, strict=True) if not gone]
                row_ids = [r for r, gone in zip(row_ids, gone_rows, strict=True) if not gone]
                source.keep_rows(torch.nonzero(live_rows).squeeze(-1))
            if block == config.num_blocks - 1 and _block_done(masks_in_block, decode, step, config):
                finished[rows] = True
            yield StepEvent(
                block=block,
                step=step,
                forward_passes=source.forward_passes,
                work={
                    "query_positions": source.query_positions,
                    "attended_pairs": source.attended_pairs,
                    "head_positions": source.head_positions,
                },
                tokens=x.clone(),
                committed=committed,
                confidence=shown,
                finished=finished.clone(),
            )
            if len(rows) == 0:
                return
        if len(rows) == 0:
            return


def _denoise_by_length(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerateConfig,
    decode: DecodeConfig,
    mask_id: int | None,
    answer: torch.Tensor | None,
    abandoned: Callable[[], Collection[int]] | None,
    per_row: _Rows | None = None,
) -> Iterator[StepEvent]:
    """The rows of each prompt length as their own unpadded batch, stepped in turn; the events
    show the whole batch in its padded layout. Low-precision attention sums round differently
    when left padding shifts a row's keys (bf16: a few rows in 64 change), while rows of equal
    length batched without padding compute exactly what each computes alone."""
    tokens = special_tokens_of(model, mask_id)
    mask_id = tokens.mask_id
    vocab_size = vocab_size_of(model)
    device = device_of(model)
    prompt = check_prompt(prompt, vocab_size).to(device)
    batch, width = prompt.shape
    attention_mask = check_attention_mask(attention_mask, (batch, width)).to(device)
    lengths = attention_mask.sum(dim=-1)  # (B,) real tokens per row
    columns = torch.arange(width, device=device)
    if not bool((attention_mask == (columns[None, :] >= width - lengths[:, None])).all()):
        raise ValueError(
            "batch_invariant needs left padding: each attention_mask row 0, ..., 0, 1, ..., 1"
        )
    length = width + config.gen_length
    x = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    x[:, :width] = prompt
    if answer is not None:
        if per_row is not None and per_row.ragged:
            raise ValueError(
                "answer= (fixed answer tokens) needs one gen_length for every row; these rows "
                "have several"
            )
        answer = _checked_answer(answer, batch, config, mask_id, vocab_size, True).to(device)
        x[:, width:] = answer
    # Groups of one prompt length and one canvas: each runs unpadded, as its rows run alone.
    gen_lengths = per_row.gen_lengths if per_row is not None else [config.gen_length] * batch
    groups: dict[tuple[int, int], list[int]] = {}
    for row, real in enumerate(lengths.tolist()):
        groups.setdefault((int(real), gen_lengths[row]), []).append(row)
        x[row, width + gen_lengths[row] :] = tokens.eos_id  # past a shorter canvas (`_denoise`)
    runs = []  # [rows, first column, last column, generator, last event]
    for (real, gen_length), rows in sorted(groups.items()):
        group_abandoned = None
        if abandoned is not None:

            def group_abandoned(rows=rows):
                gone = set(abandoned())
                return {local for local, row in enumerate(rows) if row in gone}

        steps = _denoise(
            model,
            x[rows, width - real : width],
            None,
            config if per_row is None else per_row.configs[rows[0]],
            decode,
            mask_id,
            None if answer is None else answer[rows],
            group_abandoned,
            whole_batch=False,
            per_row=None if per_row is None else per_row.subset(rows),
        )
        rows_on_device = torch.tensor(rows, device=device)
        runs.append([rows_on_device, width - real, width + gen_length, steps, None])
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    live = list(runs)
    while live:
        committed = torch.zeros((batch, length), dtype=torch.bool, device=device)
        shown = torch.full((batch, length), torch.nan, device=device)
        advanced = []
        for run in live:
            rows, first, last, steps, _ = run
            event = next(steps, None)
            if event is None:  # this group is done (or had nothing to decode)
                finished[rows] = True
                continue
            x[rows, first:last] = event.tokens
            committed[rows, first:last] = event.committed
            shown[rows, first:last] = event.confidence
            finished[rows] = event.finished
            run[4] = event
            advanced.append(run)
        live = advanced
        if not live:
            return
        seen = [run[4] for run in runs if run[4] is not None]
        work = {key: sum(event.work[key] for event in seen) for key in seen[0].work}
        yield StepEvent(
            block=max(run[4].block for run in live),
            step=max(run[4].step for run in live),
            forward_passes=sum(event.forward_passes for event in seen),
            work=work,
            tokens=x.clone(),
            committed=committed,
            confidence=shown,
            finished=finished.clone(),
        )


def _checked_answer(
    answer: torch.Tensor,
    batch: int,
    config: GenerateConfig,
    mask_id: int,
    vocab_size: int,
    needs_a_free_position: bool,
) -> torch.Tensor:
    """`answer` (batch, gen_length) of token ids, or a ValueError saying what to change; with
    `needs_a_free_position`, at least one position must hold the mask id."""
    answer = check_token_ids("answer", answer, 2, vocab_size)
    if answer.shape != (batch, config.gen_length):
        raise ValueError(
            f"answer must have shape (batch, gen_length) = {(batch, config.gen_length)}, "
            f"got {tuple(answer.shape)}"
        )
    if needs_a_free_position and not bool((answer == mask_id).any()):
        raise ValueError(
            f"answer holds no mask id ({mask_id}): every position is fixed, so there is "
            "nothing to generate; put the mask id where the model should write"
        )
    return answer


def _settings(config: object, decode: object) -> tuple[GenerateConfig, DecodeConfig]:
    """The settings objects, or a TypeError that says how to build them."""
    if config is None:
        config = GenerateConfig()
    if isinstance(config, dict):
        raise TypeError(
            "config must be a llada.GenerateConfig, got a dict; pass GenerateConfig(**your_dict)"
        )
    if not isinstance(config, GenerateConfig):
        raise TypeError(f"config must be a llada.GenerateConfig, got {type(config).__name__}")
    if isinstance(decode, str):
        decode = decode_preset(decode)
    elif isinstance(decode, dict):
        raise TypeError(
            "decode must be a preset name, a llada.DecodeConfig or a llada.BlockDecodeConfig, "
            "got a dict; pass DecodeConfig(**your_dict)"
        )
    elif not isinstance(decode, (DecodeConfig, BlockDecodeConfig)):
        raise TypeError(
            "decode must be a preset name, a llada.DecodeConfig or a llada.BlockDecodeConfig, "
            f"got {type(decode).__name__}"
        )
    return config, decode


def _check_family(model: torch.nn.Module, decode: DecodeConfig | BlockDecodeConfig) -> None:
    """LLaDA 2.x models decode by block diffusion, the others by LLaDA-8B's loop."""
    block_model = bool(getattr(model, "block_diffusion", False))
    if block_model and isinstance(decode, DecodeConfig):
        raise ValueError(
            "this is a LLaDA 2.x model (block diffusion): decode it with one of the presets "
            f"{', '.join(BLOCK_PRESETS)} or a llada.BlockDecodeConfig, not LLaDA-8B's "
            "DecodeConfig presets"
        )
    if not block_model and isinstance(decode, BlockDecodeConfig):
        raise ValueError(
            "the LLaDA 2.x presets and BlockDecodeConfig are for LLaDA 2.x models; this model "
            f"decodes with one of {', '.join(PRESETS)} or a llada.DecodeConfig"
        )


def _least_passes(decode: DecodeConfig) -> int:
    """Passes every block runs, full or not: Fast-dLLM's loops check for a full block only
    after a pass, and its cached ones only after the first pass over the cache."""
    if not decode.fastdllm_numerics:
        return 0
    return 2 if decode.source in ("prefix", "dual") else 1


def schedule_quota(masks: int, steps: int) -> list[int]:
    """Tokens to commit at each of `steps` steps for a block row with `masks` masks: what
    `reference.get_num_transfer_tokens` gives for that row (n // s each, one more in the first
    n % s steps), as Python ints."""
    base, remainder = divmod(masks, steps)
    return [base + (step < remainder) for step in range(steps)]


def _masks_left(
    x: torch.Tensor,
    rows: torch.Tensor,
    block_start: int,
    block_end: int,
    mask_id: int,
    live: torch.Tensor | None = None,
) -> torch.Tensor:
    """(2,) int64 on the device: the masks in the block and before it, over the batch rows
    `rows` (only those where `live`, if given)."""
    masked = x[rows, :block_end] == mask_id  # (R, block_end)
    if live is not None:
        masked = masked & live[:, None]
    return torch.stack([masked[:, block_start:].sum(), masked[:, :block_start].sum()])


def _block_done(masks_in_block: int, decode, step: int, config) -> bool:
    """Whether the loop leaves this block: the schedule's steps are spent, or (except for the
    reference's fixed step count) no masks are left in it (of the rows still decoding)."""
    if decode.commit == "schedule" and step == config.steps_per_block:
        return True
    if decode.commit == "schedule" and decode.reference_numerics:
        return False
    if step < _least_passes(decode):
        return False
    return masks_in_block == 0


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerateConfig | None = None,
    decode: DecodeConfig | str = "fast",
    mask_id: int | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    answer: torch.Tensor | None = None,
    seeds: Sequence[int | None] | None = None,
) -> SampleResult:
    """Generate `config.gen_length` tokens after each prompt row with the fast loop.

    prompt (B, Lp), left-padded with `attention_mask` for batches; `decode` is a
    `DecodeConfig` or a preset name ('reference', 'fastdllm-prefix', 'fastdllm-dual', 'fast',
    'fastest'). Returns the canvas (B, Lp + gen_length), the number of forward passes and of
    steps. `on_step` sees every step (for streaming and visualisation).

    answer: optional (B, gen_length) starting answer, the mask id where free and a token id
    where fixed (the reference demo's word constraints). Fixed tokens are never changed and,
    as in the reference demo, count as prompt for CFG's unconditional pass.

    config and decode may be one per row, and seeds gives rows their own random draws (see
    `denoise`).
    """
    last = None
    steps = 0
    events = denoise(model, prompt, attention_mask, config, decode, mask_id, answer, seeds=seeds)
    for event in events:
        steps += 1
        last = event
        if on_step is not None:
            on_step(event)
    if last is None:  # nothing to decode (e.g. every answer position given)
        raise ValueError("nothing was decoded")
    return SampleResult(
        tokens=last.tokens, forward_passes=last.forward_passes, steps=steps, work=last.work
    )
