"""benchmarks/routing.py's statistics on a hand-made trace with known answers."""
import numpy as np

from lazymoe.benchmarks.routing import expert_load, repeated_assignment


def test_repeated_assignment_and_load():
    # 4 tokens, 2 layers, top-2 of 4 experts
    ids = np.array([
        [[0, 1], [2, 3]],
        [[0, 2], [1, 0]],     # layer 0: first choice repeats, shares 0; layer 1: nothing shared
        [[3, 0], [0, 3]],     # layer 0: new first choice, shares 0; layer 1: new first, shares 0
        [[3, 1], [0, 2]],     # layer 0: repeats; layer 1: repeats
    ], np.int16)
    first, shared = repeated_assignment(ids)
    assert np.allclose(first, [2 / 3, 1 / 3]) and np.allclose(shared, [1.0, 2 / 3])
    load = expert_load(ids, 4)
    assert np.allclose(load[0], [3 / 8, 2 / 8, 1 / 8, 2 / 8]) and np.allclose(load.sum(1), 1)
