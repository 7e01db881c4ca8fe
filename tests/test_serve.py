"""The OpenAI-compatible server (minimtp/serve/: cli, app, loop, metrics) end to end, over real HTTP on loopback.

Two servers per module on the embedded pair in float32 (so greedy and seeded outputs compare exactly with an
offline :class:`minimtp.Engine` on the same weights): the main one, and a small one with ``--api-key`` and room for
one running and one waiting request (401 and 503). The official ``openai`` client talks to them where it can; the
raw HTTP client it is built on checks what it hides (status codes of type errors, ``data: [DONE]``, disconnects).
"""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from support.server import (
    Server,
    api_reason,
    chat_ids,
    generate_kwargs,
    httpx,
    ids,
    offline,
    openai_error,
    reference,
)

MODEL = "minimtp-default"
MAX_LEN = 512  # --max-model-len of the main server
PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\n",
    "class Stack:\n    def push(self, item):\n",
    "x = [",
    "# a",
    "for i in range(10):\n    print(i)\n\n",
    "def parse(line):\n    key, value = line.split('=')\n    return key.strip(), value.strip()\n\n\ndef load(path):\n",
    "import json\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n" * 4,
]
CHAT = [{"role": "user", "content": "Write a function that reverses a list."}]
ABORT = ("minimtp:request_success_total", (("finished_reason", "abort"),))  # a metrics() key


# ---- servers ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv():
    s = Server("--dtype", "float32", "--max-num-seqs", "16", "--max-waiting", "64", "--max-model-len", str(MAX_LEN))
    yield s
    s.close()


@pytest.fixture(scope="module")
def small():
    """--api-key secret, one running and one waiting request at most (the model's full context length)."""
    s = Server("--dtype", "float32", "--api-key", "secret", "--max-num-seqs", "1", "--max-waiting", "1")
    yield s
    s.close()


# ---- 1. the openai client against the offline engine ------------------------------------------------------------


def test_models_lists_the_served_model(srv):
    models = srv.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    assert srv.http.get("/v1/models").json()["data"][0]["max_model_len"] == MAX_LEN
    assert srv.http.get("/health").status_code == 200


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[6]])
def test_completion_greedy_equals_the_offline_engine(srv, prompt):
    c, body = srv.client(), dict(max_tokens=40, temperature=0)
    text, n, reason = reference(ids(prompt), body)
    r = c.completions.create(model=MODEL, prompt=prompt, **body)
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    p = len(ids(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (p, n, p + n)
    *chunks, last = c.completions.create(
        model=MODEL, prompt=prompt, stream=True, stream_options={"include_usage": True}, **body
    )
    assert "".join(ch.choices[0].text for ch in chunks) == text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == reason
    assert all(ch.choices[0].finish_reason is None and ch.usage is None for ch in chunks[:-1])
    assert last.choices == [] and last.usage.completion_tokens == n  # OpenAI's usage chunk
    # the prompt as token ids: the same request
    r = c.completions.create(model=MODEL, prompt=ids(prompt), **body)
    assert r.choices[0].text == text


def test_chat_greedy_equals_the_offline_engine(srv):
    c, body = srv.client(), dict(max_tokens=30, temperature=0)
    text, n, reason = reference(chat_ids(CHAT), body)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, **body)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(chat_ids(CHAT)), n)
    *chunks, last = c.chat.completions.create(
        model=MODEL, messages=CHAT, stream=True, stream_options={"include_usage": True}, **body
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert [ch.choices[0].finish_reason for ch in chunks] == [None] * (len(chunks) - 1) + [reason]
    assert last.choices == [] and last.usage.completion_tokens == n
    # max_completion_tokens is the chat name of max_tokens
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=30, temperature=0)
    assert r.choices[0].message.content == text


def test_langchain_chat_openai_unmodified(srv):
    """LangChain's ChatOpenAI, as its users write it, against the server: invoke and stream give the offline
    engine's greedy text."""
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    llm = chat_openai(base_url=srv.url + "/v1", api_key="x", model=MODEL, temperature=0, max_tokens=30, max_retries=0)
    text, _, _ = reference(chat_ids(CHAT), dict(max_tokens=30, temperature=0))
    question = CHAT[0]["content"]
    assert llm.invoke(question).content == text
    assert "".join(chunk.content for chunk in llm.stream(question)) == text
    unbounded = chat_openai(base_url=srv.url + "/v1", api_key="x", model=MODEL, temperature=0, max_retries=0)
    reply = unbounded.invoke(question)  # no max_tokens: the rest of the context, as OpenAI
    assert reply.content.startswith(text) and reply.response_metadata["finish_reason"] in ("stop", "length")


