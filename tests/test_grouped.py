"""The grouped expert kernel (kernels/grouped.py) against the per-expert path (kernels.expert_ffn / _batch) and the
float64 reference of tests/test_kernels.py, for every type mix those tests use (schemes mixed inside one expert)."""
import numpy as np
import pytest

from lazymoe import kernels as K
from lazymoe.kernels.grouped import combine, group_layout, grouped_ffn, sort_assignments
from tests.helpers import synth_gguf
from tests.test_kernels import FFN_TIGHT, FFN_TYPES, K_FFN_TYPES, ffn_bound, ffn_reference, weights

RNG = np.random.default_rng(77)


def arena_of(types, E, d, f):
    """E experts of types (gate, up, down) at scattered offsets in one uint8 arena: (arena, offs [E, 3], float64 refs)."""
    mats = [[weights(t, shp) for t, shp in zip(types, ((f, d), (f, d), (d, f)))] for _ in range(E)]
    chunks, offs, at = [], np.zeros((E, 3), np.int64), 0
    for e in RNG.permutation(E):                                  # not in id order, with gaps between matrices
        for i, (w, _) in enumerate(mats[e]):
            pad = int(RNG.integers(0, 3)) * 64
            chunks.append(np.zeros(pad, np.uint8))
            at += pad
            offs[e, i] = at
            chunks.append(np.ascontiguousarray(w).view(np.uint8).reshape(-1))
            at += w.nbytes
    return np.concatenate(chunks), offs, mats


def routes(T, E, A):
    top = np.stack([RNG.choice(E, A, replace=False) for _ in range(T)])          # [T, A]
    wt = RNG.random((T, A)).astype(np.float32)
    return top, wt / wt.sum(1, keepdims=True)


def per_expert(types, mats, X, top, wt):
    out = np.zeros_like(X)
    for e in np.unique(top):
        rows, rank = np.nonzero(top == e)
        (w1, _), (w3, _), (w2, _) = mats[e]
        Y = K.expert_ffn_batch(types[0], w1, types[1], w3, types[2], w2, np.ascontiguousarray(X[rows]))
        out[rows] += wt[rows, rank][:, None] * Y
    return out


def reference(mats, X, top, wt):
    out = np.zeros(X.shape, np.float64)
    for t in range(X.shape[0]):
        for a, e in enumerate(top[t]):
            (_, W1), (_, W3), (_, W2) = mats[e]
            out[t] += wt[t, a] * ffn_reference(W1, W3, W2, X[t].astype(np.float64))
    return out


CASES = [(t, 128, 352) for t in FFN_TYPES] + [(t, 256, 768) for t in K_FFN_TYPES]


