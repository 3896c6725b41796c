"""The model's hyper-parameters: one frozen dataclass, built by one function from GGUF metadata.

Mixtral, Mistral and Llama are one network here (GGUF architecture "llama"); a file
with `llama.expert_count` > 0 has a Mixture-of-Experts FFN, otherwise a dense one.
Qwen3-MoE, Qwen2-MoE and OLMoE (GGUF "qwen3moe", "qwen2moe", "olmoe") are the same network with the
differences of ARCHS: RoPE style, Q/K norms, Q/K/V biases, top-k renormalisation, a shared expert.
"""
from __future__ import annotations

from dataclasses import dataclass

from lazymoe.format.metadata import MISSING, meta

ARCH = "llama"


@dataclass(frozen=True)
class Arch:
    """What one GGUF architecture's network does differently from Mixtral's, as llama.cpp builds it
    (src/llama-model.cpp, src/llama-arch.cpp) and Hugging Face defines it."""
    name: str
    hf: tuple[str, ...]          # Hugging Face `architectures` entries converted to it
    rope_neox: bool = False      # RoPE rotates halves (NeoX, llama.cpp's LLAMA_ROPE_TYPE_NEOX), Q/K unpermuted;
    #                              False: adjacent pairs, Q/K rows permuted by the converter
    qk_norm: str = ""            # "head": RMSNorm of each head's q and k ([hd] weights, Qwen3); "all": of the
    #                              whole q and k projections ([H*hd], [G*hd], OLMoE); "": none
    qkv_bias: bool = False       # attn_q/k/v.bias (Qwen2)
    norm_topk: bool = True       # top-k router weights renormalised to sum 1 (else: softmax over all experts)
    shared_expert: bool = False  # ffn_{gate,up,down}_shexp scaled by sigmoid(ffn_gate_inp_shexp . x) (Qwen2-MoE)
    moe_only: bool = False       # llama.cpp has no dense variant of it (expert_count is required)
    expert_ff_key: bool = False  # the experts' FFN size is {arch}.expert_feed_forward_length (else feed_forward_length)


