"""Serving: ``python -m minimtp.serve``, an OpenAI-compatible server over continuous batching (docs: guides/serving).

* ``cli.py``      the command: flags, loading, the server;
* ``http.py``     uvicorn with limits (header and body deadlines, body size) and a draining shutdown;
* ``protocol.py`` the request bodies, checked (unsupported fields refused by name), → GenerationSettings;
* ``errors.py``   every error as an OpenAI error object;
* ``app.py``      the HTTP app: endpoints, choices, logprobs, streaming;
* ``loop.py``     the engine thread: schedule → execute → postprocess, each request's tokens to its call's queue;
* ``metrics.py``  Prometheus metrics, named as vLLM's.
"""

from minimtp.serve.cli import build_parser, create, main, server_for

__all__ = ["build_parser", "create", "main", "server_for"]
