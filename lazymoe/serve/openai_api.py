"""OpenAI's API shapes: a request body checked into a Request, generation Steps turned into responses.

Fields as OpenAI defines them (chat/completions and completions), llama-server's behaviour where OpenAI's
is silent: top_k, min_p and repeat_penalty are accepted; a field left out or null takes the server's
default (the CLI's sampling flags); unknown fields are ignored, and fields that would change the output
in ways this server does not implement (n > 1, logprobs, echo, tools, ...) are refused rather than ignored.
Every refusal is an ApiError: an HTTP status and OpenAI's {"error": {message, type, param, code}}.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from lazymoe.runtime.chat import render_chat
from lazymoe.runtime.sampling import Sampler, StopStrings

MAX_STOPS = 16                  # stop strings per request (OpenAI allows 4; llama-server any number)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty",
            "seed")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    """A request the server refuses: status, one-sentence message, OpenAI's type/param/code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(self.status,
                                              "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass(frozen=True)
class ServedModel:
    """What the parser needs of the loaded model: its id, context, tokenizer and chat template, the
    defaults for fields a request leaves out (max_tokens and the Sampler's arguments), and the longest
    piece in characters (a text longer than ctx of them cannot fit, and is refused before tokenizing)."""
    id: str
    ctx: int
    tokenizer: object
    chat_template: str | None
    defaults: dict = field(default_factory=dict)
    max_piece_chars: int = 64

    @classmethod
    def of(cls, model_id: str, model, defaults: dict | None = None) -> ServedModel:
        tok = model.tokenizer
        return cls(model_id, model.ctx, tok, model.chat_template, defaults or {}, max(len(p) for p in tok.pieces))

    def check_length(self, text: str, param: str) -> None:
        if len(text) > self.ctx * self.max_piece_chars:
            raise bad(f"the prompt is {len(text)} characters, more than the context of {self.ctx} tokens (--ctx) "
                      f"can hold", param, "context_length_exceeded")


@dataclass
class Request:
    """One checked generation request: the prompt as ids, the Sampler, and how to answer."""
    kind: str                   # "chat" or "completion"
    ids: list[int]
    max_tokens: int
    sampler: Sampler
    stop: list[str]
    stream: bool
    include_usage: bool
    id: str = ""
    created: int = 0
    text: str = ""              # a chat's rendered prompt (the engine matches it against the last reply)


def _typed(body: dict, name: str, kinds, what: str):
    """body[name] (None when absent or null) if it is one of kinds (bools are never numbers)."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise bad(f"{name} must be {what}, got {type(v).__name__} {v!r:.40}", name, "invalid_type")
    return v


def _refuse_unsupported(body: dict) -> None:
    checks = (("n", lambda v: v not in (None, 1), "only n=1 is supported"),
              ("best_of", lambda v: v not in (None, 1), "only best_of=1 is supported"),
              ("logprobs", lambda v: v not in (None, False, 0), "logprobs are not supported"),
              ("top_logprobs", lambda v: v not in (None, 0), "top_logprobs are not supported"),
              ("echo", lambda v: v not in (None, False), "echo is not supported"),
              ("suffix", lambda v: v not in (None, ""), "suffix (fill-in-the-middle) is not supported"),
              ("tools", lambda v: v not in (None, []), "tools are not supported"),
              ("functions", lambda v: v not in (None, []), "functions are not supported"),
              ("response_format", lambda v: v not in (None, {"type": "text"}), "only response_format text is supported"))
    for name, refused, message in checks:
        if refused(body.get(name)):
            raise bad(message, name, "unsupported_parameter")


def _content(i: int, content) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": str} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise bad(f"message {i}: only text content parts are supported, got type {p.get('type')!r:.40}",
                          "messages", "unsupported_content")
            parts.append(p["text"])
        return "".join(parts)
    raise bad(f"message {i}: content must be a string or a list of text parts", "messages", "invalid_type")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages",
                  "missing_required_parameter" if msgs is None else "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"message {i} must be an object with role and content", "messages", "invalid_type")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad(f"message {i} has role {m.get('role')!r:.40}; expected system, developer, user or assistant",
                      "messages", "invalid_value")
        out.append({"role": role, "content": _content(i, m.get("content"))})
    return out


def _prompt(body: dict, served: ServedModel) -> list[int]:
    """A completion prompt: a string, a list of one string, or token ids (a list of ints or of one list)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise bad("prompt is empty", "prompt", "invalid_value")
        served.check_length(p, "prompt")
        return served.tokenizer.encode(p, bos=True)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        n_vocab = len(served.tokenizer.pieces)
        if min(p) < 0 or max(p) >= n_vocab:
            raise bad(f"prompt token ids must be from 0 to {n_vocab - 1}", "prompt", "invalid_value")
        return list(p)
    raise bad("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt",
              "missing_required_parameter" if p is None else "invalid_type")


