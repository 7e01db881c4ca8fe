"""Prometheus text with vLLM's speculative-decoding counters (vllm ``v1/spec_decode/metrics.py``: the names, the
``model_name`` and ``engine`` labels, one ``position`` label per draft position) for a run's `minimtp.Stats`, so the
metrics audit can be tested on vLLM's format without vLLM. Each counter is split over two engines, as a data-parallel
vLLM deployment reports it (the audit must sum them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest


def vllm_metrics_text(stats, k: int, model: str = "gemma") -> str:
    r = CollectorRegistry()
    labels = ["model_name", "engine"]
    drafts = Counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", labels, registry=r)
    tokens = Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", labels, registry=r)
    accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.", labels, registry=r)
    per_pos = Counter(
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "Accepted tokens per draft position.",
        [*labels, "position"],
        registry=r,
    )
    pos = list(stats.accepted_per_position) + [0] * (k - len(stats.accepted_per_position))
    for engine, share in (("0", 0.5), ("1", 0.5)):
        drafts.labels(model, engine).inc(stats.draft_rounds * share)
        tokens.labels(model, engine).inc(stats.drafted * share)
        accepted.labels(model, engine).inc(stats.accepted * share)
        for j in range(k):
            per_pos.labels(model, engine, str(j)).inc(pos[j] * share)
    return generate_latest(r).decode()
