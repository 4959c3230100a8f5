"""A bounded, self-stopping HTTP server on 127.0.0.1 for the model-download tests (no other network).

``with LocalFileServer({"/pkg.zip": path_or_bytes}) as server: server.url("/pkg.zip")``. It binds an
ephemeral port on the loopback interface only, serves the given files (with Content-Length), can
send them slowly (``chunk_delay``) so that a cancel can be tested, counts requests, and shuts
itself down after ``lifetime`` seconds even if a test forgets to (the ``with`` block stops it at
once). ``cut_after=N`` announces the whole file but sends only its first N bytes and closes the
connection (a broken-off download); ``chunked=True`` sends the body in chunked transfer encoding (no
Content-Length; broken off, the last chunk never comes). Used by Testing/cli/test_registry.py, Testing/cli/test_catalogue.py
and the Slicer panel's model-management tests.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LocalFileServer:
    def __init__(self, files: dict[str, bytes | Path], *, chunk_delay: float = 0.0, chunk_size: int = 1 << 14,
                 lifetime: float = 120.0, send_length: bool = True, cut_after: int | None = None,
                 chunked: bool = False):
        self.files = {k: (v.read_bytes() if isinstance(v, Path) else bytes(v)) for k, v in files.items()}
        self.chunk_delay = chunk_delay
        self.chunk_size = chunk_size
        self.lifetime = lifetime
        self.send_length = send_length
        self.cut_after = cut_after
        self.chunked = chunked
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                owner.requests.append(self.path)
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404, "not found")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                if owner.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                elif owner.send_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if owner.cut_after is not None:  # announce it all, send a part, break off
                    data = data[:owner.cut_after]
                    self.close_connection = True
                try:
                    for i in range(0, len(data), owner.chunk_size):
                        block = data[i:i + owner.chunk_size]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if owner.chunked else block)
                        if owner.chunk_delay:
                            time.sleep(owner.chunk_delay)
                    if owner.chunked and owner.cut_after is None:
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):  # keep the test output clean
                pass

        return Handler

    def start(self) -> "LocalFileServer":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def url(self, path: str) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread is not None:
            self._thread.join(5.0)

    def __enter__(self) -> "LocalFileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