def test_seeded_sampling_is_reproducible_and_equals_the_offline_engine(srv):
    c, body = srv.client(), dict(max_tokens=40, temperature=1.0, seed=7)
    text, n, _ = reference(ids(PROMPTS[2]), body)
    a = c.completions.create(model=MODEL, prompt=PROMPTS[2], **body)
    b = c.completions.create(model=MODEL, prompt=PROMPTS[2], **body)
    assert a.choices[0].text == b.choices[0].text == text and a.usage.completion_tokens == n
    chunks = c.completions.create(model=MODEL, prompt=PROMPTS[2], stream=True, **body)
    assert "".join(ch.choices[0].text for ch in chunks) == text
    other = c.completions.create(model=MODEL, prompt=PROMPTS[2], **{**body, "seed": 8})
    assert other.choices[0].text != text  # the seed is used (40 tokens at temperature 1 do not repeat by chance)
    chat = dict(body, top_p=0.9, top_k=50)
    text, _, _ = reference(chat_ids(CHAT), chat)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=1.0, seed=7, top_p=0.9,
                                  extra_body={"top_k": 50})  # fmt: skip
    assert r.choices[0].message.content == text


@pytest.mark.parametrize("k", [0, 3])
def test_num_speculative_tokens_keeps_the_greedy_text(srv, k):
    c, body = srv.client(), dict(max_tokens=40, temperature=0)
    default = c.completions.create(model=MODEL, prompt=PROMPTS[0], **body).choices[0].text
    text, _, _ = reference(ids(PROMPTS[0]), {**body, "num_speculative_tokens": k})
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body={"num_speculative_tokens": k}, **body)
    assert r.choices[0].text == text == default


def test_response_format_json_schema(srv):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 10},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}  # fmt: skip
    messages = [{"role": "user", "content": "Describe a user as JSON"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "user", "schema": schema}}
    r = srv.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0,
                                             response_format=fmt)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    ref = offline().generate([chat_ids(messages)], max_new_tokens=60, json_schema=schema).texts[0]
    assert r.choices[0].message.content == ref
    # vLLM's guided_json on /v1/completions, streamed
    chunks = srv.client().completions.create(model=MODEL, prompt="x = ", max_tokens=60, temperature=0, stream=True,
                                             extra_body={"guided_json": schema})  # fmt: skip
    jsonschema.validate(json.loads("".join(ch.choices[0].text for ch in chunks)), schema)


# ---- 2. errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"num_speculative_tokens": -1}, "num_speculative_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_invalid_settings_are_400_with_an_error_object(srv, endpoint, extra, field):
    body = {"prompt": "x = ", "max_tokens": 4} if endpoint == "completions" else {"messages": CHAT, "max_tokens": 4}
    err = openai_error(srv.http.post(f"/v1/{endpoint}", json={**body, **extra}), 400)
    assert field in err["message"] and err["type"] == "invalid_request_error", err


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "max_tokens": "abc"}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "stream": "sometimes"}, "stream"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": {"text": "x"}}, "prompt"),
    ],
)
def test_type_errors_are_400_not_422(srv, body, field):
    err = openai_error(srv.http.post("/v1/completions", json=body), 400)
    assert field in err["message"] and err["param"].split(".")[0] == field, err  # prompt.str: a union's branch
    if field != "prompt":
        err = openai_error(srv.http.post("/v1/chat/completions", json={"messages": CHAT, **body}), 400)
        assert field in err["message"] and err["param"] == field, err


def test_malformed_json_missing_messages_and_zero_max_completion_tokens_are_400(srv):
    openai_error(
        srv.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert "messages" in openai_error(srv.http.post("/v1/chat/completions", json={"max_tokens": 4}), 400)["message"]
    err = openai_error(srv.http.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 0}), 400)
    assert err["param"] == "max_completion_tokens", err  # 0 is a bad value, not "unset"


