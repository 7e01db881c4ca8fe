"""The serving loop: one engine thread steps the scheduler; HTTP handlers submit requests and read their tokens.

`ServingEngine` owns a persistent KV pool and a :class:`~minimtp.scheduler.Scheduler` (docs: serving). While there
is work its thread runs the one-way step (``plan = schedule()``, ``engine.execute(plan)``, ``postprocess``), and
sleeps otherwise. A request's tokens go to its asyncio queue through
``loop.call_soon_threadsafe`` as they are accepted, then one ``("done", reason)`` event. Cancelling (a client that
went away) takes effect at the next step and frees the request's blocks. A step that raises fails the requests it
was running (their streams get an error) and the loop goes on: a bad request never stops the others.

Metrics: metrics.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

import torch

from minimtp.kv_cache import KVCache
from minimtp.request import Request
from minimtp.scheduler import Scheduler
from minimtp.serve.metrics import Metrics


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
        self.streams: dict[Request, tuple[asyncio.AbstractEventLoop, asyncio.Queue, list[float]]] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="minimtp-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, req: Request) -> asyncio.Queue:
        """Queue ``req`` (QueueFullError when the waiting queue is full); returns its event queue."""
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
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
                    plan = self.sched.schedule()
                    finished = self.sched.postprocess(plan, self.engine.execute(plan, self.sched.cache))
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
            r.done = "error"
            r.stop_reason = message
            failed.append(r)
        return failed