ARCHS = {a.name: a for a in (
    Arch("llama", ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")),
    Arch("qwen3moe", ("Qwen3MoeForCausalLM",), rope_neox=True, qk_norm="head", norm_topk=True, moe_only=True,
         expert_ff_key=True),
    Arch("qwen2moe", ("Qwen2MoeForCausalLM",), rope_neox=True, qkv_bias=True, norm_topk=False, shared_expert=True,
         moe_only=True, expert_ff_key=True),
    Arch("olmoe", ("OlmoeForCausalLM",), rope_neox=True, qk_norm="all", norm_topk=False, moe_only=True),
)}

# Architectures people ask for that are refused: GGUF name -> (Hugging Face names, the one line why).
REFUSED = {
    "gpt-oss": (("GptOssForCausalLM",), "gpt-oss (MXFP4 experts, attention sinks, alternating sliding-window "
                                        "layers, clamped SwiGLU, YaRN RoPE) is not supported yet"),
    "deepseek2": (("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"),
                  "deepseek2 (multi-head latent attention, leading dense layers) is not supported yet"),
}

# An expert's three matrices, in the order the runtime keeps them: gate (HF w1), up (w3), down (w2).
# Stored merged per layer as [E, rows, cols] tensors named blk.{i}.{name}.weight.
EXPERT_MATRICES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
EXPERT_SUFFIX = "_exps.weight"


# The output head; a file without it (tie_word_embeddings) multiplies by token_embd.weight, as llama.cpp does.
TIED_OUTPUT = "output.weight"


def is_expert_tensor(name: str) -> bool:
    """True for the merged expert tensors (blk.N.ffn_*_exps.weight), which the expert cache reads."""
    return name.endswith(EXPERT_SUFFIX)


def expert_tensors(layer: int) -> tuple[str, str, str]:
    """GGUF names of layer's merged gate, up and down expert tensors."""
    return tuple(f"blk.{layer}.{m}.weight" for m in EXPERT_MATRICES)


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int            # L
    n_embd: int             # D, hidden size
    n_ff: int               # F, FFN (expert) hidden size
    n_head: int             # H query heads
    n_head_kv: int          # KV heads (GQA groups)
    n_vocab: int            # V
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    n_expert: int           # E; 0 for a dense FFN
    n_expert_used: int      # A, experts per token; 0 for dense
    arch: str = ARCH        # GGUF general.architecture, a key of ARCHS
    n_embd_head: int = 0    # hd when it is not D / H ({arch}.attention.key_length; Qwen3: 128 with D 2048, H 32)
    n_ff_shexp: int = 0     # shared expert's FFN size ({arch}.expert_shared_feed_forward_length); 0: none

    @property
    def kind(self) -> Arch:
        return ARCHS[self.arch]

    @property
    def head_dim(self) -> int:
        return self.n_embd_head or self.n_embd // self.n_head

    @property
    def q_dim(self) -> int:
        return self.head_dim * self.n_head

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_head_kv

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Logical numpy shapes (slowest first) of every tensor, by GGUF name."""
        D, F, V, E, Q, K = self.n_embd, self.n_ff, self.n_vocab, self.n_expert, self.q_dim, self.kv_dim
        a, S = self.kind, self.n_ff_shexp
        s: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D)}
        for i in range(self.n_layer):
            b = f"blk.{i}."
            s[b + "attn_norm.weight"] = (D,)
            s[b + "attn_q.weight"] = (Q, D)
            s[b + "attn_k.weight"] = (K, D)
            s[b + "attn_v.weight"] = (K, D)
            if a.qkv_bias:
                s[b + "attn_q.bias"], s[b + "attn_k.bias"], s[b + "attn_v.bias"] = (Q,), (K,), (K,)
            if a.qk_norm:
                s[b + "attn_q_norm.weight"] = (self.head_dim,) if a.qk_norm == "head" else (Q,)
                s[b + "attn_k_norm.weight"] = (self.head_dim,) if a.qk_norm == "head" else (K,)
            s[b + "attn_output.weight"] = (D, Q)
            s[b + "ffn_norm.weight"] = (D,)
            if self.is_moe:
                s[b + "ffn_gate_inp.weight"] = (E, D)
                gate, up, down = expert_tensors(i)
                s[gate] = (E, F, D)
                s[up] = (E, F, D)
                s[down] = (E, D, F)
                if S:
                    s[b + "ffn_gate_inp_shexp.weight"] = (D,)
                    s[b + "ffn_gate_shexp.weight"] = (S, D)
                    s[b + "ffn_up_shexp.weight"] = (S, D)
                    s[b + "ffn_down_shexp.weight"] = (D, S)
            else:
                s[b + "ffn_gate.weight"] = (F, D)
                s[b + "ffn_up.weight"] = (F, D)
                s[b + "ffn_down.weight"] = (D, F)
        return s

    def params(self) -> tuple[int, int]:
        """(total parameters, parameters active per token)."""
        total = active = 0
        for name, shape in self.tensor_shapes().items():
            n = 1
            for d in shape:
                n *= d
            total += n
            active += n * self.n_expert_used // self.n_expert if is_expert_tensor(name) else n
        return total, active

    def kv_bytes(self, ctx: int) -> int:
        """The KV cache: float32 K and V of ctx tokens in every layer ([L, G, ctx, hd] twice)."""
        return 2 * self.n_layer * self.kv_dim * 4 * ctx


def config_from_metadata(md: dict, where: str = "model", tensors=None) -> ModelConfig:
    """Build and check a ModelConfig from GGUF metadata (each key typed by format/metadata.py); ValueError
    naming `where` and the key. With `tensors` (the names in the file) the counts are checked against what
    the file holds before anything is built from them."""
    arch = meta(md, "general.architecture", where, None)
    if arch not in ARCHS:
        raise ValueError(f"{where}: architecture {arch!r} is not supported" + (f": {REFUSED[arch][1]}" if arch in REFUSED else
                         f" (expected one of {', '.join(repr(a) for a in ARCHS)})"))
    p = arch + "."
    n_head = meta(md, p + "attention.head_count", where)
    n_embd = meta(md, p + "embedding_length", where)
    tokens = meta(md, "tokenizer.ggml.tokens", where, None)
    n_vocab = meta(md, p + "vocab_size", where, len(tokens) if tokens is not None else MISSING)
    n_ff_exp = meta(md, p + "expert_feed_forward_length", where, None)
    head = meta(md, p + "attention.key_length", where, 0)
    if meta(md, p + "attention.value_length", where, head) != head:
        raise ValueError(f"{where}: attention.value_length differs from attention.key_length {head}; not supported")
    cfg = ModelConfig(
        n_layer=meta(md, p + "block_count", where),
        n_embd=n_embd,
        n_ff=n_ff_exp if n_ff_exp is not None else meta(md, p + "feed_forward_length", where),
        n_head=n_head,
        n_head_kv=meta(md, p + "attention.head_count_kv", where, n_head),
        n_vocab=n_vocab,
        n_ctx_train=meta(md, p + "context_length", where),
        rms_eps=meta(md, p + "attention.layer_norm_rms_epsilon", where),
        rope_theta=meta(md, p + "rope.freq_base", where, 10000.0),
        n_expert=meta(md, p + "expert_count", where, 0),
        n_expert_used=meta(md, p + "expert_used_count", where, 0),
        arch=arch,
        n_embd_head=0 if head == n_embd // n_head else head,
        n_ff_shexp=meta(md, p + "expert_shared_feed_forward_length", where, 0),
    )
    check_config(cfg, where)
    rope_dim = meta(md, p + "rope.dimension_count", where, cfg.head_dim)
    if rope_dim != cfg.head_dim:
        raise ValueError(f"{where}: rope.dimension_count {rope_dim} differs from the head size {cfg.head_dim}; "
                         f"partial RoPE is not supported")
    if tokens is not None and len(tokens) != cfg.n_vocab:
        raise ValueError(f"{where}: vocab_size {cfg.n_vocab} but the tokenizer has {len(tokens)} tokens")
    if tensors is not None:
        check_counts(cfg, tensors, where)
    return cfg


# Tensors every layer has at least: attn_norm, q, k, v, output, ffn_norm and three FFN matrices.
TENSORS_PER_LAYER = 9


def check_counts(cfg: ModelConfig, tensors, where: str = "model") -> None:
    """ValueError unless the file's tensor names can hold cfg's layers: refused before tensor_shapes()
    builds ~9 entries per layer from a block_count that a four-byte edit made 2^20."""
    need = TENSORS_PER_LAYER * cfg.n_layer + 2      # + token_embd, output_norm (output may be tied)
    if need > len(tensors) or f"blk.{cfg.n_layer - 1}.attn_norm.weight" not in tensors:
        raise ValueError(f"{where}: block_count is {cfg.n_layer} but the file holds {len(tensors)} tensors "
                         f"(a model of {cfg.n_layer} layers has at least {need}, up to blk.{cfg.n_layer - 1})")


def check_config(cfg: ModelConfig, where: str = "model") -> None:
    """ValueError if the hyper-parameters contradict each other or are out of range."""
    for f in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "n_ctx_train"):
        v = getattr(cfg, f)
        if not 0 < v <= 1 << 20:
            raise ValueError(f"{where}: {f} = {v} is out of range")
    if cfg.arch not in ARCHS:
        raise ValueError(f"{where}: architecture {cfg.arch!r} is not supported")
    if not 0 <= cfg.n_embd_head <= 1 << 16 or not 0 <= cfg.n_ff_shexp <= 1 << 20:
        raise ValueError(f"{where}: head size {cfg.n_embd_head} or shared expert size {cfg.n_ff_shexp} is out of range")
    if (cfg.n_embd_head == 0 and cfg.n_embd % cfg.n_head) or cfg.head_dim % 2 or cfg.head_dim == 0:
        raise ValueError(f"{where}: hidden size {cfg.n_embd} does not split into {cfg.n_head} heads of even size")
    if cfg.kind.moe_only and not cfg.is_moe:
        raise ValueError(f"{where}: a {cfg.arch} model needs expert_count > 0")
    if bool(cfg.n_ff_shexp) != (cfg.kind.shared_expert and cfg.is_moe):
        raise ValueError(f"{where}: {cfg.arch} " + ("needs expert_shared_feed_forward_length > 0" if cfg.kind.shared_expert
                                                    else "has no shared expert, but expert_shared_feed_forward_length is set"))
    if cfg.n_head % cfg.n_head_kv:
        raise ValueError(f"{where}: {cfg.n_head} heads are not a multiple of {cfg.n_head_kv} KV heads")
    if not (cfg.rms_eps > 0 and cfg.rope_theta > 0):
        raise ValueError(f"{where}: RMSNorm epsilon and RoPE theta must be positive")
    if cfg.n_expert < 0 or cfg.n_expert > 256:
        raise ValueError(f"{where}: expert_count {cfg.n_expert} is out of range")
    if cfg.is_moe and not 1 <= cfg.n_expert_used <= cfg.n_expert:
        raise ValueError(f"{where}: expert_used_count {cfg.n_expert_used} must be between 1 and expert_count {cfg.n_expert}")
