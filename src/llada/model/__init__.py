"""The dense LLaDA model, its configuration and its checkpoint format."""

from .checkpoint import load_model, save_pretrained
from .config import LLaDAConfig
from .transformer import LLaDAModel, LLaDAOutput

__all__ = ["LLaDAConfig", "LLaDAModel", "LLaDAOutput", "load_model", "save_pretrained"]
