"""The serving loop: one engine thread runs the scheduler; HTTP handlers submit requests and read their tokens.

`ServingEngine` owns a persistent KV pool and a :class:`~minimtp.scheduler.Scheduler` (docs: serving). Its thread
steps the scheduler while there is work and sleeps otherwise. A request's tokens go to its asyncio queue through
``loop.call_soon_threadsafe`` as they are accepted, then one ``("done", reason)`` event. Cancelling (a client that
went away) takes effect at the next step and frees the request's blocks. A step that raises fails the requests it
was running (their streams get an error) and the loop goes on: a bad request never stops the others.

Metrics (`Metrics`, Prometheus via prometheus_client, names as vLLM's with the ``minimtp:`` prefix): the
speculative-decoding counters (drafts, draft tokens, accepted tokens, accepted per position), queue length, running
requests, KV-block usage, token counters, and TTFT / inter-token latency / end-to-end histograms.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from minimtp.kv_cache import KVCache
from minimtp.request import Request
from minimtp.scheduler import Scheduler

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, max_positions: int = 16):
        self.registry = r = CollectorRegistry()
        m = "minimtp:"
        self.prompt_tokens = Counter(m + "prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter(m + "generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter(m + "request_success", "Finished requests", ["finished_reason"], registry=r)
        self.drafts = Counter(m + "spec_decode_num_drafts", "Rounds with drafts", registry=r)
        self.draft_tokens = Counter(m + "spec_decode_num_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter(m + "spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r)
        self.accepted_pos = Counter(m + "spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position",
                                    ["position"], registry=r)  # fmt: skip
        self.mean_acceptance_length = Gauge(m + "spec_decode_mean_acceptance_length",
                                            "1 + accepted / rounds with drafts, since start", registry=r)  # fmt: skip
        self.running = Gauge(m + "num_requests_running", "Requests in the batch", registry=r)
        self.waiting = Gauge(m + "num_requests_waiting", "Requests waiting to be admitted", registry=r)
        self.kv_usage = Gauge(m + "kv_cache_usage_perc", "Fraction of KV blocks in use (fullest pool)", registry=r)
        self.ttft = Histogram(m + "time_to_first_token_seconds", "Time to first token", buckets=_LATENCY, registry=r)
        self.itl = Histogram(m + "inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY, registry=r)
        self.e2e = Histogram(m + "e2e_request_latency_seconds", "Request latency", buckets=_LATENCY, registry=r)
        self._seen = (0, 0, 0, [])  # draft rounds, drafted, accepted, accepted per position, already counted

    def update(self, sched: Scheduler) -> None:
        """Counters from the scheduler's cumulative Stats (deltas since the last call), gauges from its state."""
        st, (rounds, drafted, accepted, per_pos) = sched.stats, self._seen
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


class ServingEngine:
    """The engine thread and its queues. ``num_blocks``: the KV pool per layer type (blocks of the engine's size)."""

    def __init__(self, engine, num_blocks: int, *, max_num_seqs: int = 16, max_waiting: int = 64,
                 max_tokens_per_step: int | None = 2048):  # fmt: skip
        cfg = engine.cfg
        cache = KVCache(cfg, {t: num_blocks for t in set(cfg.layer_types)}, engine.block_size, engine.sliding_keep,
                        engine.dtype, engine.device)  # fmt: skip
        self.engine, self.metrics = engine, Metrics()
        self.sched = Scheduler(engine, cache, max_num_seqs=max_num_seqs, max_waiting=max_waiting,
                               max_tokens_per_step=max_tokens_per_step)  # fmt: skip
        self.streams: dict[Request, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[float]]] = {}
        self.wake, self.stopping = threading.Event(), False
        self.thread = threading.Thread(target=self._loop, name="minimtp-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, req: Request) -> asyncio.Queue:
        """Queue ``req`` (QueueFullError when the waiting queue is full); returns its event queue."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        times = [req.arrival]  # arrival, then the time of the last token
        req.on_tokens = lambda r, new: self._tokens(r, new)
        self.streams[req] = (loop, queue, times)
        try:
            self.sched.add(req)
        except Exception:
            del self.streams[req]
            raise
        self.wake.set()
        return queue

    def cancel(self, req: Request) -> None:
        self.sched.cancel(req)
        self.wake.set()

    def _tokens(self, r: Request, new: list[int]) -> None:
        loop, queue, times = self.streams[r]
        now = time.perf_counter()
        if len(times) == 1:
            self.metrics.ttft.observe(now - times[0])
        else:
            for _ in new:
                self.metrics.itl.observe((now - times[-1]) / len(new))
        times.append(now)
        self.metrics.generation_tokens.inc(len(new))
        loop.call_soon_threadsafe(queue.put_nowait, ("tokens", list(new)))

    def _finish(self, r: Request, reason: str) -> None:
        loop, queue, times = self.streams.pop(r)
        self.metrics.e2e.observe(time.perf_counter() - times[0])
        self.metrics.requests.labels(finished_reason=reason).inc()
        loop.call_soon_threadsafe(queue.put_nowait, ("done", reason))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self.stopping:
            if not self.sched.has_work:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            prompt_before = self.sched.stats.prompt_tokens
            try:
                with torch.inference_mode():
                    finished = self.sched.step()
            except Exception as e:  # fail the batch that raised, keep serving
                traceback.print_exc()
                finished = self._fail_running(f"{type(e).__name__}: {e}")
            self.metrics.prompt_tokens.inc(self.sched.stats.prompt_tokens - prompt_before)
            for r in finished:
                self._finish(r, r.done)
            self.metrics.update(self.sched)

    def _fail_running(self, message: str) -> list[Request]:
        failed = []
        for r in list(self.sched.running):
            self.sched.running.remove(r)
            self.sched.cache.release(r.id)
            r.done, r.stop_reason = "error", message
            failed.append(r)
        return failed
