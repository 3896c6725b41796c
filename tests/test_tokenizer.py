"""quantize.spm_model and runtime.tokenizer against sentencepiece itself.

The Tokenizer is built exactly the way a runtime builds it from a lazymoe GGUF:
load_spm_model output -> tokenizer.ggml.* keys -> Tokenizer.from_gguf_metadata.
"""
from __future__ import annotations

import os
import random
import struct
import time

import pytest

spm = pytest.importorskip("sentencepiece")
mistral_common = pytest.importorskip("mistral_common")

from lazymoe.format.tokens import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED  # noqa: E402
from lazymoe.quantize.spm_model import load_spm_model, parse_spm_model  # noqa: E402
from lazymoe.runtime.tokenizer import Tokenizer  # noqa: E402

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
MODELS = {
    "v1": os.path.join(DATA, "tokenizer.model.v1"),                                  # Mixtral 8x7B
    "v3": os.path.join(DATA, "mistral_instruct_tokenizer_240323.model.v3"),          # Mixtral 8x22B
}

TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "hello",
    " hello",
    "hello ",
    "  hello  ",
    "a  b   c    d",
    "x \n y",
    "\t\tindented\twith tabs\t",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it?\n",
    "def f(x):\n    if x > 0:\n        return x ** 2  # square\n    return -x\n\n\nclass A:\n\tpass\n",
    "Le cœur a ses raisons que la raison ne connaît point. « Déjà vu », dit-elle.",
    "Größenwahn: Straße, Fußgängerübergänge und Äpfel.",
    "我们今天去公园散步，天气很好。",
    "日本語のテキスト、カタカナとひらがな。東京タワー",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "emoji 😀🎉 and a family 👨‍👩‍👧‍👦, flags 🇫🇷🇩🇪, skin tone 👍🏽, keycap 1️⃣",
    "[INST] What is 2+2? [/INST]",
    "<s>[INST] hi [/INST] hello</s>",
    "<unk> <pad> [control_8] [TOOL_CALLS] <0x0A>",
    "see [REFERENCE_DOC_1] and[REFERENCE_DOC_19]x [REFERENCE_DOC_0 ",   # user-defined in v3
    "\x00nul\x01ctl\x7f",
    "\ufffd replacement and \u200b zero width and \u00a0 nbsp and \u2581 lower block",
    "    leading spaces and trailing spaces    ",
    "line1\r\nline2\rline3\n",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 and 𓀀 hieroglyph",
    " " * 100,
    "\n" * 50 + "end",
    "\t" * 20 + "x" + " \t \n " * 10,
]


def _random_text(rng: random.Random) -> str:
    """A random string over several Unicode ranges (no surrogates), with spaces and newlines."""
    out = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.3:
            cp = rng.randint(0x20, 0x7E)
        elif r < 0.4:
            cp = rng.choice([0x20, 0x20, 0x0A, 0x09, 0x0D])
        elif r < 0.6:
            cp = rng.randint(0x80, 0x7FF)
        elif r < 0.8:
            cp = rng.choice([rng.randint(0x800, 0xD7FF), rng.randint(0xE000, 0xFFFF)])
        else:
            cp = rng.randint(0x10000, 0x10FFFF)
        out.append(chr(cp))
    return "".join(out)


RANDOM_TEXTS = [_random_text(random.Random(seed)) for seed in range(300)]


def gguf_metadata(m) -> dict:
    """The tokenizer.ggml.* keys the quantizer writes for a SpmModel."""
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": m.pieces,
        "tokenizer.ggml.scores": m.scores,
        "tokenizer.ggml.token_type": m.types,
        "tokenizer.ggml.bos_token_id": m.bos_id,
        "tokenizer.ggml.eos_token_id": m.eos_id,
        "tokenizer.ggml.unknown_token_id": m.unk_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": m.add_dummy_prefix,
    }


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request):
    """(name, SpmModel, SentencePieceProcessor, Tokenizer) for one Mistral tokenizer."""
    path = MODELS[request.param]
    m = load_spm_model(path)
    sp = spm.SentencePieceProcessor(model_file=path)
    return request.param, m, sp, Tokenizer.from_gguf_metadata(gguf_metadata(m))


# ---- spm_model -----------------------------------------------------------------

