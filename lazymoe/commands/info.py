"""`lazymoe info`: hyper-parameters, sizes and the smallest RAM budget of a GGUF model."""
from __future__ import annotations


def add_info_parser(sub) -> None:
    p = sub.add_parser("info", help="hyper-parameters, sizes and the smallest RAM budget of a GGUF model")
    p.add_argument("model", help=".gguf file")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context length for the KV cache estimate (default 4096)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)


def _info(args) -> int:
    import json

    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.format.metadata import meta
    from lazymoe.runtime.memory import PROCESS_ESTIMATE, min_budget, work_bytes
    from lazymoe.runtime.tokenizer import load_tokenizer
    from lazymoe.runtime.weights import model_sizes

    if args.ctx <= 0:
        raise ValueError(f"--ctx must be positive, got {args.ctx}")
    with GGUFFile(args.model) as f:
        cfg = config_from_metadata(f.metadata, args.model, f.tensors)
        sizes = model_sizes(f, cfg)
        total, active = cfg.params()
        types = sorted({t.type_name for t in f.tensors.values()})
        name = meta(f.metadata, "general.name", args.model, "")
        load_tokenizer(f.metadata, args.model)          # what `run` would refuse, refused here too
        meta(f.metadata, "tokenizer.chat_template", args.model, None)
    kv = cfg.kv_bytes(args.ctx)
    info = {
        "file": args.model, "name": name, "architecture": cfg.arch, "moe": cfg.is_moe, **cfg.__dict__,
        "head_dim": cfg.head_dim, "params_total": total, "params_active": active, "tensor_types": types,
        **sizes, "ctx": args.ctx, "kv_cache_bytes": kv, "work_bytes": work_bytes(cfg, args.ctx),
        "process_estimate_bytes": PROCESS_ESTIMATE,
        # exactly where `lazymoe run MODEL --ctx N --ram B` starts to refuse
        "min_ram_bytes": min_budget(cfg, sizes["resident_bytes"], sizes["expert_slot_sizes"], args.ctx),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    num = lambda n: f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    print(f"{args.model}: {name}")
    print(f"  architecture   {cfg.arch} ({'Mixture of Experts' if cfg.is_moe else 'dense'}), types {', '.join(types)}")
    print(f"  layers {cfg.n_layer}, hidden {cfg.n_embd}, FFN {cfg.n_ff}, heads {cfg.n_head} "
          f"(KV {cfg.n_head_kv}, dim {cfg.head_dim}), vocab {cfg.n_vocab}")
    if cfg.is_moe:
        print(f"  experts        {cfg.n_expert}, {cfg.n_expert_used} used per token"
              + (f", and a shared expert of FFN {cfg.n_ff_shexp}" if cfg.n_ff_shexp else ""))
    print(f"  context        {cfg.n_ctx_train} trained; RoPE theta {cfg.rope_theta:g}; RMSNorm eps {cfg.rms_eps:g}")
    print(f"  parameters     {num(total)} total, {num(active)} active per token")
    print(f"  resident part  {mib(sizes['resident_bytes'])} (embeddings, attention, norms, router, output)")
    if cfg.is_moe:
        print(f"  experts        {mib(sizes['expert_bytes'])}; one expert {mib(sizes['bytes_per_expert'])}")
    print(f"  KV cache       {mib(kv)} for {args.ctx} tokens (float32); buffers {mib(info['work_bytes'])}")
    print(f"  min budget     {mib(info['min_ram_bytes'])}: process (~{mib(PROCESS_ESTIMATE)}) + resident + KV cache + buffers"
          + (f" + one layer's {cfg.n_expert_used} active experts" if cfg.is_moe else ""))
    return 0
