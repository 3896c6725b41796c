"""Hostile model files through the whole load path (issue #12): each must end in one ValueError naming the
file and what was expected (one stderr line and exit 2 from the CLI), in bounded time and memory."""
from __future__ import annotations

import time

import numpy as np
import pytest

from lazymoe.benchmarks.fuzz import ARRAY, STRING, enc
from lazymoe.runtime.model import load_model
from tests.helpers import cli, rewrite

pytestmark = pytest.mark.usefixtures("one_thread")

UINT32, INT32, FLOAT32 = 4, 5, 6


def refused(path, match):
    """load_model, `info` and `run` all refuse path with one line matching `match`."""
    with pytest.raises(ValueError, match=match):
        load_model(path, progress=False)
    for argv in (["info", path], ["run", path, "-p", "Hi", "-n", "2", "--temp", "0"]):
        rc, _, err = cli(*argv)
        assert rc == 2 and err.count("\n") == 1, (argv, err)
        assert path in err


# --- finding 1: metadata of the wrong type -------------------------------------------------------------------

WRONG_TYPES = [
    ("tokenizer.ggml.tokens", UINT32, enc(UINT32, 5), r"tokenizer.ggml.tokens is an integer \(5\); expected an ARRAY of STRING"),
    ("llama.block_count", ARRAY, enc(ARRAY, (UINT32, [4, 4])), r"llama.block_count is an ARRAY of UINT32 .*expected an integer"),
    ("tokenizer.ggml.scores", FLOAT32, enc(FLOAT32, 1.0), r"tokenizer.ggml.scores is a float .*expected an ARRAY"),
    ("tokenizer.ggml.token_type", INT32, enc(INT32, 1), r"tokenizer.ggml.token_type is an integer .*expected an ARRAY of integers"),
    ("tokenizer.ggml.bos_token_id", FLOAT32, enc(FLOAT32, float("inf")), r"bos_token_id is a float \(inf\); expected an integer"),
    ("tokenizer.ggml.bos_token_id", FLOAT32, enc(FLOAT32, float("-inf")), r"bos_token_id is a float \(-inf\)"),
    ("tokenizer.ggml.token_type", ARRAY, enc(ARRAY, (FLOAT32, [1.0] * 4096)), r"token_type is an ARRAY of FLOAT32"),
    ("tokenizer.ggml.scores", ARRAY, enc(ARRAY, (FLOAT32, [float("nan")] * 4096)), r"scores is an ARRAY of FLOAT32 .*finite"),
    ("tokenizer.ggml.add_bos_token", STRING, enc(STRING, "yes"), r"add_bos_token is a STRING \('yes'\); expected a BOOL"),
    ("tokenizer.chat_template", UINT32, enc(UINT32, 7), r"tokenizer.chat_template is an integer \(7\); expected a STRING"),
    ("llama.rope.freq_base", FLOAT32, enc(FLOAT32, float("nan")), r"rope.freq_base is a float \(nan\); expected a finite"),
    ("general.architecture", UINT32, enc(UINT32, 1), r"general.architecture is an integer"),
]


@pytest.mark.parametrize("key,vtype,raw,match", WRONG_TYPES, ids=[f"{k}-{i}" for i, (k, *_) in enumerate(WRONG_TYPES)])
def test_metadata_of_the_wrong_type_is_refused_naming_key_and_types(tmp_path, key, vtype, raw, match):
    path = rewrite(tmp_path, lambda p: p.set(key, vtype, raw))
    refused(path, match)


def test_info_checks_the_keys_it_reads(tmp_path):
    path = rewrite(tmp_path, lambda p: p.set("general.name", ARRAY, enc(ARRAY, (STRING, ["a"]))))
    rc, _, err = cli("info", path)
    assert rc == 2 and err.count("\n") == 1 and "general.name is an ARRAY of STRING (1 elements); expected a STRING" in err


def test_metadata_getter_is_the_one_table():
    from lazymoe.format.metadata import KEYS, meta
    with pytest.raises(ValueError, match="f: metadata key llama.block_count is missing"):
        meta({}, "llama.block_count", "f")
    assert meta({"llama.block_count": np.uint32(3)}, "llama.block_count", "f") == 3
    with pytest.raises(ValueError, match="is a BOOL"):
        meta({"llama.block_count": True}, "llama.block_count", "f")
    with pytest.raises(ValueError, match="from 1 to 1048576"):
        meta({"llama.block_count": 0}, "llama.block_count", "f")
    with pytest.raises(KeyError):
        meta({}, "llama.unknown_key", "f")          # every key read is in KEYS
    assert "tokenizer.chat_template" in KEYS


# --- finding 4: counts against what the file holds -----------------------------------------------------------

def test_a_huge_block_count_is_refused_before_anything_is_built(tmp_path):
    path = rewrite(tmp_path, lambda p: p.set("llama.block_count", UINT32, enc(UINT32, 1 << 20)))
    t0 = time.perf_counter()
    refused(path, r"block_count is 1048576 but the file holds 43 tensors")
    assert time.perf_counter() - t0 < 10


def test_block_count_beyond_the_layers_present_is_refused(tmp_path):
    path = rewrite(tmp_path, lambda p: p.set("llama.block_count", UINT32, enc(UINT32, 5)))
    refused(path, r"block_count is 5 but the file holds 43 tensors")
