"""One exception family for everything minimtp refuses.

Every message is one line naming the file / key / value and what was expected, so the CLI can print
`error: <message>` and exit non-zero without a traceback.
"""


class MinimtpError(Exception):
    """Base class of every error minimtp raises on bad input."""


class ConfigError(MinimtpError):
    """A `config.json` (or `generation_config.json`) that minimtp cannot interpret."""


class CheckpointError(MinimtpError):
    """Missing, corrupt or mis-shaped safetensors weights."""


class CompatibilityError(MinimtpError):
    """A target / assistant pair (or a setting) that cannot work together."""


class GenerationError(MinimtpError):
    """Bad arguments to `Engine.generate` (prompts, sampling settings, limits)."""


class CacheFullError(MinimtpError):
    """The paged KV pool has no free block left."""
