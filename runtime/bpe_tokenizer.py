"""Byte-level BPE tokenizer (GPT-2 style: Qwen, Llama 3, OLMo) built from GGUF metadata
(`tokenizer.ggml.model = "gpt2"`, `.tokens`, `.token_type`, `.merges`, `.pre`).

Encoding gives the ids Hugging Face `tokenizers` gives for the model's tokenizer.json (and llama.cpp's
llm_tokenizer_bpe for the same GGUF):

  1. special=True: the text of CONTROL and USER_DEFINED tokens ("<|im_start|>", "<think>") is matched first,
     longest first, and becomes their ids; special=False matches only USER_DEFINED ones (llama.cpp's rule:
     control tokens in user text are spelled out).
  2. each fragment between them is normalised (NFC for "qwen2", as Qwen's tokenizer.json asks) and split into
     words by the pre-tokenizer's regexes (PRE below, from llama.cpp's src/llama-vocab.cpp, in the form the
     models' tokenizer.json files spell them); with several regexes each splits the pieces of the previous one,
     a match and the text between matches each becoming a piece.
  3. a word's UTF-8 bytes are mapped to GPT-2's printable byte alphabet and merged by BPE: repeatedly the
     adjacent pair with the lowest merge rank, the leftmost on ties. With ignore_merges (Llama 3) a word that is
     itself a token is taken whole. A final symbol that is not a token falls back to its byte tokens.

Decoding maps each token's text back to bytes through the same alphabet (a character outside it stands for its
own UTF-8), USER_DEFINED tokens give their text, CONTROL and UNUSED tokens give nothing, and the bytes are
decoded as UTF-8 with U+FFFD for each invalid sequence (Python's "replace", which is Rust's from_utf8_lossy,
what `tokenizers` uses). The stream decoder holds back an incomplete trailing character.

Work is bounded: BPE runs per word with a heap (O(n log n) in the word's bytes), results are cached per word in
a cache of bounded size, and a word is at most the whole (already size-checked) text.
"""
from __future__ import annotations

import codecs
import heapq
import operator
import unicodedata

import regex

from lazymoe.format.metadata import meta
from lazymoe.format.tokens import BYTE, CONTROL, NORMAL, TOKEN_TYPES, USER_DEFINED

_GGUF = "tokenizer.ggml."

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")


class Pre:
    """A pre-tokenizer: regexes applied in turn, NFC first or not, ignore_merges, and add_bos's default."""

    def __init__(self, regexes: tuple[str, ...], nfc: bool = False, ignore_merges: bool = False, add_bos: bool = False):
        self.regexes = tuple(regex.compile(r) for r in regexes)
        self.nfc, self.ignore_merges, self.add_bos = nfc, ignore_merges, add_bos


