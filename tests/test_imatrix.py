"""Importance matrices: llama.cpp's two file formats read (a hand-built legacy .dat, our GGUF checked against
ggml's own reader), `lazymoe imatrix` against a numpy recomputation, the rows each expert is quantized with, and
files for another model or hostile files refused in one line."""
from __future__ import annotations

import os
import struct
import sysconfig

import numpy as np
import pytest

from lazymoe.cli import main
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.quantize.convert import convert
from lazymoe.quantize.imatrix import read_imatrix, write_imatrix

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TINY256 = os.path.join(FIX, "tiny-mixtral-256")        # hidden 256, FFN 256, 2 layers, 8 experts
CTX, CHUNKS = 64, 3


def legacy_dat(entries, last_chunk=None, dataset=None) -> bytes:
    """llama-imatrix's --output-format dat, written here from its description (save_imatrix_legacy)."""
    b = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, len(values))
        b += np.asarray(values, "<f4").tobytes()
    if last_chunk is not None:
        d = dataset.encode()
        b += struct.pack("<ii", last_chunk, len(d)) + d
    return b


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("im") / "f32.gguf")
    convert(TINY256, p, "f32", progress=False)
    return p


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "argparse.py"), encoding="utf-8") as f:
        p.write_text(f.read()[:40000])
    return str(p)


