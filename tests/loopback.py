"""A loopback HTTP server for download tests (helper, not a test module).

Serves byte strings on 127.0.0.1 (port chosen by the OS) from a daemon thread. It honours Range requests,
can fail a path's first N requests (503), cut a path's first N responses short, ignore Range, and mimic the
Cityscapes login (form POST answered with a 302 and a session cookie; files refused without the cookie).
It can also misbehave as real sites do: serve an HTML page with 200 (`html_pages`), announce a wrong
Content-Length (`wrong_length`), close the connection early without any Content-Length (`close_early`), and
redirect (`redirects`: to a login page on the same host, or to another host: the same server is reached as
`localhost` too, which is another host by name, see `url(path, host=...)`).
Every request is recorded. Use it as a context manager: it stops itself on exit, and its sockets time out.
"""

from __future__ import annotations

import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Seconds an idle connection may hold a handler thread (keeps a broken test from hanging).
SOCKET_TIMEOUT_S = 5.0
SESSION_COOKIE = "PHPSESSID=loopback-session"
LOGIN_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Login</title></head>\n"
              b"<body><form method='post'>login</form></body></html>\n")


@dataclass
class Behaviour:
    """What the server does; all fields may be changed while it runs."""

    files: dict[str, bytes] = field(default_factory=dict)  # path (with query) -> content
    fail_first: dict[str, int] = field(default_factory=dict)  # path -> number of 503 answers before success
    cut_first: dict[str, int] = field(default_factory=dict)  # path -> number of responses cut at half
    ignore_range: bool = False
    login_user: str | None = None  # when set, files need the session cookie from a good login
    login_password: str | None = None
    login_path: str = "/login/"
    html_pages: dict[str, bytes] = field(default_factory=dict)  # path -> HTML answered with 200 (text/html)
    wrong_length: dict[str, int] = field(default_factory=dict)  # path -> Content-Length announced for its file
    close_early: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, with no Content-Length, then close
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location of a 302 (a path or a whole URL)


class LoopbackServer:
    """`with LoopbackServer(Behaviour(...)) as srv: srv.url("/a.zip")`; `srv.requests` lists (method, path, headers)."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.posted: list[bytes] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT_S

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence stderr logging
                pass

            def _record(self) -> None:
                with server._lock:
                    server.requests.append((self.command, self.path, dict(self.headers)))

            def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self._record()
                b = server.behaviour
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with server._lock:
                    server.posted.append(body)
                if self.path != b.login_path:
                    self._send(404)
                    return
                form = urllib.parse.parse_qs(body.decode())
                if form.get("username") == [b.login_user] and form.get("password") == [b.login_password]:
                    self._send(302, headers={"Location": "/", "Set-Cookie": f"{SESSION_COOKIE}; Path=/"})
                else:
                    self._send(200, b"<form>login</form>")

            def do_GET(self) -> None:  # noqa: N802
                self._record()
                b = server.behaviour
                if urllib.parse.urlsplit(self.path).path == b.login_path:
                    self._send(200, LOGIN_PAGE, {"Set-Cookie": "PHPSESSID=anonymous; Path=/",
                                                 "Content-Type": "text/html; charset=utf-8"})
                    return
                if self.path in b.redirects:
                    self._send(302, b"", {"Location": b.redirects[self.path]})
                    return
                if self.path in b.html_pages:
                    self._send(200, b.html_pages[self.path], {"Content-Type": "text/html; charset=utf-8"})
                    return
                if self.path not in b.files:
                    self._send(404)
                    return
                with server._lock:
                    if b.fail_first.get(self.path, 0) > 0:
                        b.fail_first[self.path] -= 1
                        self._send(503, b"busy")
                        return
                    cut = b.cut_first.get(self.path, 0) > 0
                    if cut:
                        b.cut_first[self.path] -= 1
                if b.login_user is not None and SESSION_COOKIE not in self.headers.get("Cookie", ""):
                    self._send(302, headers={"Location": b.login_path})
                    return
                data = b.files[self.path]
                # These two ignore Range: a body delimited by closing the connection, closed too soon; the file
                # under a Content-Length that is not its length.
                if self.path in b.close_early:
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(data[: b.close_early[self.path]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.path in b.wrong_length:
                    self.send_response(200)
                    self.send_header("Content-Length", str(b.wrong_length[self.path]))
                    self.end_headers()
                    self.wfile.write(data)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not b.ignore_range and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                    if start >= len(data):
                        self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
                        return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if cut:  # promise the whole body, send half, drop the connection
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """The URL of `path`; host="localhost" reaches the same server under another host name."""
        return f"http://{host}:{self.port}{path}"

    def paths_requested(self) -> list[str]:
        return [p for _, p, _ in self.requests]

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=SOCKET_TIMEOUT_S)


def closed_port_url(path: str = "/x.zip") -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused), as when offline."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
