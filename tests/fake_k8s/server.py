"""The HTTP layer of the fake apiserver: `http.server.ThreadingHTTPServer`, HTTP/1.1, keep-alive.

Every request is authenticated (bearer token, except health checks and /version), recorded as an
RBAC-style `ApiCall`, possibly failed on purpose (`fail_next`), then answered by `Api`. Plain
answers carry Content-Length; watches and followed logs are sent with chunked transfer encoding, one
JSON event (plus newline) per chunk, as the apiserver streams them. Open watch connections are
tracked so a test can cut them all at once (`drop_watches`), as a load balancer or an apiserver
restart would.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

import structlog

from .api import Api, RequestInfo, Response, Stream, parse_request_info
from .status import ApiError, injected, unauthorized

log = structlog.get_logger(__name__)

PUBLIC_PATHS = {"/healthz", "/livez", "/readyz", "/version"}


class ApiCall(NamedTuple):
    """One resource request as RBAC sees it. Verbs: get list watch create update patch delete deletecollection."""

    verb: str
    group: str  # "" for the core group, "batch", ...
    version: str
    resource: str  # "jobs", "pods"
    subresource: str  # "", "log", "status"
    namespace: str
    name: str


class RequestLog:
    """A thread-safe, append-only list of `ApiCall`s (iterate, index, len, `snapshot()`, `clear()`)."""

    def __init__(self) -> None:
        self._items: list[ApiCall] = []
        self._lock = threading.Lock()

    def append(self, call: ApiCall) -> None:
        with self._lock:
            self._items.append(call)

    def snapshot(self) -> list[ApiCall]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.snapshot())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __getitem__(self, index: int) -> ApiCall:
        with self._lock:
            return self._items[index]

    def __repr__(self) -> str:
        return f"RequestLog({self.snapshot()!r})"


class FailureInjector:
    """Answers the next n matching requests with an error status (see FakeCluster.fail_next)."""

    def __init__(self) -> None:
        self._rules: list[list[Any]] = []  # [remaining, code, verb | None, resource | None]
        self._lock = threading.Lock()

    def add(self, count: int, code: int, verb: str | None, resource: str | None) -> None:
        with self._lock:
            self._rules.append([count, code, verb, resource])

    def take(self, call: ApiCall) -> ApiError | None:
        with self._lock:
            for rule in self._rules:
                remaining, code, verb, resource = rule
                if (verb is None or verb == call.verb) and (resource is None or resource == call.resource):
                    rule[0] = remaining - 1
                    if rule[0] <= 0:
                        self._rules.remove(rule)
                    return injected(code)
        return None


class FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api: Api, token: str) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self.token = token
        self.requests = RequestLog()
        self.nonresource_requests: list[tuple[str, str]] = []
        self.failures = FailureInjector()
        self.errors: list[str] = []  # unexpected exceptions (answered 500)
        self._connections: set[socket.socket] = set()
        self._watches: dict[socket.socket, threading.Event] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def track_watch(self, conn: socket.socket, closing: threading.Event | None) -> None:
        with self._lock:
            if closing is None:
                self._watches.pop(conn, None)
            else:
                self._watches[conn] = closing

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def drop_watches(self) -> int:
        """Cut every open watch/follow connection mid-stream (no terminating chunk). A cut watch stops
        counting in `open_watches` at once, before its handler thread has noticed: a test that waits for
        the client to reconnect sees the new watch, never the one it cut."""
        with self._lock:
            watches = list(self._watches.items())
            self._watches.clear()
        for conn, closing in watches:
            closing.set()
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.api.store.changed:
            self.api.store.changed.notify_all()
        return len(watches)

    def close_all(self) -> None:
        self.drop_watches()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Dropped(Exception):
    """The stream was cut on purpose: close without the terminating chunk."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("fake_k8s_http", line=format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # --- the request ---------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.server.token}"

    def _handle(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        try:
            if url.path not in PUBLIC_PATHS and not self._authorized():
                raise unauthorized()
            info = parse_request_info(method, url.path, query)
            if info is None:
                self.server.nonresource_requests.append((method.lower(), url.path))
                if method != "GET":
                    raise ApiError(405, "MethodNotAllowed", "the server does not allow this method", {})
                self._send(self.server.api.discovery(url.path, self.server.address))
                return
            call = ApiCall(info.verb, info.group, info.version, info.resource, info.subresource,
                           info.namespace, info.name)
            self.server.requests.append(call)
            failure = self.server.failures.take(call)
            if failure is not None:
                raise failure
            closing = threading.Event()
            result = self.server.api.dispatch(info, query, body, self.headers.get("Content-Type", ""), closing)
            if isinstance(result, Stream):
                self._stream(result, closing, info)
            else:
                self._send(result)
        except ApiError as error:
            self._send(Response(error.code, error.status(), headers=error.headers))
        except _Dropped:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # noqa: BLE001 - answer 500 like the apiserver, and remember it
            import traceback
            self.server.errors.append(traceback.format_exc())
            log.error("fake_k8s_internal_error", path=self.path, error=repr(error))
            self._send(Response(500, ApiError(500, "InternalError", f"fake_k8s: {error!r}").status()))

    def _send(self, response: Response) -> None:
        data = response.body if isinstance(response.body, bytes) else json.dumps(response.body).encode()
        self.send_response(response.code)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, stream: Stream, closing: threading.Event, info: RequestInfo) -> None:
        self.send_response(200)
        self.send_header("Content-Type", stream.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.server.track_watch(self.connection, closing)
        try:
            for chunk in stream.chunks:
                if closing.is_set():
                    raise _Dropped()
                data = chunk if isinstance(chunk, bytes) else (json.dumps(chunk) + "\n").encode()
                if data:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            if closing.is_set():
                raise _Dropped()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.server.track_watch(self.connection, None)
