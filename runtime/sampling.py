"""Choosing the next token from logits, and stopping.

Order (llama.cpp's default chain): penalties (repetition, frequency, presence) -> top-k -> top-p -> min-p
-> temperature -> draw. Temperature 0 is greedy: argmax after the penalties.
"""
from __future__ import annotations

import numpy as np

from lazymoe.format.checks import number, whole_number

REPEAT_LAST_N = 64      # tokens of history the repetition penalty looks at (llama.cpp's default)


class Sampler:
    """Stateful sampler: `sample(logits [V], history)` -> token id. A seed makes draws repeatable.

    frequency_penalty and presence_penalty are OpenAI's: the logit of token j drops by
    c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, where c[j] counts how often this sampler has
    drawn j (the generated text, not the prompt); both in [-2, 2], 0 turns them off."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repeat_penalty: float = 1.0, seed: int | None = None, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0):
        self.temperature = number(temperature, "temperature", 0.0, 100.0)
        self.top_k = whole_number(top_k, "top_k", 0, hint=" (0 turns it off)")
        self.top_p = number(top_p, "top_p", 0.0, 1.0, lo_open=True)
        self.min_p = number(min_p, "min_p", 0.0, 1.0)
        self.repeat_penalty = number(repeat_penalty, "repeat_penalty", 0.0, 100.0, lo_open=True)
        self.frequency_penalty = number(frequency_penalty, "frequency_penalty", -2.0, 2.0)
        self.presence_penalty = number(presence_penalty, "presence_penalty", -2.0, 2.0)
        self.counts: dict[int, int] = {}                            # token id -> times drawn
        if seed is not None:
            whole_number(seed, "seed", 0)
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, history=()) -> int:
        z = np.array(logits, dtype=np.float64)                      # [V], a copy we may edit
        if self.repeat_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history[-REPEAT_LAST_N:], dtype=np.int64))
            v = z[seen]
            z[seen] = np.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        if (self.frequency_penalty or self.presence_penalty) and self.counts:
            ids = np.fromiter(self.counts, np.int64, len(self.counts))
            c = np.fromiter(self.counts.values(), np.float64, len(self.counts))
            z[ids] -= c * self.frequency_penalty + self.presence_penalty
        tok = self._draw(z)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        return tok

    def _draw(self, z: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(z))
        ids = np.argsort(-z, kind="stable")                         # [V] best first
        if self.top_k:
            ids = ids[:self.top_k]
        zs = z[ids]
        p = np.exp(zs - zs[0])
        p /= p.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), self.top_p)) + 1   # smallest prefix with mass >= top_p
            ids, zs, p = ids[:keep], zs[:keep], p[:keep]
        if self.min_p > 0.0:
            keep = p >= self.min_p * p[0]
            ids, zs = ids[keep], zs[keep]
        p = np.exp((zs - zs[0]) / self.temperature)
        p /= p.sum()
        return int(ids[self.rng.choice(len(ids), p=p)])


class StopStrings:
    """Hold back text that might begin a stop string; report when one appears.

    push(text) -> (text safe to show, stopped). Text from the stop string on is dropped.
    """

    def __init__(self, stops=()):
        stops = [] if stops is None else list(stops)
        for s in stops:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty text, got {s!r}")
        self.stops = stops
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        self.buf += text
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf = self.buf[:cut], ""
            return out, True
        hold = 0   # longest tail of buf that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:n]):
                    hold = n
                    break
        out = self.buf[:len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out
