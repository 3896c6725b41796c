"""Read a SentencePiece `tokenizer.model` without sentencepiece or protobuf.

The quantizer copies the vocabulary into GGUF's `tokenizer.ggml.*` keys and must
not depend on sentencepiece, so this module parses the protobuf wire format by
hand. Only the fields lazymoe needs are read (numbers from sentencepiece_model.proto):

    ModelProto       1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece    1 piece (string), 2 score (float), 3 type (enum, default NORMAL=1)
    TrainerSpec      3 model_type (default UNIGRAM=1), 35 byte_fallback (false),
                     40 unk_id (0), 41 bos_id (1), 42 eos_id (2), 43 pad_id (-1)
    NormalizerSpec   1 name, 2 precompiled_charsmap, 3 add_dummy_prefix (true),
                     4 remove_extra_whitespaces (true), 5 escape_whitespaces (true)

Every other field is skipped by wire type. The file is untrusted: each varint and
length is bounds-checked and any defect raises one ValueError naming the file.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from lazymoe.format.checks import open_regular
from lazymoe.format.tokens import BYTE, NORMAL, TOKEN_TYPES, UNKNOWN

# TrainerSpec.ModelType
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
BPE = 2

# Real tokenizer.model files are 0.5-5 MB; anything far larger is not one.
MAX_FILE_BYTES = 64 << 20

_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class SpmModel:
    """The parts of a SentencePiece model the quantizer and tokenizer need.

    pieces/scores/types are parallel lists of length vocab_size; types use the
    SentencePiece numbering (NORMAL=1 ... BYTE=6). bos_id/eos_id/pad_id are -1
    when disabled.
    """
    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    model_type: int
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    normalizer_name: str
    has_precompiled_charsmap: bool

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)


class _WireError(Exception):
    """A defect in the protobuf bytes; turned into a ValueError naming the file."""


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at buf[pos:end]; returns (value, new_pos)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _WireError("a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _WireError("a varint is longer than 10 bytes")


def _fields(buf: bytes, pos: int, end: int):
    """Yield (field_number, wire_type, value) for the message in buf[pos:end].

    value is an int for varints, bytes for fixed32/fixed64, and a (start, stop)
    slice of buf for length-delimited fields (so sub-messages are not copied).
    """
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _WireError("a field has number 0")
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(buf, pos, end)
        elif wire == _WIRE_LEN:
            n, pos = _read_varint(buf, pos, end)
            if n > end - pos:
                raise _WireError(f"field {field} claims {n} bytes but only {end - pos} remain")
            value = (pos, pos + n)
            pos += n
        elif wire == _WIRE_FIXED32:
            if end - pos < 4:
                raise _WireError(f"fixed32 field {field} is truncated")
            value = buf[pos:pos + 4]
            pos += 4
        elif wire == _WIRE_FIXED64:
            if end - pos < 8:
                raise _WireError(f"fixed64 field {field} is truncated")
            value = buf[pos:pos + 8]
            pos += 8
        else:
            raise _WireError(f"field {field} has unsupported wire type {wire}")
        yield field, wire, value


def _int32(field: int, wire: int, value) -> int:
    """An int32/enum field: low 32 bits of the varint, two's complement."""
    if wire != _WIRE_VARINT:
        raise _WireError(f"field {field} should be a varint, got wire type {wire}")
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _bool(field: int, wire: int, value) -> bool:
    if wire != _WIRE_VARINT:
        raise _WireError(f"field {field} should be a varint, got wire type {wire}")
    return value != 0


