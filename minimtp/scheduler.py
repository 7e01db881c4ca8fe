"""Continuous batching: requests join and leave the batch between rounds.

One :meth:`Scheduler.step` (docs: serving, "How the scheduler works"):

    retire    cancelled requests; free their KV blocks
    admit     waiting requests, oldest first, while the batch has room (``max_num_seqs``), the step's token budget
              allows their prompt, and the KV pool has blocks for it; prefill them in one packed forward
    reserve   blocks for every running request's round (pending token + its drafts); when the pool is full, the
              newest request is preempted: its blocks are freed and it waits again at the front, to be recomputed
              from prompt + tokens so far (its generated tokens and random stream are kept)
    round     one draft / verify / accept round for every running request together (`Engine._round`)
    retire    the finished ones

A request's tokens depend only on its own settings and random stream, never on its batchmates: every per-row draw
comes from its own generator, in the same order whatever the batch (sampling.py).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque

from minimtp.errors import CacheFullError, GenerationError
from minimtp.request import Request
from minimtp.stats import Stats


class QueueFullError(GenerationError):
    """The waiting queue is at ``max_waiting``: try again later (HTTP 503)."""


class Scheduler:
    def __init__(self, engine, cache, *, max_num_seqs: int = 256, max_waiting: int | None = None,
                 max_tokens_per_step: int | None = None):  # fmt: skip
        self.engine, self.cache, self.stats = engine, cache, Stats()
        self.max_num_seqs, self.max_waiting, self.budget = max_num_seqs, max_waiting, max_tokens_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.lock = threading.Lock()  # add() and cancel() may come from other threads
        self._ids = itertools.count()

    def add(self, req: Request) -> Request:
        with self.lock:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            req.id = next(self._ids)
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request at the next step (e.g. its client disconnected); its blocks are freed then."""
        req.cancelled = True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        """One scheduling step (module docstring). Returns the requests that finished in it."""
        finished = self._retire()
        new = self._admit()
        if new:
            self.engine._prefill(self, new)
            self.stats.prefill_steps += 1
        active = self._reserve([r for r in self.running if r.done is None])
        if active:
            self.engine._round(self, active)
        return finished + self._retire()

    def run(self) -> None:
        while self.has_work:
            self.step()

    def _retire(self) -> list[Request]:
        done = []
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r.done = r.done or "abort"
                done.append(r)
        for r in list(self.running):
            if r.cancelled and r.done is None:
                r.done = "abort"
            if r.done is not None:
                self.running.remove(r)
                self.cache.release(r.id)
                done.append(r)
        return done

    def _admit(self) -> list[Request]:
        new: list[Request] = []
        used = sum(r.k + 1 for r in self.running)
        while self.waiting and len(self.running) + len(new) < self.max_num_seqs:
            r = self.waiting[0]
            n = len(r.prompt) + max(len(r.out) - 1, 0)  # a preempted request recomputes its tokens too
            if new and self.budget is not None and used + n > self.budget:
                break
            self.cache.add(r.id)
            try:
                self.cache.reserve(r.id, n + r.k + 1)
            except CacheFullError:
                self.cache.release(r.id)
                if self.running or new:
                    break  # wait for blocks to come back
                raise  # nothing else holds blocks: this request can never fit
            with self.lock:
                self.waiting.popleft()
            new.append(r)
            used += n
            self.stats.prompt_tokens += len(r.prompt) if not r.out else 0
        self.running += new
        return new

    def _reserve(self, active: list[Request]) -> list[Request]:
        """Blocks for each request's round; preempt the newest while the pool cannot hold them all."""
        for r in list(active):
            while r in active:
                try:
                    self.cache.reserve(r.id, r.cache_len + r.k + 1)
                    break
                except CacheFullError:
                    victim = active[-1]
                    if victim is r and len(active) == 1:
                        raise
                    self._preempt(victim)
                    active.remove(victim)
        return active

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.cache.release(r.id)
        r.cache_len, r.hidden = 0, None
        with self.lock:
            self.waiting.appendleft(r)
