"""Golden logits for the files llama.cpp's own quantizer writes (run by hand; needs the `ref` and `llama` extras).

The fixture tests/fixtures/tiny-mixtral-256 has every weight row a multiple of 256, so
llama.cpp applies its K-quants rather than falling back to other types. For each ftype in
FTYPES: convert the fixture to an F32 GGUF with lazymoe's quantizer, let llama.cpp's
`llama_model_quantize` write the ftype, check that it chose the ftype's types (no
fallback), and save Hugging Face's MixtralForCausalLM logits (float32, on the file's
weights dequantized by gguf-py) to tests/fixtures/golden/tiny-mixtral-256-<ftype>.npz:
`ids` [T], `logits` [T, V], `router_margin` [L, T] (per layer and position, HF's router
logit of its last chosen expert minus the best unchosen one's), `weights_sha256` of the
file's tensors, and `tensor_names` with `tensor_types` (what llama.cpp chose per tensor).
tests/test_kquants.py re-creates each file and compares llama.cpp's and lazymoe's logits
with these.

    python -m tests.make_kquant_golden [NAME ...]     (from the repository root; default: every FTYPES name)

Regenerate when llama.cpp's quantizer (the pinned llama-cpp-python) or lazymoe's F32
conversion changes the bytes.
"""
from __future__ import annotations

import ctypes
import os
import sys
import tempfile

import numpy as np

from tests.make_golden import reference_model, weights_sha256

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURE = "tiny-mixtral-256"
SRC = os.path.join(HERE, "fixtures", FIXTURE)
GOLDEN = os.path.join(HERE, "fixtures", "golden")

# file name -> (llama.cpp's LLAMA_FTYPE_MOSTLY_<name>, pure). "q4_0-pure" (every matrix Q4_0, llama.cpp's
# `pure` flag) is not an ftype people download: it is the one llama.cpp file that exercises lazymoe's Q4_0
# kernels today, since llama.cpp's Q4_0 ftype puts the output head in Q6_K.
FTYPES: dict[str, tuple[str, bool]] = {
    "q2_k": ("Q2_K", False), "q3_k_s": ("Q3_K_S", False), "q3_k_m": ("Q3_K_M", False), "q3_k_l": ("Q3_K_L", False),
    "q4_k_s": ("Q4_K_S", False), "q4_k_m": ("Q4_K_M", False), "q5_k_s": ("Q5_K_S", False), "q5_k_m": ("Q5_K_M", False),
    "q6_k": ("Q6_K", False), "q4_0": ("Q4_0", False), "q4_1": ("Q4_1", False), "q5_0": ("Q5_0", False),
    "q5_1": ("Q5_1", False), "q8_0": ("Q8_0", False), "q4_0-pure": ("Q4_0", True),
    "iq4_nl": ("IQ4_NL", False), "iq4_xs": ("IQ4_XS", False),
}

K_TYPES = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
# llama.cpp's IQ4 ftypes (no importance matrix needed) keep its K-quant rules for the rest: Q6_K output head, Q5_K
# attn_output in 8-expert models, Q8_0 attn_k/attn_v
IQ4_TYPES = {"IQ4_NL", "IQ4_XS"}


def golden_path(name: str) -> str:
    return os.path.join(GOLDEN, f"{FIXTURE}-{name}.npz")


def source_gguf(dst: str) -> str:
    """The fixture as an F32 GGUF (lazymoe's converter; bf16 weights are exact in f32): llama.cpp's input."""
    from lazymoe.quantize.convert import convert
    convert(SRC, dst, "f32", force=True, progress=False)
    return dst


def llama_quantize(src: str, dst: str, name: str) -> str:
    """Write `dst` from `src` with llama.cpp's quantizer in ftype FTYPES[name]."""
    import llama_cpp
    ftype, pure = FTYPES[name]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.pure = pure
    p.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize failed writing {name} to {dst}")
    return dst


def tensor_types(path: str) -> dict[str, str]:
    """Tensor name -> GGML type name ("Q4_K"), as stored in the file."""
    from lazymoe.format.gguf_file import GGUFFile
    with GGUFFile(path) as g:
        return {n: t.type_name for n, t in g.tensors.items()}


