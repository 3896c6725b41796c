"""`lazymoe serve` through the official openai client and raw HTTP, against a server each test module starts
on a free loopback port with the demo model; the chat page in headless Chromium (skipped without it)."""
from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

KEY = "sk-test-key"
MODEL_ID = "lazymoe-demo-q4_0"
CTX = 2048                      # the demo model's own context
START_TIMEOUT = 90


class Served:
    """A `lazymoe serve` subprocess: its port, process and stderr file."""

    def __init__(self, tmp_path, *args):
        self.err_path = os.path.join(tmp_path, "serve.err")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "lazymoe.cli", "serve", "--port", "0", "-q", *args],
                                     stdout=subprocess.PIPE, stderr=self.err, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                break
        assert "listening on http://127.0.0.1:" in line, (line, self.stderr())
        self.port = int(line.split("127.0.0.1:")[1].split("/")[0])
        self.base = f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        if not self.err.closed:
            self.err.flush()
        with open(self.err_path) as f:
            return f.read()

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def raw(self, method, path, body=None, headers=None, key=KEY):
        """(status, headers, parsed JSON or text) of one request on a fresh connection."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"Authorization": f"Bearer {key}"} if key else {}
        if body is not None:
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read().decode()
        conn.close()
        try:
            return r.status, r.headers, json.loads(data)
        except ValueError:
            return r.status, r.headers, data

    def healthy(self) -> bool:
        status, _, body = self.raw("GET", "/health", key=None)
        return status == 200 and body["status"] == "ok"

    def stop(self, sig=signal.SIGTERM, timeout=15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.err.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Served(str(tmp_path_factory.mktemp("serve")), "--api-key", KEY)
    yield s
    assert s.stop() == 0, s.stderr()


def chat(client, content="def fib(n):", **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}], **kw)


def stream_text(stream):
    """(text, finish_reason, usage, lazymoe stats) of a streamed chat completion."""
    text, finish, usage, stats = [], None, None, None
    for c in stream:
        if c.usage is not None:
            usage = c.usage
        if (c.model_extra or {}).get("lazymoe"):
            stats = c.model_extra["lazymoe"]
        for ch in c.choices:
            text.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    return "".join(text), finish, usage, stats


# --- the API through the openai client ----------------------------------------------

def test_models(server):
    assert [m.id for m in server.client().models.list()] == [MODEL_ID]
    assert server.client().models.retrieve(MODEL_ID).id == MODEL_ID


def test_chat_whole_and_streamed_agree(server):
    r = chat(server.client())
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == MODEL_ID and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length") and text
    assert 0 < r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stats = r.model_extra["lazymoe"]
    assert stats["gen_tok_per_s"] > 0 and 0 <= stats["hit_rate"] <= 1 and stats["peak_rss_bytes"] > 0
    # greedy is repeatable, and the stream carries the same text, usage and stats
    assert chat(server.client()).choices[0].message.content == text
    s_text, finish, usage, s_stats = stream_text(chat(server.client(), stream=True, stream_options={"include_usage": True}))
    assert (s_text, finish) == (text, r.choices[0].finish_reason)
    assert usage.completion_tokens == r.usage.completion_tokens and s_stats["generated_tokens"] == usage.completion_tokens


def test_completions_and_max_completion_tokens(server):
    c = server.client()
    r = c.completions.create(model=MODEL_ID, prompt="def fibonacci(n):\n", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    chunks = list(c.completions.create(model=MODEL_ID, prompt="def fibonacci(n):\n", max_tokens=10, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    r2 = chat(c, max_tokens=None, max_completion_tokens=3)
    assert r2.usage.completion_tokens == 3 and r2.choices[0].finish_reason == "length"


def test_stop_strings(server):
    c = server.client()
    text = c.completions.create(model=MODEL_ID, prompt="def fibonacci(n):\n", max_tokens=24, temperature=0).choices[0].text
    cut = next(i for i in range(4, len(text) - 2) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    for stop in (text[cut:cut + 2], ["\x00never", text[cut:cut + 2]]):
        r = c.completions.create(model=MODEL_ID, prompt="def fibonacci(n):\n", max_tokens=24, temperature=0, stop=stop)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text[:cut], "stop")


def test_seeds_and_penalties(server):
    c = server.client()
    kw = {"prompt": "import ", "max_tokens": 16, "temperature": 1.5, "top_p": 1.0}
    a = c.completions.create(model=MODEL_ID, seed=7, **kw).choices[0].text
    assert c.completions.create(model=MODEL_ID, seed=7, **kw).choices[0].text == a
    assert c.completions.create(model=MODEL_ID, seed=8, **kw).choices[0].text != a
    r = c.completions.create(model=MODEL_ID, prompt="import ", max_tokens=16, temperature=0, frequency_penalty=2.0,
                             presence_penalty=1.0, extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1})
    assert r.usage.completion_tokens > 0


def test_eight_concurrent_streams_complete(server):
    results, errors = {}, []

    def one(i):
        try:
            results[i] = stream_text(chat(server.client(), f"def f{i}(x):", max_tokens=16, stream=True))
        except Exception as e:  # collected for the assertion below
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 8
    assert all(finish in ("stop", "length") for _, finish, _, _ in results.values())


def test_kv_prefix_reused_across_turns(server):
    """Turn 2 evaluates only what follows turn 1's prompt (the demo model's replies never start with the space
    its chat template puts before them, so the reply itself cannot be reused here: see the engine test)."""
    c = server.client()
    turn1 = [{"role": "user", "content": "def fib(n):"}]
    for temperature in (0, 1.5):
        r1 = c.chat.completions.create(model=MODEL_ID, messages=turn1, max_tokens=24, temperature=temperature, seed=3)
        turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "and now def fact(n):"}]
        r2 = c.chat.completions.create(model=MODEL_ID, messages=turn2, max_tokens=8, temperature=0)
        cached = r2.usage.prompt_tokens_details.cached_tokens
        assert cached >= r1.usage.prompt_tokens - 1, temperature
        assert r2.model_extra["lazymoe"]["prompt_tokens"] == r2.usage.prompt_tokens - cached


def test_disconnect_mid_stream_stops_generation(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"prompt": "def fibonacci(n):\n", "max_tokens": 1900, "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while got.count(b"data: ") < 3:
        got += sock.recv(65536)
    sock.close()
    t0 = time.monotonic()
    while server.raw("GET", "/health", key=None)[2]["busy"]:
        assert time.monotonic() - t0 < 2.0, "the generation went on after the client left"
        time.sleep(0.01)
    assert server.healthy()


def test_401_without_the_key(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    status, headers, body = server.raw("POST", "/v1/chat/completions", {"messages": []}, key=None)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer" and body["error"]["type"] == "authentication_error"
    assert server.raw("GET", "/", key=None)[0] == 200 and server.healthy()     # the page and /health are open


def test_engine_stops_within_one_token_reuses_replies_and_matches_the_runtime():
    """In process: the worker ends a generation right after the token during which the client left; a prompt
    that continues the last prompt and reply (as text) reuses the generated ids; a greedy request through
    parse and the engine gives the runtime's own text."""
    import dataclasses

    from lazymoe.runtime import DEMO_MODEL
    from lazymoe.runtime.generate import collect
    from lazymoe.runtime.model import load_model
    from lazymoe.serve.engine import Engine, Job
    from lazymoe.serve.openai_api import ServedModel, parse

    model = load_model(DEMO_MODEL, progress=False)
    served = ServedModel.of(MODEL_ID, model)
    engine = Engine(model, 2)
    tok = model.tokenizer

    try:
        polls = []
        req = parse("completion", {"prompt": "def f(x):\n", "max_tokens": 500}, served)
        job = Job(req, lambda: polls.append(1) or len(polls) > 5)
        engine.submit(job)
        steps = drain(job)
        assert len(steps) == 5 and steps[-1].finish_reason is None      # polled once before it began, then per token

        # turn 2 as text: the previous prompt and reply, a control piece, more; re-encoding the reply differs
        turn1 = "<s> [INST] def fib(n): [/INST]"
        req = dataclasses.replace(parse("completion", {"prompt": "x", "max_tokens": 24}, served),
                                  ids=tok.encode(turn1, bos=False, special=True), text=turn1)
        job = Job(req)
        engine.submit(job)
        generated = list(drain(job)[-1].token_ids)
        turn2 = turn1 + engine._continuation(generated) + "</s> [INST] more [/INST]"
        plain = tok.encode(turn2, bos=False, special=True)
        assert plain[:len(req.ids) + len(generated)] != req.ids + generated
        req2 = dataclasses.replace(req, ids=plain, text=turn2, max_tokens=4)
        job = Job(req2)
        engine.submit(job)
        last = drain(job)[-1]
        assert req2.ids[:len(req.ids) + len(generated)] == req.ids + generated
        assert last.stats["prompt_tokens_cached"] == len(req.ids) + len(generated) - 1     # the last was never evaluated
        assert tok.decode(req2.ids) == tok.decode(plain)

        job = Job(parse("completion", {"prompt": "def f(x):\n", "max_tokens": 12}, served))
        engine.submit(job)
        steps = drain(job)
        text, last = collect(model.stream_generate("def f(x):\n", max_tokens=12))
        assert "".join(s.text for s in steps) == text and steps[-1].token_ids == last.token_ids
    finally:
        engine.stop()
        model.close()


