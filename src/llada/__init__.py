"""llada: run, evaluate, serve and train LLaDA masked diffusion language models.

The reference-compatible entry points keep the names and arguments of the published code:
`load_model`, `generate`, `get_log_likelihood`. Submodules are imported on first use, so that
`import llada` (and `llada --help`) stays fast. For the same reason `import llada` does not
register llada's models with transformers (importing transformers takes seconds): `import
llada.hf`, or call `llada.register_with_transformers()`, before `AutoModel.from_pretrained`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLaDAConfig": "llada.model.config",
    "LLaDAModel": "llada.model.transformer",
    "LLaDAMoEConfig": "llada.model.llada_moe",
    "LLaDAMoEModel": "llada.model.llada_moe",
    "LLaDA2Config": "llada.model.llada2",
    "LLaDA2Model": "llada.model.llada2",
    "load_model": "llada.model.checkpoint",
    "save_pretrained": "llada.model.checkpoint",
    "SpecialTokens": "llada.tokens",
    "generate": "llada.sampling.reference",
    "block_generate": "llada.sampling.block",
    "block_sample": "llada.sampling.block_cached",
    "block_preset": "llada.sampling.config",
    "block_generate_cached": "llada.sampling.block_cached",
    "GenerateConfig": "llada.sampling.config",
    "DecodeConfig": "llada.sampling.config",
    "BlockDecodeConfig": "llada.sampling.config",
    "NonFiniteLogitsError": "llada.sampling.config",
    "sample": "llada.sampling.fast",
    "denoise": "llada.sampling.fast",
    "KVCache": "llada.model.transformer",
    "causal_attention_mask": "llada.model.transformer",
    "get_log_likelihood": "llada.likelihood",
    "LikelihoodConfig": "llada.likelihood",
    "load_tokenizer": "llada.tokenizer",
    "render_chat": "llada.tokenizer",
    "register_with_transformers": "llada.hf",
    "generation_defaults": "llada.generation_config",
    "quantize": "llada.quantization",
    "compile_model": "llada.compile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llada' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
