"""How the fast loop obtains logits: which window of the canvas each forward pass runs over.

- `full`: every step runs the whole canvas (the reference; exact).
- `prefix`: Fast-dLLM's prefix cache. At a block's first step a full forward fills the cache;
  later steps run the current block and everything after it over the cached prefix.
- `dual`: Fast-dLLM's dual cache. The same fill; later steps run only the current block, over
  the cached prefix and the (stale) cached suffix.
  With `DecodeConfig(fastdllm_numerics=True)` (the fastdllm-* presets) the loop runs these two
  as Fast-dLLM does, with at least one cached step per block even when the fill's step already
  decoded the whole block; otherwise a full block is left at once.
- `block`: ours. Only the very first step runs the whole canvas. The first step of every later
  block runs the block just finished together with the new block (one pass commits the finished
  tokens' keys and values and decides the new block's first tokens), so no step ever
  recomputes the prompt or the rest of the canvas; `vicinity` extra positions after the block
  are refreshed at every step.

Every source supports classifier-free guidance (the unconditional rows ride along in the same
forward and the same cache), attention masks (left padding) and rows leaving the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.transformer import KVCache, flat_positions

SOURCES = ("full", "prefix", "dual", "block")


def padding_mask_or_none(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask, or None when it pads nothing. The model turns any mask it is given into an
    attention bias (it never reads the mask's values back in the forward); None keeps such a
    batch on the maskless attention kernels, bit-identical to an unpadded call. One read-back
    per sampling call (and per change of the batch's rows), outside the forwards."""
    if attention_mask is None or not bool(attention_mask.all()):
        return attention_mask
    return None


@dataclass
class Window:
    start: int
    end: int
    fills_cache: bool = False


class LogitsSource:
    """Runs the model over windows of the canvas; subclasses choose the windows."""

    uses_cache = True

    def __init__(
        self,
        model: torch.nn.Module,
        attention_mask: torch.Tensor | None,
        prompt_index: torch.Tensor,
        mask_id: int,
        cfg_scale: float,
        vicinity: int = 0,
        refresh: int = 0,
    ) -> None:
        self.model = model
        self.attention_mask = padding_mask_or_none(attention_mask)
        self.prompt_index = prompt_index
        self.mask_id = mask_id
        self.cfg_scale = cfg_scale
        self.vicinity = vicinity
        self.refresh = refresh
        # Tokens committed (in the row with most) since the cache was last filled.
        self.committed_since_fill = 0
        self.cache: KVCache | None = None
        self.forward_passes = 0
        # Work done, for achieved-FLOP/s figures: query positions run through the blocks,
        # (query, key) pairs attended, and positions run through the LM head.
        self.query_positions = 0
        self.attended_pairs = 0
        self.head_positions = 0

    def window(self, block_start: int, block_end: int, length: int, first_step: bool) -> Window:
        raise NotImplementedError

    def stale(self) -> bool:
        """Whether the refresh rule asks for a cache fill before this step."""
        return self.refresh > 0 and self.committed_since_fill >= self.refresh

    def note_commits(self, most_in_a_row: int) -> None:
        self.committed_since_fill += most_in_a_row

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only these rows of the batch go on (the others finished)."""
        if self.attention_mask is not None:
            self.attention_mask = padding_mask_or_none(self.attention_mask.index_select(0, rows))
        self.prompt_index = self.prompt_index.index_select(0, rows)
        if self.cache is not None:
            if self.cfg_scale > 0:
                rows = torch.cat([rows, rows + self.cache.batch_size // 2])
            self.cache.select_rows(rows)

    def logits(
        self,
        x: torch.Tensor,
        window: Window,
        logits_at: torch.Tensor,
        flat_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (N, V) at the positions `logits_at` (bool, B x window width) of the window of
        x, in row-major order.

        flat_at: the same selection as flat row-major positions (N,), when the caller has them
        (the fast loop sizes them without a read-back); otherwise they are computed here, the
        one read-back of the selection, outside the forward (the model's output shape must not
        depend on tensor values)."""
        if flat_at is None:
            flat_at = flat_positions(logits_at)
        tokens = x[:, window.start : window.end]
        mask = self.attention_mask
        guided = self.cfg_scale > 0
        if guided:
            prompt = self.prompt_index[:, window.start : window.end]
            tokens = torch.cat([tokens, tokens.masked_fill(prompt, self.mask_id)])
            # The unconditional rows follow the conditional ones: the same positions, B*T on.
            flat_at = torch.cat([flat_at, flat_at + logits_at.numel()])
            mask = None if mask is None else torch.cat([mask, mask])
        self.forward_passes += 1
        self.query_positions += tokens.numel()
        keys = x.shape[1] if (self.uses_cache and not window.fills_cache) else tokens.shape[1]
        self.attended_pairs += tokens.numel() * keys
        self.head_positions += flat_at.numel()
        if not self.uses_cache:
            out = self.model(tokens, attention_mask=mask, logits_at=flat_at).logits
        else:
            if window.fills_cache:
                # A fresh cache holding the current rows' padding; the whole-canvas forward
                # below writes every slot.
                self.cache = self.model.new_kv_cache(*tokens.shape, attention_mask=mask)
                self.committed_since_fill = 0
            out = self.model(
                tokens, kv_cache=self.cache, window_start=window.start, logits_at=flat_at
            ).logits
        if not guided:
            return out
        conditional, unconditional = out.chunk(2)
        return unconditional + (self.cfg_scale + 1) * (conditional - unconditional)


class FullForward(LogitsSource):
    uses_cache = False

    def window(self, block_start, block_end, length, first_step):
        return Window(0, length)


class PrefixCache(LogitsSource):
    def window(self, block_start, block_end, length, first_step):
        if first_step or self.stale():
            return Window(0, length, fills_cache=True)
        return Window(block_start, length)


class DualCache(LogitsSource):
    def window(self, block_start, block_end, length, first_step):
        if first_step or self.stale():
            return Window(0, length, fills_cache=True)
        return Window(block_start, block_end)


class BlockCache(LogitsSource):
    def window(self, block_start, block_end, length, first_step):
        if self.cache is None or self.stale():
            return Window(0, length, fills_cache=True)
        end = min(length, block_end + self.vicinity)
        if first_step:  # also run the block just finished, to commit its keys and values
            return Window(block_start - (block_end - block_start), end)
        return Window(block_start, end)


def make_source(name: str, *args, **kwargs) -> LogitsSource:
    classes = {"full": FullForward, "prefix": PrefixCache, "dual": DualCache, "block": BlockCache}
    if name not in classes:
        raise ValueError(f"unknown logits source {name!r}; choose from {SOURCES}")
    return classes[name](*args, **kwargs)
