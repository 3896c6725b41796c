"""Byte-level BPE tokenizers of Hugging Face folders (tokenizer.json + tokenizer_config.json) -> the
`tokenizer.ggml.*` keys llama.cpp's convert_hf_to_gguf.py writes (its `_set_vocab_gpt2`: `get_vocab_base`,
`get_vocab_base_pre`, and gguf-py's `SpecialVocab(load_merges=True)`), without transformers.

- tokens: id -> text for every id below n_vocab: the model's vocabulary and the added tokens; ids that have
  neither (Qwen's embedding has ~300 more rows than its tokenizer has tokens) become "[PAD{id}]" of type UNUSED.
- token_type: NORMAL for the model's vocabulary; an added token is CONTROL when it is special or looks special
  (<|...|>, as the converter's `does_token_look_special`), USER_DEFINED otherwise (Qwen3's <think>).
- merges: "left right" strings in rank order (the list-of-pairs form of newer tokenizer.json files is joined
  the same way, a space inside a part written as U+0120 as gguf-py does).
- pre: the converter names the pre-tokenizer by a hash of the real model's tokens for a fixed text, which only
  the real vocabulary reproduces; here it is recognised from tokenizer.json's pre_tokenizer itself: Qwen2's
  Split regex -> "qwen2", Llama 3's -> "llama-bpe", GPT-2's ByteLevel regex -> "gpt-2", or with an NFC
  normalizer (GPT-NeoX's tokenizer) "olmo" when config.json's model_type is an OLMo one, else "mpt" (the names
  the converter gives those tokenizers; llama.cpp splits all of them with GPT-2's regex). Anything else is
  refused in one line.
- bos/eos/unk/sep/pad ids: tokenizer_config.json's *_token text looked up among the added tokens, then
  config.json's *_token_id; add_bos/add_eos: a TemplateProcessing post-processor that starts with the BOS (Llama
  3), overridden by tokenizer_config.json's add_*_token.
The chat template is added by the caller (quantize/sources.py reads it for every tokenizer kind).
"""
from __future__ import annotations

import json
import os

import numpy as np

from lazymoe.format.checks import read_json_object
from lazymoe.format.metadata import MAX_MERGES, MAX_VOCAB
from lazymoe.format.tokens import CONTROL, NORMAL, UNUSED, USER_DEFINED

# Pre-tokenizer regexes as the models' tokenizer.json files spell them, and the name llama.cpp gives each.
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}

# gguf-py's SpecialVocab types and the GGUF key each is written to ("seperator" is the key's real spelling).
_SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
                 "pad": "padding_token_id", "cls": "cls_token_id", "mask": "mask_token_id"}

_G = "tokenizer.ggml."


def _byte_level(step) -> bool:
    return isinstance(step, dict) and step.get("type") == "ByteLevel"


