"""Continuous batching (minimtp/scheduler.py): requests with their own settings join and leave between rounds, and
each one's tokens are exactly what it gets decoded alone - whatever its batchmates, arrival step, preemptions or
cancellations around it. KV blocks all come back at the end."""

from __future__ import annotations

import functools

import pytest
import torch
from support.common import default_engine

from minimtp.errors import CacheFullError
from minimtp.kv_cache import KVCache
from minimtp.request import make_requests
from minimtp.scheduler import QueueFullError, Scheduler
from minimtp.settings import GenerationSettings

PROMPTS = ["def fibonacci(n):\n    ", "import os\n", "class Stack:\n    def push(self, item):\n", "x = [", "# a"]
SETTINGS = [  # one per request: greedy and sampled, plain and speculative, both draft modes, controls
    dict(max_new_tokens=20, num_speculative_tokens=4),
    dict(max_new_tokens=12, use_assistant=False, temperature=1.0, top_k=20, seed=3),
    dict(max_new_tokens=25, num_speculative_tokens=2, temperature=0.8, seed=11, draft_mode="sample"),
    dict(max_new_tokens=16, num_speculative_tokens=5, temperature=1.0, top_p=0.9, seed=5, stop=["\n"]),
    dict(max_new_tokens=18, num_speculative_tokens=3, repetition_penalty=1.3, stop_token_ids=[]),
]


@functools.cache
def engine():
    return default_engine(block_size=4)


def ids(i: int) -> list[int]:
    return engine().tokenizer(PROMPTS[i])["input_ids"]


@functools.cache
def alone(i: int) -> tuple[int, ...]:
    return tuple(engine().generate([ids(i)], **SETTINGS[i]).tokens[0])


def request(i: int):
    [r] = make_requests(engine(), [ids(i)], GenerationSettings(**SETTINGS[i]))
    return r


def pool(blocks: int) -> KVCache:
    e = engine()
    return KVCache(e.cfg, {t: blocks for t in set(e.cfg.layer_types)}, e.block_size, e.sliding_keep, e.dtype)


def all_free(cache: KVCache) -> bool:
    return all(len(cache.free_blocks[t]) == n for t, n in cache.num_blocks.items()) and not cache.tables


@torch.inference_mode()
def step(sched: Scheduler) -> list:
    """One step, as the engine and the server run it: schedule, execute, postprocess."""
    plan = sched.schedule()
    return sched.postprocess(plan, engine().execute(plan, sched.cache))


@torch.inference_mode()
def run(sched: Scheduler, arrivals: dict[int, list[int]]) -> dict[int, tuple[int, ...]]:
    """Add request i at step s for s, [i...] in arrivals; step until done. {i: tokens}."""
    reqs, n = {}, 0
    while n <= max(arrivals) or sched.has_work:
        for i in arrivals.get(n, []):
            reqs[i] = sched.add(request(i))
        step(sched)
        n += 1
    return {i: tuple(r.out) for i, r in reqs.items()}


def test_mixed_settings_in_one_batch_equal_each_alone():
    sched = Scheduler(pool(400))
    got = run(sched, {0: list(range(len(PROMPTS)))})
    for i in range(len(PROMPTS)):
        assert got[i] == alone(i), (i, SETTINGS[i])
    assert all_free(sched.cache)


def test_requests_joining_between_rounds_equal_each_alone():
    sched = Scheduler(pool(400), max_num_seqs=3)
    got = run(sched, {0: [0, 1], 2: [2], 3: [3, 4]})  # 4 waits for a free slot (max_num_seqs = 3)
    assert got == {i: alone(i) for i in range(len(PROMPTS))}
    assert sched.stats.prefill_steps >= 3 and all_free(sched.cache)


def test_token_budget_spreads_admission_over_steps():
    sched = Scheduler(pool(400), max_tokens_per_step=12)
    got = run(sched, {0: list(range(len(PROMPTS)))})
    assert got == {i: alone(i) for i in range(len(PROMPTS))}
    assert sched.stats.prefill_steps >= 3


def test_a_full_pool_preempts_and_recomputes():
    """A pool too small for all five at once: the newest is preempted (its blocks freed, recomputed later from
    prompt + tokens so far), and every request still gets exactly its tokens."""
    sched = Scheduler(pool(24))
    preempted = []
    orig = sched._preempt
    sched._preempt = lambda r: (preempted.append(r.index), orig(r))
    got = run(sched, {0: list(range(len(PROMPTS)))})
    assert preempted, "the pool was large enough: the test would not exercise preemption"
    assert got == {i: alone(i) for i in range(len(PROMPTS))}
    assert all_free(sched.cache)


def test_cancel_frees_the_blocks_and_spares_the_others():
    sched = Scheduler(pool(400))
    reqs = [sched.add(request(i)) for i in range(3)]
    with torch.inference_mode():
        step(sched)
        sched.cancel(reqs[1])
        while sched.has_work:
            step(sched)
    assert reqs[1].done == "abort" and len(reqs[1].out) < 12
    assert tuple(reqs[0].out) == alone(0) and tuple(reqs[2].out) == alone(2)
    assert all_free(sched.cache)


def test_queue_limit_and_a_request_that_can_never_fit():
    sched = Scheduler(pool(400), max_waiting=2)
    sched.add(request(0))
    sched.add(request(1))
    with pytest.raises(QueueFullError, match="waiting queue is full"):
        sched.add(request(2))
    tiny = Scheduler(pool(2))
    with pytest.raises(CacheFullError, match="needs .* KV blocks .* pool holds 2"):
        tiny.add(request(2))
    assert not tiny.has_work


def test_a_failed_request_ends_once_and_spares_the_others():
    """`Scheduler.fail` (the server calls it for the requests of a step that raised) ends a running or waiting
    request with "error", frees its blocks, and the others still get exactly their tokens."""
    sched = Scheduler(pool(400), max_num_seqs=2)
    reqs = [sched.add(request(i)) for i in range(3)]
    with torch.inference_mode():
        step(sched)
        assert sched.fail([reqs[1], reqs[2]], "boom") == [reqs[1], reqs[2]]  # one running, one waiting
        assert sched.fail([reqs[1]], "again") == []  # once
        while sched.has_work:
            step(sched)
    assert (reqs[1].done, reqs[1].stop_reason, reqs[2].done) == ("error", "boom", "error")
    assert tuple(reqs[0].out) == alone(0)
    assert all_free(sched.cache)
