"""`lazymoe serve`: an OpenAI-compatible HTTP server (and a chat page at /) over one model.

One line on stdout with the address once the model is loaded and the port is bound; SIGTERM or Ctrl-C
stops it: queued requests get 503, a running generation stops at its next token and its stream ends
with an error event, idle connections are closed, and the process exits 0.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from lazymoe.commands.run import add_model_args, cache_options, load, sampling
from lazymoe.runtime import DEMO_MODEL

DEFAULT_PORT = 8080             # llama-server's
DEFAULT_QUEUE = 16


def add_serve_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over OpenAI's API (and a chat page at /)",
        description="Serve a model over OpenAI's API: GET /v1/models, POST /v1/chat/completions, POST "
                    "/v1/completions (stream: true sends Server-Sent Events), GET /health, Ollama's /api/chat, /api/generate, "
                    "/api/tags and /api/version, and a chat page at /. "
                    "One request decodes at a time; up to --queue more wait, beyond that the answer is 503. "
                    "The sampling flags (-n, --temp, --top-k, --top-p, --min-p, --repeat-penalty, -s, --stop) are "
                    "the defaults for requests that leave those fields out.")
    add_model_args(p, 512, model_default=DEMO_MODEL)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port; 0 picks a free one (default {DEFAULT_PORT})")
    p.add_argument("--api-key", default=os.environ.get("LAZYMOE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API (default: $LAZYMOE_API_KEY, else none)")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE, metavar="N",
                   help=f"requests that may wait while one decodes; more get 503 with Retry-After (default {DEFAULT_QUEUE})")
    p.add_argument("-q", "--quiet", action="store_true", help="no request log on stderr")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from lazymoe.format.checks import whole_number
    from lazymoe.serve.engine import Engine
    from lazymoe.serve.openai_api import ServedModel
    from lazymoe.serve.server import App, Server, is_loopback

    gen = sampling(args)
    whole_number(args.port, "--port", 0, 65535)
    whole_number(args.queue, "--queue", 1)
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    path = args.model
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file")
    if not is_loopback(args.host) and not args.api_key:
        print(f"lazymoe serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"machine can use the model", file=sys.stderr)

    model = load(path, args.ram, args.ctx, cache_options(args), quiet=False)
    engine = None
    try:
        model_id = os.path.basename(path).removesuffix(".gguf")
        served = ServedModel.of(model_id, model, gen)
        engine = Engine(model, args.queue)
        app = App(engine, served, path, args.api_key,
                  max_connections=max(64, 4 * (args.queue + 1)), loopback=is_loopback(args.host), log=not args.quiet)
        try:
            httpd = Server(args.host, args.port, app)
        except OSError as e:
            engine.stop()
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        return _run(httpd, engine)
    finally:
        if engine is None or not engine.thread.is_alive():     # else the worker is still inside a forward pass:
            model.close()                                       # the process exit frees the model instead



def _run(httpd, engine) -> int:
    """Serve until SIGTERM or SIGINT, then stop in order: the engine, the open connections, the listener."""
    stop = threading.Event()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="lazymoe-http",
                              daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lazymoe serve: listening on http://{shown}:{port}/ (model {httpd.app.served.id}, "
          f"context {httpd.app.served.ctx} tokens, queue {engine.jobs.maxsize})", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("lazymoe serve: stopping", file=sys.stderr, flush=True)
        engine.stop()
        httpd.close_all(wait_s=3.0)
        httpd.shutdown()
        httpd.server_close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return 0
