"""Write the golden logits the runtime is checked against (run by hand; needs torch + transformers).

For each fixture checkpoint and each type: convert with lazymoe's quantizer, dequantize
every tensor of the GGUF with gguf-py, undo llama.cpp's Q/K row permutation, load the
weights into transformers' own MixtralForCausalLM / MistralForCausalLM (float32, eager
attention) and save its logits for a fixed token sequence to
tests/fixtures/golden/<fixture>-<type>.npz (arrays `ids` [T], `logits` [T, V], and `weights_sha256` of the GGUF's tensors:
regenerate when the quantizer's output changes). The Hugging Face state dict comes from
lazymoe.benchmarks.hf_reference. From the repository root, with lazymoe installed:

    python -m tests.make_golden            # the Mixtral/Mistral fixtures
    python -m tests.make_golden --archs [NAME ...]   # make_tiny.ARCH_CONFIGS (also needs llama-cpp-python)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURES = ("tiny-mixtral", "tiny-moe-top1", "tiny-dense")
TYPES = ("f32", "q8_0", "q4_0")
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
N_TOKENS = 24


def golden_ids(tokenizer) -> list[int]:
    """The fixed sequence: BOS + the text's tokens, padded with fixed ids to N_TOKENS."""
    ids = tokenizer.encode(TEXT, bos=True)[:N_TOKENS]
    pad = [(7 * i + 3) % tokenizer.vocab_size for i in range(N_TOKENS)]
    return ids + pad[len(ids):]


def weights_sha256(gguf_path: str) -> str:
    """Hash of the GGUF's tensor data: the golden holds only for exactly these weights."""
    import hashlib

    from lazymoe.format.gguf_file import GGUFFile
    g = GGUFFile(gguf_path)
    h = hashlib.sha256()
    for name in sorted(g.tensors):
        h.update(name.encode())
        h.update(g.raw(name))
    return h.hexdigest()


def reference_model(gguf_path: str, config_path: str, ids=None):
    """(transformers' model in float32 holding the GGUF's dequantized weights, the golden ids [T] int64: `ids`,
    default golden_ids of the file's tokenizer). The class is the config's first `architectures` entry."""
    import torch
    import transformers

    from lazymoe.benchmarks.hf_reference import hf_state_dict
    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.runtime.tokenizer import Tokenizer

    g = GGUFFile(gguf_path)
    cfg = config_from_metadata(g.metadata, gguf_path)
    ids = np.array(golden_ids(Tokenizer.from_gguf_metadata(g.metadata)) if ids is None else ids, dtype=np.int64)
    with open(config_path) as f:
        hf_cfg = json.load(f)
    moe = cfg.is_moe
    cls = getattr(transformers, hf_cfg["architectures"][0])
    conf = transformers.AutoConfig.for_model(**hf_cfg)
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(conf).to(torch.float32).eval()
    model.load_state_dict(hf_state_dict(g, cfg, moe), strict=True)
    return model, ids


def reference_logits(gguf_path: str, config_path: str, ids=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], transformers' float32 logits [T, V] on the GGUF's dequantized weights)."""
    import torch
    model, ids = reference_model(gguf_path, config_path, ids)
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None]).logits[0].numpy().astype(np.float32)
    return ids, out


# The other architectures (tests/fixtures/make_tiny.ARCH_CONFIGS, built here, not committed): the text's tokens by
# Hugging Face's `tokenizers` on the checkpoint's tokenizer.json, then two ids past the tokenizer's ~2,000 tokens in
# the padded part of the embedding; ARCH_TOKENS in all.
ARCH_TEXT = "x = f(12) 🦙 Über 東京<|im_end|><|endoftext|>"
ARCH_TOKENS = 20
ARCH_PADDED_IDS = [2040, 2047]
ARCH_TYPES = ("f32", "q8_0")
# The K-quant file of each: llama.cpp's quantizer (llama_model_quantize, the `llama` extra) on lazymoe's F32 file.
ARCH_KQUANT = "q4_k_m"


def llama_cpp_quantize(src: str, dst: str, ftype_name: str) -> str:
    """llama.cpp's own quantizer: src (a GGUF) -> dst in llama.cpp's file type ftype_name ("q4_k_m")."""
    import ctypes

    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name.upper()}")
    p.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype_name}")
    return dst


def arch_files(fx: str, tmp: str) -> dict[str, str]:
    """Type -> GGUF of ARCH_CONFIGS fixture fx: lazymoe's F32 and Q8_0 files and llama.cpp's ARCH_KQUANT of the F32."""
    from lazymoe.quantize.convert import convert
    from tests.fixtures.make_tiny import build_arch
    src = build_arch(fx, os.path.join(tmp, fx))
    out = {}
    for ty in ARCH_TYPES:
        out[ty] = os.path.join(tmp, f"{fx}-{ty}.gguf")
        convert(src, out[ty], ty, force=True, progress=False)
    out[ARCH_KQUANT] = llama_cpp_quantize(out["f32"], os.path.join(tmp, f"{fx}-{ARCH_KQUANT}.gguf"), ARCH_KQUANT)
    return out


def arch_ids(folder: str) -> list[int]:
    """The golden ids of a checkpoint folder: ARCH_TEXT by `tokenizers`, cut to leave room for ARCH_PADDED_IDS."""
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(ARCH_TEXT).ids
    return ids[:ARCH_TOKENS - len(ARCH_PADDED_IDS)] + ARCH_PADDED_IDS


def main_archs(out_dir: str, names=()) -> None:
    from tests.fixtures.make_tiny import ARCH_CONFIGS
    with tempfile.TemporaryDirectory() as tmp:
        for fx in names or ARCH_CONFIGS:
            for ty, path in arch_files(fx, tmp).items():
                ids = arch_ids(os.path.join(tmp, fx))
                ids, logits = reference_logits(path, os.path.join(tmp, fx, "config.json"), ids)
                dst = os.path.join(out_dir, f"{fx}-{ty}.npz")
                np.savez_compressed(dst, ids=ids, logits=logits, weights_sha256=np.array(weights_sha256(path)))
                print(f"wrote {dst}: {len(ids)} tokens, logits {logits.shape}, |max| {np.abs(logits).max():.3f}")


def main() -> int:
    from lazymoe.quantize.convert import convert
    out_dir = os.path.join(HERE, "fixtures", "golden")
    os.makedirs(out_dir, exist_ok=True)
    if sys.argv[1:2] == ["--archs"]:
        main_archs(out_dir, sys.argv[2:])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for fx in FIXTURES:
            src = os.path.join(HERE, "fixtures", fx)
            if not os.path.isdir(src):
                print(f"skip {fx}: {src} is missing")
                continue
            for ty in TYPES:
                path = os.path.join(tmp, f"{fx}-{ty}.gguf")
                convert(src, path, ty, force=True, progress=False)
                ids, logits = reference_logits(path, os.path.join(src, "config.json"))
                dst = os.path.join(out_dir, f"{fx}-{ty}.npz")
                np.savez_compressed(dst, ids=ids, logits=logits, weights_sha256=np.array(weights_sha256(path)))
                print(f"wrote {dst}: {len(ids)} tokens, logits {logits.shape}, |max| {np.abs(logits).max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
