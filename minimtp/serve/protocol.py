"""The request bodies of the OpenAI API (and vLLM's extensions), checked, and mapped onto `GenerationSettings`.

`parse` reads a body: JSON, an object, valid Unicode (a lone surrogate such as ``"\\ud800"`` names its field), the
pydantic model's types, every ``null`` the spec allows. A field the server does not implement is refused with a
400 naming it, never ignored: ``tools``, ``logit_bias``, ``best_of``, ``suffix``... are accepted only with the
value that changes nothing (no tools, an empty bias, ``best_of == n``). `to_settings` maps a body onto
`GenerationSettings` (settings.py): sampling, seed, stops, penalties, ``logprobs``, and one constraint from
``response_format``, vLLM's ``structured_outputs`` (json, regex, choice, grammar, json_object) or its older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` (docs: guides/serving).
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, ValidationError

from minimtp.errors import MinimtpError
from minimtp.serve.errors import APIError
from minimtp.settings import GenerationSettings

MAX_N = 16  # choices per prompt
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}  # no effect here
REGEX_META = set("\\.+*?()|[]{}^$/")


class _Body(BaseModel):
    """The fields both endpoints share (OpenAI's, plus vLLM's extensions); ``None`` wherever the spec allows it."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict | None = None
    num_speculative_tokens: int | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    token_healing: bool | None = None
    logit_bias: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatBody(_Body):
    messages: list[dict]
    max_completion_tokens: int | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    parallel_tool_calls: bool | None = None


def parse(raw: bytes, model: type[_Body]) -> _Body:
    """The body as ``model``, or APIError(400) naming the first problem."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(f"the body is a JSON {type(data).__name__}: expected an object")
    _check_unicode(data, "")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise APIError(f"{where}: {first.get('msg', 'invalid value')}", param=where or None) from None
    _check_supported(body)
    return body


def _check_unicode(value, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start : e.start + 1].encode("unicode_escape").decode()
            raise APIError(
                f"{where or 'body'}: contains {bad}, a lone surrogate (not valid Unicode)", param=where
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where)
            _check_unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{where}[{i}]")


def _check_supported(body: _Body) -> None:
    """Refuse, naming it, every field this server does not implement (unless its value changes nothing)."""
    for name in body.model_extra or {}:
        if name not in IGNORED:
            raise APIError(f"{name}: this server does not support the field {name!r}", param=name)
    noop = {
        "logit_bias": lambda v: not v,
        "suffix": lambda v: not v,
        "best_of": lambda v: v is None or v == (body.n or 1),
        "tools": lambda v: not v,
        "functions": lambda v: not v,
        "tool_choice": lambda v: v in (None, "none", "auto"),
        "function_call": lambda v: v in (None, "none", "auto"),
    }
    for name, unchanged in noop.items():
        value = getattr(body, name, None)
        if not unchanged(value):
            raise APIError(
                f"{name}={_short(value)}: this server does not support {name} (tools, biases, ...)", param=name
            )
    options = body.stream_options or {}
    for key in options:
        if key != "include_usage":
            raise APIError(f"stream_options.{key}: not supported (only include_usage)", param="stream_options")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def constraint(body: _Body, response_format: dict | None = None) -> dict:
    """The one output constraint of ``body`` as GenerationSettings fields (json_schema, regex or grammar)."""
    given = {}
    if response_format is not None:
        given["response_format"] = _response_format(response_format)
    if body.structured_outputs is not None:
        given["structured_outputs"] = _structured_outputs(body.structured_outputs)
    legacy = {
        "guided_json": body.guided_json,
        "guided_regex": body.guided_regex,
        "guided_choice": body.guided_choice,
        "guided_grammar": body.guided_grammar,
    }
    for name, value in legacy.items():
        if value is not None:
            given[name] = _structured_outputs({name.removeprefix("guided_"): value}, name)
    given = {name: fields for name, fields in given.items() if fields}
    if len(given) > 1:
        raise APIError(f"{' and '.join(given)} given: pass one output constraint")
    return next(iter(given.values()), {})


def _response_format(fmt: dict) -> dict:
    """OpenAI's response_format -> a json_schema field (text: none)."""
    kind = fmt.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema" and isinstance(fmt.get("json_schema"), dict) and "schema" in fmt["json_schema"]:
        return {"json_schema": fmt["json_schema"]["schema"]}
    raise APIError(
        "response_format: expected type text, json_object, or json_schema with json_schema.schema",
        param="response_format",
    )


def _structured_outputs(spec: dict, where: str = "structured_outputs") -> dict:
    """vLLM's structured outputs (one of json, regex, choice, grammar, json_object) -> GenerationSettings fields."""
    given = {k: v for k, v in spec.items() if v is not None and v is not False}
    unknown = [k for k in given if k not in ("json", "regex", "choice", "grammar", "json_object")]
    if unknown:
        raise APIError(f"{where}.{unknown[0]}: not supported (json, regex, choice, grammar, json_object)", param=where)
    if len(given) > 1:
        raise APIError(f"{where}: {' and '.join(given)} given: pass one of them", param=where)
    if not given:
        return {}
    kind, value = next(iter(given.items()))
    if kind == "json":
        return {"json_schema": value}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "grammar":
        return {"grammar": value}
    if kind == "regex":
        return {"regex": value}
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise APIError(f"{where}: choice must be a non-empty list of non-empty strings", param=where)
    return {"regex": "|".join("".join("\\" + c if c in REGEX_META else c for c in s) for s in value)}


def to_settings(body: _Body, *, max_tokens: int, default_k: int, defaults: dict, grammar: dict, logprobs) -> dict:
    """``body``'s GenerationSettings fields; ``defaults``: the server's sampling defaults for what it leaves out."""
    k = default_k if body.num_speculative_tokens is None else body.num_speculative_tokens
    if k < 0:
        raise APIError(
            f"num_speculative_tokens={k}: expected an integer >= 0 (0 = plain)", param="num_speculative_tokens"
        )
    sampling = {
        "top_k": None if body.top_k in (-1, 0) else body.top_k,  # vLLM: -1 = off
        "top_p": body.top_p,
        "min_p": body.min_p,
        "repetition_penalty": body.repetition_penalty,
    }
    fields = dict(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        **{name: defaults.get(name) if v is None else v for name, v in sampling.items()},
        seed=body.seed,
        stop=body.stop,
        include_stop_str_in_output=bool(body.include_stop_str_in_output),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        num_speculative_tokens=max(k, 1),
        use_assistant=k > 0,
        stop_token_ids=[] if body.ignore_eos else body.stop_token_ids,
        token_healing=bool(body.token_healing),
        logprobs=logprobs,
        **grammar,
    )
    try:
        return GenerationSettings.of(**fields)
    except MinimtpError as e:
        raise APIError(str(e), param=_param(str(e))) from None


def _param(message: str) -> str | None:
    head = message.split("=", 1)[0].split(" ", 1)[0]
    return head if head.isidentifier() else None
