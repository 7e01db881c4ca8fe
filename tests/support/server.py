"""What the server tests share: `Server`, ``python -m minimtp.serve FLAGS`` in this process over real HTTP on a
loopback port, and the offline reference the server's outputs are compared with (the plain PyTorch Engine on the
embedded pair in float32)."""

from __future__ import annotations

import functools
import socket
import threading
import time

import openai

import minimtp
from support.common import default_engine, default_pair

try:  # the HTTP client the official openai package is built on: httpx2 since openai 3, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx


class Server:
    """``python -m minimtp.serve FLAGS`` in this process: the engine thread plus uvicorn in a daemon thread, on a
    loopback port the OS picked (the socket is bound here and handed to uvicorn: no race for the port)."""

    def __init__(self, *flags: str):
        from minimtp.serve import build_parser, create, server_for

        self.args = build_parser().parse_args(["--port", "0", *flags])
        self.app, self.serving = create(self.args)
        self.serving.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = server_for(self.app, self.serving, self.args)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def client(self, api_key: str = "x") -> openai.OpenAI:
        # no retries: a 503 must reach the test, not be retried after Retry-After
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def metrics(self) -> dict:
        """{(sample name, ((label, value), ...)): value} from GET /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        r = self.http.get("/metrics")
        assert r.status_code == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}  # fmt: skip

    def wait_idle(self, until=lambda m: True, timeout: float = 30.0) -> dict:
        """Poll until the engine has no request left (no stream open, nothing running or waiting), /metrics shows
        running 0, waiting 0 and KV usage 0, and ``until(metrics)`` holds; return the last metrics. (A client can
        see its tokens before the step that made them has updated the gauges: idle alone is not enough.)"""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            gauges = [m[(n, ())] for n in ("minimtp:num_requests_running", "minimtp:num_requests_waiting",
                                           "minimtp:kv_cache_usage_perc")]  # fmt: skip
            engine_idle = not self.serving.streams and not self.serving.sched.has_work
            if engine_idle and gauges == [0, 0, 0] and until(m):
                break
            assert time.monotonic() < deadline, (
                f"not idle after {timeout} s: {len(self.serving.streams)} streams, running, waiting, kv usage = "
                f"{gauges}, until(metrics) = {until(m)}"
            )
            time.sleep(0.05)
        cache = self.serving.sched.cache  # and the pool itself: every block back, no table left
        assert all(len(cache.free_blocks[t]) == n for t, n in cache.num_blocks.items()) and not cache.tables
        return m

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.serving.stop()


def tokenizer():
    return default_pair()[2]


@functools.cache
def offline() -> minimtp.Engine:
    """The reference: the plain PyTorch Engine on the tests' float32 copy of the pair (the server loads its own and
    runs the fast path)."""
    return default_engine()


def ids(prompt: str) -> list[int]:
    return list(tokenizer()(prompt)["input_ids"])


def chat_ids(messages) -> list[int]:
    out = tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def generate_kwargs(body: dict) -> dict:
    """The Engine.generate keywords that mean what a request body means (OpenAI's defaults: temperature 1,
    max_tokens 16; num_speculative_tokens 0 = plain, absent = the assistant's default)."""
    kw = dict(max_new_tokens=body.get("max_tokens", 16), temperature=float(body.get("temperature", 1.0)))
    k = body.get("num_speculative_tokens")
    if k == 0:
        kw["use_assistant"] = False
    elif k is not None:
        kw["num_speculative_tokens"] = k
    for name in ("top_k", "top_p", "min_p", "seed", "stop", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):  # fmt: skip
        if name in body:
            kw[name] = body[name]
    if body.get("ignore_eos"):
        kw["stop_token_ids"] = []
    return kw


def reference(prompt_ids: list[int], body: dict):
    """(text, number of tokens, finish reason as the API names it) of the offline engine for one request."""
    res = offline().generate([prompt_ids], **generate_kwargs(body))
    return res.texts[0], len(res.tokens[0]), api_reason(res.finish_reasons[0])


def api_reason(done: str) -> str:
    return "length" if done == "context" else done


def openai_error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["code"] == status and "type" in err
    return err