_QWEN2_PRE = Pre((_QWEN2,), nfc=True)
_LLAMA3_PRE = Pre((_LLAMA3,), ignore_merges=True, add_bos=True)
_GPT2_PRE = Pre((_GPT2,))
# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llama_vocab::impl::load groups the names.
PRE: dict[str, Pre] = {
    "qwen2": _QWEN2_PRE, "deepseek-r1-qwen": _QWEN2_PRE, "megrez": _QWEN2_PRE, "stablelm2": Pre((_QWEN2,)),
    "llama-bpe": _LLAMA3_PRE, "llama3": _LLAMA3_PRE, "llama-v3": _LLAMA3_PRE,
    "dbrx": Pre((_LLAMA3,)), "smaug-bpe": Pre((_LLAMA3,)),
    "gpt-2": _GPT2_PRE, "olmo": _GPT2_PRE, "mpt": _GPT2_PRE, "phi-2": _GPT2_PRE,
    "default": Pre((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
}

# Token texts llama.cpp ends generation on besides the eos id (its EOG list in llama_vocab::impl::load):
# a chat model's end-of-turn token (Qwen's <|im_end|>, Llama 3's <|eot_id|>) is rarely its eos.
EOG_TEXTS = frozenset(("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
                       "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"))

MAX_CACHE = 1 << 16          # words whose BPE result is kept (cleared when full)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes for U+0100 upwards in byte order (space is 'Ġ', newline 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


_BYTE_CHAR = bytes_to_unicode()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}
_BYTE_CHAR_STR = [_BYTE_CHAR[b] for b in range(256)]


class BPETokenizer:
    """Byte-level BPE over a GGUF vocabulary: tokens and types of length vocab_size, merges in rank order
    ("left right"); pre names the pre-tokenizer (PRE)."""

    def __init__(self, tokens, types, merges, pre: str, bos_id: int | None, eos_id: int, add_bos: bool | None = None,
                 where: str = "GGUF"):
        tokens = [str(t) for t in tokens]
        types = [int(t) for t in types]
        n = len(tokens)
        if n == 0:
            raise ValueError(f"{where}: the tokenizer vocabulary is empty")
        if len(types) != n:
            raise ValueError(f"{where}: the tokenizer has {n} tokens but {len(types)} token types")
        if pre not in PRE:
            raise ValueError(f"{where}: tokenizer.ggml.pre is {pre[:40]!r}; lazymoe knows {', '.join(sorted(PRE))}")
        self.pre_name, self._pre = pre, PRE[pre]
        ids = []
        for name, i in (("eos_token_id", eos_id), ("bos_token_id", eos_id if bos_id is None else bos_id)):
            try:
                i = operator.index(i)
            except TypeError:
                raise ValueError(f"{where}: tokenizer {name} must be an integer, got {i!r}") from None
            if not 0 <= i < n:
                raise ValueError(f"{where}: tokenizer {name} {i} is outside the vocabulary of {n} tokens")
            ids.append(i)
        self.eos_id, self.bos_id = ids                  # no BOS id (OLMo files may lack one): the EOS stands in
        self.add_bos = self._pre.add_bos if add_bos is None else bool(add_bos)
        self.pieces, self.types = tokens, types

        self._vocab: dict[str, int] = {}       # NORMAL token text -> id: what BPE produces
        self._added: dict[str, int] = {}       # CONTROL / USER_DEFINED text -> id: matched whole in the text
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if not t:
                raise ValueError(f"{where}: tokenizer token {i} is empty")
            if ty not in TOKEN_TYPES:
                raise ValueError(f"{where}: tokenizer token {i} ({t[:40]!r}) has unknown type {ty}")
            if ty in (NORMAL, BYTE):
                self._vocab.setdefault(t, i)     # the first id wins, as in llama.cpp's token_to_id
            elif ty in (CONTROL, USER_DEFINED):
                self._added.setdefault(t, i)
        self._ranks: dict[tuple[str, str], int] = {}
        for r, m in enumerate(merges):
            if not isinstance(m, str):
                raise ValueError(f"{where}: merge {r} is not a string")
            k = m.find(" ", 1)                   # llama.cpp splits at the first space after the first character
            if k < 0 or k == len(m) - 1:
                raise ValueError(f"{where}: merge {r} ({m[:40]!r}) is not two parts separated by a space")
            self._ranks.setdefault((m[:k], m[k + 1:]), r)
        self._byte_ids = [self._vocab.get(_BYTE_CHAR_STR[b]) for b in range(256)]
        self._all_bytes = all(i is not None for i in self._byte_ids)
        self._bytes: list[bytes | None] = [self._token_bytes(t, ty) for t, ty in zip(tokens, types)]
        self._max_token_chars = max(len(b) for b in self._bytes if b is not None) if any(self._bytes) else 1
        self.eog_ids = frozenset([self.eos_id] + [i for t, i in self._added.items() if t in EOG_TEXTS])
        self._special_re: dict[bool, regex.Pattern | None] = {}
        self._cache: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _token_bytes(text: str, typ: int) -> bytes | None:
        if typ in (NORMAL, BYTE):
            return b"".join(bytes([_CHAR_BYTE[c]]) if c in _CHAR_BYTE else c.encode("utf-8", "surrogatepass")
                            for c in text)
        if typ == USER_DEFINED:
            return text.encode("utf-8", "surrogatepass")
        return None                              # CONTROL, UNUSED, UNKNOWN: no text

    @classmethod
    def from_gguf_metadata(cls, md: dict, where: str = "GGUF") -> BPETokenizer:
        for key in ("tokens", "token_type", "merges", "eos_token_id"):
            if _GGUF + key not in md:
                raise ValueError(f"{where}: metadata lacks {_GGUF + key}, needed by the 'gpt2' tokenizer")
        get = lambda key, *default: meta(md, _GGUF + key, where, *default)
        return cls(get("tokens"), get("token_type"), get("merges"), get("pre", "default"),
                   bos_id=get("bos_token_id", None), eos_id=get("eos_token_id"), add_bos=get("add_bos_token", None),
                   where=where)

    # ---- the Tokenizer interface (runtime/tokenizer.py) --------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def is_control(self, i: int) -> bool:
        return self.types[i] == CONTROL

    def max_chars(self, n_tokens: int) -> int:
        """The most characters n_tokens tokens can encode: a token covers at most its own length in bytes (NFC
        may fold up to 4 characters into one first). Unbounded when a byte has no token (its text is dropped)."""
        if not self._all_bytes:
            return 1 << 62
        return n_tokens * self._max_token_chars * (4 if self._pre.nfc else 1)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < len(self.pieces):
            raise ValueError(f"token id {i} is outside the vocabulary of {len(self.pieces)} tokens")
        return self.pieces[i]

    # ---- encoding ---------------------------------------------------------------

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`; BOS first when bos and the model adds one (tokenizer.ggml.add_bos_token, or the
        pre-tokenizer's default: Llama 3 adds it, Qwen and GPT-2 do not). special=True turns the text of control
        tokens into their ids (for rendered chat prompts, never for user text); added non-control tokens
        (USER_DEFINED) are matched either way."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos and self.add_bos else []
        pat = self._special(special)
        pos = 0
        if pat is not None:
            for m in pat.finditer(text):
                self._encode_fragment(text[pos:m.start()], ids)
                ids.append(self._added[m.group()])
                pos = m.end()
        self._encode_fragment(text[pos:], ids)
        return ids

    def _special(self, control: bool) -> regex.Pattern | None:
        if control not in self._special_re:
            alts = sorted((t for t, i in self._added.items() if control or self.types[i] == USER_DEFINED),
                          key=len, reverse=True)
            self._special_re[control] = regex.compile("|".join(regex.escape(a) for a in alts)) if alts else None
        return self._special_re[control]

    def _words(self, text: str) -> list[str]:
        pieces = [text]
        for rx in self._pre.regexes:
            out = []
            for p in pieces:
                pos = 0
                for m in rx.finditer(p):
                    if m.start() > pos:
                        out.append(p[pos:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def _encode_fragment(self, text: str, ids: list[int]) -> None:
        if not text:
            return
        if self._pre.nfc:
            text = unicodedata.normalize("NFC", text)
        cache = self._cache
        for w in self._words(text):
            got = cache.get(w)
            if got is None:
                try:
                    b = w.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("text to encode contains a lone surrogate, which is not valid Unicode") from None
                got = self._bpe("".join(_BYTE_CHAR_STR[x] for x in b))
                if len(cache) >= MAX_CACHE:
                    cache.clear()
                cache[w] = got
            ids.extend(got)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """BPE of one byte-mapped word -> ids (llama.cpp's llm_tokenizer_bpe_session::tokenize, per word)."""
        vocab = self._vocab
        if self._pre.ignore_merges and word in vocab:
            return (vocab[word],)
        syms = list(word)
        n = len(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        ranks = self._ranks
        heap: list[tuple[int, int, int, int]] = []      # (rank, left, right, merged length)

        def push(left: int, right: int) -> None:
            if left >= 0 and right >= 0:
                r = ranks.get((syms[left], syms[right]))
                if r is not None:
                    heapq.heappush(heap, (r, left, right, len(syms[left]) + len(syms[right])))

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or nxt[left] != right or len(a) + len(b) != size:
                continue                                  # stale: one side has merged since
            syms[left], syms[right] = a + b, ""
            r = nxt[right]
            nxt[left] = r
            if r >= 0:
                prev[r] = left
            push(prev[left], left)
            push(left, r)

        out = []
        i = 0
        while i != -1:
            s = syms[i]
            t = vocab.get(s)
            if t is not None:
                out.append(t)
            else:                                         # not a token: its bytes' tokens (missing ones dropped)
                out.extend(self._byte_ids[_CHAR_BYTE[c]] for c in s if self._byte_ids[_CHAR_BYTE[c]] is not None)
            i = nxt[i]
        return tuple(out)

    # ---- decoding ---------------------------------------------------------------

    def decode(self, ids) -> str:
        """Text of token ids (control tokens give no text, as `tokenizers`' decode(skip_special_tokens=True))."""
        d = BPEStreamDecoder(self)
        return "".join(d.feed(i) for i in ids) + d.flush()

    def stream(self) -> BPEStreamDecoder:
        """A decoder to feed one id at a time (for printing tokens as they are generated)."""
        return BPEStreamDecoder(self)


class BPEStreamDecoder:
    """Incremental decode: feed(id) returns the text now certain; "".join(feed(i) for i in ids) + flush() ==
    tokenizer.decode(ids). Bytes of an incomplete UTF-8 character wait for the next token."""

    def __init__(self, tokenizer: BPETokenizer):
        self.tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        tok = self.tok
        if not 0 <= token_id < tok.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {tok.vocab_size} tokens")
        b = tok._bytes[token_id]
        return self._dec.decode(b) if b else ""

    def flush(self) -> str:
        """Text of held-back bytes (an incomplete character becomes U+FFFD)."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

