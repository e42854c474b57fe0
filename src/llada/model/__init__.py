"""The model families (dense LLaDA, LLaDA-MoE, LLaDA 2.x), their configurations and checkpoint
format."""

from .checkpoint import load_model, save_pretrained
from .config import LLaDAConfig
from .families import FAMILIES, Family, detect_family
from .llada2 import LLaDA2Config, LLaDA2Model
from .llada_moe import LLaDAMoEConfig, LLaDAMoEModel
from .transformer import LLaDAModel, LLaDAOutput

__all__ = [
    "FAMILIES",
    "Family",
    "LLaDA2Config",
    "LLaDA2Model",
    "LLaDAConfig",
    "LLaDAModel",
    "LLaDAMoEConfig",
    "LLaDAMoEModel",
    "LLaDAOutput",
    "detect_family",
    "load_model",
    "save_pretrained",
]