def test_unknown_model_is_404(srv):
    err = openai_error(srv.http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert "gpt-9" in err["message"] and err["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        srv.client().chat.completions.create(model="gpt-9", messages=CHAT, max_tokens=4)


def test_prompt_plus_max_tokens_over_the_context_length_is_400(srv):
    long = [5 + i % 1000 for i in range(MAX_LEN - 20)]
    err = openai_error(srv.http.post("/v1/completions", json={"prompt": long, "max_tokens": 21}), 400)
    assert "max_tokens" in err["message"] and str(MAX_LEN) in err["message"], err
    openai_error(srv.http.post("/v1/completions", json={"prompt": long + long, "max_tokens": 1}), 400)
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model=MODEL, prompt=long, max_tokens=21)
    r = srv.client().completions.create(model=MODEL, prompt=long, max_tokens=20, temperature=0)  # exactly fits
    assert r.usage.total_tokens <= MAX_LEN


def test_api_key(small):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        err = openai_error(small.http.get("/v1/models", headers=headers), 401)
        assert err["type"] == "authentication_error"
        openai_error(small.http.post("/v1/completions", json={"prompt": "x"}, headers=headers), 401)
    assert small.http.get("/health").status_code == 200  # no key needed outside /v1
    assert small.http.get("/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    r = small.client("secret").completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1


def _stream(server, body, api_key="secret"):
    """An open streaming request (the caller reads and closes it)."""
    req = server.http.build_request("POST", "/v1/completions", json={**body, "stream": True},
                                    headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip
    return server.http.send(req, stream=True)


def _data(lines):
    """The payloads of the SSE `data:` lines of an iterator of lines."""
    for line in lines:
        if line.startswith("data:"):
            yield line[len("data:") :].strip()


def test_a_full_queue_is_503_with_retry_after(small):
    """max-num-seqs 1, max-waiting 1: A runs, B waits, C is refused (and admitted again once they are gone)."""
    body = {"prompt": "import os\n", "max_tokens": 4000, "ignore_eos": True, "num_speculative_tokens": 0}
    a = _stream(small, body)
    b = None
    try:
        assert a.status_code == 200
        a_events = _data(a.iter_lines())  # (kept: an iterator dropped half-read closes its connection)
        next(a_events)  # A has a token: it is running
        b = _stream(small, body)  # the response has started: B is queued
        assert b.status_code == 200
        auth = {"Authorization": "Bearer secret"}
        r = small.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 4}, headers=auth)
        err = openai_error(r, 503)
        assert r.headers["retry-after"] == "1" and "queue is full" in err["message"], err
        with pytest.raises(openai.InternalServerError) as e:
            small.client("secret").chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
        assert e.value.status_code == 503
        sched = small.serving.sched  # A runs, B waits (and neither was cancelled)
        assert [r.cancelled for r in sched.running] == [False] and [r.cancelled for r in sched.waiting] == [False]
        assert sched.running[0].id < sched.waiting[0].id
        deadline = time.monotonic() + 10  # the gauges follow at the end of the engine's next step
        while (m := small.metrics())[("minimtp:num_requests_waiting", ())] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (m[("minimtp:num_requests_running", ())], m[("minimtp:num_requests_waiting", ())]) == (1, 1)
    finally:
        a.close()
        if b is not None:
            b.close()
    small.wait_idle()  # both cancelled: the running one's blocks and the waiting one are gone
    r = small.client("secret").completions.create(model=MODEL, prompt="x = ", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---- 3. a client that goes away --------------------------------------------------------------------------------


def test_disconnect_mid_stream_cancels_and_frees_the_blocks(srv):
    aborted = srv.metrics().get(ABORT, 0)
    body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with srv.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = _data(r.iter_lines())
        got = [json.loads(next(events)) for _ in range(2)]
        assert all(g["choices"][0]["finish_reason"] is None for g in got)
    srv.wait_idle(until=lambda m: m.get(ABORT, 0) == aborted + 1)  # it ended as aborted, and its blocks are free
    r = srv.client().completions.create(model=MODEL, prompt="x = ", max_tokens=8, temperature=0)
    assert r.usage.completion_tokens >= 1


# ---- 4. metrics ---------------------------------------------------------------------------------------------------


def test_metrics_after_requests(srv):
    c, usage = srv.client(), []
    before = srv.wait_idle()
    for k in (5, 2):
        r = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                 extra_body={"num_speculative_tokens": k})  # fmt: skip
        usage.append(r.usage)
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt=PROMPTS[5],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage.append(chunks[-1].usage)
    m = srv.wait_idle()
    g = lambda name, **labels: m[(name, tuple(sorted(labels.items())))]
    delta = lambda name: g(name) - before.get((name, ()), 0)
    drafts, drafted = g("minimtp:spec_decode_num_drafts_total"), g("minimtp:spec_decode_num_draft_tokens_total")
    accepted = g("minimtp:spec_decode_num_accepted_tokens_total")
    assert 0 < drafts <= drafted and 0 < accepted <= drafted
    assert (
        delta("minimtp:spec_decode_num_drafts_total") > 0 and delta("minimtp:spec_decode_num_accepted_tokens_total") > 0
    )
    per_pos = {int(dict(labels)["position"]): v for (name, labels), v in m.items()
               if name == "minimtp:spec_decode_num_accepted_tokens_per_pos_total"}  # fmt: skip
    per_pos = [per_pos[j] for j in range(len(per_pos))]
    assert len(per_pos) >= 5 and sum(per_pos) == accepted
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:])), per_pos  # position j+1 is accepted only after j
    assert g("minimtp:spec_decode_mean_acceptance_length") == pytest.approx(1 + accepted / drafts)
    assert delta("minimtp:generation_tokens_total") == sum(u.completion_tokens for u in usage)
    assert delta("minimtp:prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert delta(f"minimtp:{h}_count") >= 3 and g(f"minimtp:{h}_sum") > 0, h
        assert g(f"minimtp:{h}_bucket", le="+Inf") == g(f"minimtp:{h}_count")
    assert delta("minimtp:time_to_first_token_seconds_count") == delta("minimtp:e2e_request_latency_seconds_count") == 3
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert g(f"minimtp:{gauge}") == 0


# ---- 5. many clients at once --------------------------------------------------------------------------------------

SETTINGS = [  # request-body settings of the load test: greedy k 0/3/5, seeded sampling, controls
    {"temperature": 0, "num_speculative_tokens": 0},
    {"temperature": 0, "num_speculative_tokens": 3},
    {"temperature": 0, "num_speculative_tokens": 5, "ignore_eos": True},
    {"temperature": 0, "stop": ["\n"]},
    {"temperature": 1.0, "num_speculative_tokens": 3},
    {"temperature": 1.0, "num_speculative_tokens": 0, "top_k": 40},
    {"temperature": 0.8, "num_speculative_tokens": 5, "top_p": 0.9, "repetition_penalty": 1.2},
]
MAX_TOKENS = [4, 17, 40]
INVALID = {5: {"temperature": -0.5}, 20: {"top_p": 0}, 35: {"max_tokens": "abc"}, 50: {"frequency_penalty": 9}}
CANCEL = {3, 13, 23, 33, 43, 53}


def _load_requests() -> list[dict]:
    """64 requests: (endpoint, body, prompt ids, kind) with kind valid / cancel / invalid."""
    out = []
    for i in range(64):
        chat = i % 7 == 6
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}}
        body |= {**SETTINGS[i % len(SETTINGS)], "max_tokens": MAX_TOKENS[i % 3]}
        if body["temperature"] > 0:
            body["seed"] = 1000 + i
        kind = "invalid" if i in INVALID else "cancel" if i in CANCEL else "valid"
        if kind == "cancel":
            body |= {"max_tokens": 300, "ignore_eos": True}
        body |= INVALID.get(i, {})
        if chat:
            messages = [{"role": "user", "content": prompt}]
            out.append(dict(endpoint="chat/completions", body={**body, "messages": messages}, ids=chat_ids(messages),
                            kind=kind))  # fmt: skip
        else:  # every other completion sends its prompt as token ids
            out.append(dict(endpoint="completions", body={**body, "prompt": ids(prompt) if i % 2 else prompt},
                            ids=ids(prompt), kind=kind))  # fmt: skip
    return out


