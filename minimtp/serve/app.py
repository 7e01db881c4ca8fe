"""The OpenAI-compatible HTTP app (FastAPI) around a started serving loop (loop.py).

Endpoints (OpenAI's formats; docs: guides/serving): ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
tokenizer's chat template), both with ``"stream": true`` (server-sent events, then ``data: [DONE]``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus). Requests carry their own sampling settings, seed,
stops, penalties and grammar (``response_format`` for chat; vLLM's ``guided_json`` / ``guided_regex`` /
``guided_grammar`` for both) and their own ``num_speculative_tokens`` (0 = plain). Errors are OpenAI error objects:
400 for bad parameters, 401 without the ``--api-key``, 404 for an unknown model, 503 + Retry-After for a full queue.
Each body becomes one `GenerationSettings` (settings.py) and one request.
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict
from sse_starlette.sse import EventSourceResponse

from minimtp.controls.stop_strings import StopStrings, TextStream
from minimtp.errors import MinimtpError
from minimtp.request import make_requests
from minimtp.scheduler import QueueFullError
from minimtp.settings import GenerationSettings


class _Body(BaseModel):
    """The fields both endpoints share (OpenAI's, plus vLLM's extensions); unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1
    stream: bool = False
    num_speculative_tokens: int | None = None
    guided_json: dict | str | bool | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    token_healing: bool = False


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]
    echo: bool = False
    logprobs: int | None = None


class ChatBody(_Body):
    messages: list[dict]
    max_completion_tokens: int | None = None
    response_format: dict | None = None
    logprobs: bool = False


