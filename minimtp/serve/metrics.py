"""The server's Prometheus metrics (prometheus_client), named as vLLM's with the ``minimtp:`` prefix: the
speculative-decoding counters (drafts, draft tokens, accepted tokens, accepted per position), queue length, running
requests, KV-block usage, token counters, and TTFT / inter-token latency / end-to-end histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from minimtp.scheduler import Scheduler

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, max_positions: int = 16):
        r = CollectorRegistry()
        m = "minimtp:"
        self.registry = r
        self.prompt_tokens = Counter(m + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(m + "generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(m + "request_success", "Finished requests", ["finished_reason"], registry=r)
        self.drafts = Counter(m + "spec_decode_num_drafts", "Rounds with drafts", registry=r)
        self.draft_tokens = Counter(m + "spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter(m + "spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_pos = Counter(
            m + "spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position", ["position"], registry=r
        )
        self.mean_acceptance_length = Gauge(
            m + "spec_decode_mean_acceptance_length", "1 + accepted / rounds with drafts, since start", registry=r
        )
        self.running = Gauge(m + "num_requests_running", "Requests in the batch", registry=r)
        self.waiting = Gauge(m + "num_requests_waiting", "Requests waiting to be admitted", registry=r)
        self.kv_usage = Gauge(m + "kv_cache_usage_perc", "Fraction of KV blocks in use (fullest pool)", registry=r)
        self.ttft = Histogram(m + "time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=r)
        self.itl = Histogram(m + "inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY, registry=r)
        self.e2e = Histogram(m + "e2e_request_latency_seconds", "Request latency", buckets=_LATENCY, registry=r)
        self._seen = (0, 0, 0, [])  # draft rounds, drafted, accepted, accepted per position, already counted

    def update(self, sched: Scheduler) -> None:
        """Counters from the scheduler's cumulative Stats (deltas since the last call), gauges from its state."""
        st = sched.stats
        rounds, drafted, accepted, per_pos = self._seen
        self.drafts.inc(st.draft_rounds - rounds)
        self.draft_tokens.inc(st.drafted - drafted)
        self.accepted.inc(st.accepted - accepted)
        for j, a in enumerate(st.accepted_per_position):
            self.accepted_pos.labels(position=str(j)).inc(a - (per_pos[j] if j < len(per_pos) else 0))
        self._seen = (st.draft_rounds, st.drafted, st.accepted, list(st.accepted_per_position))
        self.mean_acceptance_length.set(st.mean_acceptance_length)
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting))
        c = sched.cache
        self.kv_usage.set(max(1 - len(c.free_blocks[t]) / n for t, n in c.num_blocks.items()))
