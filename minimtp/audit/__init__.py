"""``python -m minimtp.audit``: minimtp as the oracle that checks other MTP implementations (docs: guides/audit).

Subcommands, one module each: ``expected`` (exact acceptance along plain-decoded continuations), ``metrics`` (an
engine's Prometheus counters against it), ``sampling`` (a seeded-sample exactness test of any OpenAI-compatible
endpoint) and ``golden`` (reference traces for implementers to diff against).
"""