def drain(job):
    """The Steps of a submitted job, to its end."""
    from lazymoe.serve.engine import END
    events = []
    while (ev := job.events.get(timeout=30)) is not END:
        events.append(ev)
    return [e for e in events if hasattr(e, "token")]


def test_ollama_api(server):
    name = MODEL_ID + ":latest"
    status, _, tags = server.raw("GET", "/api/tags")
    assert status == 200 and [m["name"] for m in tags["models"]] == [name]
    assert server.raw("GET", "/api/version")[2]["version"]
    msgs = [{"role": "user", "content": "def fib(n):"}]
    want = chat(server.client(), max_tokens=12).choices[0].message.content
    body = {"model": name, "messages": msgs, "stream": False, "options": {"temperature": 0, "num_predict": 12}}
    status, _, r = server.raw("POST", "/api/chat", body)
    assert status == 200 and r["done"] and r["message"]["content"] == want and r["eval_count"] <= 12
    assert r["done_reason"] in ("stop", "length") and r["lazymoe"]["gen_tok_per_s"] > 0
    status, headers, text = server.raw("POST", "/api/chat", {**body, "stream": True})     # Ollama's default: stream
    lines = [json.loads(x) for x in text.splitlines()]
    assert headers["Content-Type"] == "application/x-ndjson" and lines[-1]["done"] and not any(x["done"] for x in lines[:-1])
    assert "".join(x["message"]["content"] for x in lines) == want
    completion = server.client().completions.create(model=MODEL_ID, prompt="def f(x):\n", max_tokens=8, temperature=0)
    status, _, r = server.raw("POST", "/api/generate", {"model": MODEL_ID, "prompt": "def f(x):\n", "raw": True,
                                                        "stream": False, "options": {"temperature": 0, "num_predict": 8}})
    assert status == 200 and r["response"] == completion.choices[0].text
    assert server.raw("POST", "/api/generate", {"model": name})[2]["done_reason"] == "load"
    status, _, r = server.raw("POST", "/api/chat", {"model": "llama3", "messages": msgs})
    assert status == 404 and set(r) == {"error"}
    status, _, r = server.raw("POST", "/api/chat", {**body, "options": {"temperature": "hot"}})
    assert status == 400 and "temperature" in r["error"] and server.healthy()


