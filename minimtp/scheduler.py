"""Continuous batching: requests join and leave the batch between steps. The scheduler decides; the engine runs.

One step flows one way (docs: serving, "How the scheduler works"):

    plan = scheduler.schedule()              retire cancelled requests; admit waiting ones, or reserve the round
    result = engine.execute(plan, cache)     prefill the admitted requests, or run one round for the running ones
    finished = scheduler.postprocess(plan, result)   append each request's tokens, count, retire the finished

`schedule` first reserves blocks for every running request's next round (pending token + its drafts). If they fit,
it admits waiting requests, oldest first, while the batch has room (``max_num_seqs``), the step's token budget
allows their prompt, and the KV pool has blocks left for it: that step prefills them. Otherwise the step is a
round for the running requests; when the pool cannot hold their rounds, the newest request is preempted: its
blocks are freed and it waits again at the front, to be recomputed from prompt + tokens so far (its generated
tokens and random stream are kept).

A request is refused when it is added if an empty pool could not hold it (`add` raises `CacheFullError`), so
nothing waits forever; a request that still cannot get blocks alone, or whose step raised (`fail`), ends once with
``done = "error"`` and the others go on.

A request's tokens depend only on its own settings and random stream, never on its batchmates: every per-row draw
comes from its own generator, in the same order whatever the batch (sampling.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from minimtp.config import SLIDING
from minimtp.errors import CacheFullError, GenerationError
from minimtp.kv_cache import KVCache
from minimtp.request import Request
from minimtp.stats import Stats


class QueueFullError(GenerationError):
    """The waiting queue is at ``max_waiting``: try again later (HTTP 503)."""


@dataclass
class Plan:
    """One step's work order. Either ``prefill`` (newly admitted requests: their prompts, or prompt + tokens so far
    after a preemption) or ``decode`` (running requests, one round each, blocks reserved) is non-empty, or
    neither. ``retired``: requests cancelled before the step, already off the batch."""

    prefill: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    retired: list[Request] = field(default_factory=list)

    @property
    def requests(self) -> list[Request]:
        return self.prefill or self.decode


@dataclass
class StepResult:
    """What the engine did with a plan, one entry per planned request (in ``Plan.requests`` order): the tokens it
    emitted (a preempted request's prefill emits none; stop tokens and strings are cut by `Request.append`), the
    drafts proposed and accepted in a round, and the wall time of drafting and of the target's forwards.
    ``logprobs``: for the requests that ask for them, one (logprob, top) entry per token (sampling.token_logprobs),
    else None."""

    tokens: list[list[int]]
    drafted: list[int]
    accepted: list[int]
    logprobs: list[list[tuple] | None] | None = None
    draft_s: float = 0.0
    verify_s: float = 0.0


class Scheduler:
    def __init__(
        self,
        cache: KVCache,
        *,
        max_num_seqs: int = 256,
        max_waiting: int | None = None,
        max_tokens_per_step: int | None = None,
    ):
        self.cache = cache
        self.stats = Stats()
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.budget = max_tokens_per_step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.lock = threading.Lock()  # add() and cancel() may come from other threads
        self._ids = itertools.count()
        self._failed: list[Request] = []  # ended by the scheduler itself, returned by the next retire

    def add(self, req: Request) -> Request:
        """Queue ``req``; QueueFullError when the queue is at ``max_waiting``, CacheFullError when the pool could
        never hold it (its prompt + budget + one round of drafts)."""
        self._check_fits(req)
        with self.lock:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
            req.id = next(self._ids)
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request at the next step (e.g. its client disconnected); its blocks are freed then."""
        req.cancelled = True

    def fail(self, reqs: list[Request], message: str) -> list[Request]:
        """End the scheduled ones of ``reqs`` with ``done = "error"`` (e.g. the step that ran them raised) and free
        their blocks; returns them."""
        failed = []
        for r in reqs:
            with self.lock:
                waiting = r in self.waiting
                if waiting:
                    self.waiting.remove(r)
            if r in self.running:
                self.running.remove(r)
            elif not waiting:
                continue
            if r.id in self.cache.tables:
                self.cache.release(r.id)
            r.done = "error"
            r.stop_reason = message
            failed.append(r)
        return failed

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Plan:
        """The next step's plan (module docstring)."""
        retired = self._retire()
        if self.waiting and self._reserve_rounds():  # the running requests' rounds come first
            new = self._admit()
            if new:
                return Plan(prefill=new, retired=retired)
        return Plan(decode=self._reserve(list(self.running)), retired=retired)

    def postprocess(self, plan: Plan, result: StepResult) -> list[Request]:
        """Apply ``result``: each request's tokens and counters; returns the requests that finished in the step
        (their blocks are free)."""
        now = time.perf_counter()
        if plan.prefill:
            self.stats.prefill_steps += 1
        for b, r in enumerate(plan.requests):
            if plan.decode:
                self.stats.count_round(result.drafted[b], result.accepted[b], forward=b == 0)  # one batched forward
                r.stats.count_round(result.drafted[b], result.accepted[b])
            first = not r.out
            r.append(result.tokens[b], result.logprobs[b] if result.logprobs else None)
            if first and r.out:
                r.stats.ttft_s = now - r.arrival
        self.stats.draft_s += result.draft_s
        self.stats.verify_s += result.verify_s
        return plan.retired + self._retire()

    def _check_fits(self, r: Request) -> None:
        """Every pool must hold the prefill (prompt + one round: ``k`` drafts and the pending token); the
        full-attention pools also everything the request can grow to (prompt + budget, at most the context)."""
        c = self.cache
        for t, blocks in c.num_blocks.items():
            n = len(r.prompt) + (0 if t == SLIDING else min(r.max_new, r.max_len - len(r.prompt))) + r.k + 1
            need = -(-n // c.block_size)
            if need > blocks:
                raise CacheFullError(
                    f"the request needs {need} KV blocks of {c.block_size} positions ({len(r.prompt)} prompt tokens,"
                    f" up to {r.max_new} new, {r.k} drafts per round) but the {t} pool holds {blocks}: lower "
                    "max_tokens or num_speculative_tokens"
                )

    def _retire(self) -> list[Request]:
        done = self._failed
        self._failed = []
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
        used = 0
        while self.waiting and len(self.running) + len(new) < self.max_num_seqs:
            r = self.waiting[0]
            n = len(r.prompt) + max(len(r.out) - 1, 0)  # a preempted request recomputes its tokens too
            if new and self.budget is not None and used + n > self.budget:
                break
            self.cache.add(r.id)
            try:
                self.cache.reserve(r.id, n + r.k + 1)
            except CacheFullError as e:
                self.cache.release(r.id)
                if self.running or new:
                    break  # wait for blocks to come back
                self._failed += self.fail([r], str(e))  # nothing else holds blocks: it can never fit
                continue
            with self.lock:
                self.waiting.popleft()
            new.append(r)
            used += n
            if not r.out:
                self.stats.prompt_tokens += len(r.prompt)
                r.stats.prompt_tokens = len(r.prompt)
        self.running += new
        return new

    def _reserve_rounds(self) -> bool:
        """Blocks for every running request's next round, if the pool has them (then what is left may admit)."""
        try:
            for r in self.running:
                self.cache.reserve(r.id, r.cache_len + r.k + 1)
        except CacheFullError:
            return False
        return True

    def _reserve(self, active: list[Request]) -> list[Request]:
        """Blocks for each request's round; preempt the newest while the pool cannot hold them all."""
        for r in list(active):
            while r in active:
                try:
                    self.cache.reserve(r.id, r.cache_len + r.k + 1)
                    break
                except CacheFullError as e:
                    victim = active[-1]
                    if victim is r and len(active) == 1:  # alone, it still does not fit: it never will
                        self._failed += self.fail([r], str(e))
                        active.remove(r)
                        break
                    self._preempt(victim)
                    active.remove(victim)
        return active

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self.cache.release(r.id)
        r.cache_len = 0
        r.hidden = None
        with self.lock:
            self.waiting.appendleft(r)
