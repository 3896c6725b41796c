"""The HTTP layer: routes, auth, limits, Server-Sent Events, and a clean stop.

The standard library's ThreadingHTTPServer (as mlx_lm.server uses): one model decodes one sequence at a
time, so an async stack would buy no throughput, and without it `serve` runs on a fresh offline machine
with no extra dependency. What http.server lacks for a long-running service is added here: a body
limit, a socket timeout, a listen backlog and a cap on open connections, a Host check against DNS
rebinding while bound to loopback, an Origin check against cross-site requests from browsers, JSON
errors (never a traceback), and streams over chunked transfer encoding (keep-alive works).
"""
from __future__ import annotations

import hmac
import importlib.metadata
import json
import os
import queue
import select
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lazymoe.serve import ollama_api
from lazymoe.serve.engine import END, Busy, Engine, Job
from lazymoe.serve.openai_api import ApiError, Request, ServedModel, bad, chunk, models, parse, response, usage_chunk

MAX_BODY = 4 * 2**20            # bytes: a 32k-token prompt is ~150 KB of text, JSON escaping at most 6x that
SOCKET_TIMEOUT = 30.0           # s: idle keep-alive connections and clients that stop reading are dropped
EVENT_POLL = 1.0                # s: how often a waiting handler checks that the worker is alive
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


