"""SentencePiece-compatible BPE tokenizer built from GGUF metadata (no sentencepiece at run time).

Encoding reproduces `sentencepiece.SentencePieceProcessor.encode` for BPE models
with an identity normalizer (every Mistral/Mixtral tokenizer):

  1. normalize: ' ' (U+0020 only; tabs and newlines stay) -> '▁' (U+2581) and a
     dummy '▁' in front when add_space_prefix; an empty text stays empty. When
     remove_extra_whitespaces is set (not for Mistral models) leading and
     trailing spaces are dropped and runs of spaces collapse to one first.
  2. split into Unicode characters; user-defined pieces are matched whole
     (longest match) and never merged further.
  3. BPE: repeatedly merge the adjacent pair whose concatenation is a NORMAL,
     USER_DEFINED or UNUSED piece with the highest score; ties go to the
     leftmost pair. CONTROL, UNKNOWN and BYTE pieces never take part, so text
     such as "[INST]" or "<s>" is spelled out, never turned into the control id.
     Merges into UNUSED pieces are undone at the end (sentencepiece "resegment").
  4. a symbol that is not in the vocabulary becomes the byte tokens <0xXX> of its
     UTF-8 bytes (byte_fallback), or one <unk> per run of unknown symbols.

Decoding follows SentencePieceProcessor.decode: control ids give no text, the
unknown id gives " ⁇ ", runs of byte tokens are decoded one character at a time
with each invalid byte becoming U+FFFD, '▁' becomes ' ', and the leading '▁' of
the first piece that produces text is dropped.
"""
from __future__ import annotations

import heapq
import operator
import re

from lazymoe.format.metadata import meta
from lazymoe.format.tokens import BYTE, CONTROL, NORMAL, TOKEN_TYPES, UNKNOWN, UNUSED, USER_DEFINED

SPACE = "\u2581"
UNK_SURFACE = " \u2047 "
REPLACEMENT = "\ufffd"

_GGUF = "tokenizer.ggml."


def _utf8_len(lead: int) -> int:
    """Bytes a UTF-8 sequence with this lead byte claims; 0 for bytes that cannot lead."""
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 0


def _decode_bytes(buf: bytes | bytearray, final: bool) -> tuple[str, int]:
    """Decode byte-token bytes the way sentencepiece's ProcessBytePieces does.

    Characters are taken one at a time; a byte that does not start a complete,
    valid character becomes U+FFFD and only that byte is consumed. With
    final=False a trailing, still-completable prefix is left undecoded.
    Returns (text, bytes consumed).
    """
    out = []
    pos, n = 0, len(buf)
    while pos < n:
        need = _utf8_len(buf[pos])
        if need == 1:
            out.append(chr(buf[pos]))
            pos += 1
            continue
        if need and pos + need > n and not final and all(0x80 <= b < 0xC0 for b in buf[pos + 1:]):
            break  # may still become a valid character
        if need and pos + need <= n:
            try:
                out.append(bytes(buf[pos:pos + need]).decode("utf-8"))
                pos += need
                continue
            except UnicodeDecodeError:
                pass
        out.append(REPLACEMENT)
        pos += 1
    return "".join(out), pos


