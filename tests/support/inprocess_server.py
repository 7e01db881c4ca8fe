"""``python -m minimtp.serve FLAGS`` inside the test process, on a loopback port the OS picked.

Only the server's public entry points are used (``minimtp.serve.build_parser`` and ``create``): the serving loop
starts, uvicorn runs the app in a daemon thread on a socket bound here (no race for the port), and ``close`` stops
both. The audit tests talk to it as any client would: over HTTP.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request


class InProcessServer:
    def __init__(self, *flags: str):
        import uvicorn

        from minimtp.serve import build_parser, create

        self.app, self.serving = create(build_parser().parse_args(["--port", "0", *flags]))
        self.serving.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.serving.stop()
