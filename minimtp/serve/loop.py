"""The serving loop: one engine thread steps the scheduler; HTTP handlers submit requests and read their tokens.

`ServingEngine` owns a persistent KV pool and a :class:`~minimtp.scheduler.Scheduler` (docs: serving). While there
is work its thread runs the one-way step (``plan = schedule()``, ``engine.execute(plan)``, ``postprocess``), and
sleeps otherwise. The requests of one HTTP call (its prompts × ``n``) share one asyncio queue: their tokens go to it
through ``loop.call_soon_threadsafe`` as they are accepted, as ``(index, "tokens", ids)``, then one
``(index, "done", reason)``. Cancelling (a client that went away) takes effect at the next step and frees the
request's blocks. A step that raises fails the requests it was running, once (their streams get an error), and the
loop goes on: a bad request never stops the others.

Shutting down (`close`, then `drain`): no new request is admitted (`submit` raises `ServerClosingError`, HTTP 503);
running ones may finish until the deadline, then the rest are cancelled (finish reason "abort").

Memory: the step's tensors change shape with every batch, and glibc's allocator keeps the freed pieces: the
resident size crept by hundreds of MiB over a few thousand requests of a mixed load. The loop hands free memory
back to the system (``malloc_trim``) whenever it goes idle and every ``TRIM_EVERY`` steps, which keeps it flat
(docs: guides/serving, "Memory").

Metrics: metrics.py.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time

import torch

from minimtp.errors import GenerationError
from minimtp.kv_cache import KVCache
from minimtp.request import Request
from minimtp.scheduler import Scheduler
from minimtp.serve.metrics import Metrics

log = logging.getLogger("minimtp.serve")
TRIM_EVERY = 256  # steps between two malloc_trim calls while busy


def _malloc_trim():
    """glibc's malloc_trim(0) (hand the free heap back to the system), or None where there is none."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class ServerClosingError(GenerationError):
    """The server is shutting down and admits no new request (HTTP 503)."""


class ServingEngine:
    """The engine thread and its queues. ``num_blocks``: the KV pool per layer type (blocks of the engine's size)."""

    def __init__(
        self,
        engine,
        num_blocks: int,
        *,
        max_num_seqs: int = 16,
        max_waiting: int = 64,
        max_tokens_per_step: int | None = 2048,
    ):
        cfg = engine.cfg
        blocks = {t: num_blocks for t in set(cfg.layer_types)}
        cache = KVCache(cfg, blocks, engine.block_size, engine.sliding_keep, engine.dtype, engine.device)
        self.engine = engine
        self.metrics = Metrics()
        self.sched = Scheduler(
            cache, max_num_seqs=max_num_seqs, max_waiting=max_waiting, max_tokens_per_step=max_tokens_per_step
        )
        self.streams: dict[Request, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int, list[float]]] = {}
        self.wake = threading.Event()
        self.closing = False
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="minimtp-engine", daemon=True)
        self.trim = _malloc_trim()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, reqs: list[Request]) -> asyncio.Queue:
        """Queue ``reqs`` (all or none: QueueFullError when the waiting queue cannot take them, CacheFullError when
        the pool could never hold one, ServerClosingError while shutting down); returns their event queue."""
        if self.closing:
            raise ServerClosingError("the server is shutting down")
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        added = []
        try:
            for i, req in enumerate(reqs):
                req.on_tokens = self._tokens
                self.streams[req] = (loop, queue, i, [req.arrival])  # arrival, then the time of the last token
                self.sched.add(req)
                added.append(req)
        except Exception:
            for req in reqs:
                self.streams.pop(req, None)
            for req in added:
                self.sched.cancel(req)
            raise
        self.wake.set()
        return queue

    def cancel(self, reqs: list[Request]) -> None:
        for req in reqs:
            self.sched.cancel(req)
        self.wake.set()

    def close(self) -> None:
        """Admit nothing new from now on."""
        self.closing = True

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the requests in flight, then cancel the rest and wait for their
        final events to be sent."""
        deadline = time.monotonic() + timeout
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.cancel(list(self.streams))
        deadline = time.monotonic() + 5
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _tokens(self, r: Request, new: list[int]) -> None:
        loop, queue, index, times = self.streams[r]
        now = time.perf_counter()
        if len(times) == 1:
            self.metrics.ttft.observe(now - times[0])
        else:
            for _ in new:
                self.metrics.itl.observe((now - times[-1]) / len(new))
        times[:] = [times[0], now]
        self.metrics.generation_tokens.inc(len(new))
        loop.call_soon_threadsafe(queue.put_nowait, (index, "tokens", list(new)))

    def _finish(self, r: Request, reason: str) -> None:
        entry = self.streams.pop(r, None)
        if entry is None:  # submit() took it back
            return
        loop, queue, index, times = entry
        self.metrics.e2e.observe(time.perf_counter() - times[0])
        self.metrics.requests.labels(finished_reason=reason).inc()
        loop.call_soon_threadsafe(queue.put_nowait, (index, "done", reason))

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        steps = 0
        while not self.stopping:
            if not self.sched.has_work:
                if steps and self.trim is not None:  # just went idle
                    self.trim(0)
                steps = 0
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            steps += 1
            if steps % TRIM_EVERY == 0 and self.trim is not None:
                self.trim(0)
            prompt_before = self.sched.stats.prompt_tokens
            plan = None
            try:
                with torch.inference_mode():
                    plan = self.sched.schedule()
                    finished = self.sched.postprocess(plan, self.engine.execute(plan, self.sched.cache))
            except Exception as e:  # fail the requests of the step that raised, once; keep serving
                culprits = plan.requests if plan is not None else list(self.sched.waiting)[:1]
                log.exception("a step of %d request(s) failed; they end with an error", len(culprits))
                finished = (plan.retired if plan is not None else []) + self.sched.fail(
                    culprits, f"{type(e).__name__}: {e}"
                )
            self.metrics.prompt_tokens.inc(self.sched.stats.prompt_tokens - prompt_before)
            for r in finished:
                self._finish(r, r.done)
            self.metrics.update(self.sched)