class Tokenizer:
    """SentencePiece BPE tokenizer over a GGUF vocabulary.

    pieces, scores, types: parallel sequences of length vocab_size (types in
    SentencePiece/GGUF numbering NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4
    UNUSED=5 BYTE=6). Byte fallback is on when all 256 "<0xXX>" BYTE pieces exist.
    """

    def __init__(self, pieces, scores, types, bos_id: int, eos_id: int, unk_id: int,
                 add_space_prefix: bool = True, add_bos: bool = True,
                 remove_extra_whitespaces: bool = False):
        pieces = [str(p) for p in pieces]
        scores = [float(s) for s in scores]
        types = [int(t) for t in types]
        n = len(pieces)
        if n == 0:
            raise ValueError("tokenizer vocabulary is empty")
        if len(scores) != n or len(types) != n:
            raise ValueError(f"tokenizer has {n} pieces but {len(scores)} scores and {len(types)} types")
        checked = []
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("unk_id", unk_id)):
            try:
                i = operator.index(i)               # int or numpy integer
            except TypeError:
                raise ValueError(f"tokenizer {name} must be an integer, got {i!r}") from None
            if not 0 <= i < n:
                raise ValueError(f"tokenizer {name} {i} is outside the vocabulary of {n} pieces")
            checked.append(i)
        bos_id, eos_id, unk_id = checked
        self.pieces = pieces
        self.scores = scores
        self.types = types
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.add_space_prefix = bool(add_space_prefix)
        self.add_bos = bool(add_bos)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)

        # sentencepiece's two maps: pieces_ (mergeable) and reserved_id_map_ (the rest).
        self._vocab: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._user_defined: dict[str, int] = {}
        self._byte_value: dict[int, int] = {}          # id -> byte for BYTE pieces
        byte_ids = [-1] * 256
        for i, (p, t) in enumerate(zip(pieces, types)):
            if not p:
                raise ValueError(f"tokenizer piece {i} is empty")
            if t not in TOKEN_TYPES:
                raise ValueError(f"tokenizer piece {i} ({p!r}) has unknown type {t}")
            target = self._vocab if t in (NORMAL, USER_DEFINED, UNUSED) else self._reserved
            if p in target:
                raise ValueError(f"tokenizer piece {p!r} appears twice (ids {target[p]} and {i})")
            target[p] = i
            if t == USER_DEFINED:
                self._user_defined[p] = i
            elif t == BYTE:
                if len(p) != 6 or not (p.startswith("<0x") and p.endswith(">")):
                    raise ValueError(f"tokenizer byte piece {i} is {p!r}, expected the form <0xXX>")
                try:
                    b = int(p[3:5], 16)
                except ValueError:
                    raise ValueError(f"tokenizer byte piece {i} is {p!r}, expected the form <0xXX>") from None
                self._byte_value[i] = b
                byte_ids[b] = i
        self.byte_fallback = all(i >= 0 for i in byte_ids)
        self._byte_ids = byte_ids
        self._max_user_len = max((len(p) for p in self._user_defined), default=0)
        self._max_piece_len = max(len(p) for p in pieces)
        self._special = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t in (CONTROL, UNKNOWN)}
        self._special_pattern: re.Pattern | None = None
        self.eog_ids = frozenset((eos_id,))              # ids that end generation

    @classmethod
    def from_gguf_metadata(cls, md: dict, where: str = "GGUF") -> Tokenizer:
        """Build from GGUF key/values (`tokenizer.ggml.*`, each typed by format/metadata.py); `where` names the
        file in errors."""
        model = meta(md, _GGUF + "model", where, None)
        if model != "llama":
            raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}; expected 'llama' (SentencePiece BPE)")
        for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
            if _GGUF + key not in md:
                raise ValueError(f"{where}: metadata lacks {_GGUF + key}, needed by the 'llama' tokenizer")
        get = lambda key, *default: meta(md, _GGUF + key, where, *default)
        return cls(get("tokens"), get("scores"), get("token_type"),
                   bos_id=get("bos_token_id"), eos_id=get("eos_token_id"), unk_id=get("unknown_token_id"),
                   add_space_prefix=get("add_space_prefix", True), add_bos=get("add_bos_token", True),
                   remove_extra_whitespaces=get("remove_extra_whitespaces", False))

    def max_chars(self, n_tokens: int) -> int:
        """The most characters of text that n_tokens tokens can encode: each token covers at most the longest
        piece (byte tokens cover less). Unbounded (a huge number) when runs of unknown symbols collapse into
        one <unk> (no byte fallback) or extra whitespace is removed."""
        if not self.byte_fallback or self.remove_extra_whitespaces:
            return 1 << 62
        return n_tokens * self._max_piece_len

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < len(self.pieces):
            raise ValueError(f"token id {i} is outside the vocabulary of {len(self.pieces)} pieces")
        return self.pieces[i]

    def is_control(self, i: int) -> bool:
        return self.types[i] == CONTROL

    # ---- encoding -------------------------------------------------------------

    def _normalize(self, text: str, dummy_prefix: bool) -> str:
        if self.remove_extra_whitespaces:
            text = " ".join(t for t in text.split(" ") if t)
        if not text:
            return ""
        text = text.replace(" ", SPACE)
        return SPACE + text if dummy_prefix else text

    def _split(self, norm: str) -> tuple[list[str], list[bool]]:
        """Characters of `norm`, with user-defined pieces kept whole -> (symbols, frozen)."""
        if not self._user_defined:
            return list(norm), [False] * len(norm)
        syms, frozen = [], []
        pos, n = 0, len(norm)
        while pos < n:
            for ln in range(min(self._max_user_len, n - pos), 0, -1):
                if norm[pos:pos + ln] in self._user_defined:
                    syms.append(norm[pos:pos + ln])
                    frozen.append(True)
                    pos += ln
                    break
            else:
                syms.append(norm[pos])
                frozen.append(False)
                pos += 1
        return syms, frozen

    def encode(self, text: str, bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`, the same as SentencePieceProcessor.encode(text), with BOS first if bos.

        special=True additionally turns the text of control and unknown pieces
        ("<s>", "</s>", "[INST]" in tokenizer v3, ...) into their ids. The text
        between them is encoded piece by piece and only a piece at the very start
        of `text` gets the dummy '▁' prefix (Hugging Face's non-legacy rule, which
        the Mixtral chat templates are written for; llama.cpp instead prefixes
        every piece that follows a special token). Use it for rendered chat
        prompts, never for user-supplied text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = [self.bos_id] if bos else []
        if not special:
            self._encode_plain(text, ids, self.add_space_prefix)
            return ids
        pos = 0
        for m in self._special_re().finditer(text):
            self._encode_plain(text[pos:m.start()], ids, self.add_space_prefix and pos == 0)
            ids.append(self._special[m.group()])
            pos = m.end()
        self._encode_plain(text[pos:], ids, self.add_space_prefix and pos == 0)
        return ids

    def _special_re(self) -> re.Pattern:
        if self._special_pattern is None:
            # Longest text first, so that the alternation prefers the longest match.
            alts = sorted(self._special, key=len, reverse=True)
            self._special_pattern = re.compile("|".join(re.escape(a) for a in alts))
        return self._special_pattern

    def _encode_plain(self, text: str, ids: list[int], dummy_prefix: bool) -> None:
        """Append the sentencepiece encoding of `text` to ids."""
        norm = self._normalize(text, dummy_prefix)
        if not norm:
            return
        syms, frozen = self._split(norm)
        n = len(syms)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        vocab, scores, types = self._vocab, self.scores, self.types
        unused_parts: dict[str, tuple[str, str]] = {}
        # Agenda: (-score, left, right, merged length); heapq pops the best score,
        # then the leftmost pair. Stale entries are skipped when popped.
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0 or frozen[left] or frozen[right]:
                return
            a, b = syms[left], syms[right]
            i = vocab.get(a + b)
            if i is None:
                return
            heapq.heappush(heap, (-scores[i], left, right, len(a) + len(b)))
            if types[i] == UNUSED:
                unused_parts[a + b] = (a, b)

        for i in range(1, n):
            push(i - 1, i)

        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or len(a) + len(b) != size:
                continue
            syms[left] = a + b
            syms[right] = ""
            r = nxt[right]
            nxt[left] = r
            if r >= 0:
                prev[r] = left
            push(prev[left], left)
            push(left, r)

        out_pieces: list[str] = []

        def resegment(w: str) -> None:
            i = vocab.get(w)
            if i is not None and types[i] == UNUSED and w in unused_parts:
                a, b = unused_parts[w]
                resegment(a)
                resegment(b)
            else:
                out_pieces.append(w)

        i = 0
        while i != -1:
            resegment(syms[i])
            i = nxt[i]

        reserved, unk, byte_ids = self._reserved, self.unk_id, self._byte_ids
        prev_unk = False
        for w in out_pieces:
            i = reserved.get(w)
            if i is None:
                i = vocab.get(w, unk)
            if i == unk and self.byte_fallback:
                try:
                    ids.extend(byte_ids[b] for b in w.encode("utf-8"))
                except UnicodeEncodeError:
                    raise ValueError("text to encode contains a lone surrogate, which is not valid Unicode") from None
                continue
            if i == unk and prev_unk:
                continue  # without byte fallback, a run of unknown symbols is one <unk>
            prev_unk = i == unk
            ids.append(i)

    # ---- decoding -------------------------------------------------------------

    def _piece_text(self, i: int, is_bos_ws: bool) -> tuple[str, bool]:
        """Surface text of non-byte piece i and whether it consumed the leading '▁'."""
        t = self.types[i]
        if t == CONTROL:
            return "", False
        if t == UNKNOWN:
            return UNK_SURFACE, False
        p = self.pieces[i]
        had_ws = False
        if is_bos_ws and (self.add_space_prefix or self.remove_extra_whitespaces) and p.startswith(SPACE):
            p = p[1:]
            had_ws = not self.remove_extra_whitespaces
        return p.replace(SPACE, " "), had_ws

    def decode(self, ids) -> str:
        """Text of token ids, the same as SentencePieceProcessor.decode(ids)."""
        d = StreamDecoder(self)
        parts = [d.feed(i) for i in ids]
        parts.append(d.flush())
        return "".join(parts)

    def stream(self) -> StreamDecoder:
        """A decoder to feed one id at a time (for printing tokens as they are generated)."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decode: feed(id) returns the text that is now certain.

    Multi-byte characters spelled with byte tokens are held back until complete.
    "".join(feed(i) for i in ids) + flush() == tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self._pending = bytearray()     # byte-token bytes not yet turned into text
        self._text_seen = False         # any text produced so far
        self._bos_ws_seen = False       # the previous non-byte piece consumed the leading '▁'
        self._is_bos_ws = True          # a leading '▁' may still be dropped

    def feed(self, token_id: int) -> str:
        tok = self.tok
        if not 0 <= token_id < tok.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {tok.vocab_size} pieces")
        b = tok._byte_value.get(token_id)
        if b is not None:
            self._pending.append(b)
            text, used = _decode_bytes(self._pending, final=False)
            del self._pending[:used]
            self._text_seen |= bool(text)
            return text
        out = self.flush()
        if self._bos_ws_seen or self._text_seen:
            self._is_bos_ws = False
        text, self._bos_ws_seen = tok._piece_text(token_id, self._is_bos_ws)
        self._text_seen |= bool(text)
        return out + text

    def flush(self) -> str:
        """Text of held-back bytes (each byte of an incomplete character becomes U+FFFD)."""
        if not self._pending:
            return ""
        text, _ = _decode_bytes(self._pending, final=True)
        self._pending.clear()
        self._text_seen |= bool(text)
        return text


def load_tokenizer(md: dict, where: str = "GGUF"):
    """The tokenizer tokenizer.ggml.model names: "llama" (SentencePiece BPE: Mistral, Mixtral) -> Tokenizer,
    "gpt2" (byte-level BPE: Qwen, Llama 3, OLMo) -> runtime/bpe_tokenizer.BPETokenizer. Both have encode(text, bos,
    special), decode, stream(), vocab_size, pieces, types, is_control, max_chars, bos_id, eos_id and eog_ids."""
    model = meta(md, _GGUF + "model", where, None)
    if model == "gpt2":
        from lazymoe.runtime.bpe_tokenizer import BPETokenizer
        return BPETokenizer.from_gguf_metadata(md, where)
    if model == "llama":
        return Tokenizer.from_gguf_metadata(md, where)
    raise ValueError(f"{where}: tokenizer.ggml.model is {str(model)[:40]!r}; lazymoe reads 'llama' (SentencePiece "
                     f"BPE) and 'gpt2' (byte-level BPE)")
