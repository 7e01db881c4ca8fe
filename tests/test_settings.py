"""One settings object, validated in one place (minimtp/settings.py), and the one-way step around it: the scheduler
plans, the engine executes, the scheduler appends and retires (minimtp/scheduler.py, minimtp/engine.py)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import minimtp
from minimtp.errors import GenerationError
from minimtp.kv_cache import KVCache
from minimtp.request import Request, make_requests
from minimtp.scheduler import Plan, Scheduler, StepResult
from minimtp.settings import GenerationSettings

PROMPTS = [[2, 17, 5, 33], [2, 9, 40, 41, 42, 7]]


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(max_new_tokens=True), "max_new_tokens=True"),
        (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
        (dict(num_speculative_tokens=0), "num_speculative_tokens=0"),
        (dict(draft_mode="beam"), "draft_mode='beam'"),
        (dict(stop_token_ids="1"), "stop_token_ids='1'"),
        (dict(stop_token_ids=[1, -2]), "stop_token_ids=[1, -2]"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_k=-3), "top_k=-3"),
        (dict(top_p=2.0), "top_p=2.0"),
        (dict(min_p=1.5), "min_p=1.5"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
        (dict(presence_penalty=3.0), "presence_penalty=3.0"),
        (dict(frequency_penalty=-2.5), "frequency_penalty=-2.5"),
        (dict(stop=[""]), "stop[0]=''"),
        (dict(stop=3), "stop=3"),
        (dict(max_tokens=5), "unknown setting 'max_tokens'"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(change, needle):
    with pytest.raises(GenerationError) as e:
        GenerationSettings.of(**change)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_keywords_replace_fields_and_the_rest_stays():
    base = GenerationSettings(max_new_tokens=9, temperature=0.5, seed=3)
    s = GenerationSettings.of(base, top_k=4)
    assert (s.max_new_tokens, s.temperature, s.seed, s.top_k) == (9, 0.5, 3, 4)
    assert base.top_k is None  # frozen: of() builds a new object
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.top_k = 1
    with pytest.raises(GenerationError, match="expected a GenerationSettings"):
        GenerationSettings.of({"top_k": 4})


def test_every_field_is_a_generate_keyword_and_the_cli_and_server_build_the_same_object(saved):
    """Engine.generate(settings=s) == Engine.generate(**fields of s) == positional max_new_tokens, token for token."""
    target = minimtp.load_target(saved("e2b")[0])
    assistant = minimtp.load_assistant(saved("e2b")[1], target)
    engine = minimtp.Engine(target, assistant, block_size=4)
    s = GenerationSettings(max_new_tokens=7, temperature=1.0, top_k=20, seed=[1, 2], num_speculative_tokens=3)
    by_object = engine.generate(PROMPTS, settings=s).tokens
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    assert engine.generate(PROMPTS, **fields).tokens == by_object
    rest = {k: v for k, v in fields.items() if k != "max_new_tokens"}
    assert engine.generate(PROMPTS, 7, **rest).tokens == by_object
    assert engine.generate(PROMPTS, settings=dataclasses.replace(s, seed=[1, 3])).tokens[0] == by_object[0]
    with pytest.raises(GenerationError, match="unknown setting 'max_tokens'"):
        engine.generate(PROMPTS, max_tokens=3)


def test_the_scheduler_knows_no_engine():
    assert "engine" not in inspect.signature(Scheduler).parameters


def pool(cfg, blocks: int = 64) -> KVCache:
    return KVCache(cfg, {t: blocks for t in set(cfg.layer_types)}, 4)


def test_a_step_is_plan_execute_postprocess(saved):
    """The first plan prefills every request, the next ones run rounds; postprocess appends the result's tokens,
    counts them and retires the finished requests with their blocks freed."""
    target = minimtp.load_target(saved("e2b")[0])
    assistant = minimtp.load_assistant(saved("e2b")[1], target)
    engine = minimtp.Engine(target, assistant, block_size=4)
    cache = pool(target.config)
    sched = Scheduler(cache)
    reqs = make_requests(engine, PROMPTS, GenerationSettings(max_new_tokens=5, stop_token_ids=[]))
    for r in reqs:
        sched.add(r)
    with torch.inference_mode():
        plan = sched.schedule()
        assert plan.prefill == reqs and plan.decode == []
        result = engine.execute(plan, cache)
        assert [len(t) for t in result.tokens] == [1, 1] and all(r.out == [] for r in reqs)  # not appended yet
        assert sched.postprocess(plan, result) == []
        assert [len(r.out) for r in reqs] == [1, 1] and sched.stats.prefill_steps == 1
        finished = []
        while sched.has_work:
            plan = sched.schedule()
            assert plan.prefill == [] and plan.decode
            finished += sched.postprocess(plan, engine.execute(plan, cache))
    assert finished and set(finished) == set(reqs) and all(r.done == "length" for r in reqs)
    assert [r.out for r in reqs] == engine.generate(PROMPTS, 5, stop_token_ids=[]).tokens
    assert not cache.tables


def test_postprocess_cuts_at_a_stop_token_the_budget_and_the_context_limit(saved):
    cfg = minimtp.load_target(saved("e2b")[0]).config
    sched = Scheduler(pool(cfg))
    stop = Request([1, 2], stops=frozenset({5}), max_new=10)
    budget = Request([1, 2], max_new=2)
    context = Request([1, 2], max_new=10, max_len=4)
    for r in (stop, budget, context):
        sched.add(r)
    plan = sched.schedule()
    assert plan.prefill == [stop, budget, context]
    for r in plan.prefill:
        r.cache_len = len(r.prompt)
    sched.postprocess(plan, StepResult([[3], [3], [3]], [0, 0, 0], [0, 0, 0]))
    plan = Plan(decode=[stop, budget, context])
    for r in plan.decode:
        r.cache_len += 1
    finished = sched.postprocess(plan, StepResult([[4, 5, 6], [4, 8], [4]], [2, 1, 0], [2, 1, 0]))
    assert (stop.out, stop.done, stop.stop_reason) == ([3, 4, 5], "stop", 5)
    assert (budget.out, budget.done) == ([3, 4], "length")
    assert (context.out, context.done) == ([3, 4], "context")
    assert set(finished) == {stop, budget, context} and not sched.cache.tables
    assert sched.stats.drafted == 3 and sched.stats.accepted == 3 and stop.stats.generated_tokens == 3