def _offline_references(reqs: list[dict]) -> dict[int, tuple[str, int, str]]:
    """{request index: (text, tokens, finish reason)}: one batched generate per distinct setting and max_tokens,
    one seed per prompt (a prompt's tokens do not depend on its batch)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        if r["kind"] == "valid":
            kw = generate_kwargs({k: v for k, v in r["body"].items() if k != "seed"})
            groups.setdefault(json.dumps(kw, sort_keys=True), []).append(i)
    refs = {}
    for key, members in groups.items():
        kw = json.loads(key)
        seeds = [reqs[i]["body"].get("seed") for i in members]
        if seeds[0] is not None:
            kw["seed"] = seeds
        res = offline().generate([reqs[i]["ids"] for i in members], **kw)
        for b, i in enumerate(members):
            refs[i] = (res.texts[b], len(res.tokens[b]), api_reason(res.finish_reasons[b]))
    return refs


async def _run_one(client, r: dict) -> dict:
    async with client.stream("POST", "/v1/" + r["endpoint"], json=r["body"]) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "body": json.loads(await resp.aread())}
        events = []
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                events.append(line[len("data:") :].strip())
                content = [e for e in events if e != "[DONE]" and _delta(r, json.loads(e))]
                if r["kind"] == "cancel" and len(content) >= 2:
                    break  # leave mid-stream: the connection closes with the block
        return {"status": 200, "events": events}


def _delta(r: dict, chunk: dict) -> str:
    if not chunk["choices"]:  # the usage chunk
        return ""
    c = chunk["choices"][0]
    return (c["delta"].get("content") or "") if r["endpoint"] == "chat/completions" else c["text"]


async def _run_all(url: str, reqs: list[dict]) -> list[dict]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(_run_one(client, r) for r in reqs))


def test_load_mixed_concurrent_streams(srv):
    reqs = _load_requests()
    refs = _offline_references(reqs)
    before = srv.metrics()
    t0 = time.perf_counter()
    results = asyncio.run(_run_all(srv.url, reqs))
    elapsed = time.perf_counter() - t0
    ids_seen = []
    for i, (r, res) in enumerate(zip(reqs, results)):
        if r["kind"] == "invalid":
            assert res["status"] == 400 and res["body"]["error"]["code"] == 400, (i, res)
            continue
        assert res["status"] == 200, (i, res)
        events = res["events"]
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        assert len({c["id"] for c in chunks}) == 1, i  # one id per request ...
        usage = chunks[-1].get("usage")
        if r["kind"] != "cancel":
            assert chunks[-1]["choices"] == [] and usage is not None, (i, chunks[-1])
            chunks = chunks[:-1]
        ids_seen.append(chunks[0]["id"])
        reasons = [c["choices"][0]["finish_reason"] for c in chunks]
        if r["kind"] == "cancel":
            assert "[DONE]" not in events and set(reasons) == {None}, (i, reasons)
            continue
        # exactly one final chunk, the last, then [DONE]; nothing after it
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, i
        assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] is not None, (i, reasons)
        text, n, reason = refs[i]
        got = "".join(_delta(r, c) for c in chunks)
        assert (got, reasons[-1], usage["completion_tokens"]) == (text, reason, n), (i, r["body"])
        assert usage["prompt_tokens"] == len(r["ids"])
    assert len(set(ids_seen)) == len(ids_seen) == 64 - len(INVALID)  # ... and none shared
    finished = lambda m: sum(v for k, v in m.items() if k[0] == "minimtp:request_success_total")
    # every submitted request ended exactly once, the cancelled ones as aborted; no stream, request or block left
    after = srv.wait_idle(until=lambda m: m.get(ABORT, 0) - before.get(ABORT, 0) == len(CANCEL))
    assert finished(after) - finished(before) == 64 - len(INVALID)
    assert srv.http.get("/health").status_code == 200
    print(f"64 concurrent streams in {elapsed:.1f} s")


def test_response_format_and_guided_json_together_are_refused(srv):
    body = {"messages": CHAT, "max_tokens": 4, "response_format": {"type": "json_object"}, "guided_regex": "[a-z]+"}
    assert "response_format" in openai_error(srv.http.post("/v1/chat/completions", json=body), 400)["message"]
