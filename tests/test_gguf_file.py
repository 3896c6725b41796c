"""The strict GGUF reader on hostile files: every defect is one GGUFError naming the file, never a crash."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from lazymoe.format.gguf_file import GGUFError, GGUFFile

U32, U64, STR, ARR, F32 = 4, 10, 8, 9, 6


def s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims, gtype: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", gtype, offset)


def gguf(kvs=(), tis=(), data=b"", n_kv=None, n_t=None, version=3, align=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tis) if n_t is None else n_t, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tis)
    body += b"\0" * (-len(body) % align)
    return body + data


def ok_file() -> bytes:
    return gguf([kv("general.architecture", STR, s("llama"))], [tensor_info("w", [4, 2])], np.ones(8, np.float32).tobytes())


def check(tmp_path, blob: bytes, *words):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFError) as e:
        GGUFFile(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_valid_file(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(ok_file())
    f = GGUFFile(p)
    assert f.metadata["general.architecture"] == "llama"
    assert f.tensors["w"].shape == (2, 4) and np.array_equal(f.tensor("w"), np.ones((2, 4), np.float32))


def test_hostile_headers(tmp_path):
    check(tmp_path, b"GGML" + b"\0" * 40, "not a GGUF")
    check(tmp_path, b"GGUF", "not a GGUF", "too short")
    check(tmp_path, gguf(version=1), "version 1")
    check(tmp_path, gguf(n_kv=2**62), "claims")
    check(tmp_path, gguf(n_t=2**40), "claims")
    check(tmp_path, ok_file()[:-4], "truncated")


def test_hostile_metadata(tmp_path):
    check(tmp_path, gguf([struct.pack("<Q", 2**40)], n_kv=1), "limit")                           # absurd key length
    check(tmp_path, gguf([struct.pack("<Q", 5000)], n_kv=1), "truncated")                       # key longer than file
    check(tmp_path, gguf([kv("k", STR, struct.pack("<Q", 2**60))]), "limit")                     # huge string
    check(tmp_path, gguf([kv("k", ARR, struct.pack("<IQ", U32, 2**61))]), "truncated")           # array longer than file
    check(tmp_path, gguf([kv("k", ARR, struct.pack("<IQ", STR, 2**40))]), "claims")              # string array too
    check(tmp_path, gguf([kv("k", 99, b"")]), "unknown value type")
    check(tmp_path, gguf([kv("k", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U32, 0))]), "nested")
    check(tmp_path, gguf([kv("k", U32, struct.pack("<I", 1)), kv("k", U32, struct.pack("<I", 2))]), "twice")
    check(tmp_path, gguf([kv("k", STR, s("ok")[:8] + b"\xff\xfe")]), "UTF-8")
    check(tmp_path, gguf([kv("general.alignment", U32, struct.pack("<I", 24))]), "alignment")


def test_hostile_tensors(tmp_path):
    arch = [kv("general.architecture", STR, s("llama"))]
    check(tmp_path, gguf(arch, [tensor_info("w", [4] * 9)]), "9 dimensions")
    check(tmp_path, gguf(arch, [tensor_info("w", [2**32, 2**32, 2**31])]), "larger than the file")   # product overflows 64 bits
    check(tmp_path, gguf(arch, [tensor_info("w", [0, 4])]), "zero")
    check(tmp_path, gguf(arch, [tensor_info("w", [4, 2], gtype=999)]), "unknown type")
    check(tmp_path, gguf(arch, [tensor_info("w", [4, 2], offset=2**62)], data=b"\0" * 32), "truncated")
    check(tmp_path, gguf(arch, [tensor_info("w", [4, 2], offset=4)], data=b"\0" * 64), "aligned")
    check(tmp_path, gguf(arch, [tensor_info("w", [48, 1], gtype=2)], data=b"\0" * 64), "multiple")   # Q4_0 row of 48
    check(tmp_path, gguf(arch, [tensor_info("w", [4, 2]), tensor_info("w", [4, 2], offset=32)], data=b"\0" * 64), "twice")
    check(tmp_path, gguf(arch, [tensor_info("w", [4, 2])], data=b"\0" * 16), "truncated")


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")
    p = tmp_path / "k.gguf"
    p.write_bytes(gguf([kv("general.architecture", STR, s("llama"))], [tensor_info("w", [256, 1], gtype=21)], b"\0" * 110))
    f = GGUFFile(p)                                           # IQ3_S: readable, listed ...
    with pytest.raises(GGUFError, match="IQ3_S is not supported"):
        f.tensor("w")                                         # ... but not computed on
