"""Byte-level BPE: quantize/hf_tokenizer.bpe_metadata (tokenizer.json -> tokenizer.ggml.*) and
runtime/bpe_tokenizer.BPETokenizer against Hugging Face `tokenizers` (the reference) and llama.cpp's tokenizer
on the same GGUF keys, for every pre-tokenizer we support: qwen2, llama-bpe, gpt-2/olmo (committed fixtures from
tests/fixtures/make_bpe.py) and llama.cpp's "default" (built here)."""
from __future__ import annotations

import json
import os
import random
import shutil
import unicodedata

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from lazymoe.format.chat_templates import QWEN3_TEMPLATE  # noqa: E402
from lazymoe.format.tokens import CONTROL, NORMAL, UNUSED, USER_DEFINED  # noqa: E402
from lazymoe.quantize.hf_tokenizer import bpe_metadata, is_byte_level_bpe  # noqa: E402
from lazymoe.runtime import bpe_tokenizer  # noqa: E402
from lazymoe.runtime.bpe_tokenizer import _BYTE_CHAR, BPETokenizer  # noqa: E402
from lazymoe.runtime.chat import render_chat  # noqa: E402
from lazymoe.runtime.tokenizer import load_tokenizer  # noqa: E402
from tests.helpers import FIXTURES  # noqa: E402

N_VOCAB = 2048          # more rows than the fixtures' ~2,000 tokens: the converter pads, as for Qwen
STYLES = ("qwen2", "llama3", "olmo")
PRE_OF = {"qwen2": "qwen2", "llama3": "llama-bpe", "olmo": "gpt-2"}


def _corpus() -> list[str]:
    fixed = [
        "def f(x):\n    return x**2  # square\n\n\n\tif a != b:\r\n\t\tpass\n",
        "class A(object):\n    '''doc'''\n    x = {'k': [1, 2, 3]}  ;;  y=0x1F >>= 2\n",
        "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
        "Быстрая коричневая лиса. 敏捷的棕色狐狸。今日は良い天気ですね。다람쥐 헌 쳇바퀴. الثعلب البني. שועל חום. तेज़ भूरी.",
        "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👍🏽 👨\u200d👩\u200d👧 🇫🇷 ❤️",
        "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 1,000,000 -12e-3 ½ ² ٣",
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n", " ", "  ", "\n", "\t", "a  b   c    ", "   lead", "trail   ",
        "------======= ''''''```````\"\"\"\"......!!!!!!?????? ~~~ |||| <<>> $$$ ^^^ +++",
        "e\u0301 cafe\u0301 Ａｂｃ ﬁ \u00c5 A\u030a",                       # NFC-sensitive (Qwen normalises)
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|endoftext|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<|padding|>x<|endoftext|>",
        "x" * 300, "ab" * 200 + " " * 100 + "\n" * 50, "",
    ]
    rng = random.Random(14)
    alphabet = list("abcXYZ 0123\n\t\r'sд我🚀.,!-_é") + ["\u0301", "\u200d", "<|im_end|>", "<think>", "<|endoftext|>",
                                                        "<|eot_id|>", "  ", "'ll"]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(200)]


CORPUS = _corpus()


def _pair(style: str):
    folder = os.path.join(FIXTURES, f"bpe-{style}")
    hf = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return hf, load_tokenizer(bpe_metadata(folder, N_VOCAB), folder)


@pytest.fixture(scope="module", params=STYLES)
def pair(request):
    return (request.param, *_pair(request.param))