def error_body(status: int, message: str, kind: str = "invalid_request_error", param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, kind: str = "invalid_request_error", param=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind, param), status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param=None):
        super().__init__(message)
        self.status = status
        self.param = param


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
    app = FastAPI(title="minimtp", docs_url=None, redoc_url=None)
    engine = serving.engine
    defaults = defaults or {}

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        return error(400, f"{where}: {e.get('msg', 'invalid value')}", param=where or None)

    @app.exception_handler(BadRequest)
    async def bad(_request, exc: BadRequest):
        kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
        return error(exc.status, str(exc), kind, exc.param)

    @app.get("/health")
    async def health():
        return PlainTextResponse("", status_code=200 if serving.thread.is_alive() else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(serving.metrics.registry).decode(), media_type="text/plain")

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "minimtp",
            "max_model_len": max_model_len,
        }
        return {"object": "list", "data": [card]}

    def settings(body: _Body, max_tokens: int | None, grammar: dict, max_name: str = "max_tokens"):
        """The body's GenerationSettings (``grammar``: the chat endpoint's response_format, as a settings field)."""
        if body.model is not None and body.model != model_name:
            raise BadRequest(f"model {body.model!r} does not exist (this server serves {model_name!r})", 404, "model")
        if max_tokens is not None and max_tokens < 1:  # the API's name, not GenerationSettings' max_new_tokens
            raise BadRequest(f"{max_name}={max_tokens}: expected an integer >= 1", param=max_name)
        if body.n != 1:
            raise BadRequest(f"n={body.n} is not supported: expected 1", param="n")
        k = default_k if body.num_speculative_tokens is None else body.num_speculative_tokens
        if k < 0:
            raise BadRequest(f"num_speculative_tokens={k}: expected an integer >= 0 (0 = plain)")
        guided = any(g is not None for g in (body.guided_json, body.guided_regex, body.guided_grammar))
        if grammar and guided:
            raise BadRequest("response_format and guided_json/guided_regex/guided_grammar given: pass one of them")
        sampling = {
            "top_k": None if body.top_k in (-1, 0) else body.top_k,  # vLLM: -1 = off
            "top_p": body.top_p,
            "min_p": body.min_p,
            "repetition_penalty": body.repetition_penalty,
        }
        sampling = {name: defaults.get(name) if v is None else v for name, v in sampling.items()}  # else the config's
        fields = dict(
            max_new_tokens=16 if max_tokens is None else max_tokens,
            temperature=body.temperature,
            **sampling,
            seed=body.seed,
            stop=body.stop,
            include_stop_str_in_output=body.include_stop_str_in_output,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            num_speculative_tokens=max(k, 1),
            use_assistant=k > 0,
            stop_token_ids=[] if body.ignore_eos else body.stop_token_ids,
            json_schema=body.guided_json,
            regex=body.guided_regex,
            grammar=body.guided_grammar,
            token_healing=body.token_healing,
        )
        fields.update(grammar)  # response_format (chat), instead of the guided_* fields
        try:
            return GenerationSettings.of(**fields)
        except MinimtpError as e:
            raise BadRequest(str(e)) from None

    def make_request(ids: list[int], settings: GenerationSettings):
        if len(ids) + settings.max_new_tokens > max_model_len:
            raise BadRequest(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({settings.max_new_tokens}) exceeds the "
                f"model's context length ({max_model_len} tokens)",
                param="max_tokens",
            )
        try:
            [req] = make_requests(engine, [ids], settings)
        except MinimtpError as e:
            raise BadRequest(str(e)) from None
        return req

    async def run(req, chat: bool, rid: str, prompt_len: int, stream: bool):
        try:
            queue = serving.submit(req)
        except QueueFullError as e:
            return error(503, str(e), "server_busy", headers={"Retry-After": "1"})
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        text = TextStream(req.stop_strings or StopStrings(tokenizer, [], prefix=req.controls.healed))

        def choice(delta: str, reason):
            if chat:
                return {"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": reason}
            return {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}

        def usage():
            n = len(req.out)
            return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

        async def events():
            reason = None
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield json.dumps(_chunk(rid, obj + ".chunk", created, model_name, first))
                while reason is None:
                    kind, value = await queue.get()
                    reason = _reason(value) if kind == "done" else None
                    if reason == "error":
                        yield json.dumps(error_body(500, f"generation failed: {req.stop_reason}", "internal_error"))
                        break
                    delta = text.delta(req.out, final=kind == "done")
                    if delta or reason:
                        c = _chunk(rid, obj + ".chunk" if chat else obj, created, model_name, choice(delta, reason))
                        if reason:
                            c["usage"] = usage()
                        yield json.dumps(c)
                yield "[DONE]"
            finally:
                if reason is None:  # the client went away mid-stream: free the request's blocks
                    serving.cancel(req)

        if stream:
            return EventSourceResponse(events(), sep="\n")
        reason = None
        try:
            while reason is None:
                kind, value = await queue.get()
                reason = _reason(value) if kind == "done" else None
        finally:
            if reason is None:
                serving.cancel(req)
        if reason == "error":
            return error(500, f"generation failed: {req.stop_reason}", "internal_error")
        text.delta(req.out, final=True)
        final = text.shown
        c = {"index": 0, "finish_reason": reason, "logprobs": None}
        c |= {"message": {"role": "assistant", "content": final}} if chat else {"text": final}
        return {**_chunk(rid, obj, created, model_name, c), "usage": usage()}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        if body.echo or body.logprobs:
            raise BadRequest("echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise BadRequest("a list of prompts is not supported: send one prompt per request", param="prompt")
            p = p[0]
        ids = list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p)
        if not ids:
            raise BadRequest("the prompt is empty", param="prompt")
        req = make_request(ids, settings(body, body.max_tokens, {}))
        return await run(req, False, f"cmpl-{uuid.uuid4().hex}", len(ids), body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        if body.logprobs:
            raise BadRequest("logprobs are not supported", param="logprobs")
        if not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template: use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template(body.messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja / message-shape errors, one line
            raise BadRequest(f"messages: cannot apply the chat template ({str(e).splitlines()[0]})") from None
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        name = "max_tokens" if body.max_completion_tokens is None else "max_completion_tokens"  # 0 is not "unset"
        chosen = settings(body, getattr(body, name), _response_format(body.response_format), name)
        return await run(make_request(ids, chosen), True, f"chatcmpl-{uuid.uuid4().hex}", len(ids), body.stream)

    return app


def _chunk(rid, obj, created, model, choice) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def _reason(done: str) -> str:
    return {"stop": "stop", "length": "length", "context": "length"}.get(done, done)


def _response_format(fmt: dict | None) -> dict:
    """OpenAI's response_format -> a json_schema keyword (text: none)."""
    if not fmt or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"json_schema": {"type": "object"}}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        return {"json_schema": fmt["json_schema"]["schema"]}
    raise BadRequest(
        "response_format: expected type text, json_object, or json_schema with json_schema.schema",
        param="response_format",
    )
