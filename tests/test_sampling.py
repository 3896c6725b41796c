"""Sampler and stop strings: exact behaviour on hand-made logits."""
from __future__ import annotations

import numpy as np
import pytest

from lazymoe.runtime.sampling import Sampler, StopStrings

LOGITS = np.array([1.0, 3.0, 2.0, -1.0, 2.5], dtype=np.float32)   # order by value: 1, 4, 2, 0, 3


def draws(s: Sampler, n=3000, logits=LOGITS, history=()):
    return np.bincount([s.sample(logits, history) for _ in range(n)], minlength=len(logits)) / n


def test_greedy():
    assert Sampler().sample(LOGITS) == 1
    assert Sampler(temperature=0, top_k=3, top_p=0.5, min_p=0.5, seed=1).sample(LOGITS) == 1


def test_repeat_penalty():
    # 3.0 / 2 = 1.5 < 2.5: token 4 wins once token 1 is penalised; negative logits are multiplied
    assert Sampler(repeat_penalty=2.0).sample(LOGITS, [1]) == 4
    z = np.array([-1.0, -1.5], dtype=np.float32)
    assert Sampler(repeat_penalty=2.0).sample(z, [0]) == 1
    # only the last 64 tokens count
    assert Sampler(repeat_penalty=2.0).sample(LOGITS, [1] + [3] * 64) == 1


def test_temperature_matches_softmax():
    p = np.exp(LOGITS / 0.7)
    p /= p.sum()
    got = draws(Sampler(temperature=0.7, seed=0))
    assert np.abs(got - p).max() < 0.03


def test_top_k_top_p_min_p_cut_the_tail():
    assert set(np.nonzero(draws(Sampler(temperature=1, top_k=2, seed=0), 500))[0]) == {1, 4}
    # softmax(LOGITS) sorted: 0.43, 0.26, 0.16, ... ; top_p 0.6 keeps the first two (0.69 >= 0.6)
    assert set(np.nonzero(draws(Sampler(temperature=1, top_p=0.6, seed=0), 500))[0]) == {1, 4}
    # min_p 0.5 keeps p >= 0.5 * p_max: e^-0.5 = 0.61 (token 4) and e^-1 = 0.37 (token 2 is out)
    assert set(np.nonzero(draws(Sampler(temperature=1, min_p=0.5, seed=0), 500))[0]) == {1, 4}
    assert set(np.nonzero(draws(Sampler(temperature=1, top_k=1, seed=0), 50))[0]) == {1}


def test_seed_repeats():
    s1, s2 = Sampler(temperature=1.5, seed=42), Sampler(temperature=1.5, seed=42)
    assert [s1.sample(LOGITS) for _ in range(50)] == [s2.sample(LOGITS) for _ in range(50)]


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("inf")), dict(temperature="1"),
                                dict(top_k=-1), dict(top_k=2.0), dict(top_k=True), dict(top_p=0.0),
                                dict(top_p=1.01), dict(min_p=-0.01), dict(min_p=1.5), dict(repeat_penalty=0),
                                dict(repeat_penalty=float("nan")), dict(seed=-1), dict(seed=1.5)])
def test_invalid_values(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_stop_strings():
    s = StopStrings(["</end>", "STOP"])
    assert s.push("hello </") == ("hello ", False)         # "</" might begin "</end>": held back
    assert s.push("em") == ("</em", False)                 # it did not
    assert s.push(" ST") == (" ", False)
    assert s.push("OP and more") == ("", True)
    s = StopStrings(["ab"])
    assert s.push("xa") == ("x", False) and s.flush() == "a"
    assert StopStrings().push("anything") == ("anything", False)
    assert StopStrings(["lo"]).push("hello world") == ("hel", True)
    for bad in ([""], [None], [3]):
        with pytest.raises(ValueError):
            StopStrings(bad)


def test_frequency_and_presence_penalties():
    # OpenAI's rule: z[j] -= c[j] * frequency + (c[j] > 0) * presence, c counting the sampler's own draws
    s = Sampler(frequency_penalty=0.3)
    assert [s.sample(LOGITS) for _ in range(4)] == [1, 1, 4, 1]     # 3.0 - 0.6 = 2.4 < 2.5; then 2.5 - 0.3 < 2.4
    assert s.counts == {1: 3, 4: 1}
    s = Sampler(presence_penalty=0.6)                               # once drawn, 1 -> 2.4 and 4 -> 1.9 for good
    assert [s.sample(LOGITS) for _ in range(4)] == [1, 4, 1, 1]
    s = Sampler(presence_penalty=1.2)                               # 1 -> 1.8, 4 -> 1.3: token 2 (2.0) wins
    assert [s.sample(LOGITS) for _ in range(4)] == [1, 4, 2, 1]
    assert Sampler(frequency_penalty=-2.0, presence_penalty=2.0).sample(LOGITS) == 1
    # the history passed in (the prompt) does not count, unlike repeat_penalty
    assert Sampler(presence_penalty=2.0).sample(LOGITS, [1, 1, 1]) == 1
    z = np.zeros(3, np.float32)
    s = Sampler(presence_penalty=-1.0)                              # negative values favour repeats
    assert [s.sample(z) for _ in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("kw", [dict(frequency_penalty=2.5), dict(presence_penalty=-2.01),
                                dict(frequency_penalty="0.5"), dict(presence_penalty=float("nan"))])
def test_invalid_penalties(kw):
    with pytest.raises(ValueError, match="penalty"):
        Sampler(**kw)
