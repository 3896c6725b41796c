"""Write the golden logits the runtime is checked against (run by hand; needs torch + transformers).

For each fixture checkpoint and each type: convert with lazymoe's quantizer, dequantize
every tensor of the GGUF with gguf-py, undo llama.cpp's Q/K row permutation, load the
weights into transformers' own MixtralForCausalLM / MistralForCausalLM / LlamaForCausalLM (float32, eager
attention) and save its logits for a fixed token sequence to
tests/fixtures/golden/<fixture>-<type>.npz (arrays `ids` [T], `logits` [T, V], and `weights_sha256` of the GGUF's tensors:
regenerate when the quantizer's output changes). The Hugging Face state dict comes from
lazymoe.benchmarks.hf_reference. From the repository root, with lazymoe installed:

    python -m tests.make_golden [FIXTURE ...]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURES = ("tiny-mixtral", "tiny-moe-top1", "tiny-dense", "tiny-dense-bpe")
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


def reference_model(gguf_path: str, config_path: str):
    """(transformers' model in float32 holding the GGUF's dequantized weights, the golden ids [T] int64)."""
    import torch
    import transformers

    from lazymoe.benchmarks.hf_reference import hf_state_dict
    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.runtime.tokenizer import load_tokenizer

    g = GGUFFile(gguf_path)
    cfg = config_from_metadata(g.metadata, gguf_path)
    ids = np.array(golden_ids(load_tokenizer(g.metadata)), dtype=np.int64)
    with open(config_path) as f:
        hf_cfg = json.load(f)
    moe = hf_cfg.get("num_local_experts", 0) > 0
    # Mixtral, Mistral, or Llama (tiny-dense-bpe: Llama 3's tokenizer, tie_word_embeddings)
    kind = "Mixtral" if moe else "Llama" if hf_cfg.get("model_type") == "llama" else "Mistral"
    cls = getattr(transformers, f"{kind}ForCausalLM")
    conf = getattr(transformers, f"{kind}Config")(**hf_cfg)
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(conf).to(torch.float32).eval()
    model.load_state_dict(hf_state_dict(g, cfg, moe), strict=True)
    return model, ids


def reference_logits(gguf_path: str, config_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], transformers' float32 logits [T, V] on the GGUF's dequantized weights)."""
    import torch
    model, ids = reference_model(gguf_path, config_path)
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None]).logits[0].numpy().astype(np.float32)
    return ids, out


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or list(FIXTURES)
    from lazymoe.quantize.convert import convert
    out_dir = os.path.join(HERE, "fixtures", "golden")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for fx in names:
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
