"""Samplers: the reference sampler (the oracle) and, built on the same pieces, fast paths; LLaDA
2.x's block samplers (`block_generate`, the oracle; `block_sample`, with the block KV cache).

Names are resolved on first use so that importing the settings (e.g. for `llada --help`)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerateConfig": ".config",
    "DecodeConfig": ".config",
    "BlockDecodeConfig": ".config",
    "NonFiniteLogitsError": ".config",
    "max_steps": ".config",
    "PRESETS": ".config",
    "decode_preset": ".config",
    "BLOCK_PRESETS": ".config",
    "block_preset": ".config",
    "sample": ".fast",
    "denoise": ".fast",
    "SampleResult": ".fast",
    "StepEvent": ".events",
    "generate": ".reference",
    "add_gumbel_noise": ".reference",
    "get_num_transfer_tokens": ".reference",
    "block_generate": ".block",
    "block_sample": ".block_cached",
    "block_generate_cached": ".block_cached",
    "iter_block_sample": ".block_cached",
    "BlockSampleResult": ".block_cached",
    "BlockStepEvent": ".block_cached",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'llada.sampling' has no attribute '{name}'")