def test_cross_site_browser_requests_refused(server):
    status, _, r = server.raw("POST", COMP, {"prompt": "x", "max_tokens": 1}, {"Origin": "http://evil.example"})
    assert status == 403 and r["error"]["code"] == "forbidden_origin"
    own = {"Origin": f"http://127.0.0.1:{server.port}"}
    assert server.raw("POST", COMP, {"prompt": "x", "max_tokens": 1}, own)[0] == 200


# --- every bad request: 400 (or the matching 4xx) with OpenAI's error object, and the server keeps serving ------

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
BAD = [
    ("malformed JSON", CHAT, b'{"messages": [', 400, None),
    ("NaN literal", CHAT, b'{"messages": [], "temperature": NaN}', 400, None),
    ("body not an object", CHAT, [1, 2], 400, None),
    ("no messages", CHAT, {"model": MODEL_ID}, 400, "messages"),
    ("messages a string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("content a number", CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("unknown model", CHAT, {"model": "gpt-4o", "messages": MSG}, 400, "model"),
    ("model a number", CHAT, {"model": 3, "messages": MSG}, 400, "model"),
    ("negative max_tokens", CHAT, {"messages": MSG, "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("string max_tokens", CHAT, {"messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("float max_tokens", CHAT, {"messages": MSG, "max_tokens": 1.5}, 400, "max_tokens"),
    ("max_tokens past ctx", CHAT, {"messages": MSG, "max_tokens": CTX}, 400, "max_tokens"),
    ("negative temperature", CHAT, {"messages": MSG, "temperature": -1}, 400, "temperature"),
    ("string temperature", CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("bool temperature", CHAT, {"messages": MSG, "temperature": True}, 400, "temperature"),
    ("top_p 0", CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("top_k -1", CHAT, {"messages": MSG, "top_k": -1}, 400, "top_k"),
    ("top_k float", CHAT, {"messages": MSG, "top_k": 1.5}, 400, "top_k"),
    ("min_p 2", CHAT, {"messages": MSG, "min_p": 2}, 400, "min_p"),
    ("negative seed", CHAT, {"messages": MSG, "seed": -1}, 400, "seed"),
    ("string seed", CHAT, {"messages": MSG, "seed": "x"}, 400, "seed"),
    ("frequency_penalty 3", CHAT, {"messages": MSG, "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("presence_penalty string", CHAT, {"messages": MSG, "presence_penalty": "a"}, 400, "presence_penalty"),
    ("repeat_penalty 0", CHAT, {"messages": MSG, "repeat_penalty": 0}, 400, "repeat_penalty"),
    ("stop a number", CHAT, {"messages": MSG, "stop": 5}, 400, "stop"),
    ("empty stop", CHAT, {"messages": MSG, "stop": [""]}, 400, "stop"),
    ("too many stops", CHAT, {"messages": MSG, "stop": ["a"] * 17}, 400, "stop"),
    ("stream a string", CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("include_usage a string", CHAT, {"messages": MSG, "stream": True, "stream_options": {"include_usage": 1}}, 400,
     "stream_options"),
    ("n 2", CHAT, {"messages": MSG, "n": 2}, 400, "n"),
    ("logprobs", CHAT, {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("tools", CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("no prompt", COMP, {"model": MODEL_ID}, 400, "prompt"),
    ("empty prompt", COMP, {"prompt": ""}, 400, "prompt"),
    ("prompt ids out of range", COMP, {"prompt": [1, 10**9]}, 400, "prompt"),
    ("prompt past ctx", COMP, {"prompt": [1] * CTX}, 400, "prompt"),
    ("prompt text past ctx", COMP, {"prompt": "x" * (CTX * 64)}, 400, "prompt"),
    ("messages past ctx", CHAT, {"messages": [{"role": "user", "content": "def f(): pass\n" * CTX}]}, 400, "messages"),
    ("two prompts", COMP, {"prompt": ["a", "b"]}, 400, "prompt"),
    ("echo", COMP, {"prompt": "a", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize("what, path, body, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, what, path, body, status, param):
    got, _, reply = server.raw("POST", path, body)
    assert got == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["param"] == param
    assert reply["error"]["type"] == "invalid_request_error" and "Traceback" not in reply["error"]["message"]
    assert server.healthy()


def test_bad_http(server):
    cases = [("GET", CHAT, None, {}, 405), ("POST", "/v1/nothing", {}, {}, 404),
             ("POST", CHAT, b"{}", {"Content-Type": "text/plain"}, 415),
             ("POST", CHAT, b"{}", {"Content-Type": "application/json", "Content-Length": str(2**30)}, 413),
             ("GET", "/health", None, {"Host": "attacker.example"}, 403)]
    for method, path, body, headers, status in cases:
        got, _, reply = server.raw(method, path, body, headers)
        assert got == status and set(reply["error"]) == {"message", "type", "param", "code"}, (path, reply)
        assert server.healthy()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:    # garbage instead of HTTP
        s.sendall(b"\x00\x01 nonsense HTTP/9\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    assert server.healthy() and "Traceback" not in server.stderr()


# --- the queue bound and SIGTERM (a server of their own) ----------------------------------

def test_queue_full_then_sigterm(tmp_path):
    s = Served(str(tmp_path), "--queue", "1")
    body = {"prompt": "def fibonacci(n):\n", "max_tokens": 1900, "temperature": 0, "stream": True}
    events = {"a": [], "b": []}

    def stream(name):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            conn.request("POST", COMP, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            events[name].append(r.status)
            for line in r:
                if line.startswith(b"data: "):
                    events[name].append(line[6:].strip())
        except Exception as e:  # recorded; the assertions below say what was expected
            events[name].append(repr(e))
    a = threading.Thread(target=stream, args=("a",))
    a.start()
    t0 = time.monotonic()
    while len(events["a"]) < 3:
        assert time.monotonic() - t0 < 20
        time.sleep(0.01)
    b = threading.Thread(target=stream, args=("b",))
    b.start()
    while s.raw("GET", "/health", key=None)[2]["waiting"] < 1:
        assert time.monotonic() - t0 < 20
        time.sleep(0.01)
    status, headers, reply = s.raw("POST", COMP, {"prompt": "x", "max_tokens": 1}, key=None)
    assert status == 503 and int(headers["Retry-After"]) >= 1 and reply["error"]["code"] == "queue_full"
    t1 = time.monotonic()
    assert s.stop(signal.SIGTERM) == 0, s.stderr()
    assert time.monotonic() - t1 < 10
    a.join(10)
    b.join(10)
    assert events["a"][0] == 200 and json.loads(events["a"][-1])["error"]["code"] == "shutting_down"
    assert events["b"][0] == 503
    assert "Traceback" not in s.stderr()


def test_cli_errors_are_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, expect in ((["--port", str(port)], "cannot listen on 127.0.0.1"), (["--queue", "0"], "--queue"),
                             (["--port", "70000"], "--port"), ([str(tmp_path / "none.gguf")], "no such model file")):
            r = subprocess.run([sys.executable, "-m", "lazymoe.cli", "serve", "-q", *args], capture_output=True,
                               text=True, timeout=START_TIMEOUT)
            lines = [x for x in r.stderr.splitlines() if not x.startswith("RAM plan")]
            assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], r.stderr


# --- the chat page in a real browser ------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="headless Chromium and chromedriver are not installed (Debian: apt-get install chromium "
                           "chromium-driver)")
def test_chat_page_in_chromium(server):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(server.base + "/")
        wait.until(lambda d: d.find_element(By.ID, "key-row").is_displayed())    # the API asked for the key
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "save-key").click()
        wait.until(lambda d: d.find_element(By.ID, "model").text == MODEL_ID)
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("24")
        for n, text in enumerate(("def fib(n):", "and def fact(n):"), 1):
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d, n=n: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")) == n)
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error")
            replies = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")
            assert replies[-1].text.strip()
            stats = driver.find_element(By.ID, "stats").text
            assert "tok/s" in stats and "expert hit rate" in stats and "MiB" in stats
        assert "reused" in stats and len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    finally:
        driver.quit()
