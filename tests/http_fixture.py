"""A real HTTP server on 127.0.0.1 for the network tests: serves registered bytes by path and plays
scripted faults, one per request, in order (``server.fault(path, "500", "500")``: two errors, then the file).

Faults: ``"500"``/``"503"``/``"429"`` (that status), ``"truncate"`` (full Content-Length, half the body,
connection closed), ``"stall"`` (no answer for ``stall_seconds``), ``"garbage"`` (200 with the body's
bytes scrambled), ``hold(path)`` (every request of that path hangs, unanswered, until ``release()``; later ones are served).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FixtureServer:
    def __init__(self, stall_seconds: float = 3.0):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.held: set[str] = set()
        self.log: list[tuple[str, int | str]] = []
        self.stall_seconds = stall_seconds
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def fault(self, path: str, *actions: str) -> None:
        self.faults[path].extend(actions)

    def hold(self, path: str) -> None:
        self.held.add(path)

    def release(self) -> None:
        self._release.set()

    def requests(self, path: str) -> list[int | str]:
        with self._lock:
            return [status for p, status in self.log if p == path]

    def _record(self, path: str, status: int | str) -> None:
        with self._lock:
            self.log.append((path, status))

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        with self._lock:
            action = self.faults[path].pop(0) if self.faults.get(path) else None
        if path in self.held and not self._release.is_set():
            self._record(path, "hold")
            self._release.wait()
            return  # the held request is never answered; later ones are
        if action in ("500", "503", "429"):
            self._record(path, int(action))
            h.send_error(int(action))
            return
        if action == "stall":
            self._record(path, "stall")
            time.sleep(self.stall_seconds)
            return
        data = self.files.get(path)
        if data is None:
            self._record(path, 404)
            h.send_error(404)
            return
        if action == "garbage":
            data = bytes(b ^ 0x5A for b in data)
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if action == "truncate":
            self._record(path, "truncate")
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        self._record(path, 200)
        h.wfile.write(data)

    def __enter__(self) -> "FixtureServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()
