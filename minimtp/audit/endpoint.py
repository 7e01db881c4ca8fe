"""What the sampling audit samples from: an endpoint that completes one prompt for many seeds.

An endpoint is any object with ``complete(prompt, seeds, max_tokens, settings) -> list[str | list[int]]``: one
continuation per seed, as text (what an HTTP server returns) or as token ids. :class:`OpenAIEndpoint` is an
OpenAI-compatible server's ``POST /v1/completions`` (the standard library's HTTP client, requests in parallel
threads); a test or a notebook can pass any in-process object with the same method (a biased reference rule,
transformers' assisted generation).

Each request asks for ``max_tokens`` tokens with its own ``seed`` and the audit's ``settings`` (temperature,
top_k, top_p, min_p, penalties) and ``ignore_eos: true`` (vLLM's and minimtp's field: the support the audit
enumerates does not stop at EOS). Features a server may lack (logprobs, token ids in the response) are not used.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from minimtp.errors import GenerationError


class Endpoint(Protocol):
    def complete(self, prompt: str | list[int], seeds: list[int], max_tokens: int, settings: dict) -> list:
        """One continuation (text, or token ids) of ``prompt`` per seed."""


class OpenAIEndpoint:
    """``POST {base_url}/completions`` (base_url ends in ``/v1``), ``concurrency`` requests at a time."""

    def __init__(self, base_url: str, model: str | None, api_key: str | None = None, concurrency: int = 8, timeout=60):
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.api_key = api_key
        self.concurrency = concurrency
        self.timeout = timeout

    def _one(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                out = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300].replace("\n", " ")
            raise GenerationError(f"{self.url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise GenerationError(f"{self.url}: {e}") from None
        try:
            return out["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise GenerationError(f"{self.url}: the response has no choices[0].text: {str(out)[:200]}") from None

    def complete(self, prompt, seeds, max_tokens, settings):
        base = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **settings}
        if self.model is not None:
            base["model"] = self.model
        bodies = [dict(base, seed=s) for s in seeds]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, bodies))
