"""Samplers: the reference sampler (the oracle) and, built on the same pieces, fast paths."""

from .config import GenerateConfig
from .reference import add_gumbel_noise, generate, get_num_transfer_tokens

__all__ = ["GenerateConfig", "add_gumbel_noise", "generate", "get_num_transfer_tokens"]
