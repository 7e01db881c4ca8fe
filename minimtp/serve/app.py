"""The OpenAI-compatible HTTP app (FastAPI) around a started serving loop (loop.py).

Endpoints (OpenAI's formats; docs: guides/serving): ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
tokenizer's chat template), both with ``"stream": true`` (server-sent events, then ``data: [DONE]``; usage in a
last ``choices: []`` chunk with ``stream_options.include_usage``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, ``GET /metrics`` (Prometheus). A call may carry a list of prompts (completions) and ``n`` choices
each: every (prompt, choice) is one request with its own random stream (seed s: stream i of s, sampling.py).
Requests carry their own sampling settings, seed, stops, penalties, ``logprobs`` (of p, the processed target
distribution each token was drawn from: exactly plain decoding's numbers, also under speculation), ``echo``, one
output constraint (protocol.py) and their own ``num_speculative_tokens`` (0 = plain). Tokenizing, templating and
compiling a grammar run in a worker thread, never on the event loop. A client that hangs up, streaming or not,
cancels its requests. Errors: errors.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest

from minimtp.controls.stop_strings import StopStrings, TextStream
from minimtp.errors import CacheFullError, MinimtpError
from minimtp.request import make_requests
from minimtp.scheduler import QueueFullError
from minimtp.serve.errors import APIError, error, error_body, install_handlers
from minimtp.serve.loop import ServerClosingError
from minimtp.serve.protocol import MAX_N, ChatBody, CompletionBody, constraint, parse, to_settings

REASONS = {"stop": "stop", "length": "length", "context": "length", "abort": "abort", "error": "error"}


def build_app(
    serving,
    tokenizer,
    model_name: str,
    *,
    default_k: int,
    max_model_len: int,
    api_key: str | None = None,
    defaults: dict | None = None,
) -> FastAPI:
    """The FastAPI app around a started :class:`~minimtp.serve.loop.ServingEngine`. ``defaults``: sampling
    settings for the fields a body leaves out (``--generation-config``)."""
    app = FastAPI(title="minimtp", docs_url=None, redoc_url=None, openapi_url=None)
    install_handlers(app)
    engine = serving.engine
    defaults = defaults or {}
    expected_key = f"Bearer {api_key}".encode() if api_key else None
    longest = max(map(len, tokenizer.get_vocab()))  # characters of the longest token: bounds a prompt's length
    card = {"id": model_name, "object": "model", "owned_by": "minimtp", "max_model_len": max_model_len}

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if expected_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not secrets.compare_digest(given, expected_key):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)")
        return await call_next(request)

    @app.get("/health")
    async def health():
        ok = serving.thread.is_alive() and not serving.closing
        return PlainTextResponse("", status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(serving.metrics.registry).decode(), media_type="text/plain")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{**card, "created": int(time.time())}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(f"model {model_id!r} does not exist (this server serves {model_name!r})", 404, "model")
        return {**card, "created": int(time.time())}

    def check_model(body) -> None:
        if body.model is not None and body.model != model_name:
            raise APIError(f"model {body.model!r} does not exist (this server serves {model_name!r})", 404, "model")

    def max_new(value: int | None, name: str, prompts: list[list[int]], default: int | None) -> int:
        """The request's max_tokens: given (>= 1), else ``default`` (None: the rest of the context)."""
        if value is not None and value < 1:  # the API's name, not GenerationSettings' max_new_tokens
            raise APIError(f"{name}={value}: expected an integer >= 1", param=name)
        longest_prompt = max(map(len, prompts))
        n = value if value is not None else default if default is not None else max_model_len - longest_prompt
        if longest_prompt + n > max_model_len:
            raise APIError(
                f"the prompt ({longest_prompt} tokens) plus {name} ({n}) exceeds the model's context length "
                f"({max_model_len} tokens)",
                param=name,
            )
        return n

    def tokenize(text: str) -> list[int]:
        if len(text) > max_model_len * longest:  # cannot fit whatever it tokenizes to: do not tokenize it
            raise APIError(f"the prompt ({len(text)} characters) exceeds the model's context length", param="prompt")
        return list(tokenizer.encode(text))

    async def prompt_ids(prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError("the prompt is empty", param="prompt")
        out = []
        for p in prompt:
            ids = await asyncio.to_thread(tokenize, p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError("the prompt is empty", param="prompt")
            out.append(ids)
        return out

    def chat_ids(messages: list[dict]) -> list[int]:
        chars = sum(len(part) for m in messages for part in _texts(m.get("content")))
        if chars > max_model_len * longest:  # the template keeps every text: it cannot fit
            raise APIError(f"the messages ({chars} characters) exceed the model's context length", param="messages")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja / message-shape errors, one line
            raise APIError(f"messages: cannot apply the chat template ({str(e).splitlines()[0]})") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def requests_for(prompts: list[list[int]], n: int, settings):
        try:
            return make_requests(engine, [p for p in prompts for _ in range(n)], settings)
        except MinimtpError as e:
            raise APIError(str(e)) from None

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse(await request.body(), CompletionBody)
        check_model(body)
        if body.echo and body.logprobs is not None:
            raise APIError("echo with logprobs (the prompt's logprobs) is not supported", param="echo")
        prompts = await prompt_ids(body.prompt)
        n = _choices(body.n, len(prompts), serving)
        settings = to_settings(
            body,
            max_tokens=max_new(body.max_tokens, "max_tokens", prompts, 16),  # OpenAI's default for completions
            default_k=default_k,
            defaults=defaults,
            grammar=constraint(body),
            logprobs=body.logprobs,
        )
        reqs = await asyncio.to_thread(requests_for, prompts, n, settings)
        call = Call(reqs, tokenizer, model_name, "text_completion", prompts, n, bool(body.echo))
        return await respond(request, call, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(await request.body(), ChatBody)
        check_model(body)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError("this model's tokenizer has no chat template: use /v1/completions")
        prompts = [await asyncio.to_thread(chat_ids, body.messages)]
        n = _choices(body.n, 1, serving)
        name = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"  # 0 is not "unset"
        top = body.top_logprobs
        if top is not None and not body.logprobs:
            raise APIError("top_logprobs needs logprobs: true", param="top_logprobs")
        settings = to_settings(
            body,
            max_tokens=max_new(getattr(body, name), name, prompts, None),  # OpenAI: the rest of the context
            default_k=default_k,
            defaults=defaults,
            grammar=constraint(body, body.response_format),
            logprobs=(top or 0) if body.logprobs else None,
        )
        reqs = await asyncio.to_thread(requests_for, prompts, n, settings)
        return await respond(request, Call(reqs, tokenizer, model_name, "chat.completion", prompts, n), body)

    async def respond(request: Request, call: Call, body):
        try:
            queue = serving.submit(call.reqs)
        except QueueFullError as e:
            raise APIError(str(e), 503, headers={"Retry-After": "1"}) from None
        except ServerClosingError as e:
            raise APIError(str(e), 503) from None
        except CacheFullError as e:
            raise APIError(str(e), param="max_tokens") from None
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(call.events(queue, serving, usage), media_type="text/event-stream")
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            while not call.finished:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:  # the client hung up: stop its requests
                    get.cancel()
                    serving.cancel(call.unfinished())
                    return JSONResponse(error_body(400, "the client disconnected"), status_code=400)
                call.take(*get.result())
        finally:
            watch.cancel()
        if call.failed:
            return error(500, f"generation failed: {call.failed}")
        return call.response()

    return app


def _choices(n: int | None, prompts: int, serving) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise APIError(f"n={n}: expected an integer in 1..{MAX_N}", param="n")
    limit = serving.sched.max_waiting
    if limit is not None and n * prompts > limit:
        raise APIError(f"{prompts} prompt(s) x n={n} is more requests than the queue holds ({limit})", param="n")
    return n


def _texts(content) -> list[str]:
    """The texts of a message's content (a string, or a list of parts)."""
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Call:
    """The requests of one HTTP call (prompt i, choice j: request ``i * n + j``, choice index the same) and what
    has been sent of them: the text shown (TextStream, cut at stop strings), the tokens whose logprobs are sent,
    the finish reasons."""

    def __init__(self, reqs, tokenizer, model, obj: str, prompts, n: int, echo: bool = False):
        self.reqs = reqs
        self.tokenizer = tokenizer
        self.model = model
        self.chat = obj == "chat.completion"
        self.obj = obj
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = sum(map(len, prompts))
        self.echo = [tokenizer.decode(prompts[i // n]) if echo else "" for i in range(len(reqs))]
        self.texts = [TextStream(r.stop_strings or StopStrings(tokenizer, [], prefix=r.controls.healed)) for r in reqs]
        self.reported = [0] * len(reqs)  # tokens whose logprobs were sent
        self.offsets = [len(e) for e in self.echo]  # text offset of the next reported token (completions)
        self.reasons: list[str | None] = [None] * len(reqs)
        self.failed: str | None = None

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.reasons)

    def unfinished(self):
        return [r for r, reason in zip(self.reqs, self.reasons) if reason is None]

    def take(self, index: int, kind: str, value) -> None:
        if kind == "done":
            self.reasons[index] = REASONS.get(value, value)
            if value == "error":
                self.failed = str(self.reqs[index].stop_reason)

    def usage(self) -> dict:
        n = sum(len(r.out) for r in self.reqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _logprobs(self, i: int, upto: int):
        """The logprob object of request i's tokens reported..upto (None without logprobs)."""
        r = self.reqs[i]
        if r.logprobs is None:
            return None
        start = self.reported[i]
        self.reported[i] = upto
        entries = r.out_logprobs[start:upto]
        word = lambda t: self.tokenizer.decode([t])
        tokens = [word(t) for t in r.out[start:upto]]
        if self.chat:
            content = []
            for s, (lp, top) in zip(tokens, entries):
                alts = [{"token": word(t), "logprob": v, "bytes": list(word(t).encode())} for t, v in top]
                content.append({"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": alts})
            return {"content": content, "refusal": None}
        offsets = []
        for s in tokens:
            offsets.append(self.offsets[i])
            self.offsets[i] += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [{word(t): v for t, v in top} for _, top in entries],
            "text_offset": offsets,
        }

    def _choice(self, i: int, text: str, reason, logprobs, delta: bool) -> dict:
        if not self.chat:
            return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
        if delta:
            return {
                "index": i,
                "delta": {"content": text} if text else {},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        message = {"role": "assistant", "content": text}
        return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reason}

    def _object(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def response(self) -> dict:
        choices = []
        for i, r in enumerate(self.reqs):
            self.texts[i].delta(r.out, final=True)
            text = self.echo[i] + self.texts[i].shown
            choices.append(self._choice(i, text, self.reasons[i], self._logprobs(i, len(r.out)), delta=False))
        return {**self._object(self.obj, choices), "usage": self.usage()}

    async def events(self, queue: asyncio.Queue, serving, include_usage: bool):
        """Server-sent events: the chunks of every choice as its tokens arrive, a last chunk with its finish reason,
        the usage chunk if asked, then ``[DONE]``. A client that goes away cancels the unfinished requests."""
        obj = self.obj + ".chunk" if self.chat else self.obj
        chunk = lambda choice: _sse(self._object(obj, [choice]))
        try:
            for i in range(len(self.reqs)):
                if self.chat:
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                    yield chunk({**first, "finish_reason": None})
                elif self.echo[i]:
                    yield chunk(self._choice(i, self.echo[i], None, None, delta=True))
            while not self.finished:
                i, kind, value = await queue.get()
                self.take(i, kind, value)
                if self.failed:
                    yield _sse(error_body(500, f"generation failed: {self.failed}"))
                    break
                r = self.reqs[i]
                upto = self.reported[i] + len(value) if kind == "tokens" else len(r.out)
                text = self.texts[i].delta(r.out, final=kind == "done")
                logprobs = self._logprobs(i, min(upto, len(r.out)))
                if text or logprobs or kind == "done":
                    yield chunk(self._choice(i, text, self.reasons[i], logprobs, delta=True))
            if include_usage and not self.failed:
                yield _sse({**self._object(obj, []), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            if not self.finished:
                serving.cancel(self.unfinished())


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