@pytest.fixture(scope="module")
def ours(f32, text, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ours") / "imatrix.gguf")
    assert main(["imatrix", f32, "--text", text, "-o", out, "--ctx", str(CTX), "--chunks", str(CHUNKS), "-q"]) == 0
    return out


def test_gguf_round_trip(tmp_path):
    p = str(tmp_path / "im.gguf")
    sums = {"blk.0.attn_q.weight": np.arange(8, dtype=np.float32).reshape(1, 8),
            "blk.0.ffn_up_exps.weight": np.full((3, 8), 6.0, np.float32)}
    counts = {"blk.0.attn_q.weight": np.array([2]), "blk.0.ffn_up_exps.weight": np.array([3, 0, 2])}
    write_imatrix(p, sums, counts, ["calib.txt"], 5, 512)
    im = read_imatrix(p)
    assert im.datasets == ["calib.txt"] and im.chunk_count == 5 and not im.legacy
    assert np.array_equal(im.values["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / 2)
    # an expert no token reached gets importance 1, as llama-quantize gives it
    assert np.array_equal(im.values["blk.0.ffn_up_exps.weight"], np.array([[2.0] * 8, [1.0] * 8, [3.0] * 8], np.float32))
    with GGUFFile(p) as g:                               # llama-imatrix's layout: ggml [cols, n_mat] and [1, n_mat]
        assert g.metadata["general.type"] == "imatrix" and "general.architecture" not in g.metadata
        assert g.tensors["blk.0.ffn_up_exps.weight.in_sum2"].shape == (3, 8)
        assert g.tensors["blk.0.ffn_up_exps.weight.counts"].shape == (3, 1)
        assert g.metadata["imatrix.chunk_size"] == 512


def test_legacy_dat_read(tmp_path):
    p = tmp_path / "im.dat"
    p.write_bytes(legacy_dat([("blk.0.attn_q.weight", 4, [4.0, 8.0]), ("blk.0.ffn_down_exps.weight", 2, [2.0] * 6)],
                             10, "wiki.txt"))
    im = read_imatrix(str(p))
    assert im.legacy and im.datasets == ["wiki.txt"] and im.chunk_count == 10
    assert np.array_equal(im.values["blk.0.attn_q.weight"], [[1.0, 2.0]])     # values / ncall
    assert im.values["blk.0.ffn_down_exps.weight"].size == 6
    p.write_bytes(legacy_dat([("a.weight", 0, [3.0])]))                          # no trailer; ncall 0: as stored
    assert np.array_equal(read_imatrix(str(p)).values["a.weight"], [[3.0]])


@pytest.mark.parametrize("data, match", [
    (b"", "truncated"),
    (struct.pack("<i", 1 << 30), "claims"),
    (legacy_dat([("a.weight", 1, [1.0, 2.0])])[:-3], "values with"),
    (legacy_dat([("a.weight", 1, [1.0])]) + b"xy", "truncated"),
    (legacy_dat([("a.weight", 1, [1.0]), ("a.weight", 1, [1.0])]), "twice"),
    (legacy_dat([("a.weight", 1, [np.nan])]), "non-finite"),
    (legacy_dat([("a.weight", 1, [-1.0])]), "negative"),
    (struct.pack("<ii", 1, -5) + bytes(16), "name of -5 bytes"),
])
def test_hostile_legacy_refused(tmp_path, capsys, f32, data, match):
    p = tmp_path / "bad.dat"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        read_imatrix(str(p))
    assert main(["quantize", f32, "-o", str(tmp_path / "o.gguf"), "-t", "q8_0", "--imatrix", str(p), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "importance matrix" in err
    assert not (tmp_path / "o.gguf").exists()


def test_hostile_gguf_refused(tmp_path):
    from gguf import GGUFWriter
    p = str(tmp_path / "bad.gguf")
    w = GGUFWriter(p, "imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((2, 8), np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.ones((2, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="without imatrix.datasets"):        # llama-quantize requires the keys
        read_imatrix(p)
    write_imatrix(p, {"x.weight": np.ones((2, 8))}, {"x.weight": np.array([1, np.inf])}, ["t"], 1, 8)
    with pytest.raises(ValueError, match="non-finite counts"):
        read_imatrix(p)


def test_lazymoe_imatrix_is_what_the_inputs_give(f32, text, ours):
    """Our file against sums recomputed here: the same run with an observer that keeps the inputs, and numpy
    for the down projections' input silu(x W_gate^T) * (x W_up^T) from the F32 file's weights."""
    from lazymoe import load_model
    from lazymoe.commands.imatrix import Collector
    im = read_imatrix(ours)
    with GGUFFile(ours) as g:
        sums = {n[:-8]: np.array(g.tensor(n)) for n in g.tensors if n.endswith(".in_sum2")}
        counts = {n[:-7]: np.array(g.tensor(n)).reshape(-1) for n in g.tensors if n.endswith(".counts")}
    assert im.chunk_count == CHUNKS and im.datasets == [text]
    assert len(sums) == 2 * 8                           # per layer q, k, v, output, router, 3 expert tensors
    n_tok = CHUNKS * CTX
    for il in range(2):
        b = f"blk.{il}."
        for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp"):
            assert counts[b + n + ".weight"].tolist() == [n_tok]
        assert np.array_equal(sums[b + "attn_q.weight"], sums[b + "attn_v.weight"])
        assert counts[b + "ffn_gate_exps.weight"].sum() == 2 * n_tok               # top-2: each token twice
        assert np.array_equal(counts[b + "ffn_down_exps.weight"], counts[b + "ffn_up_exps.weight"])
        # every token's FFN input goes to 2 experts: the experts' sums are twice the router's
        assert np.allclose(sums[b + "ffn_gate_exps.weight"].sum(0), 2 * sums[b + "ffn_gate_inp.weight"][0], rtol=1e-4)

    seen = []

    class Keep(Collector):
        def ffn(self, il, e, X, gate, up):
            seen.append((il, e, np.array(X)))
            super().ffn(il, e, X, gate, up)
    ids = load_model(f32, ctx=CTX, progress=False).tokenizer.encode(open(text, encoding="utf-8").read(), bos=True)
    model = load_model(f32, ctx=CTX, progress=False)
    model.net.observer = col = Keep(8)
    for c in range(CHUNKS):
        chunk = np.asarray(ids[c * CTX:(c + 1) * CTX])
        chunk[0] = model.tokenizer.bos_id
        model.logits(chunk)
    model.close()
    for n in sums:
        assert np.allclose(col.sums[n], sums[n], rtol=1e-5), n
    with GGUFFile(f32) as g:
        gate, up = (np.array(g.tensor(f"blk.1.ffn_{k}_exps.weight")) for k in ("gate", "up"))   # [E, F, D]
    want = np.zeros((8, gate.shape[1]))
    for il, e, X in seen:
        if il == 1:
            x = X.astype(np.float64)
            a = x @ gate[e].T.astype(np.float64)                                     # [t, F]
            want[e] += (((a / (1 + np.exp(-a))) * (x @ up[e].T.astype(np.float64))) ** 2).sum(0)
    assert np.allclose(sums["blk.1.ffn_down_exps.weight"], want, rtol=1e-3, atol=1e-6)


def test_llama_cpp_reads_ours_and_quantizes_with_it(f32, ours, tmp_path):
    """ggml's own GGUF reader gives the same importance as ours (llama-quantize's load_imatrix over it), and
    llama_model_quantize takes it: it throws on an entry of the wrong size, and the K-quant tensors change."""
    pytest.importorskip("llama_cpp")
    from gguf import LlamaFileType

    from lazymoe.benchmarks.llama_imatrix import llama_quantize, load_imatrix_ggml
    values, datasets, chunks = load_imatrix_ggml(ours)
    im = read_imatrix(ours)
    assert set(values) == set(im.values) and datasets == im.datasets and chunks == im.chunk_count
    for n, v in values.items():
        assert np.array_equal(v, im.values[n].reshape(-1)), n
    a, b = str(tmp_path / "with.gguf"), str(tmp_path / "without.gguf")
    llama_quantize(f32, a, LlamaFileType.MOSTLY_Q4_K_M, values)
    llama_quantize(f32, b, LlamaFileType.MOSTLY_Q4_K_M)
    with GGUFFile(a) as ga, GGUFFile(b) as gb:
        changed = {n for n in ga.tensors if bytes(ga.raw(n)) != bytes(gb.raw(n))}
    k_quant = {n for n in values if "attn_k" not in n and "attn_v" not in n and "gate_inp" not in n}   # Q8_0 ignores it
    assert changed == k_quant


def test_each_expert_is_quantized_with_its_row(f32, ours, tmp_path):
    from lazymoe.kernels.quantizers import quantize
    im = read_imatrix(ours)
    got = {}

    def recording(rows, qt, importance=None):
        got.setdefault(qt.name, []).append(None if importance is None else np.array(importance))
        return quantize(rows, qt)
    s = convert(f32, str(tmp_path / "q8.gguf"), "q8_0", progress=False, quantize_fn=recording, imatrix=ours)
    assert "importance matrix imatrix.gguf (16 entries)" in str(s)
    rows = got["q8_0"]
    with GGUFFile(str(tmp_path / "q8.gguf")) as g:
        order = [n for n in g.tensors if g.tensors[n].type_name == "Q8_0"]
        md = g.metadata
    assert md["quantize.imatrix.entries_count"] == 16 and md["quantize.imatrix.chunks_count"] == CHUNKS
    # parts in file order: token_embd, then per layer ..., each merged expert tensor one call per expert
    i = 0
    for n in order:
        for e in range(8 if "_exps" in n else 1):
            want = im.values.get(n)
            assert (rows[i] is None) == (want is None), n
            if want is not None:
                assert np.array_equal(rows[i], want[e]), (n, e)
            i += 1
    assert i == len(rows)


def test_imatrix_for_another_model_refused(ours, tmp_path, capsys):
    other = str(tmp_path / "tiny.gguf")
    convert(os.path.join(FIX, "tiny-mixtral"), other, "f32", progress=False)     # hidden 64: other sizes
    assert main(["quantize", other, "-o", str(tmp_path / "o.gguf"), "-t", "q8_0", "--imatrix", ours, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another model" in err and not (tmp_path / "o.gguf").exists()
    dat = tmp_path / "names.dat"
    dat.write_bytes(legacy_dat([("blk.7.attn_q.weight", 1, [1.0] * 64)]))
    assert main(["quantize", other, "-o", str(tmp_path / "o.gguf"), "-t", "q8_0", "--imatrix", str(dat), "-q"]) == 2
    assert "no tensor of" in capsys.readouterr().err


def test_legacy_dat_drives_the_quantizer_like_gguf(f32, ours, tmp_path):
    """A hand-built .dat holding our file's means (times ncall, as llama-imatrix stores them) quantizes to the
    same bytes as the GGUF file."""
    im = read_imatrix(ours)
    dat = tmp_path / "same.dat"
    dat.write_bytes(legacy_dat([(n, 3, (v * 3).reshape(-1)) for n, v in sorted(im.values.items())], 3, "calib.txt"))
    seen = {}

    def recording(tag):
        def q(rows, qt, importance=None):
            from lazymoe.kernels.quantizers import quantize
            seen.setdefault(tag, []).append(None if importance is None else np.array(importance))
            return quantize(rows, qt)
        return q
    convert(f32, str(tmp_path / "a.gguf"), "q8_0", progress=False, quantize_fn=recording("gguf"), imatrix=ours)
    convert(f32, str(tmp_path / "b.gguf"), "q8_0", progress=False, quantize_fn=recording("dat"), imatrix=str(dat))
    assert len(seen["gguf"]) == len(seen["dat"])
    for a, b in zip(seen["gguf"], seen["dat"]):
        assert (a is None and b is None) or np.allclose(a, b, rtol=1e-6)


def test_imatrix_command_bad_input(f32, text, tmp_path, capsys):
    out = str(tmp_path / "im.gguf")
    for argv, match in (([f32, "--text", text, "-o", out, "--ctx", "100000"], "ctx"),
                        ([f32, "--text", str(tmp_path / "none.txt"), "-o", out], "cannot read"),
                        ([f32, "--text", text, "-o", out, "--chunks", "0"], "--chunks"),
                        ([str(tmp_path / "none.gguf"), "--text", text, "-o", out], "none.gguf")):
        assert main(["imatrix", *argv, "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    assert main(["imatrix", f32, "--text", str(short), "-o", out, "-q"]) == 2
    assert "fewer than one chunk" in capsys.readouterr().err and not os.path.exists(out)