def _stops(body: dict, default) -> list[str]:
    stop = default if body.get("stop") is None else body["stop"]
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop",
                  "invalid_type")
    StopStrings(stops)
    return stops


def parse(kind: str, body, served: ServedModel) -> Request:
    """Check a chat ("chat") or completion ("completion") request body against the served model."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    model = _typed(body, "model", (str,), "a string")
    if model is not None and model != served.id:
        raise bad(f"model {model!r:.80} is not served here; GET /v1/models lists {served.id!r}", "model",
                  "model_not_found")
    _refuse_unsupported(body)
    stream = bool(_typed(body, "stream", (bool,), "true or false"))
    options = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options", "invalid_type")

    kw = {}
    for name in SAMPLING:
        v = _typed(body, name, (int,) if name in ("top_k", "seed") else (int, float),
                   "a whole number" if name in ("top_k", "seed") else "a number")
        kw[name] = served.defaults.get(name) if v is None else v
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        sampler = Sampler(**kw)
    except ValueError as e:
        name = str(e).split()[0]
        raise bad(str(e), name if name in SAMPLING else None, "invalid_value") from None
    stop = _stops(body, served.defaults.get("stop"))

    if kind == "chat":
        tok = served.tokenizer
        try:
            text = render_chat(_messages(body), served.chat_template, tok.pieces[tok.bos_id], tok.pieces[tok.eos_id])
        except ValueError as e:
            raise bad(str(e), "messages", "invalid_value") from None
        served.check_length(text, "messages")
        ids, where = tok.encode(text, bos=False, special=True), "messages"
    else:
        text, ids, where = "", _prompt(body, served), "prompt"
    if len(ids) >= served.ctx:
        raise bad(f"the prompt is {len(ids)} tokens; the context holds {served.ctx} (--ctx), with room for at least "
                  f"one new token", where, "context_length_exceeded")

    room = served.ctx - len(ids)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, name, (int,), "a whole number")
    if max_tokens is None:
        max_tokens = min(served.defaults.get("max_tokens", room), room)
    elif max_tokens < 1:
        raise bad(f"{name} must be at least 1, got {max_tokens}", name, "invalid_value")
    elif max_tokens > room:
        raise bad(f"the prompt ({len(ids)} tokens) plus {name}={max_tokens} do not fit the context of {served.ctx} "
                  f"tokens (--ctx); ask for at most {room}", name, "context_length_exceeded")
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return Request(kind, ids, max_tokens, sampler, stop, stream, include_usage and stream,
                   prefix + uuid.uuid4().hex[:24], int(time.time()), text)


# --- responses ----------------------------------------------------------------------

def usage(n_prompt: int, stats: dict) -> dict:
    n = stats.get("generated_tokens", 0)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n,
            "prompt_tokens_details": {"cached_tokens": stats.get("prompt_tokens_cached", 0)}}


def _head(req: Request, model_id: str, chunk: bool) -> dict:
    obj = {"chat": ("chat.completion", "chat.completion.chunk"), "completion": ("text_completion", "text_completion")}
    return {"id": req.id, "object": obj[req.kind][chunk], "created": req.created, "model": model_id,
            "system_fingerprint": "lazymoe"}


def response(req: Request, model_id: str, text: str, finish: str, stats: dict) -> dict:
    """The whole (non-streamed) answer; `lazymoe` carries the generation's stats (tok/s, hit rate, memory)."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                  "finish_reason": FINISH[finish]}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH[finish]}
    return {**_head(req, model_id, False), "choices": [choice], "usage": usage(len(req.ids), stats), "lazymoe": stats}


def chunk(req: Request, model_id: str, text: str | None, finish: str | None = None, stats: dict | None = None,
          first: bool = False) -> dict:
    """One streamed chunk: text (None: the role-only opening chunk of a chat), the finish reason on the last
    one, which also carries the `lazymoe` stats."""
    if req.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": FINISH.get(finish)}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": FINISH.get(finish)}
    out = {**_head(req, model_id, True), "choices": [choice]}
    if stats is not None:
        out["lazymoe"] = stats
    return out


def usage_chunk(req: Request, model_id: str, stats: dict) -> dict:
    """stream_options.include_usage: the chunk after the last one, with no choices and the usage."""
    return {**_head(req, model_id, True), "choices": [], "usage": usage(len(req.ids), stats)}


def models(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "lazymoe"}]}
