"""Hostile chat templates (issue #12, finding 3): every path bounded in memory and time, refused with one
ValueError; each case runs in a child limited to 1 GiB of address space above its start."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lazymoe.benchmarks.fuzz import STRING, enc
from tests.helpers import rewrite, run_cli

CHILD = r"""
import json, resource, sys, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + (1 << 30), resource.RLIM_INFINITY))
from lazymoe.runtime.chat import render_chat
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                  # VmHWM := VmRSS (ru_maxrss would carry the parent's peak)
base = status("VmRSS")
t0 = time.perf_counter()
try:
    render_chat([{"role": "user", "content": "hi"}], sys.argv[1], "<s>", "</s>")
    r = "ok"
except ValueError as e:
    r = "ValueError: " + str(e)
except BaseException as e:
    r = type(e).__name__ + ": " + str(e)
print(json.dumps({"result": r, "seconds": time.perf_counter() - t0, "peak": status("VmHWM") - base}))
"""


def render_bounded(template: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, template], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


@pytest.mark.parametrize("template,match", [
    ("{{ '%1999999999s'|format('a') }}", "format string asks for widths and precisions of 1999999999"),
    ("{{ '%9999999999s'|format('a') }}", "format string asks for widths"),
    ("{{ '%.999999999f'|format(1.0) }}", "format string asks for widths"),
    ("{{ '%*s'|format(99999, 'a') }}", "from an argument"),
    ("{{ '" + "%999999s" * 300 + "' % (('a',) * 300) }}", "format string asks for widths"),
    ("{{ '" + "{:999999}" * 300 + "'.format(*(['a'] * 300)) }}", "format string asks for widths"),
    ("{{ '%.999999f%.999999f'|format(1.0, 2.0) }}", "format string asks for widths"),
])
def test_format_widths_are_bounded_on_every_path(template, match):
    r = render_bounded(template)
    assert r["result"].startswith("ValueError: chat template was refused") and match in r["result"], r
    assert r["seconds"] < 1.0 and r["peak"] < 100 << 20, r


@pytest.mark.parametrize("template", [
    "{{ " + " + ".join(["1"] * 300) + " }}",
    "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
    "{% for i in range(1) %}" * 120 + "x" + "{% endfor %}" * 120,
    "{% if 1 %}" * 120 + "x" + "{% endif %}" * 120,
    "{{ " + " ~ ".join(["'a'"] * 400) + " }}",
    "{{ " + "not " * 2000 + "1 }}",
    "{{ x" + ".y" * 3000 + " }}",
])
def test_deep_nesting_and_long_expressions_are_a_value_error(template):
    r = render_bounded(template)
    assert r["result"].startswith("ValueError: chat template") or r["result"] == "ok", r
    assert r["seconds"] < 5 and r["peak"] < 300 << 20, r


@pytest.mark.parametrize("template", ["{{ x" + ".y" * 300 + " }}", "{{ " + "-" * 400 + "1 }}",
                                      "{{ " + "[" * 150 + "1" + "]" * 150 + " }}"])
def test_compiling_is_bounded_in_time(template):
    """jinja's optimizer is cubic in the nesting depth: 300 attribute lookups took ~3 s to compile."""
    r = render_bounded(template)
    assert r["result"].startswith("ValueError: chat template"), r
    assert r["seconds"] < 2.5, r


def test_a_render_near_the_output_limit_is_not_tokenized_past_the_context(tmp_path):
    """A template rendering just under 1 M characters: refused for the context before tokenizing."""
    template = "{{ bos_token }}{{ 'a' * 999990 }}"
    path = rewrite(tmp_path, lambda p: p.set("tokenizer.chat_template", STRING, enc(STRING, template)))
    t0 = time.perf_counter()
    rc, out, err = run_cli(["chat", path, "-n", "2", "--temp", "0"], stdin="hello\n")
    assert rc == 2 and err.count("\n") == 1 and "limit of 32768 (the characters a context of 2048 tokens can hold)" in err, err
    assert time.perf_counter() - t0 < 5


def test_chat_prompt_ids_bounds_the_tokenizer_by_the_context():
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.runtime import DEMO_MODEL
    from lazymoe.runtime.chat import chat_prompt_ids
    from lazymoe.runtime.tokenizer import Tokenizer
    with GGUFFile(DEMO_MODEL) as g:
        tok = Tokenizer.from_gguf_metadata(g.metadata)
    msgs = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(msgs, None, tok, 64) == tok.encode("<s> [INST] hi [/INST]", bos=False, special=True)
    with pytest.raises(ValueError, match="limit of 1024 .the characters a context of 64 tokens"):
        chat_prompt_ids(msgs, "{{ 'a' * 5000 }}", tok, 64)
