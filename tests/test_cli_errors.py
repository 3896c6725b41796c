"""The command line on hostile input (issue #12, finding 7): every refusal one stderr line and exit 2."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from lazymoe.benchmarks.fuzz import Gguf
from lazymoe.runtime import DEMO_MODEL
from tests.helpers import cli, rewrite, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(rc, err, *words):
    assert rc == 2 and err.count("\n") == 1 and err.startswith("lazymoe"), err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("command", [["info"], ["run", "-p", "hi"], ["chat"], ["quantize", "-o", "OUT"]])
def test_a_fifo_is_refused_at_once(tmp_path, command):
    fifo = str(tmp_path / "model.gguf")
    os.mkfifo(fifo)
    argv = [command[0], fifo] + [str(tmp_path / "out.gguf") if a == "OUT" else a for a in command[1:]]
    t0 = time.perf_counter()
    rc, _, err = cli(*argv)            # blocked forever in open() before
    one_line(rc, err, fifo, "FIFO; expected a regular file")
    assert time.perf_counter() - t0 < 10


def test_a_folder_as_the_model_is_refused(tmp_path):
    rc, _, err = cli("info", str(tmp_path))
    one_line(rc, err, "a folder; expected a regular file")


def _nan_scales(p: Gguf) -> None:
    _, dims, _, off = p.tensor("output.weight")
    data = bytearray(p.data)
    for b in range(dims[0] * dims[1] // 32):
        data[off + 18 * b:off + 18 * b + 2] = b"\x00\x7e"
    p.data = bytes(data)


def test_an_error_after_loading_is_the_only_stderr_line(tmp_path):
    path = rewrite(tmp_path, _nan_scales)
    rc, _, err = cli("run", path, "-p", "Hi there", "-n", "2")
    one_line(rc, err, "non-finite")
    rc, _, err = cli("run", DEMO_MODEL, "-p", "word " * 3000, "-n", "2", "--ctx", "64")
    one_line(rc, err, "do not fit the context of 64 tokens")
    rc, _, err = run_cli(["chat", path, "-n", "2"], stdin="hello\n")
    assert rc == 2 and err.count("\n") == 1 and "non-finite" in err, err


def test_the_ram_plan_still_comes_with_the_stats():
    rc, _, err = cli("run", DEMO_MODEL, "-p", "Hi", "-n", "2", "--temp", "0")
    lines = err.splitlines()
    assert rc == 0 and lines[0].startswith("RAM plan") and "tok/s" in lines[1], err


def test_invalid_utf8_on_the_command_line_is_reported_plainly():
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")     # what Python makes of a Latin-1 argv
    rc, _, err = cli("run", DEMO_MODEL, "-p", prompt, "-n", "2")
    one_line(rc, err, "command-line argument 4", "is not valid UTF-8 (byte 0xe9)")
    assert "surrogate" not in err
    p = subprocess.run([sys.executable, "-m", "lazymoe.cli", "run", DEMO_MODEL, "-p", b"\xff\xfe"],
                       capture_output=True, timeout=120)
    assert p.returncode == 2 and p.stderr.count(b"\n") == 1 and b"not valid UTF-8 (byte 0xff)" in p.stderr


@pytest.mark.parametrize("stdin", [
    io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe\n"), encoding="utf-8"),                       # strict decoding
    io.TextIOWrapper(io.BytesIO(b"hello\n\xff\xfe\n"), encoding="utf-8", errors="surrogateescape"),
])
def test_invalid_utf8_on_chat_stdin_is_reported_plainly(stdin):
    from lazymoe.commands.run import cmd_chat
    args = type("Args", (), dict(model=DEMO_MODEL, n_predict=2, ram=None, ctx=None, temp=0.0, top_k=0, top_p=1.0,
                                 min_p=0.0, repeat_penalty=1.0, seed=None, stop=[], policy="layer", prefetch=True,
                                 prefetch_depth=None, overlap=True, refine=False, read="auto",
                                 system=None))()
    out = io.StringIO()
    old = sys.stdout
    sys.stdout = out
    try:
        with pytest.raises(ValueError, match=r"stdin line [12] is not valid UTF-8 \(byte 0xff"):
            cmd_chat(args, stdin=stdin)
    finally:
        sys.stdout = old


@pytest.mark.parametrize("argv", [["run"], ["run", DEMO_MODEL], ["bogus"], ["info", DEMO_MODEL, "--ctx", "x"], []])
def test_argparse_errors_are_one_line(argv, capsys):
    from lazymoe import cli as lazymoe_cli
    with pytest.raises(SystemExit) as e:
        lazymoe_cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error:" in err and "--help" in err, err


def test_ram_far_above_the_machine_is_accepted_with_a_note():
    rc, _, err = cli("run", DEMO_MODEL, "-p", "Hi", "-n", "2", "--temp", "0", "--ram", "1000T")
    lines = err.splitlines()
    assert rc == 0 and len(lines) == 3 and "note: --ram 1000T is more than this machine's" in lines[0], err
    assert lines[1].startswith("RAM plan: budget") and "1000" not in lines[1].split(":")[1], err


def test_an_error_quoting_hostile_bytes_stays_one_printable_line():
    """A key that swallowed the bytes after it (newlines, a template, control bytes) is quoted escaped; the
    fuzzer's mixtral:2027006495 printed 8 stderr lines before (`--replay` it)."""
    from lazymoe.cli import one_line
    msg = one_line("m.gguf: metadata tokenizer.ggml.eos\x04\x00token\n{%- if x %}\n\x07 is not a key")
    assert msg.isprintable() and "\\n{%- if x %}" in msg and "\\x07" in msg and "is not a key" in msg
