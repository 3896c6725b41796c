"""Which tensors make a quantized file's KL: llama.cpp's file with some tensors' bytes replaced, then its KL.

    python -m lazymoe.benchmarks.hybrid_kl F32.gguf BASE.gguf [REGEX[=FILE] ...] [--jitter SEED] [--tokens 8192]

BASE is a file llama.cpp's quantizer wrote from F32.gguf (the F32 file `lazymoe quantize -t f32` writes from the
demo model's checkpoint). Each REGEX picks tensors of BASE by name; their bytes are replaced by lazymoe's quantizer's
for the same type (kernels.quantizers.quantize on F32's rows; no importance matrix), or by FILE's (another file of
the same types, e.g. `lazymoe quantize`'s). --jitter SEED re-rounds ours with an importance of 1 ± 5 % per column
drawn from SEED: an equally good quantization with other roundings, to see how far one realisation moves the KL.
Prints, over the replaced tensors, the shrink along the weights (-Σ e·x / Σ x², e = x̂ - x) and the relative
squared error Σ e² / Σ x² of BASE's bytes and of the replacement, then the KL vs F32, top-1 and perplexity of the
hybrid file over the held-out text (benchmarks/quality.py's measure, llama.cpp's runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("f32")
    ap.add_argument("base")
    ap.add_argument("specs", nargs="*", help="REGEX (ours) or REGEX=FILE (that file's bytes)")
    ap.add_argument("--jitter", type=int, default=None, metavar="SEED")
    ap.add_argument("--tokens", type=int, default=8192)
    a = ap.parse_args(argv)
    from gguf import GGUFReader
    from gguf import quants as gq

    from lazymoe.benchmarks.quality import evaluate, held_out_ids
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.kernels.quantizers import QUANTIZES, quantize
    from lazymoe.runtime.tokenizer import Tokenizer

    with GGUFFile(a.f32) as g:
        tok = Tokenizer.from_gguf_metadata(g.metadata, a.f32)
    ids = held_out_ids(tok, a.tokens)
    F = {t.name: t for t in GGUFReader(a.f32).tensors}
    B = {t.name: t for t in GGUFReader(a.base).tensors}
    sums = {"base": np.zeros(3), "new": np.zeros(3)}                 # -Σ e·x, Σ e², Σ x²
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "hybrid.gguf")
        shutil.copy(a.base, out)
        with open(out, "r+b") as f:
            for spec in a.specs:
                pattern, _, other = spec.partition("=")
                S = {t.name: t for t in GGUFReader(other).tensors} if other else None
                n = 0
                for name, t in B.items():
                    ty = t.tensor_type.name.lower()
                    if not re.search(pattern, name) or (S is None and (ty not in QUANTIZES or ty in ("f32", "f16"))):
                        continue
                    x = np.asarray(F[name].data, np.float32).reshape(-1, F[name].data.shape[-1])
                    if S is not None:
                        if S[name].tensor_type != t.tensor_type:
                            raise SystemExit(f"hybrid_kl: {other}: {name} is {S[name].tensor_type.name}, not {t.tensor_type.name}")
                        data = np.asarray(S[name].data)
                    else:
                        imp = None if a.jitter is None else (
                            1 + 0.05 * np.random.default_rng(a.jitter).uniform(-1, 1, x.shape[1])).astype(np.float32)
                        data = quantize(x, ty, imp)
                    data = np.ascontiguousarray(data).view(np.uint8).reshape(np.asarray(t.data).shape)
                    if data.nbytes != t.n_bytes:
                        raise SystemExit(f"hybrid_kl: {name}: {data.nbytes} bytes, expected {t.n_bytes}")
                    x64 = x.astype(np.float64)
                    for key, q in (("base", np.asarray(t.data)), ("new", data)):
                        e = gq.dequantize(q, t.tensor_type).reshape(x.shape) - x64
                        sums[key] += [-(e * x64).sum(), (e * e).sum(), (x64 * x64).sum()]
                    f.seek(t.data_offset)
                    f.write(data.tobytes())
                    n += 1
                print(f"{pattern} <- {other or 'lazymoe'}: {n} tensors", file=sys.stderr)
        ref: list = []
        evaluate(a.f32, ids, ref, "llama.cpp")
        r = evaluate(out, ids, ref, "llama.cpp")
    stats = {k: {"shrink": v[0] / v[2], "relerr2": v[1] / v[2]} for k, v in sums.items() if v[2] > 0}
    print(json.dumps({"base": os.path.basename(a.base), "specs": a.specs, "jitter": a.jitter, "tensors": stats,
                      "kl": r["kl"], "top1": r["top1"], "ppl": r["ppl"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