def _string(buf: bytes, field: int, wire: int, value) -> str:
    if wire != _WIRE_LEN:
        raise _WireError(f"field {field} should be a string, got wire type {wire}")
    try:
        return buf[value[0]:value[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise _WireError(f"string field {field} is not valid UTF-8") from None


def _piece(buf: bytes, start: int, stop: int, index: int) -> tuple[str, float, int]:
    """Parse one ModelProto.SentencePiece message -> (piece, score, type)."""
    piece, score, ptype = None, 0.0, NORMAL
    for field, wire, value in _fields(buf, start, stop):
        if field == 1:
            piece = _string(buf, field, wire, value)
        elif field == 2:
            if wire != _WIRE_FIXED32:
                raise _WireError(f"score of piece {index} should be a float, got wire type {wire}")
            score = struct.unpack("<f", value)[0]
        elif field == 3:
            ptype = _int32(field, wire, value)
    if not piece:
        raise _WireError(f"piece {index} has no text")
    if "\0" in piece:
        raise _WireError(f"piece {index} contains a NUL character")
    if ptype not in TOKEN_TYPES:
        raise _WireError(f"piece {index} ({piece!r}) has unknown type {ptype}")
    return piece, score, ptype


def _parse(buf: bytes) -> dict:
    """Parse ModelProto bytes into plain values (raises _WireError)."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    # Repeated occurrences of a sub-message merge; for scalars the last one wins.
    trainer = {3: 1, 35: False, 40: 0, 41: 1, 42: 2, 43: -1}
    normalizer = {1: "", 2: False, 3: True, 4: True, 5: True}
    seen_pieces = False
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field in (1, 2, 3) and wire != _WIRE_LEN:
            raise _WireError(f"top-level field {field} should be a message, got wire type {wire}")
        if field == 1:
            seen_pieces = True
            p, s, t = _piece(buf, value[0], value[1], len(pieces))
            pieces.append(p)
            scores.append(s)
            types.append(t)
        elif field == 2:
            for f, w, v in _fields(buf, value[0], value[1]):
                if f in (3, 40, 41, 42, 43):
                    trainer[f] = _int32(f, w, v)
                elif f == 35:
                    trainer[f] = _bool(f, w, v)
        elif field == 3:
            for f, w, v in _fields(buf, value[0], value[1]):
                if f == 1:
                    normalizer[f] = _string(buf, f, w, v)
                elif f == 2:
                    if w != _WIRE_LEN:
                        raise _WireError(f"precompiled_charsmap should be bytes, got wire type {w}")
                    normalizer[f] = v[1] > v[0]
                elif f in (3, 4, 5):
                    normalizer[f] = _bool(f, w, v)
    if not seen_pieces:
        raise _WireError("it has no pieces (is it a SentencePiece model?)")
    return {
        "pieces": pieces, "scores": scores, "types": types,
        "model_type": trainer[3], "byte_fallback": trainer[35],
        "unk_id": trainer[40], "bos_id": trainer[41], "eos_id": trainer[42], "pad_id": trainer[43],
        "normalizer_name": normalizer[1], "has_precompiled_charsmap": normalizer[2],
        "add_dummy_prefix": normalizer[3], "remove_extra_whitespaces": normalizer[4],
        "escape_whitespaces": normalizer[5],
    }


def parse_spm_model(data: bytes, name: str = "<bytes>") -> SpmModel:
    """Parse the bytes of a SentencePiece BPE model; `name` is used in error messages."""
    try:
        d = _parse(bytes(data))
    except _WireError as e:
        raise ValueError(f"{name}: not a valid SentencePiece model: {e}") from None
    n = len(d["pieces"])
    if d["model_type"] != BPE:
        kind = MODEL_TYPES.get(d["model_type"], f"unknown type {d['model_type']}")
        raise ValueError(f"{name}: SentencePiece model type is {kind}; only BPE models are supported")
    if not 0 <= d["unk_id"] < n:
        raise ValueError(f"{name}: unk_id {d['unk_id']} is outside the vocabulary of {n} pieces")
    for key in ("bos_id", "eos_id", "pad_id"):
        if not -1 <= d[key] < n:
            raise ValueError(f"{name}: {key} {d[key]} is outside the vocabulary of {n} pieces")
    if d["types"][d["unk_id"]] != UNKNOWN:
        raise ValueError(f"{name}: unk_id {d['unk_id']} points at a piece that is not of type UNKNOWN")
    if len(set(d["pieces"])) != n:
        raise ValueError(f"{name}: the vocabulary holds the same piece text twice")
    if d["byte_fallback"] and d["types"].count(BYTE) != 256:
        raise ValueError(f"{name}: byte_fallback is set but there are not 256 byte pieces")
    return SpmModel(**d)


def load_spm_model(path: str | os.PathLike) -> SpmModel:
    """Read a SentencePiece `tokenizer.model` file (BPE models only).

    Raises ValueError (one sentence naming the file) for a missing, oversized,
    truncated or malformed file, or a model type other than BPE.
    """
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: {size} bytes is too large for a SentencePiece model "
                             f"(limit {MAX_FILE_BYTES})")
        with os.fdopen(open_regular(os.fspath(path)), "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read SentencePiece model: {e.strerror or e}") from None
    return parse_spm_model(data, str(path))
