"""`lazymoe quantize` and `lazymoe info`."""
from __future__ import annotations

from kernels.qtypes import QTYPES


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="convert a checkpoint (HF folder, Mistral folder, GGUF) to a GGUF of 4-bit blocks",
                       description="Convert a Hugging Face or Mistral-native checkpoint folder, or a GGUF file, "
                                   "into a GGUF file laid out as llama.cpp writes it.")
    p.add_argument("src", help="checkpoint folder (config.json or params.json) or .gguf file")
    p.add_argument("-o", "--output", required=True, help="output .gguf file")
    p.add_argument("-t", "--type", default="q4_0", choices=list(QTYPES), help="type of the 2-D weight matrices (default q4_0)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_quantize)


def _quantize(args) -> int:
    from quantize.convert import convert
    summary = convert(args.src, args.output, args.type, force=args.force, progress=not args.quiet)
    print(summary)
    return 0


def add_synth_parser(sub) -> None:
    from quantize.synth import SHAPES
    p = sub.add_parser("synth", help="write a GGUF with a real model's exact shapes and random weights (for benchmarks)",
                       description="Write a GGUF with the exact shapes, names and metadata of a real Mixtral and random, "
                                   "numerically sane weights, streaming, as blocks. Random weights route almost uniformly: "
                                   "expert-cache hit rates on them are a lower bound.")
    p.add_argument("--shape", required=True, choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: all of the real model's)")
    p.add_argument("-t", "--type", default="q4_0", choices=["q4_0", "q8_0"], help="weight type (default q4_0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True, help="output .gguf file")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)


def _synth(args) -> int:
    from kernels.qtypes import qtype
    from quantize.convert import write_gguf
    from quantize.synth import synth_source
    src = synth_source(args.shape, args.layers, args.type, args.seed)
    print(write_gguf(src, args.output, qtype(args.type), force=args.force, progress=not args.quiet))
    return 0


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="hyper-parameters, sizes and the smallest RAM budget of a GGUF model")
    p.add_argument("model", help=".gguf file")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context length for the KV cache estimate (default 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)


def model_sizes(f, cfg) -> dict:
    """Byte counts of a GGUF model: resident part, experts, one expert (and its cache slot)."""
    expert_bytes = sum(t.nbytes for n, t in f.tensors.items() if n.endswith("_exps.weight"))
    resident = sum(t.nbytes for n, t in f.tensors.items() if not n.endswith("_exps.weight"))
    per_expert = expert_bytes // max(1, cfg.n_layer * cfg.n_expert) if cfg.is_moe else 0
    slot = sum(-(-(f.tensors[f"blk.0.{k}.weight"].nbytes // cfg.n_expert) // 64) * 64
               for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")) if cfg.is_moe else 0
    return {"resident_bytes": resident, "expert_bytes": expert_bytes, "bytes_per_expert": per_expert, "expert_slot_bytes": slot}


def _info(args) -> int:
    import json

    from runtime.config import config_from_metadata
    from runtime.gguf_file import GGUFFile
    from runtime.memory import PROCESS_ESTIMATE, min_budget, work_bytes

    if args.ctx <= 0:
        raise ValueError(f"--ctx must be positive, got {args.ctx}")
    with GGUFFile(args.model) as f:
        cfg = config_from_metadata(f.metadata, args.model)
        if cfg.is_moe:
            for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
                f.tensor_info(f"blk.0.{k}.weight")
        total, active = cfg.params()
        sizes = model_sizes(f, cfg)
        types = sorted({t.type_name for t in f.tensors.values()})
        name = f.get("general.name", "")
    kv = cfg.kv_bytes_per_token() * args.ctx
    info = {
        "file": args.model, "name": name, "architecture": "llama", "moe": cfg.is_moe, **cfg.__dict__,
        "head_dim": cfg.head_dim, "params_total": total, "params_active": active, "tensor_types": types,
        **sizes, "ctx": args.ctx, "kv_cache_bytes": kv, "work_bytes": work_bytes(cfg, args.ctx),
        "process_estimate_bytes": PROCESS_ESTIMATE,
        "min_budget_bytes": min_budget(cfg, sizes["resident_bytes"], sizes["expert_slot_bytes"], args.ctx),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    num = lambda n: f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    print(f"{args.model}: {name}")
    print(f"  architecture   llama ({'Mixture of Experts' if cfg.is_moe else 'dense'}), types {', '.join(types)}")
    print(f"  layers {cfg.n_layer}, hidden {cfg.n_embd}, FFN {cfg.n_ff}, heads {cfg.n_head} (KV {cfg.n_head_kv}, dim {cfg.head_dim}), vocab {cfg.n_vocab}")
    if cfg.is_moe:
        print(f"  experts        {cfg.n_expert}, {cfg.n_expert_used} used per token")
    print(f"  context        {cfg.n_ctx_train} trained; RoPE theta {cfg.rope_theta:g}; RMSNorm eps {cfg.rms_eps:g}")
    print(f"  parameters     {num(total)} total, {num(active)} active per token")
    print(f"  resident part  {mib(sizes['resident_bytes'])} (embeddings, attention, norms, router, output)")
    if cfg.is_moe:
        print(f"  experts        {mib(sizes['expert_bytes'])}; one expert {mib(sizes['bytes_per_expert'])}")
    print(f"  KV cache       {mib(kv)} for {args.ctx} tokens (float32); buffers {mib(info['work_bytes'])}")
    print(f"  min budget     {mib(info['min_budget_bytes'])}: process (~{mib(PROCESS_ESTIMATE)}) + resident + KV cache + buffers"
          + (f" + one layer's {cfg.n_expert_used} active experts" if cfg.is_moe else ""))
    return 0
