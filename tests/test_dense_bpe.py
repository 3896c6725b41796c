"""The dense Llama 3 case: tests/fixtures/tiny-dense-bpe (LlamaForCausalLM, byte-level BPE with the "llama-bpe"
pre-tokenizer, an embedding padded past the tokenizer, tie_word_embeddings) converted by lazymoe's quantizer
without output.weight (what llama.cpp's converter writes for a tied head), run by lazymoe and by llama.cpp against
transformers' golden logits (tests/make_golden.py)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from lazymoe import load_model
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.runtime.chat import chat_prompt_ids
from tests.fixtures.make_bpe import LLAMA3_TEMPLATE
from tests.helpers import FIXTURES, cli

FX = "tiny-dense-bpe"
GOLDEN_RTOL = 1e-4      # F32: float32 accumulation order only (as tests/test_runtime.py)
MEAN_RTOL = 0.01        # Q8_0: the activation is rounded to Q8_0 blocks too


def _golden(ty: str):
    return np.load(os.path.join(FIXTURES, "golden", f"{FX}-{ty}.npz"))


def test_converted_keys(converted):
    with GGUFFile(converted(FX, "f32")) as g:
        md = g.metadata
        assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "llama-bpe"
        assert len(md["tokenizer.ggml.tokens"]) == 2048 and md["tokenizer.ggml.tokens"][-1] == "[PAD2047]"
        assert md["tokenizer.ggml.bos_token_id"] == 0 and md["tokenizer.ggml.eos_token_id"] == 4   # <|eot_id|>
        assert md["tokenizer.ggml.add_bos_token"] is True and md["tokenizer.chat_template"] == LLAMA3_TEMPLATE


@pytest.mark.parametrize("ty", ["f32", "q8_0"])
def test_tied_head_runs_like_transformers(converted, ty):
    gold = _golden(ty)
    ref, scale = gold["logits"], np.abs(gold["logits"]).max()
    path = converted(FX, ty)            # tie_word_embeddings: written without output.weight, as llama.cpp does
    with GGUFFile(path) as g:
        assert "output.weight" not in g.tensors
        file_bytes = sum(t.nbytes for t in g.tensors.values())
    m = load_model(path, ctx=64, progress=False)
    try:
        assert m.net.w.output is m.net.w.token_embd and m.net.w.output[0].name == ty   # the quantized embedding
        got = m.logits(gold["ids"])
        assert got.shape == ref.shape
        if ty == "f32":
            assert np.abs(got - ref).max() <= GOLDEN_RTOL * scale
        assert np.abs(got - ref).mean() <= MEAN_RTOL * scale
        assert m.net.w.resident_bytes == file_bytes                 # dense: every tensor resident, the head once
    finally:
        m.close()


@pytest.mark.parametrize("ty", ["f32", "q8_0"])
def test_llama_cpp_runs_the_tied_file(converted, tmp_path, ty):
    pytest.importorskip("llama_cpp")
    from tests.helpers import llama_logits
    gold = _golden(ty)
    got = llama_logits(converted(FX, ty), [int(i) for i in gold["ids"]])
    want = gold["logits"]
    assert np.abs(got - want).max() / np.abs(want).max() < (2e-3 if ty == "f32" else 0.25)
    assert (got.argmax(1) == want.argmax(1)).mean() >= (1.0 if ty == "f32" else 0.85)


def test_llama_cpp_tokenizes_the_converted_file_the_same(converted):
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.test_bpe_tokenizer import CORPUS
    path = converted(FX, "q8_0")
    m = load_model(path, ctx=64, progress=False)
    llm = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    try:
        for text in CORPUS:
            for special in (True, False):
                assert m.tokenizer.encode(text, bos=True, special=special) == \
                    llm.tokenize(text.encode(), add_bos=True, special=special), (text, special)
    finally:
        m.close()


def test_chat_and_generation(converted):
    m = load_model(converted(FX, "q8_0"), ctx=128, progress=False)
    try:
        tok = m.tokenizer
        ids = chat_prompt_ids([{"role": "user", "content": "Hi!"}], m.chat_template, tok, 128)
        eot, begin = tok.eos_id, tok.bos_id
        assert ids[0] == begin and ids.count(eot) == 1 and tok.pieces[ids[-1]] == "\u010a\u010a"   # "\n\n" after the header
        assert {tok.pieces[i] for i in tok.eog_ids} == {"<|eot_id|>", "<|end_of_text|>"}
        text = "".join(m.generate("def main():", max_tokens=8, temperature=0))
        assert isinstance(text, str)
    finally:
        m.close()


def test_cli_runs_the_tied_file(converted, tmp_path):
    rc, out, err = cli("run", converted(FX, "q8_0"), "-p", "Hello", "-n", "4", "--temp", "0")
    assert rc == 0, err


def test_quantize_refuses_a_broken_tokenizer_json(tmp_path):
    import json
    import shutil
    src = tmp_path / "src"
    shutil.copytree(os.path.join(FIXTURES, FX), src)
    t = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    t["model"]["vocab"]["zz"] = 99999
    (src / "tokenizer.json").write_text(json.dumps(t), encoding="utf-8")
    out = tmp_path / "out.gguf"
    rc, _, err = cli("quantize", str(src), "-o", str(out))
    assert rc == 2 and err.count("\n") == 1 and "id 99999, outside the model's vocabulary of 2048 rows" in err
    assert not out.exists()
