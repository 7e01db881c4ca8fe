"""minimtp: readable, exact speculative decoding for Gemma 4 with its MTP assistant."""

from minimtp.assistant import Gemma4Assistant, load_assistant
from minimtp.engine import Engine, GenerationResult
from minimtp.errors import (
    CacheFullError,
    CheckpointError,
    CompatibilityError,
    ConfigError,
    GenerationError,
    MinimtpError,
)
from minimtp.model import Gemma4, load_target
from minimtp.settings import GenerationSettings
from minimtp.stats import Stats
from minimtp.tokenizer import load_tokenizer

__all__ = [
    "load_target",
    "load_assistant",
    "load_tokenizer",
    "Engine",
    "GenerationResult",
    "GenerationSettings",
    "Stats",
    "Gemma4",
    "Gemma4Assistant",
    "MinimtpError",
    "ConfigError",
    "CheckpointError",
    "CompatibilityError",
    "GenerationError",
    "CacheFullError",
]
__version__ = "0.1.0"