def expected_types(name: str) -> tuple[str, set[str]]:
    """(the ftype's own type, every type llama.cpp may pick in it on rows of 256) for FTYPES[name]."""
    ftype, pure = FTYPES[name]
    base = "_".join(ftype.split("_")[:2])                            # "Q3_K_M" -> "Q3_K", "Q4_0" -> "Q4_0"
    if pure:
        return base, {base, "F32"}
    if base in K_TYPES:
        return base, K_TYPES | {"Q8_0", "F32"}
    if base in IQ4_TYPES:
        return base, {base, "Q5_K", "Q6_K", "Q8_0", "F32"}
    return base, {base, "Q8_0", "Q6_K", "F32"}


def check_types(name: str, types: dict[str, str]) -> None:
    """ValueError unless llama.cpp chose the ftype's types: its own type on the expert gate/up matrices
    (the bulk of the weights), nothing outside expected_types, Q8_0 only on attn_k/attn_v (its rule for
    8-expert models) and Q6_K in a Q4_0..Q5_1 file only on the output head. On rows that are not a
    multiple of 256 llama.cpp falls back (Q2_K/Q3_K to Q4_0, IQ4_XS to IQ4_NL, Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0),
    which these rules catch."""
    base, allowed = expected_types(name)
    for n, t in types.items():
        if t not in allowed:
            raise ValueError(f"{name}: tensor {n} is {t}, outside {sorted(allowed)}: did llama.cpp fall back?")
        if t == "Q8_0" and base != "Q8_0" and not n.endswith(("attn_k.weight", "attn_v.weight")):
            raise ValueError(f"{name}: tensor {n} is Q8_0: did llama.cpp fall back?")
        if t == "Q6_K" and base not in K_TYPES and n != "output.weight":
            raise ValueError(f"{name}: tensor {n} is Q6_K in a {base} file")
        if t == "Q5_K" and base in IQ4_TYPES and not n.endswith("attn_output.weight"):
            raise ValueError(f"{name}: tensor {n} is Q5_K in a {base} file")
        if n.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")) and t != base:
            raise ValueError(f"{name}: tensor {n} is {t}, expected the ftype's own {base}")


ROLES = ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "output")


def type_row(types: dict[str, str]) -> list[str]:
    """One table cell per role: the role's types over layers, joined by '/' where layers differ."""
    cells = []
    for role in ROLES:
        per_layer = sorted((n for n in types if n.split(".")[-2] == role), key=lambda n: n.split("."))
        seen = [types[n] for n in per_layer]
        cells.append("/".join(seen) if len(set(seen)) > 1 else seen[0])
    return cells


def reference(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [T], HF's float32 logits [T, V], router margins [L, T]) on the file's dequantized weights."""
    import torch
    model, ids = reference_model(path, os.path.join(SRC, "config.json"))
    router = []                                                      # per layer: router logits [T, E]
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: router.append(out[0].detach().numpy().copy()))
             for layer in model.model.layers]
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].numpy().astype(np.float32)
    for h in hooks:
        h.remove()
    k = model.config.num_experts_per_tok
    margins = np.stack([np.diff(np.sort(r, axis=1)[:, -k - 1:-k + 1], axis=1)[:, 0] for r in router])   # [L, T]
    return ids, logits, margins.astype(np.float32)


def main(argv=None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(FTYPES)
    unknown = [n for n in names if n not in FTYPES]
    if unknown:
        print(f"make_kquant_golden: unknown file type {unknown[0]!r}; expected one of {', '.join(FTYPES)}", file=sys.stderr)
        return 2
    os.makedirs(GOLDEN, exist_ok=True)
    print("| file | " + " | ".join(ROLES) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        src = source_gguf(os.path.join(tmp, "f32.gguf"))
        for name in names:
            path = llama_quantize(src, os.path.join(tmp, f"{name}.gguf"), name)
            types = tensor_types(path)
            check_types(name, types)
            ids, logits, margins = reference(path)
            names = sorted(types)
            np.savez_compressed(golden_path(name), ids=ids, logits=logits, router_margin=margins,
                                weights_sha256=np.array(weights_sha256(path)),
                                tensor_names=np.array(names), tensor_types=np.array([types[n] for n in names]))
            print(f"| {name} | " + " | ".join(type_row(types)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
