"""Ollama's native API (/api/chat, /api/generate, /api/tags, /api/version), translated to the OpenAI
request the rest of the server checks, and its answers as Ollama writes them (one JSON object per line).

Ollama streams by default ("stream": false turns it off), takes sampling fields under "options"
(num_predict is max_tokens; -1 or absent: the server's default), names models "name:tag", and answers
errors as {"error": "message"}.
"""
from __future__ import annotations

from datetime import datetime, timezone

from lazymoe.serve.openai_api import FINISH, ApiError, bad

OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
           "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
           "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}


def model_name(served_id: str) -> str:
    return served_id + ":latest"


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def to_openai(kind: str, body, served_id: str) -> tuple[str, dict, bool]:
    """An Ollama chat ("chat") or generate ("generate") body -> (parse kind, OpenAI body, stream); the kind is
    "load" for a generate without a prompt."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and model not in (served_id, model_name(served_id)):
        raise ApiError(404, f"model {str(model)[:80]!r} not found; /api/tags lists {model_name(served_id)!r}", "model",
                       "model_not_found")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream", "invalid_type")
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad("options must be an object", "options", "invalid_type")
    out = {OPTIONS[k]: v for k, v in options.items() if k in OPTIONS and v is not None}
    if out.get("max_tokens") in (-1, -2):                 # Ollama's "until the context is full"
        del out["max_tokens"]
    if body.get("format") not in (None, ""):
        raise bad("format (structured output) is not supported", "format", "unsupported_parameter")
    if kind == "chat":
        for i, m in enumerate(body.get("messages") or []):
            if isinstance(m, dict) and (m.get("images") or m.get("tool_calls")):
                raise bad(f"message {i}: images and tool calls are not supported", "messages", "unsupported_content")
        out["messages"] = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                           for m in body.get("messages") or []] or None
        return "chat", out, stream
    prompt, system = body.get("prompt"), body.get("system")
    if prompt in (None, ""):                              # Ollama's way of asking to load the model
        return "load", out, stream
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise bad("prompt (and system, if given) must be strings", "prompt", "invalid_type")
    if body.get("images") or body.get("suffix") or body.get("template") or body.get("context"):
        raise bad("images, suffix, template and context are not supported", "prompt", "unsupported_parameter")
    if body.get("raw"):
        out["prompt"] = prompt
        return "completion", out, stream
    out["messages"] = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return "chat", out, stream


def line(kind: str, model: str, text: str, finish: str | None = None, stats: dict | None = None,
         n_prompt: int = 0) -> dict:
    """One object of an Ollama answer: a piece of text, or (finish set) the last one with the counts and
    durations in nanoseconds, and the `lazymoe` stats."""
    out = {"model": model, "created_at": now()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = finish is not None
    if finish is not None:
        s = stats or {}
        ns = lambda seconds: int(seconds * 1e9)
        out.update({"done_reason": FINISH[finish], "total_duration": ns(s.get("prompt_s", 0) + s.get("gen_s", 0)),
                    "load_duration": 0, "prompt_eval_count": n_prompt, "prompt_eval_duration": ns(s.get("prompt_s", 0)),
                    "eval_count": s.get("generated_tokens", 0), "eval_duration": ns(s.get("gen_s", 0)), "lazymoe": s})
    return out


def tags(served_id: str, size: int, mtime: float) -> dict:
    details = {"format": "gguf", "family": "llama", "families": ["llama"], "parameter_size": "", "quantization_level": ""}
    modified = datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"models": [{"name": model_name(served_id), "model": model_name(served_id), "modified_at": modified,
                        "size": size, "digest": "", "details": details}]}


def loaded(model: str) -> dict:
    """/api/generate with an empty prompt: Ollama's way of loading a model; here it is loaded already."""
    return {"model": model, "created_at": now(), "response": "", "done": True, "done_reason": "load"}


def error_body(e: ApiError) -> dict:
    return {"error": e.message}
