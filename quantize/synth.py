"""GGUF files of random but numerically sane weights: the exact shapes, names and metadata of
Mixtral 8x7B / 8x22B (real-size models without downloading them), or of any ModelConfig (the
tiny models the tests run, and hostile files the loader must refuse).

Weights are written directly as blocks (no float tensor is ever made for them), one expert
at a time, through the same streaming writer as `quantize`, so the full 8x7B at Q4_0
(24.6 GiB) is written in minutes with little memory. Random weights route almost uniformly:
expert-cache hit rates measured on them are a lower bound for a trained model.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from lazymoe.format.config import ModelConfig
from lazymoe.format.tokens import BYTE, CONTROL, NORMAL, UNKNOWN
from lazymoe.kernels.qtypes import QType, qtype
from lazymoe.kernels.quantizers import WRITES
from lazymoe.quantize.mixes import block_type, ftype, is_expert, tensor_types
from lazymoe.quantize.sources import Source, TensorPlan, model_metadata

SHAPES = {
    "mixtral-8x7b": ModelConfig(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=32000,
                                n_ctx_train=32768, rms_eps=1e-5, rope_theta=1e6, n_expert=8, n_expert_used=2),
    "mixtral-8x22b": ModelConfig(n_layer=56, n_embd=6144, n_ff=16384, n_head=48, n_head_kv=8, n_vocab=32768,
                                 n_ctx_train=65536, rms_eps=1e-5, rope_theta=1e6, n_expert=8, n_expert_used=2),
    # Qwen3-MoE (Hugging Face config.json of Qwen/Qwen3-30B-A3B and Qwen3-235B-A22B): head_dim 128 != D / H
    "qwen3-30b-a3b": ModelConfig(n_layer=48, n_embd=2048, n_ff=768, n_head=32, n_head_kv=4, n_vocab=151936,
                                 n_ctx_train=40960, rms_eps=1e-6, rope_theta=1e6, n_expert=128, n_expert_used=8,
                                 arch="qwen3moe", n_embd_head=128),
    "qwen3-235b-a22b": ModelConfig(n_layer=94, n_embd=4096, n_ff=1536, n_head=64, n_head_kv=4, n_vocab=151936,
                                   n_ctx_train=40960, rms_eps=1e-6, rope_theta=1e6, n_expert=128, n_expert_used=8,
                                   arch="qwen3moe", n_embd_head=128),
}

WEIGHT_STD = 0.02        # the scale Mixtral's initialisation uses; keeps activations sane through RMSNorm
ROWS_PER_PART = 2048


def synthetic_vocab(n: int) -> dict:
    """A valid SentencePiece-style vocabulary of n pieces: <unk>, <s>, </s>, the 256 byte pieces,
    then made-up pieces (llama.cpp needs the byte pieces to load it)."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    i = 0
    while len(pieces) < n:
        w, k = "", i
        while True:
            w += letters[k % 26]
            k //= 26
            if k == 0:
                break
        pieces.append("\u2581" + w)
        types.append(NORMAL)
        i += 1
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces[:n],
            "tokenizer.ggml.scores": -np.arange(n, dtype=np.float32), "tokenizer.ggml.token_type": np.asarray(types[:n], np.int32),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}


def stored_type(name: str) -> QType:
    """lazymoe's QType called `name`, or for a type gguf-py knows and lazymoe cannot compute on (files that
    must be refused) one from gguf-py's size table."""
    try:
        return qtype(name)
    except ValueError:
        try:
            g = GGMLQuantizationType[name.upper()]
        except KeyError:
            raise ValueError(f"unknown weight type {name!r}") from None
        block_size, type_size = GGML_QUANT_SIZES[g]
        return QType(name.lower(), g, block_size, type_size, np.dtype(np.uint8))


# Byte offsets of the f16 scale d and (where the type has one) the f16 min in a block (ggml-common.h). Random
# blocks get d = +-1 and min 0 first; the weight std that gives is measured once per type and d rescaled.
SCALE_FIELDS = {"Q4_1": (0, 2), "Q5_0": (0, None), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108, None),
                "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None), "IQ4_NL": (0, None), "IQ4_XS": (0, None)}
_CODE_STD: dict[str, float] = {}


def _random_blocks(qt: QType, nb: int, rng: np.random.Generator) -> np.ndarray:
    """nb random blocks of a type in SCALE_FIELDS, [nb, type_size] uint8, weights of std ~WEIGHT_STD and mean 0."""
    d_at, m_at = SCALE_FIELDS[qt.ggml.name]
    blocks = np.frombuffer(rng.bytes(nb * qt.type_size), np.uint8).reshape(nb, qt.type_size).copy()
    if m_at is not None:
        blocks[:, m_at:m_at + 2] = 0
    if qt.ggml.name not in _CODE_STD:
        probe = blocks[:64].copy()
        probe[:, d_at:d_at + 2] = np.array([1.0], np.float16).view(np.uint8)
        _CODE_STD[qt.ggml.name] = float(np.sqrt(np.mean(quants.dequantize(probe, qt.ggml).astype(np.float64) ** 2)))
    sign = np.where(rng.integers(0, 2, nb, dtype=np.uint8) == 1, 1.0, -1.0)     # zero-mean, see _random_rows
    d = (sign * (WEIGHT_STD / _CODE_STD[qt.ggml.name])).astype(np.float16)
    blocks[:, d_at:d_at + 2] = d.view(np.uint8).reshape(nb, 2)
    return blocks


