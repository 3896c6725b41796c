"""Load on `lazymoe serve`: concurrent streaming clients, a bounded number of requests, loopback only.

    python -m lazymoe.benchmarks.serve_load [MODEL] [--clients 8] [--requests 500] [--max-tokens 16]
                                            [--queue 16] [--over-clients 32 --over-queue 4] [--url URL] [--json]

Starts `lazymoe serve MODEL` (the demo model by default) on a free loopback port, or uses a running one
(--url, 127.0.0.1 only), and runs three phases, each bounded in requests and in time (--time-limit):
- load: --clients threads stream chat completions until --requests are done; the first --warmup requests
  (JIT, first reads) are not timed. Reports requests/s, time to first token p50/p95, tokens/s (all tokens
  over the wall time) and per-request decode tok/s, errors (must be 0 while clients <= queue + 1), and the
  server's RSS after the warm-up, at the end and at its peak (from the `lazymoe` stats of each response).
- over the bound: with its own server (--over-queue), --over-clients clients each send --over-requests:
  every answer must be a 200 or a clean 503 with Retry-After, nothing else.
- KV reuse: --turns trials of a two-turn chat whose first turn is long; time to first token of turn 2
  (only its new tokens are evaluated) against turn 1 (the whole prompt), medians.
"""
from __future__ import annotations

import argparse
import http.client
import json
import select
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")
START_TIMEOUT = 120


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