def test_encode_decode_match_tokenizers(pair):
    style, hf, tok = pair
    assert tok.pre_name == PRE_OF[style]
    for text in CORPUS:
        ids = tok.encode(text, bos=False, special=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == hf.decode(ids), text


def test_bos_as_the_model_adds_it(pair):
    style, hf, tok = pair
    for text in CORPUS[:20]:
        assert tok.encode(text, bos=True, special=True) == hf.encode(text, add_special_tokens=True).ids
    assert tok.add_bos == (style == "llama3")


def _vocab_only_gguf(path: str, md: dict) -> str:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 64), ("feed_forward_length", 64),
                 ("attention.head_count", 4), ("attention.head_count_kv", 4)):
        w.add_uint32(f"llama.{k}", v)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for k, v in md.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v.tolist() if isinstance(v, np.ndarray) else v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama_cpp_agrees(tmp_path, md: dict, tok, nfc: bool) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = _vocab_only_gguf(str(tmp_path / "vocab.gguf"), md)
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    for text in CORPUS:
        text = unicodedata.normalize("NFC", text) if nfc else text      # llama.cpp does not normalise
        for special in (True, False):
            ours = tok.encode(text, bos=False, special=special)
            assert ours == llm.tokenize(text.encode(), add_bos=False, special=special), (text, special)


def test_llama_cpp_tokenizes_our_keys_the_same(pair, tmp_path):
    style, _, tok = pair
    _llama_cpp_agrees(tmp_path, bpe_metadata(os.path.join(FIXTURES, f"bpe-{style}"), N_VOCAB), tok, style == "qwen2")