def _random_rows(qt: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Stored rows of type qt with values of standard deviation ~WEIGHT_STD."""
    if not qt.is_block:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_STD
        # BF16 is stored as its uint16 bits: a cast to uint16 would make every weight 0
        return quants.quantize(w, qt.ggml).view(np.uint16) if qt.ggml == GGMLQuantizationType.BF16 else w.astype(qt.dtype)
    if qt.ggml.name in SCALE_FIELDS:
        return _random_blocks(qt, rows * cols // qt.block_size, rng).reshape(rows, cols // qt.block_size * qt.type_size)
    if qt.name not in ("q4_0", "q8_0"):                 # other block types: gguf-py's reference quantizer
        return quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * WEIGHT_STD, qt.ggml)
    nb = rows * cols // qt.block_size
    blocks = np.frombuffer(rng.bytes(nb * qt.type_size), np.uint8).reshape(nb, qt.type_size).copy()
    # uniform codes: Q4_0 (q-8) has std 4.61, Q8_0 (int8) std 73.9; the f16 scale d sets the weight std.
    # Both code ranges have mean -0.5: with one sign for every d, each matrix would carry a common
    # rank-one part that lines every hidden state up and makes every token pick the same experts.
    # A random sign per block makes the weights zero-mean.
    code_std = {"q4_0": 4.61, "q8_0": 73.9}[qt.name]
    sign = np.where(rng.integers(0, 2, nb, dtype=np.uint8) == 1, 1.0, -1.0)
    d = (sign * (WEIGHT_STD / code_std)).astype(np.float16)
    blocks[:, :2] = d.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(rows, cols // qt.block_size * qt.type_size)


def synth_source(shape: str | ModelConfig, layers: int | None = None, type_name: str = "q4_0", seed: int = 0,
                 types: dict[str, str] | None = None, shapes: dict[str, tuple[int, ...]] | None = None,
                 drop=(), arch: str | None = None, expert_type: str | None = None) -> Source:
    """A Source whose tensors are random blocks with the sizes of `shape` (a SHAPES name, or any ModelConfig)
    and `layers` of its layers, weight matrices in `type_name`: a type ("q4_0") or one of llama.cpp's file
    types ("q4_k_m": each tensor in the type llama.cpp's quantizer gives it, see quantize/mixes.py).
    expert_type (a block type, "q2_k"): the routed experts' matrices in it instead, as `lazymoe quantize
    --expert-type` and llama-quantize's `--tensor-type _exps=T` lay them out (the rules for the other tensors
    unchanged).

    For hostile files, by GGUF tensor name: types (a weight matrix stored in another type, any type gguf-py
    knows), shapes (a tensor written with another shape), drop (tensors left out); arch is written as
    general.architecture (default: the config's)."""
    if isinstance(shape, ModelConfig):
        base, label = shape, "model"
    elif shape in SHAPES:
        base, label = SHAPES[shape], shape
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    n_layer = base.n_layer if layers is None else layers
    if not 1 <= n_layer <= base.n_layer:
        raise ValueError(f"--layers must be between 1 and {base.n_layer} for {label}, got {n_layer}")
    cfg = ModelConfig(**{**base.__dict__, "n_layer": n_layer})
    f32 = qtype("f32")
    et = block_type(expert_type, "--expert-type") if expert_type else None
    experts = {n: et.lower() for n in cfg.tensor_shapes() if et and is_expert(n)}
    if et and not experts:
        raise ValueError(f"--expert-type {expert_type}: the model has no expert matrices (it is a dense model)")
    if type_name.lower() in WRITES:                       # a type lazymoe writes: every weight matrix in it
        qt, mix = qtype(type_name), experts
    else:
        ftype(type_name)                                  # ValueError naming the known file types
        over = lambda n: experts[n].upper() if n in experts else None      # noqa: E731
        qt, mix = f32, {n: t.lower() for n, t in tensor_types(cfg, type_name, overrides=over).items()}
    types, shapes = {**mix, **(types or {})}, shapes or {}
    rng = np.random.default_rng(seed)

    def matrix(t: QType, rows: int, cols: int) -> list:
        return [lambda r=r: _random_rows(t, min(ROWS_PER_PART, rows - r), cols, rng) for r in range(0, rows, ROWS_PER_PART)]

    ones = lambda n: [lambda: np.ones((1, n), np.float32)]
    plans = []
    for name, shp in cfg.tensor_shapes().items():
        if name in drop:
            continue
        shp = tuple(shapes.get(name, shp))
        t = stored_type(types[name]) if name in types else qt
        if len(shp) == 1:
            plans.append(TensorPlan(name, shp, ones(shp[0]), stored=f32))
        elif name.endswith("ffn_gate_inp.weight"):
            plans.append(TensorPlan(name, shp, [lambda s=shp: rng.standard_normal(s, dtype=np.float32) * 0.5], stored=f32))
        elif len(shp) == 3:
            parts = [p for _ in range(shp[0]) for p in matrix(t, shp[1], shp[2])]
            plans.append(TensorPlan(name, shp, parts, stored=t))
        else:
            plans.append(TensorPlan(name, shp, matrix(t, *shp), stored=t))
    md = model_metadata(cfg)
    md["general.architecture"] = arch or cfg.arch
    md["general.name"] = f"synthetic {label} ({n_layer} layers, random weights)"
    md.update(synthetic_vocab(cfg.n_vocab))
    return Source(f"synth:{label}", "synth", cfg, md, plans)