class Server:
    """A `lazymoe serve` subprocess on a free loopback port."""

    def __init__(self, model: str | None, queue: int, extra=()):
        cmd = [sys.executable, "-m", "lazymoe.cli", "serve", "--port", "0", "-q", "--queue", str(queue), *extra]
        self.proc = subprocess.Popen(cmd + ([model] if model else []), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        deadline, line = time.monotonic() + START_TIMEOUT, ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                break
        if "listening on http://127.0.0.1:" not in line:
            self.close()
            raise ValueError(f"lazymoe serve did not start: {line.strip() or 'no address line'}")
        self.host, self.port = "127.0.0.1", int(line.split("127.0.0.1:")[1].split("/")[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stdout.close()


def stream_chat(host: str, port: int, messages: list[dict], max_tokens: int, key: str | None = None,
                timeout: float = 120.0) -> dict:
    """One streamed chat completion: status, ttft_s, total_s, tokens, text, the final `lazymoe` stats,
    Retry-After on a 503, error (a one-line description of anything unexpected)."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    out = {"status": 0, "ttft_s": None, "total_s": None, "tokens": 0, "text": "", "stats": None, "error": None}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        r = conn.getresponse()
        out["status"] = r.status
        if r.status != 200:
            out["retry_after"] = r.getheader("Retry-After")
            out["body"] = r.read().decode(errors="replace")[:300]
            return out
        text, done = [], False
        for line in r:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                out["error"] = ev["error"]["message"]
                break
            for ch in ev.get("choices", []):
                piece = ch.get("delta", {}).get("content")
                if piece and out["ttft_s"] is None:
                    out["ttft_s"] = time.perf_counter() - t0
                text.append(piece or "")
            out["stats"] = ev.get("lazymoe") or out["stats"]
            if ev.get("usage"):
                out["tokens"] = ev["usage"]["completion_tokens"]
        out["text"] = "".join(text)
        if not done and out["error"] is None:
            out["error"] = "the stream ended without [DONE]"
    except (OSError, ValueError, http.client.HTTPException) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["total_s"] = time.perf_counter() - t0
        conn.close()
    return out


def run_clients(host, port, clients: int, n_requests: int, max_tokens: int, time_limit: float, key=None,
                prompt=lambda i: [{"role": "user", "content": f"def function_{i}(x):"}]) -> list[dict]:
    """clients threads share n_requests requests; each result gets its index and start time."""
    results: list[dict] = []
    lock = threading.Lock()
    next_i = [0]
    deadline = time.monotonic() + time_limit

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            t = time.perf_counter()
            r = stream_chat(host, port, prompt(i), max_tokens, key)
            r["i"], r["start"] = i, t
            with lock:
                results.append(r)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 130)
    return sorted(results, key=lambda r: r["i"])


def load_phase(host, port, clients, n_requests, warmup, max_tokens, time_limit, key=None) -> dict:
    t0 = time.perf_counter()
    results = run_clients(host, port, clients, n_requests, max_tokens, time_limit, key)
    wall = time.perf_counter() - t0
    timed = [r for r in results if r["i"] >= warmup]
    ok = [r for r in timed if r["status"] == 200 and r["error"] is None]
    errors = [r for r in results if r["status"] != 200 or r["error"] is not None]
    t_first = min((r["start"] for r in timed), default=t0)
    span = max((r["start"] + r["total_s"] for r in timed), default=t_first) - t_first
    rss = [(r["i"], r["stats"]["rss_bytes"], r["stats"]["peak_rss_bytes"]) for r in results if r["stats"]]
    after_warm = [x for x in rss if x[0] >= warmup]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    dec = [r["stats"]["gen_tok_per_s"] for r in ok if r["stats"] and r["stats"]["gen_tok_per_s"]]
    return {
        "clients": clients, "requests": len(results), "timed": len(timed), "warmup": warmup, "max_tokens": max_tokens,
        "wall_s": wall, "requests_per_s": len(ok) / span if span else 0.0,
        "ttft_p50_s": percentile(ttft, 50) if ttft else None, "ttft_p95_s": percentile(ttft, 95) if ttft else None,
        "tokens_per_s": sum(r["tokens"] for r in ok) / span if span else 0.0,
        "decode_tok_per_s_median": statistics.median(dec) if dec else None,
        "errors": len(errors), "error_samples": [r["error"] or r.get("body") for r in errors[:3]],
        "rss_after_warmup_bytes": after_warm[0][1] if after_warm else None,
        "rss_end_bytes": rss[-1][1] if rss else None,
        "peak_rss_bytes": max(x[2] for x in rss) if rss else None,
        "peak_rss_after_warmup_growth_bytes": (max(x[2] for x in after_warm) - after_warm[0][2]) if after_warm else None,
        "rss_by_quarter_bytes": [after_warm[min(len(after_warm) - 1, len(after_warm) * q // 4)][1] for q in (1, 2, 3, 4)]
        if after_warm else [],
    }


def over_phase(host, port, clients, per_client, max_tokens, time_limit, key=None) -> dict:
    results = run_clients(host, port, clients, clients * per_client, max_tokens, time_limit, key)
    ok = sum(r["status"] == 200 and r["error"] is None for r in results)
    busy = [r for r in results if r["status"] == 503]
    clean = sum(bool(r.get("retry_after")) and "queue_full" in r.get("body", "") for r in busy)
    other = [r for r in results if r["status"] not in (200, 503) or (r["status"] == 200 and r["error"])]
    return {"clients": clients, "requests": len(results), "ok": ok, "busy_503": len(busy), "clean_503": clean,
            "other_errors": len(other), "error_samples": [r["error"] or r.get("body") for r in other[:3]]}


def reuse_phase(host, port, trials: int, key=None) -> dict:
    """TTFT of turn 1 (a long first message) and turn 2 (a short reply to it), medians over trials."""
    t1, t2, cached, n_prompt = [], [], [], []
    for k in range(trials):
        first = [{"role": "user", "content": f"# trial {k}\n" + "def add(a, b):\n    return a + b\n\n" * 60}]
        a = stream_chat(host, port, first, 8, key)
        turn2 = first + [{"role": "assistant", "content": a["text"]}, {"role": "user", "content": "def sub(a, b):"}]
        b = stream_chat(host, port, turn2, 8, key)
        if a["error"] or b["error"] or a["status"] != 200 or b["status"] != 200:
            raise ValueError(f"the KV reuse phase failed: {a['error'] or b['error'] or (a['status'], b['status'])}")
        t1.append(a["ttft_s"])
        t2.append(b["ttft_s"])
        cached.append(b["stats"]["prompt_tokens_cached"])
        n_prompt.append(b["stats"]["prompt_tokens"] + b["stats"]["prompt_tokens_cached"])
    return {"trials": trials, "turn1_ttft_s": statistics.median(t1), "turn2_ttft_s": statistics.median(t2),
            "turn2_prompt_tokens": statistics.median(n_prompt), "turn2_cached_tokens": statistics.median(cached)}


def table(res: dict) -> str:
    mib = lambda b: f"{b / 2**20:.0f} MiB" if b is not None else "-"
    ms = lambda s: f"{1000 * s:.0f} ms" if s is not None else "-"
    L = res["load"]
    rows = ["| phase | clients | requests | req/s | TTFT p50 | TTFT p95 | tok/s (all) | decode tok/s | errors "
            "| RSS after warm-up / end / peak |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| load (queue {res['queue']}) | {L['clients']} | {L['requests']} ({L['timed']} timed) | {L['requests_per_s']:.1f} | "
            f"{ms(L['ttft_p50_s'])} | {ms(L['ttft_p95_s'])} | {L['tokens_per_s']:.0f} | "
            f"{L['decode_tok_per_s_median'] or 0:.0f} | {L['errors']} | {mib(L['rss_after_warmup_bytes'])} / "
            f"{mib(L['rss_end_bytes'])} / {mib(L['peak_rss_bytes'])} |"]
    if res.get("over"):
        o = res["over"]
        rows.append(f"| over the bound (queue {res['over_queue']}) | {o['clients']} | {o['requests']} | - | - | - | - | - | "
                    f"{o['other_errors']} ({o['ok']} ok, {o['busy_503']} 503, {o['clean_503']} of them with Retry-After) | - |")
    if res.get("reuse"):
        r = res["reuse"]
        rows.append("")
        rows.append(f"KV reuse: turn 1 TTFT {ms(r['turn1_ttft_s'])} (whole prompt), turn 2 TTFT {ms(r['turn2_ttft_s'])} "
                    f"({r['turn2_cached_tokens']:.0f} of {r['turn2_prompt_tokens']:.0f} prompt tokens from the KV cache), "
                    f"median of {r['trials']}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.serve_load", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("model", nargs="?", default=None, help="a GGUF model (default: the demo model)")
    p.add_argument("--url", default=None, help="a running server on loopback instead, e.g. http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None, help="its key, if it has one")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the load phase (default 8)")
    p.add_argument("--requests", type=int, default=500, help="requests of the load phase (default 500)")
    p.add_argument("--warmup", type=int, default=16, help="first requests not timed (default 16)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--queue", type=int, default=16, help="--queue of the server started for the load phase (default 16)")
    p.add_argument("--over-clients", type=int, default=32, help="clients of the over-the-bound phase; 0 skips it (default 32)")
    p.add_argument("--over-queue", type=int, default=4, help="--queue of its server (default 4)")
    p.add_argument("--over-requests", type=int, default=4, help="requests per client in that phase (default 4)")
    p.add_argument("--turns", type=int, default=5, help="trials of the KV reuse phase; 0 skips it (default 5)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds per phase at most (default 600)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("clients", "requests", "max_tokens", "queue", "over_queue", "over_requests"):
        if getattr(args, name) < 1:
            raise SystemExit(f"serve_load: error: --{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or args.turns < 0 or args.over_clients < 0 or args.time_limit <= 0:
        raise SystemExit("serve_load: error: --warmup, --turns and --over-clients must be >= 0, --time-limit > 0")
    res = {"model": args.model or "demo", "queue": args.queue, "over_queue": args.over_queue}
    server = None
    if args.url:
        u = urlsplit(args.url)
        if u.hostname not in LOOPBACK or not u.port:
            raise SystemExit(f"serve_load: error: --url must be a loopback address with a port, got {args.url!r}")
        host, port = u.hostname, u.port
    else:
        server = Server(args.model, args.queue)
        host, port = server.host, server.port
    try:
        res["load"] = load_phase(host, port, args.clients, args.requests, args.warmup, args.max_tokens, args.time_limit,
                                 args.api_key)
        if args.turns:
            res["reuse"] = reuse_phase(host, port, args.turns, args.api_key)
    finally:
        if server is not None:
            server.close()
    if args.over_clients:
        if args.url:
            res["over"] = over_phase(host, port, args.over_clients, args.over_requests, args.max_tokens,
                                     args.time_limit, args.api_key)
        else:
            over = Server(args.model, args.over_queue)
            try:
                res["over"] = over_phase(over.host, over.port, args.over_clients, args.over_requests, args.max_tokens,
                                         args.time_limit)
            finally:
                over.close()
    print(json.dumps(res, indent=1) if args.json else table(res))
    bad = res["load"]["errors"] if args.clients <= args.queue + 1 else 0
    return 1 if bad or (res.get("over") or {}).get("other_errors") else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
