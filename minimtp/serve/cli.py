"""``python -m minimtp.serve``: an OpenAI-compatible HTTP server with continuous batching and speculative decoding.

The model-pair flags are the CLI's (flags.py); with none it serves the embedded default pair. Endpoints and
request fields: app.py and docs/guides/serving.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch

from minimtp.errors import MinimtpError
from minimtp.flags import add_pair_flags, load_pair, pair_dirs, sampling_settings
from minimtp.serve.app import build_app
from minimtp.serve.http import make_server
from minimtp.serve.loop import ServingEngine
from minimtp.tokenizer import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minimtp.serve", description=__doc__.split("\n\n")[0])
    add_pair_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-waiting", type=int, default=64, help="queued requests before 503")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit (default: the model's)")
    p.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks per layer type (default: fits max-num-seqs requests of max-model-len)",
    )
    p.add_argument("--api-key", default=os.environ.get("MINIMTP_API_KEY"), help="require Authorization: Bearer KEY")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger bodies get 413 (default 8 MiB)")
    p.add_argument("--timeout-header", type=float, default=10.0, help="seconds a client has to send a request head")
    p.add_argument("--timeout-body", type=float, default=30.0, help="seconds a client has to send a request body")
    p.add_argument("--timeout-keep-alive", type=float, default=5.0, help="seconds an idle connection stays open")
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM: seconds running requests may take to finish before they are cancelled",
    )
    return p


def server_for(app, serving, args, port: int | None = None):
    """The uvicorn server of ``app`` with the flags' limits (serve/http.py)."""
    return make_server(
        app,
        serving,
        host=args.host,
        port=args.port if port is None else port,
        max_request_bytes=args.max_request_bytes,
        header_timeout=args.timeout_header,
        body_timeout=args.timeout_body,
        keep_alive_timeout=args.timeout_keep_alive,
        drain_timeout=args.shutdown_timeout,
    )


def create(args):
    """(app, serving engine) for parsed ``args`` (used by main and by the tests)."""
    model_dir, asst_dir = pair_dirs(args)
    tok = load_tokenizer(model_dir)
    _, assistant, engine = load_pair(model_dir, asst_dir, args, tokenizer=tok)
    max_len = min(args.max_model_len or engine.cfg.max_position_embeddings, engine.cfg.max_position_embeddings)
    k = args.num_speculative_tokens
    k = 0 if assistant is None or k == 0 else (k or engine.default_num_speculative_tokens)
    blocks = args.num_blocks or args.max_num_seqs * (-(-(max_len + k + 1) // engine.block_size))
    serving = ServingEngine(engine, blocks, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting)
    defaults = {}
    if args.generation_config != "minimtp":
        sampling, _ = sampling_settings(args, model_dir)
        defaults = {k: v for k, v in sampling.items() if k != "temperature"}
    name = args.served_model_name
    if name is None:
        name = "minimtp-default" if args.model is None else os.path.basename(model_dir.rstrip("/"))
    app = build_app(serving, tok, name, default_k=k, max_model_len=max_len, api_key=args.api_key, defaults=defaults)
    return app, serving


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        app, serving = create(args)
    except MinimtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serving.start()
    print(f"minimtp serving on http://{args.host}:{args.port}/v1", file=sys.stderr)
    # uvicorn drains on SIGTERM / SIGINT (http.py), then re-raises the signal: exit 0 after that, no traceback
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server_for(app, serving, args).run()
    except KeyboardInterrupt:
        pass
    finally:
        serving.stop()
    return 0
