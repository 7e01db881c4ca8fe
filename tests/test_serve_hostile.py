"""The server against careless and hostile clients (minimtp/serve/): every case gets its status and an OpenAI error
object (or the right answer), and the server stays healthy and serves a normal request after it.

One in-process server with tight limits (context 256, 1 s header / body / keep-alive deadlines, a 2 MB body limit),
one subprocess for SIGTERM. Greedy and seeded answers are compared with the offline Engine on the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from support.server import Server, chat_ids, httpx, ids, offline, openai_error

MODEL = "minimtp-default"
MAX_LEN = 256


@pytest.fixture(scope="module")
def srv():
    flags = ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--max-num-seqs", "4", "--max-waiting", "32"]
    flags += ["--timeout-header", "1", "--timeout-body", "1", "--timeout-keep-alive", "1"]
    s = Server(*flags, "--max-request-bytes", str(2 << 20))
    yield s
    s.close()


def healthy(srv) -> None:
    """/health is 200 and a normal request is served (the offline engine's greedy text)."""
    assert srv.http.get("/health").status_code == 200
    r = srv.http.post("/v1/completions", json={"prompt": "import os\n", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline().generate([ids("import os\n")], max_new_tokens=6).texts[0]


def post(srv, path: str, body) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return srv.http.post(path, content=content, headers={"content-type": "application/json"})


def raw(srv) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (at most 5 s)."""
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    return data.decode()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes ``sock`` (EOF) within ``within`` seconds; anything it sends first is read."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


# ---- 1. requests that used to wedge or fail the server -----------------------------------------------------------


def test_a_draft_length_the_pool_cannot_hold_is_400_at_once_and_nothing_wedges(srv):
    t0 = time.monotonic()
    body = {"prompt": "x = ", "max_tokens": 4, "num_speculative_tokens": 100000}
    err = openai_error(post(srv, "/v1/completions", body), 400)
    assert time.monotonic() - t0 < 5
    assert "num_speculative_tokens" in err["message"] and "KV blocks" in err["message"], err
    healthy(srv)
    # a long draft the pool holds is served (the rounds clamp it to the budget): the greedy text
    r = post(
        srv, "/v1/completions", {"prompt": "x = ", "max_tokens": 8, "temperature": 0, "num_speculative_tokens": 500}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == offline().generate([ids("x = ")], max_new_tokens=8).texts[0]
    srv.wait_idle()


def test_a_step_that_raises_fails_its_own_request_once_and_spares_the_others(srv, monkeypatch, caplog):
    engine = srv.serving.engine
    poison = ids("# poison\n")
    execute = engine.execute

    def failing(plan, cache):
        if any(r.prompt == poison for r in plan.requests):
            raise RuntimeError("injected failure")
        return execute(plan, cache)

    monkeypatch.setattr(engine, "execute", failing)
    good = {"prompt": "def f(x):\n", "max_tokens": 12, "temperature": 0}
    results = {}
    threads = [
        threading.Thread(target=lambda: results.update(bad=post(srv, "/v1/completions", {"prompt": poison}))),
        threading.Thread(target=lambda: results.update(good=post(srv, "/v1/completions", good))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    err = openai_error(results["bad"], 500)
    assert "injected failure" in err["message"] and err["type"] == "internal_error"
    assert (
        results["good"].json()["choices"][0]["text"]
        == offline().generate([ids(good["prompt"])], max_new_tokens=12).texts[0]
    )
    srv.wait_idle()
    logged = [r for r in caplog.records if r.name == "minimtp.serve" and r.exc_info]
    assert len(logged) == 1 and "injected failure" in str(logged[0].exc_info[1])  # logged once, not per step
    monkeypatch.undo()
    healthy(srv)


# ---- 2. clients that go away, send too much or too slowly ----------------------------------------------------------


def test_a_non_streaming_client_that_hangs_up_cancels_its_request(srv):
    before = srv.metrics()
    abort = ("minimtp:request_success_total", (("finished_reason", "abort"),))
    body = json.dumps({"prompt": "import os\n", "max_tokens": 200, "ignore_eos": True, "num_speculative_tokens": 0})
    sock = raw(srv)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    time.sleep(0.5)  # admitted and decoding
    sock.close()
    m = srv.wait_idle(until=lambda m: m.get(abort, 0) == before.get(abort, 0) + 1)
    made = m[("minimtp:generation_tokens_total", ())] - before[("minimtp:generation_tokens_total", ())]
    assert made < 200  # it stopped early, not ran to the end
    healthy(srv)


def test_a_huge_prompt_is_refused_without_blocking_the_event_loop(srv, monkeypatch):
    """5 MB of text cannot fit 256 tokens: refused before tokenizing. A slow tokenization runs in a worker thread:
    /health answers while it runs."""
    t0 = time.monotonic()
    err = openai_error(post(srv, "/v1/completions", {"prompt": "x" * (5 << 20), "max_tokens": 4}), 413)
    assert "limit" in err["message"]  # over --max-request-bytes
    err = openai_error(post(srv, "/v1/completions", {"prompt": "word " * 300_000, "max_tokens": 4}), 400)
    assert "context length" in err["message"] and time.monotonic() - t0 < 10
    tok = srv.serving.engine.tokenizer
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: (time.sleep(2), encode(text, **kw))[1])
    done = {}
    slow = threading.Thread(
        target=lambda: done.update(r=post(srv, "/v1/completions", {"prompt": "x = ", "max_tokens": 2}))
    )
    slow.start()
    time.sleep(0.3)
    assert srv.http.get("/health").status_code == 200
    assert slow.is_alive(), "the tokenizer finished first: /health did not have to overlap it"
    slow.join(30)
    assert done["r"].status_code == 200
    monkeypatch.undo()
    healthy(srv)


def test_idle_and_header_trickling_sockets_are_closed(srv):
    """--timeout-header 1: a socket that sends nothing, or one header byte every 0.25 s, is closed (here within 4 s;
    without the deadline they stay open for good)."""
    idle = [raw(srv) for _ in range(50)]
    trickle = raw(srv)
    trickle.sendall(b"POST /v1/completions HTTP/1.1\r\n")
    t0 = time.monotonic()
    closed = False
    while not closed and time.monotonic() - t0 < 4:
        try:
            trickle.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        time.sleep(0.25)
    assert closed or closed_by_server(trickle, 1)
    assert all(closed_by_server(s, max(0.1, 4 - (time.monotonic() - t0))) for s in idle)
    for s in idle + [trickle]:
        s.close()
    healthy(srv)


def test_a_body_that_does_not_arrive_is_408_and_a_large_one_413(srv):
    sock = raw(srv)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    reply = read_all(sock)
    assert reply.startswith("HTTP/1.1 408") and '"code": 408' in reply, reply
    sock = raw(srv)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
    reply = read_all(sock)
    assert reply.startswith("HTTP/1.1 413") and '"type": "invalid_request_error"' in reply, reply
    healthy(srv)


# ---- 3. malformed bodies and wrong paths: OpenAI error objects, never plain text -----------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
        (b'{"prompt": "x", "max_tokens": 2, "guided_regex": "a\\ud800"}', "guided_regex"),
        (b'{"prompt": "x", "max_tokens": 2, "guided_json": {"type": "string", "pattern": "\\udfff"}}', "guided_json"),
        (b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}', "messages"),
    ],
)
def test_a_lone_surrogate_is_400_naming_its_field(srv, body, field):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    err = openai_error(post(srv, path, body), 400)
    assert "surrogate" in err["message"] and err["param"].startswith(field), err
    healthy(srv)


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v1/completions", None, 405),
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("POST", "/v1/completions", b"", 400),
        ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
        ("GET", "/v1/models/gpt-9", None, 404),
    ],
)
def test_wrong_paths_methods_and_bodies_are_openai_errors(srv, method, path, body, status):
    r = srv.http.request(method, path, content=body, headers={"content-type": "application/json"})
    openai_error(r, status)
    assert r.headers["content-type"].startswith("application/json")
    healthy(srv)


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
    ],
)
def test_fields_the_server_does_not_implement_are_400_naming_them(srv, extra, field):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    err = openai_error(post(srv, "/v1/chat/completions", body), 400)
    assert field in err["message"] and err["param"] == field, err


@pytest.mark.parametrize("extra, field", [({"best_of": 3}, "best_of"), ({"suffix": "}"}, "suffix")])
def test_completion_fields_it_does_not_implement_are_400(srv, extra, field):
    err = openai_error(post(srv, "/v1/completions", {"prompt": "x", "max_tokens": 2, **extra}), 400)
    assert field in err["message"] and err["param"] == field, err


# ---- 4. what real clients send ----------------------------------------------------------------------------------


def test_null_is_accepted_wherever_the_spec_allows_it(srv):
    nulls = {"temperature": None, "n": None, "stream": None, "top_p": None, "seed": None, "stop": None}
    r = post(srv, "/v1/completions", {"prompt": "x = ", "max_tokens": 4, "echo": None, "logprobs": None, **nulls})
    assert r.status_code == 200, r.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": None, "tools": None}
    r = post(srv, "/v1/chat/completions", {**chat, "tool_choice": None, "response_format": None, **nulls})
    assert r.status_code == 200, r.text


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(srv):
    messages = [{"role": "user", "content": "count"}]
    r = post(srv, "/v1/chat/completions", {"messages": messages, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == len(chat_ids(messages)) and usage["total_tokens"] == MAX_LEN
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_n_choices_are_independent_seeded_streams_equal_to_the_engine(srv):
    prompt = ids("def fibonacci(n):\n    ")
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3, "ignore_eos": True}
    r = post(srv, "/v1/completions", body).json()
    texts = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
    ref = offline().generate([prompt] * 3, max_new_tokens=12, temperature=1.0, seed=5, stop_token_ids=[]).texts
    assert texts == ref and len(set(texts)) == 3
    assert r["usage"]["prompt_tokens"] == len(prompt)  # the prompt counts once
    chunks = _stream(srv, "/v1/completions", {**body, "stream": True})
    got = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(3)}
    assert [got[i] for i in range(3)] == ref


def test_a_list_of_prompts_and_echo(srv):
    prompts = ["import os\n", "x = ["]
    r = post(srv, "/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0, "echo": True}).json()
    ref = offline().generate([ids(p) for p in prompts], max_new_tokens=6).texts
    tok = srv.serving.engine.tokenizer
    assert [c["text"] for c in r["choices"]] == [tok.decode(ids(p)) + t for p, t in zip(prompts, ref)]


def test_logprobs_are_plain_decodings_under_speculation(srv):
    prompt = ids("def fibonacci(n):\n    ")
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 0.8, "seed": 3, "logprobs": 2, "top_k": 20}
    r = post(srv, "/v1/completions", body).json()["choices"][0]["logprobs"]
    ref = offline().generate([prompt], max_new_tokens=10, temperature=0.8, seed=3, top_k=20, logprobs=2)
    assert len(r["tokens"]) == len(ref.tokens[0]) == len(r["token_logprobs"]) == len(r["top_logprobs"])
    for got, (want, _) in zip(r["token_logprobs"], ref.logprobs[0]):
        assert abs(got - want) < 1e-4  # fp32 logits of the server's batch vs the offline run: ~1e-5
    assert all(len(t) <= 2 for t in r["top_logprobs"]) and r["text_offset"][0] == 0
    messages = [{"role": "user", "content": "hi"}]
    chat = {"messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    content = post(srv, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1 and all(len(c["top_logprobs"]) == 3 and c["logprob"] <= 0 for c in content)


@pytest.mark.parametrize(
    "extra",
    [
        {"structured_outputs": {"choice": ["yes", "no", "a.b*c"]}},
        {"guided_choice": ["yes", "no", "a.b*c"]},
        {"structured_outputs": {"regex": "(yes|no|a\\.b\\*c)"}},
    ],
)
def test_structured_outputs_and_guided_choice(srv, extra):
    body = {"prompt": "Answer: ", "max_tokens": 8, "temperature": 1.0, "seed": 1, **extra}
    r = post(srv, "/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in {"yes", "no", "a.b*c"}


def test_structured_outputs_json(srv):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    r = post(srv, "/v1/completions", {"prompt": "x = ", "max_tokens": 40, "structured_outputs": {"json": schema}})
    value = json.loads(r.json()["choices"][0]["text"])
    assert isinstance(value["a"], int)


def test_model_card_by_id(srv):
    card = srv.http.get(f"/v1/models/{MODEL}").json()
    assert card["id"] == MODEL and card["object"] == "model"


def _stream(srv, path: str, body: dict) -> list[dict]:
    out = []
    with srv.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


# ---- 5. SIGTERM: a draining shutdown -----------------------------------------------------------------------------


def test_sigterm_finishes_every_stream_with_a_reason_and_done_and_exits(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "minimtp.serve",
        "--port",
        str(port),
        "--shutdown-timeout",
        "1",
        "--max-model-len",
        "4096",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        long = {"prompt": "import os\n", "max_tokens": 3000, "ignore_eos": True, "num_speculative_tokens": 0}
        got = {}

        def stream():
            lines = []
            with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
            got["stream"] = lines

        def plain():
            got["plain"] = httpx.post(url + "/v1/completions", json=long, timeout=60).json()

        threads = [threading.Thread(target=stream), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 20  # 1 s of drain, then cancel, then exit
        events = got["stream"]
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        assert last["choices"][0]["finish_reason"] in ("abort", "length"), last
        assert got["plain"]["choices"][0]["finish_reason"] in ("abort", "length"), got["plain"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