@pytest.fixture(scope="module")
def default_pre(tmp_path_factory):
    """A tokenizer with llama.cpp's "default" pre-tokenizer: its four regexes as Hugging Face Splits."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    from tests.fixtures.make_bpe import corpus
    hf = tokenizers.Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(Regex(r.pattern), behavior="isolated") for r in bpe_tokenizer.PRE["default"].regexes]
    hf.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus()[:12], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("default")
    hf.save(str(folder / "tokenizer.json"))
    t = json.loads((folder / "tokenizer.json").read_text())
    vocab = t["model"]["vocab"]
    tokens = [None] * len(vocab)
    for k, i in vocab.items():
        tokens[i] = k
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": np.array([CONTROL] + [NORMAL] * (len(tokens) - 1), dtype=np.int32),
          "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in t["model"]["merges"]],
          "tokenizer.ggml.eos_token_id": 0}
    return hf, md


def test_default_pre_tokenizer(default_pre, tmp_path):
    hf, md = default_pre
    tok = load_tokenizer(md)
    for text in CORPUS:
        assert tok.encode(text, bos=False, special=True) == hf.encode(text, add_special_tokens=False).ids, text
    _llama_cpp_agrees(tmp_path, md, tok, nfc=False)


def test_stream_decode_holds_back_incomplete_characters(pair):
    style, hf, tok = pair
    for text in CORPUS:
        ids = tok.encode(text, bos=False, special=True)
        d = tok.stream()
        out = ""
        for i in ids:
            out += d.feed(i)
            assert "\ufffd" not in out                  # a valid text never shows a half character
        assert out + d.flush() == hf.decode(ids)


def test_invalid_utf8_across_tokens_decodes_as_tokenizers(pair):
    """Byte tokens in random order: invalid and truncated sequences split across stream boundaries give the
    U+FFFD that `tokenizers` gives (from_utf8_lossy), streamed or not."""
    _, hf, tok = pair
    byte_id = [tok._vocab[_BYTE_CHAR[b]] for b in range(256)]
    rng = random.Random(3)
    cases = [[0xE6], [0xE6, 0x88], [0x80], [0xF0, 0x9F, 0x9A], [0xF0, 0x9F, 0x9A, 0x80], [0xC3, 0x28], [0xED, 0xA0, 0x80],
             [0xF4, 0x90, 0x80, 0x80], [0xC0, 0xAF], [0xE6, 0x61, 0x88]]
    cases += [[rng.choice([0x61, 0x80, 0xBF, 0xC3, 0xE6, 0xF0, 0x9F, 0xFF]) for _ in range(rng.randint(1, 12))]
              for _ in range(300)]
    for bs in cases:
        ids = [byte_id[b] for b in bs]
        want = hf.decode(ids)
        assert want == bytes(bs).decode("utf-8", "replace")
        assert tok.decode(ids) == want, bs
        d = tok.stream()
        assert "".join(d.feed(i) for i in ids) + d.flush() == want, bs


def test_converter_keys(tmp_path):
    md = bpe_metadata(os.path.join(FIXTURES, "bpe-qwen2"), N_VOCAB)
    t = json.load(open(os.path.join(FIXTURES, "bpe-qwen2", "tokenizer.json"), encoding="utf-8"))
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    assert md["tokenizer.ggml.model"] == "gpt2" and len(tokens) == N_VOCAB == len(types)
    n = len(t["model"]["vocab"]) + len(t["added_tokens"])
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, N_VOCAB)] and set(types[n:]) == {UNUSED}
    ids = {a["content"]: a["id"] for a in t["added_tokens"]}
    assert types[ids["<|im_start|>"]] == CONTROL and types[ids["<think>"]] == USER_DEFINED
    assert md["tokenizer.ggml.eos_token_id"] == ids["<|im_end|>"] and md["tokenizer.ggml.padding_token_id"] == ids["<|endoftext|>"]
    assert "tokenizer.ggml.bos_token_id" not in md and md["tokenizer.ggml.add_bos_token"] is False
    assert md["tokenizer.ggml.merges"] == [" ".join(m) for m in t["model"]["merges"]]
    # config.json's ids fill what tokenizer_config.json leaves out; model_type olmo* names the pre-tokenizer olmo
    folder = tmp_path / "olmoe"
    shutil.copytree(os.path.join(FIXTURES, "bpe-olmo"), folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "olmoe", "bos_token_id": None, "eos_token_id": 7}))
    md = bpe_metadata(str(folder), N_VOCAB)
    assert md["tokenizer.ggml.pre"] == "olmo" and md["tokenizer.ggml.eos_token_id"] == 0      # tokenizer_config first
    md = bpe_metadata(os.path.join(FIXTURES, "bpe-llama3"), N_VOCAB)
    assert md["tokenizer.ggml.pre"] == "llama-bpe" and md["tokenizer.ggml.add_bos_token"] is True
    assert md["tokenizer.ggml.bos_token_id"] == 0


def test_which_folders_are_byte_level(tmp_path):
    assert all(is_byte_level_bpe(os.path.join(FIXTURES, f"bpe-{s}")) for s in STYLES)
    assert not is_byte_level_bpe(os.path.join(FIXTURES, "tiny-dense"))       # SentencePiece tokenizer.model only
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}}))
    assert not is_byte_level_bpe(str(tmp_path))                              # Mistral's tokenizer.json


def _hostile_folder(tmp_path, edit) -> str:
    folder = tmp_path / "hostile"
    shutil.copytree(os.path.join(FIXTURES, "bpe-qwen2"), folder, dirs_exist_ok=True)
    t = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    edit(t)
    (folder / "tokenizer.json").write_text(json.dumps(t), encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["model"]["vocab"].update({"zzz": 5000}), "id 5000, outside"),
    (lambda t: t["model"]["vocab"].update({"zzz": 5}), "id 5 is both"),
    (lambda t: t["model"]["vocab"].update({"zzz": "5"}), "not a non-empty text and an integer id"),
    (lambda t: t["model"].update(merges=["ab"]), "merge 'ab'"),
    (lambda t: t["model"].update(merges=[["a", 1]]), "merge"),
    (lambda t: t["model"].update(merges="a b"), "merges must be a non-empty list"),
    (lambda t: t["added_tokens"].append({"id": -1, "content": "<x>"}), "id -1, outside"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+"), "pre-tokenizer"),
    (lambda t: t.update(model=[]), "model.type must be BPE"),
])
def test_hostile_tokenizer_json_refused(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match) as e:
        bpe_metadata(_hostile_folder(tmp_path, edit), N_VOCAB)
    assert "\n" not in str(e.value)


def _keys(**over) -> dict:
    md = bpe_metadata(os.path.join(FIXTURES, "bpe-qwen2"), N_VOCAB)
    md.update({"tokenizer.ggml." + k: v for k, v in over.items()})
    return md


@pytest.mark.parametrize("over, match", [
    (dict(merges=["ab"]), "not two parts"),
    (dict(merges=["a "]), "not two parts"),
    (dict(merges=[7]), "ARRAY of"),
    (dict(pre="deepseek-llm"), "tokenizer.ggml.pre is 'deepseek-llm'"),
    (dict(eos_token_id=N_VOCAB), "eos_token_id 2048 is outside"),
    (dict(bos_token_id=-1), "bos_token_id"),
    (dict(token_type=np.full(N_VOCAB, 9, dtype=np.int32)), "unknown type 9"),
    (dict(token_type=np.full(3, 1, dtype=np.int32)), "token types"),
    (dict(tokens=[""] * N_VOCAB), "empty"),
    (dict(model="bert"), "'llama' \\(SentencePiece BPE\\) and 'gpt2'"),
])
def test_hostile_gguf_keys_refused(over, match):
    with pytest.raises(ValueError, match=match) as e:
        load_tokenizer(_keys(**over), "hostile.gguf")
    assert "\n" not in str(e.value)


def test_missing_keys_refused():
    md = _keys()
    del md["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match="lacks tokenizer.ggml.merges"):
        load_tokenizer(md, "f.gguf")


def test_hostile_merge_chains_match_tokenizers():
    """A vocabulary built to make BPE work hard (merges that chain "a" into runs up to 512 long, a word of 5,000
    "a"s and one of 20,000 symbols with no merges): bounded (heap BPE, O(n log n) per word) and still the ids
    `tokenizers` gives."""
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = [_BYTE_CHAR[b] for b in range(256)]
    runs = ["a" * k for k in range(2, 513)]
    vocab = {t: i for i, t in enumerate(alphabet + runs)}
    merges = [("a" * (k - 1), "a") for k in range(2, 513)]
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    tok = BPETokenizer(alphabet + runs, [NORMAL] * len(vocab), [" ".join(m) for m in merges], "gpt-2", None, 0)
    for text in ("a" * 5000, "a" * 513 + " " + "a" * 1023, "bcdefghij" * 2000):
        assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode("a" * 5000, bos=False)) == "a" * 5000


def test_word_cache_is_bounded(monkeypatch):
    _, tok = _pair("olmo")
    monkeypatch.setattr(bpe_tokenizer, "MAX_CACHE", 16)
    tok._cache.clear()
    tok.encode(" ".join(f"w{i}" for i in range(500)), bos=False)
    assert len(tok._cache) <= 16


def test_chatml_prompt_and_end_of_turn():
    _, tok = _pair("qwen2")
    hf, _ = _pair("qwen2")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"},
                {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"}, {"role": "user", "content": "2+2?"}]
    text = render_chat(messages, QWEN3_TEMPLATE, "<|endoftext|>", "<|im_end|>")
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n") and "hmm" not in text
    ids = tok.encode(text, bos=False, special=True)
    assert ids == hf.encode(text, add_special_tokens=False).ids
    im_start, im_end, eot = (tok._added[t] for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4
    assert tok.eog_ids == {tok.eos_id, im_end, eot} and tok.eos_id == im_end
    # control tokens in user text are spelled out without special=True, and decode to nothing with it
    assert im_start not in tok.encode("<|im_start|>", bos=False)
    assert tok.decode(ids).startswith("system\nBe brief.\nuser\nHi 👋\n")
    _, l3 = _pair("llama3")
    assert {l3.pieces[i] for i in l3.eog_ids} == {"<|eot_id|>", "<|end_of_text|>"}


def test_max_chars_bounds_the_encoding(pair):
    _, _, tok = pair
    for text in CORPUS:
        n = len(tok.encode(text, bos=False, special=True))
        assert len(text) <= tok.max_chars(n)
