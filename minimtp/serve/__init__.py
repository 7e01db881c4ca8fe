"""Serving: ``python -m minimtp.serve``, an OpenAI-compatible server over continuous batching (docs: guides/serving).

* ``cli.py``     the command: flags, loading, uvicorn;
* ``app.py``     the HTTP app: endpoints, request bodies → GenerationSettings, OpenAI error objects, streaming;
* ``loop.py``    the engine thread: schedule → execute → postprocess, each request's tokens to its client's queue;
* ``metrics.py`` Prometheus metrics, named as vLLM's.
"""

from minimtp.serve.cli import build_parser, create, main

__all__ = ["build_parser", "create", "main"]
