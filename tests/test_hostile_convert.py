"""The converter on hostile checkpoints and kills (issue #12, findings 5 and 6)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from lazymoe.quantize.convert import convert
from tests.helpers import FIXTURES, cli

TINY = os.path.join(FIXTURES, "tiny-mixtral")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(TINY, d)
    return d


def _config(folder, key, raw_json: str):
    """config.json with `key` set to raw JSON text (1e999 is not a value json.dumps can write)."""
    c = json.loads((folder / "config.json").read_text())
    c[key] = "@@"
    (folder / "config.json").write_text(json.dumps(c).replace('"@@"', raw_json))


@pytest.mark.parametrize("key,raw,match", [
    ("hidden_size", "1e999", r"hidden_size must be a whole number from 1 to 1048576, got inf"),
    ("hidden_size", "64.0", r"hidden_size must be a whole number"),
    ("num_hidden_layers", "2.5", r"num_hidden_layers must be a whole number"),
    ("vocab_size", "18446744073709551616", r"vocab_size must be a whole number from 1 to"),
    ("num_attention_heads", "\"4\"", r"num_attention_heads must be a whole number"),
    ("intermediate_size", "true", r"intermediate_size must be a whole number"),
    ("rms_norm_eps", "1e999", r"rms_norm_eps must be > 0 and <= 1"),
    ("rope_theta", "-1", r"rope_theta must be > 0"),
    ("num_local_experts", "1e999", r"num_local_experts must be a whole number"),
    ("architectures", "5", r"architectures must be a list of names"),
    ("architectures", "[5]", r"architectures must be a list of names"),
    ("hidden_size", "[" * 100000 + "]" * 100000, r"config.json: JSON nested too deeply"),
])
def test_hostile_config_json_is_one_value_error(folder, tmp_path, key, raw, match):
    _config(folder, key, raw)
    with pytest.raises(ValueError, match=match):
        convert(str(folder), str(tmp_path / "out.gguf"), progress=False)
    rc, _, err = cli("quantize", str(folder), "-o", str(tmp_path / "out.gguf"), "-q")
    assert rc == 2 and err.count("\n") == 1, err


def _header(folder, edit):
    p = folder / "model.safetensors"
    b = p.read_bytes()
    (n,) = struct.unpack_from("<Q", b)
    text = edit(b[8:8 + n].decode())
    p.write_bytes(struct.pack("<Q", len(text)) + text.encode() + b[8 + n:])


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.replace('"shape": [512, 64]', '"shape": [1e999, 64]', 1), "malformed header entry"),
    (lambda h: h.replace('"shape": [512, 64]', '"shape": [512.0, 64]', 1), "malformed header entry"),
    (lambda h: h.replace('"shape": [512, 64]', '"shape": [' + "[" * 50000 + "]" * 50000 + "]", 1),
     "nested too deeply"),
    (lambda h: h.replace('"shape": [512, 64]', '"shape": [4294967296, 4294967296]', 1), "does not fill its"),
    (lambda h: h.replace('"dtype": "BF16"', '"dtype": 5', 1), "malformed header entry"),
    (lambda h: h.replace('"data_offsets": [', '"data_offsets": [true, ', 1), "malformed header entry"),
])
def test_hostile_safetensors_headers_are_one_value_error(folder, tmp_path, edit, match):
    h = json.loads((folder / "model.safetensors").read_bytes()[8:8 + struct.unpack_from(
        "<Q", (folder / "model.safetensors").read_bytes())[0]])
    assert any(e.get("shape") == [512, 64] for k, e in h.items() if k != "__metadata__")
    _header(folder, edit)
    with pytest.raises(ValueError, match=match):
        convert(str(folder), str(tmp_path / "out.gguf"), progress=False)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.model"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(folder, name):
    before = (folder / name).read_bytes()
    rc, _, err = cli("quantize", str(folder), "-o", str(folder / name), "--force", "-q")
    assert rc == 2 and err.count("\n") == 1 and "is one of the conversion's inputs" in err, err
    assert (folder / name).read_bytes() == before


def test_an_output_that_is_an_input_through_a_link_is_refused(folder, tmp_path):
    os.symlink(folder / "model.safetensors", tmp_path / "link.gguf")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="inputs"):
        convert(str(folder), str(tmp_path / "link.gguf"), force=True, progress=False)
    assert (folder / "model.safetensors").read_bytes() == before


# --- finding 6: kills ----------------------------------------------------------------------------------------

def _start_synth(out):
    """`lazymoe synth` of one 8x7B-shaped layer (~920 MB, seconds of writing): a run to kill mid-write."""
    # SIGINT as a terminal delivers it: a test run started in the background (`cmd &`) ignores SIGINT, and its
    # children would inherit that and finish the write
    return subprocess.Popen([sys.executable, "-m", "lazymoe.cli", "synth", "--shape", "mixtral-8x7b", "--layers", "1",
                             "-o", str(out), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler))


def _wait_for_temporary(p, out, timeout=120):
    pattern = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.*.lazymoe-tmp")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tmps = glob.glob(pattern)
        if tmps and os.path.getsize(tmps[0]) > 1 << 20:
            return tmps[0]
        assert p.poll() is None, p.communicate()
        time.sleep(0.02)
    raise AssertionError("no temporary appeared")


@pytest.mark.parametrize("sig,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_terminated_conversion_leaves_nothing(tmp_path, sig, rc):
    out = tmp_path / "out.gguf"
    p = _start_synth(out)
    try:
        tmp = _wait_for_temporary(p, str(out))
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == rc, err
    assert not os.path.exists(tmp) and not out.exists()
    assert os.listdir(tmp_path) == []


def test_the_next_run_removes_a_killed_runs_temporary_and_nothing_else(tmp_path):
    out = tmp_path / "out.gguf"
    p = _start_synth(out)
    try:
        tmp = _wait_for_temporary(p, str(out))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        p.kill()
    assert os.path.exists(tmp)
    mine = [tmp_path / "out.gguf.abc.tmp", tmp_path / ".out.gguf.x.lazymoe-tmp", tmp_path / ".other.gguf.1.lazymoe-tmp",
            tmp_path / f".out.gguf.{os.getppid()}.lazymoe-tmp"]         # a user's files, and a live run's
    for f in mine:
        f.write_bytes(b"keep")
    convert(TINY, str(out), progress=False)
    assert not os.path.exists(tmp) and out.exists()
    assert all(f.read_bytes() == b"keep" for f in mine)
    from lazymoe.quantize.convert import remove_stale_temporaries
    assert remove_stale_temporaries(str(out)) == []


def test_requantizing_keeps_metadata_values_that_do_not_fit_the_default_types(tmp_path):
    from lazymoe.benchmarks.fuzz import ARRAY, enc
    from lazymoe.format.gguf_file import GGUFFile
    from tests.helpers import rewrite

    def edit(p):
        p.set("x.u64", 10, enc(10, 2**64 - 1))
        p.set("x.f64", 12, enc(12, 1e300))
        p.set("x.u64s", ARRAY, enc(ARRAY, (10, [2**63, 1])))
        p.set("x.f64s", ARRAY, enc(ARRAY, (12, [1e300])))
    src = rewrite(tmp_path, edit)
    out = str(tmp_path / "out.gguf")
    convert(src, out, progress=False)                 # struct.error and OverflowError tracebacks before
    with GGUFFile(out) as g:
        assert g.metadata["x.u64"] == 2**64 - 1 and g.metadata["x.f64"] == 1e300
        assert g.metadata["x.u64s"].tolist() == [2**63, 1] and g.metadata["x.f64s"].tolist() == [1e300]
    empty = rewrite(tmp_path, lambda p: p.set("x.empty", ARRAY, enc(ARRAY, (4, []))), name="empty.gguf")
    rc, _, err = cli("quantize", empty, "-o", str(tmp_path / "out2.gguf"), "-q")
    assert rc == 2 and err.count("\n") == 1 and "metadata key x.empty is an ARRAY of UINT32 (0 elements)" in err, err
