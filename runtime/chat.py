"""Chat prompts: a GGUF's Jinja chat template rendered in a sandbox, or Mixtral's own format.

How to tokenize the result: the rendered prompt already starts with the BOS text
and contains "</s>" after each assistant reply, so encode it with

    ids = tokenizer.encode(prompt, bos=False, special=True)

`special=True` turns "<s>"/"</s>" (and v3's "[INST]"/"[/INST]") into their ids,
and `bos=False` avoids a second BOS. For Mixtral 8x7B this gives exactly
mistral_common's chat tokens (tests/test_tokenizer.py checks it).

Model files are untrusted, so the template runs in jinja2's
ImmutableSandboxedEnvironment with, on top of it:
  - any access to an unsafe attribute (`__class__`, `__globals__`, ...) is an
    error at once (jinja2 itself returns a silent Undefined for `{{ x.__class__ }}`);
  - `*`, `**`, `+` and `%` refuse operands whose result would be too large, and
    every function, method and filter call refuses int arguments above
    MAX_INT_ARG and results longer than max_chars (so `'x' * 10**9`,
    `'x'.center(10**9)` or a string doubled in a loop fail early);
  - `~` concatenations are checked after the fact (at most 2x max_chars);
  - the rendered text is capped at max_chars (default 1,000,000 characters);
  - the render is stopped after MAX_SECONDS by a line-trace deadline (pure
    Python loops such as three nested `range(100000)` loops), and so is compiling;
  - templates nested more than MAX_DEPTH levels are refused before compiling
    (jinja's optimizer takes seconds on `x.y.y...` 300 deep);
  - jinja2 already caps `range()` at 100,000 items.
What remains: one C-level operation that is not a call, operator or concatenation
checked above cannot be interrupted, and the deadline relies on sys.settrace
(a debugger or coverage tracer is suspended during the render).
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from datetime import datetime

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_CHARS = 1_000_000          # rendered prompt (and any intermediate string) length
MAX_TEMPLATE_CHARS = 200_000   # real chat templates are 0.5-10 KB
MAX_INT_ARG = 100_000          # largest int a template may pass to a call or filter (as range)
MAX_INT_BITS = 100_000         # largest int a template may compute with * or **
MAX_SECONDS = 2.0              # render deadline, and compile deadline
MAX_DEPTH = 100                # nesting of the parsed template (jinja's compiler is cubic in it)

ROLES = ("system", "user", "assistant")


class _TemplateRaised(Exception):
    """raise_exception() was called by the template."""


class _Refused(Exception):
    """A resource limit was hit."""


def _raise_exception(message):
    raise _TemplateRaised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(str(fmt))


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Hugging Face's override of jinja's tojson (no HTML escaping).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _size(x, limit: int = MAX_CHARS, depth: int = 0) -> int:
    """Characters + items in x, nested containers included; stops counting past `limit`."""
    if isinstance(x, (str, bytes)):
        return len(x)
    if not isinstance(x, (list, tuple, dict)) or depth > 20:
        return 0
    items = list(x.items()) if isinstance(x, dict) else x
    total = len(items)
    for item in items:
        if total > limit:
            break
        total += _size(item, limit, depth + 1)
    return total


def _check_result(x, limit: int):
    n = _size(x, limit)
    if n > limit:
        raise _Refused(f"an intermediate value of {n} characters/items exceeds the limit of {limit}")
    return x


def _check_replace(s, old, new, limit: int) -> None:
    """Refuse a str.replace / |replace whose worst-case result is over the limit."""
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        worst = (len(s) + 1) * len(new) + len(s) if not old else len(s) + len(s) // len(old) * len(new)
        if worst > limit:
            raise _Refused(f"a replace could produce {worst} characters, over the limit of {limit}")


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT_ARG:
            raise _Refused(f"a call argument {a} exceeds the limit of {MAX_INT_ARG}")


# Conversion specs of %-formats ("%-08.3f", "%*s") and replacement fields of str.format ("{0:>{w}}").
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)(\{)?")


def _check_format(fmt, limit: int) -> None:
    """Refuse a %-format or str.format string whose widths and precisions together could exceed `limit`
    characters, or that takes one from an argument ("%*s", "{:{}}"): the result is built in C before any
    size check could see it ('%.999999999f' % 1.0 is ~1 GB and seconds)."""
    if not isinstance(fmt, str):
        return
    total = 0
    if "%" in fmt:
        for m in _PERCENT_SPEC.finditer(fmt):
            for g in m.groups():
                if g == "*":
                    raise _Refused("a format string takes its width or precision from an argument")
                total += int(g) if g else 0
    if "{" in fmt:
        for m in _BRACE_SPEC.finditer(fmt):
            if m.group(2):
                raise _Refused("a format string takes its width or precision from an argument")
            total += sum(int(d) for d in re.findall(r"\d+", m.group(1)))
    if total > limit:
        raise _Refused(f"a format string asks for widths and precisions of {total} characters, over the "
                       f"limit of {limit}")


class _CheckedConcat(CodeGenerator):
    """Code generator that checks the length of every `~` concatenation."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedConcat
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, max_chars: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.max_chars = max_chars
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        for name, f in list(self.filters.items()):
            self.filters[name] = self._checked_callable(name, f)

    def checked(self, x):
        return _check_result(x, self.max_chars)

    def _checked_callable(self, name: str, f):
        """Wrap filter f: refuse huge int arguments and results, and pre-check the
        filters whose output can dwarf their input (replace, indent, join)."""
        limit = self.max_chars

        @functools.wraps(f)                 # keeps jinja's pass_context/pass_eval_context marks
        def wrapper(*args, **kwargs):
            _check_args(args, kwargs)
            strs = [a for a in args if isinstance(a, str)]
            if name == "replace" and len(strs) >= 3:
                _check_replace(strs[0], strs[1], strs[2], limit)
            elif name == "indent" and strs:
                width = kwargs.get("width", args[-1] if len(args) > 1 else 4)
                per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
                if (strs[0].count("\n") + 1) * per_line > limit:
                    raise _Refused(f"indent would produce more than {limit} characters")
            elif name == "format" and strs:                 # do_format(value, *args): value % args
                _check_format(strs[0], limit)
            elif name == "join" and len(args) >= 2:        # do_join(eval_ctx, value, d="")
                seq, sep = args[1], args[2] if len(args) > 2 else kwargs.get("d", "")
                if isinstance(seq, (list, tuple)) and \
                        _size(seq, limit) + len(seq) * _size(sep, limit) > limit:
                    raise _Refused(f"join would produce more than {limit} characters")
            return self.checked(f(*args, **kwargs))
        return wrapper

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _check_args(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", None)
        if isinstance(owner, str) and name == "replace" and len(args) >= 2:
            _check_replace(owner, args[0], args[1], __self.max_chars)
        elif isinstance(owner, str) and name == "join" and args:
            if _size(args[0], __self.max_chars) * max(len(owner), 1) > __self.max_chars:
                raise _Refused(f"str.join could produce more than {__self.max_chars} characters")
        return __self.checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        f = super().wrap_str_format(value)
        if f is None:
            return None
        _check_format(value.__self__, self.max_chars)
        return f

    def call_binop(self, context, operator, left, right):
        limit = self.max_chars
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and n > 0 and _size(seq, limit) * n > limit:
                    raise _Refused(f"repeating {_size(seq, limit)} characters/items {n} times "
                                   f"exceeds the limit of {limit}")
            if isinstance(left, int) and isinstance(right, int) and \
                    left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _Refused("an integer product is too large")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and \
                    right > 0 and max(left.bit_length(), 1) * right > MAX_INT_BITS:
                raise _Refused("an integer power is too large")
            if isinstance(right, (int, float)) and abs(right) > MAX_INT_ARG:
                raise _Refused("an exponent is too large")
        elif operator == "+":
            n = _size(left, limit) + _size(right, limit)
            if n > limit:
                raise _Refused(f"a concatenation of {n} characters/items exceeds the limit of {limit}")
        elif operator == "%" and isinstance(left, str):
            _check_format(left, limit)
        return self.checked(super().call_binop(context, operator, left, right))


def _validate(messages) -> list[dict]:
    """Check messages: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("chat messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValueError(f"chat message {i} must be a dict with exactly the keys 'role' and 'content', "
                             f"got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ValueError(f"chat message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"chat message {i} content must be a str, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def mixtral_prompt(messages: list[dict], bos_token: str, eos_token: str) -> str:
    """Mixtral-8x7B-Instruct-v0.1's format, character for character what its chat template renders:

        <s> [INST] {system}\\n\\n{user} [/INST] {assistant}</s> [INST] {user} [/INST]

    An optional system message must come first and is prepended to the first user
    message; then roles alternate user/assistant.
    """
    messages = _validate(messages)
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
        if not messages:
            raise ValueError("a system message must be followed by a user message")
    parts = [bos_token]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"after the optional system message, roles must alternate user/assistant; "
                             f"message {i + (system is not None)} is {m['role']!r}, expected {expected!r}")
        if expected == "user":
            content = m["content"] if i or system is None else system + "\n\n" + m["content"]
            parts.append(" [INST] " + content + " [/INST]")
        else:
            parts.append(" " + m["content"] + eos_token)
    return "".join(parts)


@contextlib.contextmanager
def _deadline(seconds: float, what: str):
    """Raise _Refused from the line tracer once `seconds` have passed (pure-Python loops: rendering, and
    jinja's own compiler, whose optimizer is cubic in the nesting depth)."""
    deadline = time.monotonic() + seconds
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        count += 1
        if count & 255 == 0 and time.monotonic() > deadline:
            raise _Refused(f"{what} took longer than {seconds:g} s")
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def _check_depth(tree, limit: int = MAX_DEPTH) -> None:
    """Refuse a parsed template nested deeper than `limit` (real chat templates: < 30)."""
    stack = [(tree, 0)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            raise _Refused(f"the template nests more than {limit} levels deep")
        stack.extend((c, d + 1) for c in node.iter_child_nodes())


def _render_with_deadline(template: jinja2.Template, variables: dict, max_chars: int, seconds: float) -> str:
    out: list[str] = []
    total = 0
    with _deadline(seconds, "rendering"):
        for chunk in template.generate(**variables):
            total += len(chunk)
            if total > max_chars:
                raise _Refused(f"the rendered prompt exceeds {max_chars} characters")
            out.append(chunk)
    return "".join(out)


def render_chat(messages: list[dict], template: str | None, bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, max_chars: int = MAX_CHARS) -> str:
    """Render a conversation to the prompt text.

    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    template: a Hugging Face Jinja chat template (GGUF `tokenizer.chat_template`),
    or None for Mixtral's own format (mixtral_prompt; add_generation_prompt has no
    effect there, since the prompt already ends with " [/INST]" after a user turn).
    Raises ValueError for bad messages and for a template that is malformed,
    calls raise_exception, reaches for Python internals or exceeds a limit.
    Tokenize the result with tokenizer.encode(prompt, bos=False, special=True), or use chat_prompt_ids,
    which bounds the tokenizer's work by the context.
    """
    messages = _validate(messages)
    if template is None:
        return mixtral_prompt(messages, bos_token, eos_token)
    if not isinstance(template, str):
        raise ValueError(f"chat template must be a str, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"chat template was refused: {len(template)} characters is over the "
                         f"limit of {MAX_TEMPLATE_CHARS}")
    env = _Sandbox(max_chars)
    try:
        with _deadline(MAX_SECONDS, "compiling the template"):
            tree = env.parse(template)
            _check_depth(tree)
            compiled = env.from_string(tree)
    except _Refused as e:
        raise ValueError(f"chat template was refused: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None
    except (jinja2.TemplateError, SyntaxError, RecursionError, MemoryError, OverflowError, ValueError,
            TypeError) as e:
        # SyntaxError/IndentationError: Python's own compiler limits on the code jinja generates (300 terms
        # of `1 + 1 + ...` nest too many parentheses, 100 nested loops indent too deep).
        raise ValueError(f"chat template could not be compiled: {type(e).__name__}: {e}") from None
    variables = {"messages": messages, "bos_token": bos_token, "eos_token": eos_token,
                 "add_generation_prompt": bool(add_generation_prompt)}
    try:
        return _render_with_deadline(compiled, variables, max_chars, MAX_SECONDS)
    except _TemplateRaised as e:
        raise ValueError(f"chat template raised an error: {e}") from None
    except SecurityError as e:
        raise ValueError(f"chat template was refused: {e}") from None
    except (_Refused, OverflowError, MemoryError, RecursionError) as e:
        raise ValueError(f"chat template was refused: {e}") from None
    except Exception as e:  # any other failure of untrusted template code
        raise ValueError(f"chat template failed to render: {type(e).__name__}: {e}") from None


def chat_prompt_ids(messages: list[dict], template: str | None, tokenizer, ctx: int,
                    add_generation_prompt: bool = True) -> list[int]:
    """Render a conversation with `template` (render_chat) and tokenize it for a KV cache of `ctx` tokens.
    The render is capped at the characters `ctx` tokens can cover (tokenizer.max_chars(ctx)), so a template
    that renders near the 1 M-character limit is refused before the tokenizer spends seconds and hundreds
    of MB on text that could never fit."""
    bos, eos = tokenizer.pieces[tokenizer.bos_id], tokenizer.pieces[tokenizer.eos_id]
    limit = min(MAX_CHARS, tokenizer.max_chars(ctx))
    try:
        prompt = render_chat(messages, template, bos, eos, add_generation_prompt, max_chars=limit)
    except ValueError as e:
        if limit < MAX_CHARS and str(e).startswith("chat template was refused"):
            raise ValueError(f"{e} (the characters a context of {ctx} tokens can hold)") from None
        raise
    return tokenizer.encode(prompt, bos=False, special=True)
