"""`lazymoe quantize` and `lazymoe synth`."""
from __future__ import annotations

from lazymoe.kernels.quantizers import WRITES


def add_quantize_parser(sub) -> None:
    from lazymoe.quantize.mixes import BLOCK_TYPES, FTYPES, is_mix
    p = sub.add_parser("quantize", help="convert a checkpoint (HF folder, Mistral folder, GGUF) to a GGUF of quantized blocks",
                       description="Convert a Hugging Face or Mistral-native checkpoint folder, or a GGUF file, "
                                   "into a GGUF file laid out as llama.cpp writes it.")
    p.add_argument("src", help="checkpoint folder (config.json or params.json) or .gguf file")
    p.add_argument("-o", "--output", required=True, help="output .gguf file")
    p.add_argument("-t", "--type", default=None, metavar="TYPE",
                   help="file type: a plain type for every weight matrix (" + ", ".join(t for t in FTYPES if not is_mix(t))
                        + ") or one of llama.cpp's mixes, each tensor in the type llama.cpp's quantizer gives it ("
                        + ", ".join(t for t in FTYPES if is_mix(t)) + "); default q4_0")
    p.add_argument("--expert-type", metavar="BLOCK", default=None,
                   help="block type of the routed experts' matrices (" + ", ".join(BLOCK_TYPES) + "), e.g. q2_k")
    p.add_argument("--resident-type", metavar="BLOCK", default=None,
                   help="block type of every other weight matrix (attention, embeddings, output)")
    p.add_argument("--pure", action="store_true", help="a mix's base type for every weight matrix (llama-quantize --pure)")
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix (llama-imatrix's GGUF or legacy .dat, or `lazymoe imatrix`'s) weighting "
                        "each column's rounding error")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_quantize)


def _quantize(args) -> int:
    from lazymoe.quantize.convert import convert
    summary = convert(args.src, args.output, args.type, force=args.force, progress=not args.quiet,
                      expert_type=args.expert_type, resident_type=args.resident_type, pure=args.pure,
                      imatrix=args.imatrix)
    print(summary)
    return 0


def add_synth_parser(sub) -> None:
    from lazymoe.quantize.mixes import FTYPES
    from lazymoe.quantize.synth import SHAPES
    p = sub.add_parser("synth", help="write a GGUF with a real model's exact shapes and random weights (for benchmarks)",
                       description="Write a GGUF with the exact shapes, names and metadata of a real Mixtral and random, "
                                   "numerically sane weights, streaming, as blocks. Random weights route almost uniformly: "
                                   "expert-cache hit rates on them are a lower bound.")
    p.add_argument("--shape", required=True, choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: all of the real model's)")
    p.add_argument("-t", "--type", default="q4_0", metavar="TYPE",
                   help="a type lazymoe writes (" + ", ".join(WRITES) + ") for every weight matrix, or one of "
                        "llama.cpp's file types, each tensor in the type llama.cpp's quantizer gives it: "
                        + ", ".join(t for t in FTYPES if t not in WRITES) + " (default q4_0)")
    p.add_argument("--expert-type", metavar="BLOCK", default=None,
                   help="the routed experts' matrices in this block type (e.g. -t q4_k_m --expert-type q2_k), as "
                        "`quantize --expert-type` writes them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output .gguf file")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)


def _synth(args) -> int:
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.mixes import FTYPES
    from lazymoe.quantize.synth import synth_source
    if args.type.lower() not in FTYPES:
        raise ValueError(f"--type {args.type!r} is not a weight or file type; expected one of {', '.join(FTYPES)}")
    src = synth_source(args.shape, args.layers, args.type.lower(), args.seed, expert_type=args.expert_type)
    qt = qtype(args.type) if args.type.lower() in WRITES else qtype("f32")
    print(write_gguf(src, args.output, qt, force=args.force, progress=not args.quiet, file_type=args.type.lower()))
    return 0