def is_byte_level_bpe(folder: str) -> bool:
    """Whether `folder` has a tokenizer.json whose model is BPE with a ByteLevel pre-tokenizer (GPT-2 style:
    Qwen, Llama 3, OLMo), rather than the SentencePiece-style BPE (Metaspace, byte fallback) of Mistral's."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return False
    t = read_json_object(path)
    model, pre = t.get("model"), t.get("pre_tokenizer")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return False
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    return isinstance(steps, list) and any(_byte_level(s) for s in steps)


def _pre_name(t: dict, config: dict, where: str) -> str:
    pre = t.get("pre_tokenizer")
    if _byte_level(pre) and pre.get("use_regex", True):
        norm = t.get("normalizer")
        if not (isinstance(norm, dict) and norm.get("type") == "NFC"):
            return "gpt-2"
        mt = config.get("model_type")                 # GPT-NeoX's tokenizer: NFC, then GPT-2's regex
        return "olmo" if isinstance(mt, str) and mt.startswith("olmo") else "mpt"
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if isinstance(steps, list) and len(steps) == 2 and _byte_level(steps[1]) and not steps[1].get("use_regex", True):
        split = steps[0]
        pattern = split.get("pattern") if isinstance(split, dict) and split.get("type") == "Split" else None
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex in _SPLIT_PRE and split.get("behavior") == "Isolated" and not split.get("invert"):
            return _SPLIT_PRE[regex]
    raise ValueError(f"{where}: the pre-tokenizer {json.dumps(pre)[:120]} is not one lazymoe knows (expected "
                     f"Qwen2's or Llama 3's Split regex before ByteLevel, or GPT-2's ByteLevel)")


def _merges(model: dict, where: str) -> list[str]:
    merges = model.get("merges")
    if not isinstance(merges, list) or not merges:
        raise ValueError(f"{where}: model.merges must be a non-empty list")
    if len(merges) > MAX_MERGES:
        raise ValueError(f"{where}: {len(merges)} merges, more than the {MAX_MERGES} lazymoe reads")
    out = []
    for m in merges:
        if isinstance(m, str) and m.count(" ") == 1 and " " not in (m[0], m[-1]):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) and p for p in m):
            out.append(" ".join(p.replace(" ", "\u0120") for p in m))
        else:
            raise ValueError(f"{where}: merge {str(m)[:80]!r} is not 'left right' or a pair of strings")
    return out


def _add_bos_eos(t: dict) -> dict[str, bool]:
    """add_bos from a TemplateProcessing post-processor whose single template starts with a special token and
    add_eos from one that ends with one (the simple cases gguf-py's SpecialVocab recognises)."""
    out: dict[str, bool] = {}
    post = t.get("post_processor")
    if not isinstance(post, dict):
        return out
    procs = post.get("processors") if isinstance(post.get("processors"), list) else [post]
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single")
            if isinstance(single, list) and len(single) > 1:
                if isinstance(single[0], dict) and "SpecialToken" in single[0]:
                    out["bos"] = True
                if isinstance(single[-1], dict) and "SpecialToken" in single[-1]:
                    out["eos"] = True
    return out


def _looks_special(text: str) -> bool:
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>")) or \
        (text.startswith("<\uff5c") and text.endswith("\uff5c>"))


def bpe_metadata(folder: str, n_vocab: int) -> dict:
    """tokenizer.ggml.* keys (model "gpt2", pre, tokens, token_type, merges, special ids, add_bos/add_eos) of the
    byte-level BPE tokenizer in `folder`, padded to the model's n_vocab rows as llama.cpp pads it."""
    where = os.path.join(folder, "tokenizer.json")
    t = read_json_object(where)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    tc = read_json_object(cfg_path) if os.path.isfile(cfg_path) else {}
    conf_path = os.path.join(folder, "config.json")
    config = read_json_object(conf_path) if os.path.isfile(conf_path) else {}
    model = t.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{where}: model.type must be BPE")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{where}: model.vocab must be a non-empty object of token -> id")
    if not 0 < n_vocab <= MAX_VOCAB:
        raise ValueError(f"{where}: the model's vocabulary of {n_vocab} rows is outside 1..{MAX_VOCAB}")
    tokens: list[str | None] = [None] * n_vocab
    types = np.full(n_vocab, UNUSED, dtype=np.int32)

    def put(text, i, typ: int, what: str) -> None:
        if not isinstance(text, str) or not text or isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{where}: {what} {str(text)[:40]!r} -> {str(i)[:20]} is not a non-empty text and an integer id")
        if not 0 <= i < n_vocab:
            raise ValueError(f"{where}: {what} {text[:40]!r} has id {i}, outside the model's vocabulary of {n_vocab} rows")
        if tokens[i] is not None and tokens[i] != text:
            raise ValueError(f"{where}: id {i} is both {tokens[i][:40]!r} and {text[:40]!r}")
        tokens[i] = text
        types[i] = typ

    for text, i in vocab.items():
        put(text, i, NORMAL, "token")
    added = t.get("added_tokens") or []
    if not isinstance(added, list):
        raise ValueError(f"{where}: added_tokens must be a list")
    for a in added:
        if not isinstance(a, dict):
            raise ValueError(f"{where}: added token {str(a)[:40]!r} is not an object")
        text = a.get("content")
        special = a.get("special") is True or (isinstance(text, str) and _looks_special(text))
        put(text, a.get("id"), CONTROL if special else USER_DEFINED, "added token")
    if len(set(x for x in tokens if x is not None)) != sum(x is not None for x in tokens):
        raise ValueError(f"{where}: a token text appears under two ids")
    tokens = [x if x is not None else f"[PAD{i}]" for i, x in enumerate(tokens)]

    md = {
        _G + "model": "gpt2",
        _G + "pre": _pre_name(t, config, where),
        _G + "tokens": tokens,
        _G + "token_type": types,
        _G + "merges": _merges(model, where),
    }
    # special ids: tokenizer_config's token texts first, then config.json's ids (gguf-py's order)
    by_text = {a.get("content"): a.get("id") for a in added}
    ids: dict[str, int] = {}
    for typ in _SPECIAL_KEYS:
        entry = tc.get(f"{typ}_token")
        text = entry.get("content") if isinstance(entry, dict) else entry
        i = by_text.get(text) if isinstance(text, str) else None
        if i is not None:
            ids[typ] = i
    for typ in _SPECIAL_KEYS:
        i = config.get(f"{typ}_token_id")
        if typ not in ids and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_vocab:
            ids[typ] = i
    for typ, i in ids.items():
        md[_G + _SPECIAL_KEYS[typ]] = i
    add = _add_bos_eos(t)
    for typ in ("bos", "eos"):
        if isinstance(tc.get(f"add_{typ}_token"), bool):
            add[typ] = tc[f"add_{typ}_token"]
    for typ, v in add.items():
        md[_G + f"add_{typ}_token"] = v
    return md
