"""minimtp: readable, exact speculative decoding for Gemma 4 with its MTP assistant."""

from minimtp.errors import (
    CacheFullError,
    CheckpointError,
    CompatibilityError,
    ConfigError,
    GenerationError,
    MinimtpError,
)

__all__ = [
    "MinimtpError",
    "ConfigError",
    "CheckpointError",
    "CompatibilityError",
    "GenerationError",
    "CacheFullError",
]
__version__ = "0.1.0"