@pytest.mark.parametrize("types,d,f", CASES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_grouped_against_per_expert_and_reference(types, d, f, tokens):
    E, A = 6, 3
    arena, offs, mats = arena_of(types, E, d, f)
    layout = group_layout(*types, f, d)
    X = RNG.standard_normal((tokens, d)).astype(np.float32)
    top, wt = routes(tokens, E, A)
    experts, gs, tok, w = sort_assignments(top, wt)
    Y = grouped_ffn(layout, arena, offs[experts], gs, X, tok)
    out = combine(tok, w, Y, np.zeros_like(X))
    want = per_expert(types, mats, X, top, wt)
    assert np.linalg.norm(out - want) <= FFN_TIGHT * np.linalg.norm(want)
    ref = reference(mats, X, top, wt)
    assert np.linalg.norm(out - ref) <= ffn_bound(types, X) * np.linalg.norm(ref)


def test_groups_split_across_calls_give_the_same_bits():
    """An expert's rows do not depend on which experts share its call or on the tokens' count per group,
    so computing the ready experts first and the rest later (the cache's overlap) gives the same output."""
    types, d, f, E = ("q4_k", "q4_k", "q6_k"), 256, 768, 8
    arena, offs, mats = arena_of(types, E, d, f)
    layout = group_layout(*types, f, d)
    X = RNG.standard_normal((5, d)).astype(np.float32)
    top, wt = routes(5, E, 4)
    experts, gs, tok, w = sort_assignments(top, wt)
    Y = grouped_ffn(layout, arena, offs[experts], gs, X, tok)
    half = len(experts) // 2
    Y2 = np.empty_like(Y)
    for g0, g1 in ((0, half), (half, len(experts))):
        s, e = gs[g0], gs[g1]
        Y2[s:e] = grouped_ffn(layout, arena, offs[experts[g0:g1]], gs[g0:g1 + 1] - s, X, tok[s:e])
    assert np.array_equal(Y, Y2)


def test_sort_assignments():
    top = np.array([[3, 1], [1, 0]])
    wt = np.array([[0.75, 0.25], [0.5, 0.5]], np.float32)
    experts, gs, tok, w = sort_assignments(top, wt)
    assert experts.tolist() == [0, 1, 3] and gs.tolist() == [0, 1, 3, 4]
    assert tok.tolist() == [1, 0, 1, 0] and w.tolist() == [0.5, 0.25, 0.5, 0.75]


def test_bad_inputs():
    types, d, f = ("q4_k", "q4_k", "q6_k"), 256, 256
    arena, offs, _ = arena_of(types, 2, d, f)
    layout = group_layout(*types, f, d)
    X = np.ones((1, d), np.float32)
    gs, tok = np.array([0, 1, 2]), np.array([0, 0])
    bad = [
        lambda: grouped_ffn(layout, arena[:-1], offs, gs, X, tok),                      # last matrix past the end
        lambda: grouped_ffn(layout, arena, offs - offs.min() - 1, gs, X, tok),          # a negative offset
        lambda: grouped_ffn(layout, arena, offs, np.array([0, 2, 2]), X, tok),          # an empty group
        lambda: grouped_ffn(layout, arena, offs, gs, X, np.array([0, 1])),              # token 1 of a 1-token X
        lambda: grouped_ffn(layout, arena, offs, gs, np.ones((1, 128), np.float32), tok),
        lambda: group_layout("q4_k", "q4_k", "q6_k", 128, 256),                         # down rows of 128: not a block
        lambda: group_layout("iq3_s", "q4_k", "q6_k", 256, 256),
    ]
    for f_ in bad:
        with pytest.raises(ValueError) as err:
            f_()
        assert str(err.value) and "\n" not in str(err.value)


def test_network_grouped_against_per_expert(tmp_path, monkeypatch):
    """A fine-grained model (16 experts, top-4, K-quant experts in one layer): the grouped network against its
    per-expert path, prompt and decoding, and identical logits under a budget of the fewest slots (each layer's
    experts then arrive in several acquire calls)."""
    import lazymoe.runtime.model
    from lazymoe import load_model
    from lazymoe.runtime.network import Network
    from tests.helpers import min_budget
    from tests.test_runtime import PROCESS_ESTIMATE
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)
    kq = {"blk.0.ffn_gate_exps.weight": "q4_k", "blk.0.ffn_up_exps.weight": "q4_k", "blk.0.ffn_down_exps.weight": "q6_k"}
    p = synth_gguf(tmp_path / "fine.gguf", D=256, F=256, E=16, A=4, types=kq)
    ids = list(range(1, 60))
    roomy = load_model(p, ram_budget="2G", ctx=128, progress=False)
    tight = load_model(p, ram_budget=min_budget(p, 128), ctx=128, progress=False)
    a, b = roomy.logits(ids), tight.logits(ids)
    assert np.array_equal(a, b) and tight.experts.evictions > 0
    roomy.rewind(0)
    steps = [roomy.eval([i]) for i in ids[:6]]
    monkeypatch.setattr(Network, "grouped", False)
    per = load_model(p, ram_budget="2G", ctx=128, progress=False)
    c = per.logits(ids)
    assert np.abs(a - c).max() <= 1e-3 * np.abs(c).max()
    per.rewind(0)
    for s, i in zip(steps, ids[:6]):
        d = per.eval([i])
        assert np.abs(s - d).max() <= 1e-3 * np.abs(d).max()