def test_spm_model_matches_sentencepiece(pair):
    _, m, sp, _ = pair
    n = sp.get_piece_size()
    assert m.vocab_size == n
    assert m.pieces == [sp.id_to_piece(i) for i in range(n)]
    assert m.scores == [sp.get_score(i) for i in range(n)]      # both float32 -> float
    for i, t in enumerate(m.types):
        assert (t == CONTROL) == sp.is_control(i)
        assert (t == BYTE) == sp.is_byte(i)
        assert (t == UNKNOWN) == sp.is_unknown(i)
        assert (t == UNUSED) == sp.is_unused(i)
        assert t in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE)   # v3 has 20 user-defined
    assert (m.bos_id, m.eos_id, m.unk_id, m.pad_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())
    assert m.model_type == 2 and m.byte_fallback
    assert m.add_dummy_prefix and not m.remove_extra_whitespaces and m.escape_whitespaces
    assert m.normalizer_name == "identity" and not m.has_precompiled_charsmap


# A minimal protobuf encoder to build hostile and synthetic models.
def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _vi(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(v)


def _model_bytes(pieces, model_type=2, byte_fallback=False, trainer_extra=b"", normalizer=None) -> bytes:
    """ModelProto bytes: pieces is a list of (text, score, type)."""
    out = bytearray()
    for text, score, typ in pieces:
        sp_msg = _ld(1, text.encode()) + _key(2, 5) + struct.pack("<f", score)
        if typ != NORMAL:
            sp_msg += _vi(3, typ)
        out += _ld(1, sp_msg)
    trainer = _vi(3, model_type) + _vi(35, int(byte_fallback)) + _vi(40, 0) + _vi(41, 1) + _vi(42, 2) + _vi(43, -1)
    out += _ld(2, trainer + trainer_extra)
    if normalizer is None:
        normalizer = _ld(1, b"identity") + _vi(3, 1) + _vi(4, 0) + _vi(5, 1)
    out += _ld(3, normalizer)
    return bytes(out)


SMALL_PIECES = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)] + [
    (p, -float(i), NORMAL) for i, p in enumerate(
        ["▁t", "he", "▁the", "▁a", "in", "er", "▁w", "on", "an", "▁o", "re", "ing", "▁th", "▁wh", "at"])
] + [(c, -100.0 - i, NORMAL) for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz.,")]


def test_spm_model_synthetic_roundtrip():
    m = parse_spm_model(_model_bytes(SMALL_PIECES), "small")
    assert m.pieces == [p for p, _, _ in SMALL_PIECES]
    assert m.types[:3] == [UNKNOWN, CONTROL, CONTROL] and m.pad_id == -1
    assert m.scores[4] == -1.0


@pytest.mark.parametrize("data, words", [
    (b"", "no pieces"),
    (b"\x0a\x05abc", "claims 5 bytes"),                          # length past the end
    (b"\x0a" + b"\xff" * 11, "longer than 10 bytes"),             # runaway varint
    (b"\x0b\x00", "wire type 3"),                                # group wire type
    (b"\x00\x00", "number 0"),
    (_ld(1, _ld(1, b"\xff\xfe")), "UTF-8"),                      # piece text not UTF-8
    (_ld(1, _vi(2, 1)), "score"),                                # score with the wrong wire type
    (_ld(1, _ld(1, b"a") + _vi(3, 9)), "unknown type 9"),
    (_ld(1, _ld(1, b"a") + _key(2, 5) + b"\x00\x00"), "truncated"),
])
def test_spm_model_rejects_malformed(data, words):
    with pytest.raises(ValueError, match=words) as e:
        parse_spm_model(data, "bad.model")
    assert str(e.value).startswith("bad.model:")


def test_spm_model_rejects_wrong_model_type_and_bad_ids():
    with pytest.raises(ValueError, match="UNIGRAM; only BPE"):
        parse_spm_model(_model_bytes(SMALL_PIECES, model_type=1), "uni.model")
    with pytest.raises(ValueError, match="bos_id 99"):
        parse_spm_model(_model_bytes(SMALL_PIECES, trainer_extra=_vi(41, 99)), "ids.model")
    with pytest.raises(ValueError, match="256 byte pieces"):
        parse_spm_model(_model_bytes(SMALL_PIECES, byte_fallback=True), "bytes.model")
    with pytest.raises(ValueError, match="same piece"):
        parse_spm_model(_model_bytes(SMALL_PIECES + [("he", 0.0, NORMAL)]), "dup.model")


def test_spm_model_file_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_spm_model(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="cannot read"):
        load_spm_model(tmp_path)                                  # a directory
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.model"):
        load_spm_model(empty)


def test_spm_model_truncated_real_file(tmp_path):
    data = open(MODELS["v1"], "rb").read()
    # Pieces come first: any cut before the end of TrainerSpec leaves a bad length,
    # or a model without a BPE trainer spec. The last byte is inside NormalizerSpec.
    rng = random.Random(0)
    for cut in [1, 2, 3, 7, 100, len(data) - 1] + rng.sample(range(len(data) - 200), 6):
        p = tmp_path / "cut.model"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cut.model"):
            load_spm_model(p)


def test_spm_model_garbage_and_mutations():
    rng = random.Random(1)
    for _ in range(200):
        with pytest.raises(ValueError):
            parse_spm_model(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))), "garbage")
    base = bytearray(_model_bytes(SMALL_PIECES))
    for _ in range(500):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            parse_spm_model(bytes(data), "mutant")
        except ValueError:
            pass                                                  # the only exception allowed