class App:
    """What every handler shares: the engine, the served model and its file, the key, the limits, the page."""

    def __init__(self, engine: Engine, served: ServedModel, path: str, api_key: str | None,
                 max_connections: int, loopback: bool, log: bool):
        self.engine, self.served, self.path = engine, served, path
        self.created = int(os.path.getmtime(path))
        self.api_key = api_key.encode() if api_key else None
        self.max_connections, self.loopback, self.log = max_connections, loopback, log
        with open(PAGE, "rb") as f:
            self.page = f.read()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lazymoe"
    sys_version = ""
    timeout = SOCKET_TIMEOUT

    # --- plumbing ---------------------------------------------------------------------
    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format, *args) -> None:  # noqa: A002 (http.server's signature)
        if self.app.log:
            sys.stderr.write(f"lazymoe serve: {self.address_string()} {format % args}\n")

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's own refusals (bad request line, headers too long, unknown method) as JSON, with a
        status line even where the request line was unreadable (http.server then assumes HTTP/0.9)."""
        self.close_connection = True
        self.request_version = self.protocol_version
        self._send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _sse(self, obj) -> None:
        self._write_chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def client_gone(self) -> bool:
        """True once the client has closed its end (readable with nothing to read); polled by the worker."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # --- routing ----------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        with self.server.lock:
            self.server.busy += 1
        try:
            self._route(method)
        finally:
            with self.server.lock:
                self.server.busy -= 1

    def _route(self, method: str) -> None:
        self._started = False
        self._body_read = method in ("GET", "HEAD")
        path = self.path.split("?", 1)[0]
        self._ollama_route = path.startswith("/api/")
        try:
            self._check_host()
            self._check_origin()
            if path in ("/", "/index.html") and method in ("GET", "HEAD"):
                return self._page()
            if path == "/health" and method in ("GET", "HEAD"):
                return self._health()
            route = ROUTES.get(path) or (_model_route if path.startswith("/v1/models/") else None)
            if route is None:
                raise ApiError(404, f"no such endpoint: {method} {path:.100}", code="not_found")
            if method != route.method and not (method == "HEAD" and route.method == "GET"):
                raise ApiError(405, f"{path} takes {route.method}, not {method}", code="method_not_allowed",
                               headers={"Allow": route.method})
            self._check_key()
            route(self)
        except ApiError as e:
            self._refuse(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug: one line to the client and one to stderr, never a traceback
            print(f"lazymoe serve: error: {method} {path[:100]}: {type(e).__name__}: {e}", file=sys.stderr)
            self._refuse(ApiError(500, f"internal error: {type(e).__name__}", code="internal_error"))

    def _refuse(self, e: ApiError) -> None:
        body = ollama_api.error_body(e) if self._ollama_route else e.body()
        if self._started:               # headers already sent: end the stream with an error event
            self._end_stream(body)
            return
        if not self._body_read:         # the unread body would be taken for the next request
            self.close_connection = True
        try:
            self._send_json(e.status, body, e.headers)
        except OSError:
            self.close_connection = True

    def _check_host(self) -> None:
        """While bound to loopback, only loopback names in Host: a web page that rebinds its own domain to
        127.0.0.1 cannot reach the server."""
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.split("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if self.app.loopback and not is_loopback(name):
            raise ApiError(403, f"Host {host[:80]!r} is not a loopback name; the server is bound to loopback",
                           code="forbidden_host")

    def _check_origin(self) -> None:
        """A browser sends Origin with every cross-site POST, even the simple ones (text/plain) that need no
        preflight: only the server's own pages may call it from a browser."""
        origin = self.headers.get("Origin")
        if origin is not None and origin != f"http://{self.headers.get('Host', '')}":
            raise ApiError(403, f"requests from the web page at {origin[:80]!r} are not accepted", code="forbidden_origin")

    def _check_key(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _json_body(self, json_only: bool = True):
        """The request body parsed; json_only: its Content-Type must say JSON (Ollama's own examples send
        curl's default form type, so its routes take any)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(411, "send the body with a Content-Length (chunked bodies are not accepted)",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise ApiError(411, "a Content-Length header is needed", code="length_required")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the request body is {int(length)} bytes; at most {MAX_BODY} are accepted",
                           code="request_too_large")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        data = self.rfile.read(int(length))
        self._body_read = len(data) == int(length)
        if not self._body_read:
            raise bad("the request body ended before its Content-Length", None, "invalid_json")
        if json_only and ctype != "application/json":
            raise ApiError(415, f"Content-Type must be application/json, got {ctype[:60]!r}",
                           code="unsupported_media_type")
        try:
            return json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise bad(f"the request body is not valid JSON: {str(e)[:120]}", None, "invalid_json") from None

    # --- endpoints --------------------------------------------------------------------
    def _page(self) -> None:
        page = self.app.page
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(page)

    def _health(self) -> None:
        engine = self.app.engine
        if engine.stopping.is_set() or not engine.thread.is_alive():
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        self._send_json(200, {"status": "ok", "model": self.app.served.id, "waiting": engine.waiting(),
                              "busy": engine.running is not None})

    def models(self) -> None:
        self._send_json(200, models(self.app.served.id, self.app.created))

    def model(self) -> None:
        name = self.path.split("?", 1)[0][len("/v1/models/"):]
        if name != self.app.served.id:
            raise ApiError(404, f"model {name[:80]!r} is not served here", "model", "model_not_found")
        self._send_json(200, models(name, self.app.created)["data"][0])

    def chat(self) -> None:
        self._generate("chat", self._json_body())

    def completions(self) -> None:
        self._generate("completion", self._json_body())

    def ollama_version(self) -> None:
        try:
            v = importlib.metadata.version("lazymoe")
        except importlib.metadata.PackageNotFoundError:
            v = "0"
        self._send_json(200, {"version": v})

    def ollama_tags(self) -> None:
        path = self.app.path
        self._send_json(200, ollama_api.tags(self.app.served.id, os.path.getsize(path), os.path.getmtime(path)))

    def ollama_chat(self) -> None:
        self._ollama("chat")

    def ollama_generate(self) -> None:
        self._ollama("generate")

    def _ollama(self, kind: str) -> None:
        body = self._json_body(json_only=False)
        parse_kind, openai_body, stream = ollama_api.to_openai(kind, body, self.app.served.id)
        if parse_kind == "load":
            return self._send_json(200, ollama_api.loaded(ollama_api.model_name(self.app.served.id)))
        openai_body["stream"] = stream
        self._generate(parse_kind, openai_body, ollama=kind)

    def _generate(self, kind: str, body, ollama: str | None = None) -> None:
        """Parse, queue, answer: whole or streamed, in OpenAI's shapes or (ollama: "chat"/"generate") Ollama's."""
        app = self.app
        req = parse(kind, body, app.served)
        job = Job(req, self.client_gone)
        try:
            app.engine.submit(job)
        except Busy:
            raise ApiError(503, f"the server is busy: {app.engine.waiting()} requests wait for the model (--queue); "
                           f"retry later", code="queue_full",
                           headers={"Retry-After": str(app.engine.retry_after())}) from None
        try:
            (self._stream if req.stream else self._whole)(job, req, ollama)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        finally:
            job.cancel()

    def _events(self, job: Job):
        """The job's events as they come; a 500 if the worker died (it should not)."""
        while True:
            try:
                ev = job.events.get(timeout=EVENT_POLL)
            except queue.Empty:
                if not self.app.engine.thread.is_alive():
                    yield ApiError(500, "the model's worker stopped", code="internal_error")
                    return
                continue
            if ev is END:
                return
            yield ev

    def _whole(self, job: Job, req: Request, ollama: str | None) -> None:
        text, last = [], None
        for ev in self._events(job):
            if isinstance(ev, ApiError):
                raise ev
            if ev != "started":
                last = ev
                text.append(ev.text)
        if last is None or last.finish_reason is None:
            raise ApiError(500, "the generation ended early", code="internal_error")
        text = "".join(text)
        if ollama:
            name = ollama_api.model_name(self.app.served.id)
            self._send_json(200, ollama_api.line(ollama, name, text, last.finish_reason, last.stats, len(req.ids)))
        else:
            self._send_json(200, response(req, self.app.served.id, text, last.finish_reason, last.stats))

    def _stream(self, job: Job, req: Request, ollama: str | None) -> None:
        """Server-Sent Events (`data: {chunk}` ... `data: [DONE]`), or for Ollama one JSON object per line."""
        model_id = self.app.served.id
        name = ollama_api.model_name(model_id)
        for ev in self._events(job):
            if isinstance(ev, ApiError):
                raise ev
            if ev == "started":
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson" if ollama else "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self._started = True
                if req.kind == "chat" and not ollama:
                    self._emit(chunk(req, model_id, None, first=True))
                continue
            if ev.text:
                self._emit(ollama_api.line(ollama, name, ev.text) if ollama else chunk(req, model_id, ev.text))
            if ev.finish_reason is not None:
                if ollama:
                    self._emit(ollama_api.line(ollama, name, "", ev.finish_reason, ev.stats, len(req.ids)))
                    self._write_chunk(b"")
                    return
                self._emit(chunk(req, model_id, None, ev.finish_reason, ev.stats))
                if req.include_usage:
                    self._emit(usage_chunk(req, model_id, ev.stats))
                self._end_stream(b"[DONE]")
                return

    def _emit(self, obj) -> None:
        if self._ollama_route:
            self._write_chunk(json.dumps(obj).encode() + b"\n")
        else:
            self._sse(obj)

    def _end_stream(self, last) -> None:
        """The last event (`[DONE]` or an error object), then the end of the chunked body."""
        try:
            self._emit(last)
            self._write_chunk(b"")
        except OSError:
            self.close_connection = True


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _route(method: str, fn):
    fn.method = method
    return fn


ROUTES = {"/v1/models": _route("GET", Handler.models), "/v1/chat/completions": _route("POST", Handler.chat),
          "/v1/completions": _route("POST", Handler.completions),
          "/api/version": _route("GET", Handler.ollama_version), "/api/tags": _route("GET", Handler.ollama_tags),
          "/api/chat": _route("POST", Handler.ollama_chat), "/api/generate": _route("POST", Handler.ollama_generate)}
_model_route = _route("GET", Handler.model)


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections (beyond it: 503 and close) that can close them all."""
    daemon_threads = True
    request_queue_size = 128           # listen backlog: bursts of clients beyond the default 5 are not reset

    def __init__(self, host: str, port: int, app: App):
        self.app = app
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.busy = 0                                   # requests being answered
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    def process_request(self, request, client_address) -> None:
        with self.lock:
            full = len(self.open) >= self.app.max_connections
            if not full:
                self.open.add(request)
        if not full:
            return super().process_request(request, client_address)
        body = json.dumps(ApiError(503, "too many open connections", code="too_many_connections").body()).encode()
        try:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.open.discard(request)

    def handle_error(self, request, client_address) -> None:
        """A connection that failed outside a request (a client resetting an idle keep-alive connection is
        routine): one line on stderr for anything else, no traceback."""
        e = sys.exc_info()[1]
        if not isinstance(e, (ConnectionError, TimeoutError)):
            print(f"lazymoe serve: error: connection from {client_address[0]}: {type(e).__name__}: {e}", file=sys.stderr)

    def close_all(self, wait_s: float) -> None:
        """Wait up to wait_s for the requests being answered, then cut every open connection (idle keep-alive
        ones wait in a read)."""
        deadline = time.monotonic() + wait_s
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with self.lock:
            for s in list(self.open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