# ---- tokenizer: encode -----------------------------------------------------------

def test_encode_matches_sentencepiece(pair):
    _, _, sp, tok = pair
    for t in TEXTS:
        assert tok.encode(t, bos=False) == sp.encode(t), repr(t)
        assert tok.encode(t) == [sp.bos_id()] + sp.encode(t), repr(t)


def test_encode_random_unicode_matches_sentencepiece(pair):
    _, _, sp, tok = pair
    for t in RANDOM_TEXTS:
        assert tok.encode(t, bos=False) == sp.encode(t), repr(t)


def test_control_text_is_spelled_out(pair):
    name, _, sp, tok = pair
    ids = tok.encode("[INST]<s></s>", bos=False)
    assert all(not sp.is_control(i) for i in ids)
    if name == "v3":
        assert tok.encode("[INST]", bos=False, special=True) == [3]


def test_encode_special_matches_mistral_common(pair):
    """Rendered chat text + special=True gives mistral_common's own chat tokens."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    name, _, _, tok = pair
    msgs = [SystemMessage(content="Be brief."), UserMessage(content="Hello, who are you?"),
            AssistantMessage(content="I am a bot."), UserMessage(content="Tell me a joke.")]
    if name == "v1":     # 8x7B: the system prompt goes before the first user message
        text = ("<s> [INST] Be brief.\n\nHello, who are you? [/INST] I am a bot.</s>"
                " [INST] Tell me a joke. [/INST]")
    else:                # 8x22B: [INST] are control tokens; system goes before the last user message
        text = "<s>[INST] Hello, who are you?[/INST] I am a bot.</s>[INST] Be brief.\n\nTell me a joke.[/INST]"
    ref = getattr(MistralTokenizer, name)().encode_chat_completion(ChatCompletionRequest(messages=msgs))
    assert tok.encode(text, bos=False, special=True) == ref.tokens


def test_encode_is_fast(pair):
    _, _, sp, tok = pair
    rng = random.Random(5)
    words = ["lazy", "experts", "routing", "token", "Mixtral", "über", "猫", "  ", "\n", "x=1;", "🙂"]
    text = " ".join(rng.choice(words) for _ in range(2000))[:4000]
    t0 = time.perf_counter()
    ids = tok.encode(text, bos=False)
    assert time.perf_counter() - t0 < 0.5
    assert ids == sp.encode(text)


# ---- tokenizer: decode and streaming ---------------------------------------------------

def test_decode_roundtrip(pair):
    _, _, sp, tok = pair
    for t in TEXTS + RANDOM_TEXTS:
        ids = sp.encode(t)
        assert tok.decode(ids) == sp.decode(ids), repr(t)
        if sp.decode(ids) == t:
            assert tok.decode(tok.encode(t)) == t


def _random_ids(rng: random.Random, tok: Tokenizer, byte_ids: list[int]) -> list[int]:
    """Id sequences rich in byte tokens (incl. invalid UTF-8), controls, <unk> and '▁' pieces."""
    space = tok.encode(" ", bos=False)[0]
    out = []
    for _ in range(rng.randint(0, 14)):
        r = rng.random()
        if r < 0.4:
            out.append(rng.choice(byte_ids))
        elif r < 0.55:
            out.extend(tok.encode(rng.choice(["é", "猫", "🙂", "👨‍👩‍👧"]), bos=False)[1:])
        elif r < 0.65:
            out.append(rng.choice([tok.bos_id, tok.eos_id, tok.unk_id, space]))
        else:
            out.append(rng.randrange(tok.vocab_size))
    return out


def test_decode_random_ids_matches_sentencepiece(pair):
    _, m, sp, tok = pair
    byte_ids = [i for i, t in enumerate(m.types) if t == BYTE]
    rng = random.Random(2)
    for _ in range(1500):
        ids = _random_ids(rng, tok, byte_ids)
        assert tok.decode(ids) == sp.decode(ids), (ids, [sp.id_to_piece(i) for i in ids])


def test_stream_concatenation_equals_decode(pair):
    _, m, sp, tok = pair
    byte_ids = [i for i, t in enumerate(m.types) if t == BYTE]
    rng = random.Random(3)
    seqs = [tok.encode(t) + [tok.eos_id] for t in TEXTS] + [_random_ids(rng, tok, byte_ids) for _ in range(800)]
    for ids in seqs:
        d = tok.stream()
        parts = [d.feed(i) for i in ids]
        assert "".join(parts) + d.flush() == tok.decode(ids), ids


def test_stream_holds_back_partial_characters(pair):
    _, _, _, tok = pair
    ids = tok.encode("a\U00013000", bos=False)     # "▁a" then 4 byte tokens (rare hieroglyph)
    d = tok.stream()
    parts = [d.feed(i) for i in ids]
    assert parts == ["a", "", "", "", "\U00013000"]
    assert d.flush() == ""
    # A truncated character at the end becomes U+FFFD per byte, as sentencepiece does.
    d = tok.stream()
    assert [d.feed(i) for i in ids[:3]] == ["a", "", ""]
    assert d.flush() == "\ufffd\ufffd"


def test_stream_drops_only_first_leading_space(pair):
    _, _, sp, tok = pair
    ids = [tok.bos_id] + sp.encode("Hello world") + [tok.eos_id]
    d = tok.stream()
    assert [d.feed(i) for i in ids][:2] == ["", "Hello"]
    ids = sp.encode(" two  spaces")
    assert tok.decode(ids) == sp.decode(ids) == " two  spaces"


# ---- tokenizer: construction ----------------------------------------------------------

def test_tokenizer_properties(pair):
    _, m, sp, tok = pair
    assert tok.vocab_size == sp.get_piece_size()
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.id_to_piece(1) == "<s>" and tok.byte_fallback
    with pytest.raises(ValueError, match="outside"):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_from_gguf_metadata_errors():
    m = parse_spm_model(_model_bytes(SMALL_PIECES), "small")
    md = gguf_metadata(m)
    Tokenizer.from_gguf_metadata(md)
    with pytest.raises(ValueError, match="'gpt2'"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="scores"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.scores": m.scores[:-1]})
    with pytest.raises(ValueError, match="eos_id 999"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.eos_token_id": 999})
    bad = dict(md)
    del bad["tokenizer.ggml.token_type"]
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.token_type"):
        Tokenizer.from_gguf_metadata(bad)
    with pytest.raises(ValueError, match="unknown type 7"):
        Tokenizer.from_gguf_metadata({**md, "tokenizer.ggml.token_type": [7] + m.types[1:]})


# ---- features the Mistral models do not use, checked on a synthetic model -------------

def test_synthetic_model_user_defined_unused_and_no_byte_fallback():
    """User-defined pieces, UNUSED pieces, <unk> runs and remove_extra_whitespaces,
    compared with sentencepiece loading the very same bytes."""
    pieces = SMALL_PIECES + [("▁the▁", -0.5, UNUSED), ("th", -0.1, UNUSED), ("<sep>", 0.0, USER_DEFINED),
                             ("▁▁", -3.0, NORMAL), ("at▁", -2.0, NORMAL)]
    for remove_ws in (False, True):
        normalizer = _ld(1, b"identity") + _vi(3, 1) + _vi(4, int(remove_ws)) + _vi(5, 1)
        data = _model_bytes(pieces, normalizer=normalizer)
        sp = spm.SentencePieceProcessor(model_proto=data)
        m = parse_spm_model(data, "synthetic")
        tok = Tokenizer(m.pieces, m.scores, m.types, 1, 2, 0, add_space_prefix=m.add_dummy_prefix,
                        remove_extra_whitespaces=m.remove_extra_whitespaces)
        assert not tok.byte_fallback
        rng = random.Random(4)
        texts = ["the cat at the door", "  what  is that?  ", "the<sep>the", "<sep>", "XYZ éé the", "",
                 "   ", "what the thing", "at the at<sep> the"]
        texts += ["".join(rng.choice("the wat<sep>XY  .") for _ in range(rng.randint(0, 25))) for _ in range(300)]
        for t in texts:
            ids = sp.encode(t)
            assert tok.encode(t, bos=False) == ids, (remove_ws, t)
            assert tok.decode(ids) == sp.decode(ids), (remove_ws, t)
