"""Checkpoint sources: each turns a folder or file into a ModelConfig, GGUF metadata and a
list of tensors to write, read lazily.

- Hugging Face folder: config.json (MixtralForCausalLM, MistralForCausalLM, LlamaForCausalLM, Qwen3MoeForCausalLM,
  Qwen2MoeForCausalLM, OlmoeForCausalLM: format/config.ARCHS),
  model.safetensors or shards listed in model.safetensors.index.json, tokenizer.model,
  tokenizer_config.json / chat_template.jinja.
- Mistral native folder: params.json, consolidated*.safetensors, tokenizer.model(.v1/.v3).
- A GGUF file: requantized; the old one-tensor-per-expert layout is merged here.

Every tensor is described by a TensorPlan whose parts, read in order, give its rows:
row chunks for 2-D matrices, one expert at a time for 3-D expert tensors, so no more
than one such part is ever in memory.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lazymoe.format.checks import number, open_regular, read_json_object, read_regular, whole_number
from lazymoe.format.config import ARCHS, EXPERT_MATRICES, REFUSED, TIED_OUTPUT, ModelConfig, check_config, config_from_metadata
from lazymoe.format.metadata import MAX_DIM, MAX_EXPERTS
from lazymoe.format.tokens import UNUSED
from lazymoe.kernels.qtypes import QType
from lazymoe.quantize.safetensors_file import SafetensorsFile

ROW_CHUNK = 4096   # rows of a 2-D matrix read at once (4096 x 4096 f32 = 64 MiB)

Part = Callable[[], np.ndarray]   # -> float32 [rows, cols] (or stored rows when TensorPlan.stored is set)


@dataclass
class TensorPlan:
    name: str                    # GGUF name
    shape: tuple[int, ...]       # logical numpy shape (slowest first)
    parts: list[Part]            # concatenated along the rows give the tensor
    keep_f32: bool = False       # norms and the router stay F32 whatever --type says
    stored: QType | None = None  # parts already return stored arrays of this type (synthetic models)


@dataclass
class Source:
    path: str
    kind: str                    # "hf", "mistral", "gguf"
    config: ModelConfig
    metadata: dict = field(default_factory=dict)   # GGUF key -> value (tokenizer, name, ...)
    tensors: list[TensorPlan] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)   # every file read from, which the output must not be

    def close(self) -> None:
        for c in self.closers:
            c()


# Files a checkpoint folder is read from besides its safetensors shards.
_FOLDER_FILES = ("config.json", "params.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
                 "tokenizer.model.v1", "tokenizer.model.v3", "tokenizer_config.json", "chat_template.jinja")


def _folder_inputs(path: str, shards) -> list[str]:
    names = [n for n in _FOLDER_FILES if os.path.isfile(os.path.join(path, n))] + list(shards.files)
    return [os.path.join(path, n) for n in names]


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half Q/K rows -> llama.cpp's interleaved pairs (its converter's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_source(path: str) -> Source:
    """Detect what `path` is and open it; ValueError naming the path if it is none of the three."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return _open_hf(path)
        if os.path.isfile(os.path.join(path, "params.json")):
            return _open_mistral(path)
        raise ValueError(f"{path}: not a checkpoint folder (expected config.json for Hugging Face or params.json for "
                         f"Mistral's native format)")
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if magic == b"GGUF":
        return _open_gguf(path)
    raise ValueError(f"{path}: not a GGUF file or checkpoint folder")


# --- shared helpers ---------------------------------------------------------------

class _Shards:
    """Tensor name -> the safetensors file holding it, over one or many shards."""

    def __init__(self, folder: str, files: list[str], weight_map: dict[str, str] | None = None):
        self.folder = folder
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        for fn in files:
            p = os.path.join(folder, fn)
            if not os.path.isfile(p):
                raise ValueError(f"{p}: shard is missing")
            self.files[fn] = SafetensorsFile(p)
            for n in self.files[fn].names:
                self.where[n] = fn
        if weight_map:
            for n, fn in weight_map.items():
                if self.where.get(n) != fn:
                    raise ValueError(f"{os.path.join(folder, fn)}: the index lists tensor {n} there but the shard does not hold it")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self._file(name)].shape(name)

    def _file(self, name: str) -> str:
        fn = self.where.get(name)
        if fn is None:
            raise ValueError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        return fn

    def reader(self, name: str, expect: tuple[int, ...], rows: slice | None = None, fix: Callable | None = None) -> Part:
        f = self.files[self._file(name)]
        if tuple(f.shape(name)) != tuple(expect):
            raise ValueError(f"{f.path}: tensor {name} has shape {list(f.shape(name))}, expected {list(expect)} from the config")

        def read() -> np.ndarray:
            a = f.get(name, None if rows is None else (rows.start, rows.stop))
            a = np.ascontiguousarray(a, dtype=np.float32)
            return fix(a) if fix is not None else a
        return read

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _matrix(shards: _Shards, name: str, gguf_name: str, shape: tuple[int, int], fix=None) -> TensorPlan:
    """A 2-D matrix read in row chunks (or whole when `fix` needs all rows)."""
    if fix is not None:
        return TensorPlan(gguf_name, shape, [shards.reader(name, shape, fix=fix)])
    parts = [shards.reader(name, shape, slice(r, r + ROW_CHUNK)) for r in range(0, shape[0], ROW_CHUNK)]
    return TensorPlan(gguf_name, shape, parts)


def _vector(shards: _Shards, name: str, gguf_name: str, n: int) -> TensorPlan:
    return TensorPlan(gguf_name, (n,), [shards.reader(name, (n,), fix=lambda a: a.reshape(1, -1))], keep_f32=True)


# The source's name for each merged expert tensor: Mixtral's w1 (gate), w3 (up) and w2 (down).
_EXPERT_SOURCE = dict(zip(EXPERT_MATRICES, ("w1", "w3", "w2")))


def _kind(gname: str) -> tuple[str, str]:
    """(layer or "", kind) of a GGUF name: ("0", "attn_q") for blk.0.attn_q.weight, ("0", "attn_q.bias") for its bias."""
    parts = gname.split(".")
    i, kind = (parts[1], parts[2]) if parts[0] == "blk" else ("", parts[0])
    return i, kind if parts[-1] == "weight" else f"{kind}.{parts[-1]}"


def _plan(cfg: ModelConfig, shards: _Shards, names: dict[str, str], permute_qk: bool,
          expert_source: dict[str, str] = _EXPERT_SOURCE) -> list[TensorPlan]:
    """A plan for every tensor of cfg.tensor_shapes() (the one table of GGUF names and shapes), read from a
    source whose names are given by `names`: a table from the GGUF name's kind ("attn_q", "attn_q.bias",
    "token_embd", ...; "expert" for the merged expert tensors) to the source's name with {i} for the layer,
    {e} the expert and {w} the expert matrix's name in `expert_source` (Mixtral's w1/w2/w3)."""
    heads = {"attn_q": cfg.n_head, "attn_k": cfg.n_head_kv}
    out = []
    for gname, shape in cfg.tensor_shapes().items():
        i, kind = _kind(gname)
        if names.get(kind, "") is None:                        # a tensor the file leaves out (a tied output)
            continue
        if kind in expert_source:
            src = names["expert"].replace("{i}", i).replace("{w}", expert_source[kind])
            readers = [shards.reader(src.replace("{e}", str(e)), shape[1:]) for e in range(shape[0])]
            out.append(TensorPlan(gname, shape, readers))
            continue
        src = names[kind].replace("{i}", i)
        if kind == "ffn_gate_inp_shexp":                       # HF's Linear(D, 1): [1, D], squeezed as llama.cpp does
            out.append(TensorPlan(gname, shape, [shards.reader(src, (1,) + shape)], keep_f32=True))
        elif len(shape) == 1:
            out.append(_vector(shards, src, gname, shape[0]))
        elif kind == "ffn_gate_inp":
            out.append(TensorPlan(gname, shape, [shards.reader(src, shape)], keep_f32=True))
        else:
            fix = (lambda a, n=heads[kind]: llama_permute(a, n)) if permute_qk and kind in heads else None
            out.append(_matrix(shards, src, gname, shape, fix))
    return out


def _tokenizer_metadata(folder: str, candidates: tuple[str, ...], n_vocab: int) -> dict:
    """tokenizer.ggml.* keys from a SentencePiece tokenizer.model, padded to n_vocab like llama.cpp."""
    from lazymoe.quantize.spm_model import load_spm_model

    path = next((os.path.join(folder, c) for c in candidates if os.path.isfile(os.path.join(folder, c))), None)
    if path is None:
        raise ValueError(f"{folder}: no SentencePiece tokenizer ({' or '.join(candidates)}) in the folder")
    spm = load_spm_model(path)
    pieces, scores, types = list(spm.pieces), list(spm.scores), list(spm.types)
    if len(pieces) > n_vocab:
        raise ValueError(f"{path}: the tokenizer has {len(pieces)} pieces but the model's vocabulary is {n_vocab}")
    for i in range(len(pieces), n_vocab):      # llama.cpp pads a larger embedding the same way
        pieces.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": np.asarray(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": np.asarray(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": spm.bos_id,
        "tokenizer.ggml.eos_token_id": spm.eos_id,
        "tokenizer.ggml.unknown_token_id": spm.unk_id,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": bool(spm.add_dummy_prefix),
    }
    if spm.pad_id is not None and 0 <= spm.pad_id < n_vocab:
        md["tokenizer.ggml.padding_token_id"] = spm.pad_id
    return md


def _hf_tokenizer_metadata(folder: str, n_vocab: int) -> dict:
    """A byte-level BPE tokenizer.json (Qwen, Llama 3, OLMo) or else a SentencePiece tokenizer.model (Mistral)."""
    from lazymoe.quantize.hf_tokenizer import bpe_metadata, is_byte_level_bpe

    if is_byte_level_bpe(folder):
        return bpe_metadata(folder, n_vocab)
    return _tokenizer_metadata(folder, ("tokenizer.model",), n_vocab)


def _hf_chat_template(folder: str) -> str | None:
    p = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(p):
        try:
            return read_regular(p).decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: cannot read as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    p = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(p):
        return None
    t = read_json_object(p).get("chat_template")
    if isinstance(t, list):            # [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def model_metadata(cfg: ModelConfig, n_ff: int | None = None) -> dict:
    """The {arch}.* keys llama.cpp's converter writes for cfg; n_ff: feed_forward_length where it is not the
    experts' size (Qwen's intermediate_size, of a dense FFN the MoE layers do not have; default cfg.n_ff)."""
    p = cfg.arch + "."
    md = {
        "general.architecture": cfg.arch,
        p + "block_count": cfg.n_layer,
        p + "context_length": cfg.n_ctx_train,
        p + "embedding_length": cfg.n_embd,
        p + "feed_forward_length": cfg.n_ff if n_ff is None else n_ff,
        p + "attention.head_count": cfg.n_head,
        p + "attention.head_count_kv": cfg.n_head_kv,
        p + "attention.layer_norm_rms_epsilon": cfg.rms_eps,
        p + "rope.freq_base": cfg.rope_theta,
        p + "rope.dimension_count": cfg.head_dim,
        p + "vocab_size": cfg.n_vocab,
    }
    if cfg.n_embd_head:
        md[p + "attention.key_length"] = md[p + "attention.value_length"] = cfg.n_embd_head
    if cfg.is_moe:
        md[p + "expert_count"] = cfg.n_expert
        md[p + "expert_used_count"] = cfg.n_expert_used
        if cfg.kind.expert_ff_key:
            md[p + "expert_feed_forward_length"] = cfg.n_ff
    if cfg.n_ff_shexp:
        md[p + "expert_shared_feed_forward_length"] = cfg.n_ff_shexp
    return md


# --- Hugging Face -------------------------------------------------------------------

_HF_ARCHS = tuple(n for a in ARCHS.values() for n in a.hf)

_HF_NAMES = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "attn_q": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_k": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_v": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "attn_q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "attn_output": "model.layers.{i}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "ffn_gate_inp": "model.layers.{i}.block_sparse_moe.gate.weight",
    "expert": "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight",
    "ffn_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{i}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{i}.mlp.down_proj.weight",
}

# Qwen2/3-MoE and OLMoE name the router and the experts as the dense model names its MLP; Qwen2-MoE adds
# the shared expert and its gate.
_HF_MLP_NAMES = {
    **_HF_NAMES,
    "ffn_gate_inp": "model.layers.{i}.mlp.gate.weight",
    "expert": "model.layers.{i}.mlp.experts.{e}.{w}.weight",
    "ffn_gate_inp_shexp": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "ffn_gate_shexp": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
}
_HF_MLP_EXPERTS = dict(zip(EXPERT_MATRICES, ("gate_proj", "up_proj", "down_proj")))


_NO_DEFAULT = object()


def _json_int(c: dict, key: str, where: str, default=_NO_DEFAULT, lo: int = 1, hi: int = MAX_DIM) -> int:
    """c[key] as a JSON integer in [lo, hi] (null or absent: default); ValueError naming the file and key."""
    v = c.get(key)
    if v is None:
        if default is _NO_DEFAULT:
            raise ValueError(f"{where}: key {key} is missing")
        return default
    return whole_number(v, f"{where}: {key}", lo, hi)


def _json_float(c: dict, key: str, where: str, default: float, hi: float) -> float:
    """c[key] as a finite number in (0, hi] (null or absent: default)."""
    v = c.get(key)
    return default if v is None else number(v, f"{where}: {key}", 0.0, hi, lo_open=True)


def _hf_arch(where: str, c: dict) -> str:
    """The GGUF architecture of a config.json's `architectures`; ValueError naming what is refused."""
    archs = c.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ValueError(f"{where}: architectures must be a list of names, got {str(archs)[:80]}")
    for name, a in ARCHS.items():
        if any(x in a.hf for x in archs):
            return name
    for hf, why in REFUSED.values():
        if any(x in hf for x in archs):
            raise ValueError(f"{where}: {why}")
    raise ValueError(f"{where}: architecture {archs or str(c.get('model_type'))[:80]!r} is not supported "
                     f"(expected one of {', '.join(_HF_ARCHS)})")


def _hf_refuse(where: str, c: dict, arch: str) -> None:
    """ValueError for a config the architecture's network (as llama.cpp builds it) does not compute."""
    a = ARCHS[arch]
    if arch == "llama":
        return
    checks = [
        ("use_sliding_window", bool(c.get("use_sliding_window", False)), False),
        ("clip_qkv", c.get("clip_qkv"), None),
    ]
    if a.moe_only:
        checks += [("norm_topk_prob", bool(c.get("norm_topk_prob", False)), a.norm_topk),
                   ("decoder_sparse_step", c.get("decoder_sparse_step", 1), 1),
                   ("mlp_only_layers", c.get("mlp_only_layers") or [], [])]
    if arch != "qwen2":                              # Qwen2's q/k/v biases are not a config option
        bias_key = "qkv_bias" if arch == "qwen2moe" else "attention_bias"
        checks.append((bias_key, bool(c.get(bias_key, a.qkv_bias)), a.qkv_bias))
    for key, got, want in checks:
        if got != want:
            raise ValueError(f"{where}: {key} = {json.dumps(got)[:40]} is not supported for {arch} (llama.cpp's {arch} "
                             f"network has {json.dumps(want)})")


def _hf_config(path: str, c: dict) -> tuple[ModelConfig, int | None]:
    """(the ModelConfig of a config.json, its dense intermediate_size where the experts' size is another key)."""
    where = os.path.join(path, "config.json")
    arch = _hf_arch(where, c)
    archs = c.get("architectures")
    _hf_refuse(where, c, arch)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise ValueError(f"{where}: RoPE scaling {str(rope_type)[:80]!r} is not supported")
    theta_in = c if "rope_theta" in c or not isinstance(rope, dict) else rope
    n_head = _json_int(c, "num_attention_heads", where)
    D = _json_int(c, "hidden_size", where)
    head_dim = _json_int(c, "head_dim", where, None)
    if arch == "llama" and head_dim is not None and head_dim * n_head != D:
        raise ValueError(f"{where}: head_dim {head_dim} x {n_head} heads differs from hidden_size {D}; not supported")
    ff = _json_int(c, "intermediate_size", where)
    moe_ff = _json_int(c, "moe_intermediate_size", where) if ARCHS[arch].expert_ff_key else ff
    experts_key = "num_local_experts" if arch == "llama" else "num_experts"
    cfg = ModelConfig(
        n_layer=_json_int(c, "num_hidden_layers", where), n_embd=D, n_ff=moe_ff,
        n_head=n_head, n_head_kv=_json_int(c, "num_key_value_heads", where, n_head),
        n_vocab=_json_int(c, "vocab_size", where), n_ctx_train=_json_int(c, "max_position_embeddings", where, 4096),
        rms_eps=_json_float(c, "rms_norm_eps", where, 1e-5, 1.0),
        rope_theta=_json_float(theta_in, "rope_theta", where, 10000.0, 1e12),
        n_expert=_json_int(c, experts_key, where, 0, lo=0, hi=MAX_EXPERTS),
        n_expert_used=_json_int(c, "num_experts_per_tok", where, 0, lo=0, hi=MAX_EXPERTS),
        arch=arch,
        n_embd_head=0 if head_dim is None or head_dim * n_head == D else head_dim,
        n_ff_shexp=_json_int(c, "shared_expert_intermediate_size", where) if ARCHS[arch].shared_expert else 0,
    )
    if "MixtralForCausalLM" in archs and not cfg.is_moe:
        raise ValueError(f"{where}: MixtralForCausalLM without num_local_experts")
    if arch == "llama" and "MixtralForCausalLM" not in archs and cfg.is_moe:
        cfg = ModelConfig(**{**cfg.__dict__, "n_expert": 0, "n_expert_used": 0})
    check_config(cfg, where)
    return cfg, ff if ARCHS[arch].expert_ff_key else None


def _open_hf(path: str) -> Source:
    c = read_json_object(os.path.join(path, "config.json"))
    cfg, n_ff_dense = _hf_config(path, c)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        wm = read_json_object(index).get("weight_map")
        if not isinstance(wm, dict):
            raise ValueError(f"{index}: no weight_map")
        shards = _Shards(path, sorted(set(wm.values())), wm)
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        shards = _Shards(path, ["model.safetensors"])
    else:
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)")
    llama = cfg.arch == "llama"
    names = dict(_HF_NAMES if llama else _HF_MLP_NAMES)
    if c.get("tie_word_embeddings"):
        names["output"] = None          # tied: no output.weight, as llama.cpp's converter writes it
    src = Source(path, "hf", cfg, closers=[shards.close], inputs=_folder_inputs(path, shards))
    try:
        # llama.cpp permutes Q/K rows for its adjacent-pair RoPE; NeoX-RoPE architectures keep HF's rows
        src.tensors = _plan(cfg, shards, names, permute_qk=not cfg.kind.rope_neox,
                            expert_source=_EXPERT_SOURCE if llama else _HF_MLP_EXPERTS)
        src.metadata = model_metadata(cfg, n_ff_dense)
        src.metadata["general.name"] = os.path.basename(os.path.abspath(path))
        src.metadata.update(_hf_tokenizer_metadata(path, cfg.n_vocab))
        tmpl = _hf_chat_template(path)
        if tmpl:
            src.metadata["tokenizer.chat_template"] = tmpl
    except BaseException:
        src.close()
        raise
    return src


# --- Mistral native -----------------------------------------------------------------

_MISTRAL_NAMES = {
    "token_embd": "tok_embeddings.weight",
    "output_norm": "norm.weight",
    "output": "output.weight",
    "attn_norm": "layers.{i}.attention_norm.weight",
    "attn_q": "layers.{i}.attention.wq.weight",
    "attn_k": "layers.{i}.attention.wk.weight",
    "attn_v": "layers.{i}.attention.wv.weight",
    "attn_output": "layers.{i}.attention.wo.weight",
    "ffn_norm": "layers.{i}.ffn_norm.weight",
    "ffn_gate_inp": "layers.{i}.feed_forward.gate.weight",
    "expert": "layers.{i}.feed_forward.experts.{e}.{w}.weight",
    "ffn_gate": "layers.{i}.feed_forward.w1.weight",
    "ffn_up": "layers.{i}.feed_forward.w3.weight",
    "ffn_down": "layers.{i}.feed_forward.w2.weight",
}


def _open_mistral(path: str) -> Source:
    where = os.path.join(path, "params.json")
    p = read_json_object(where)
    moe = p.get("moe") or {}
    if not isinstance(moe, dict):
        raise ValueError(f"{where}: moe must be an object, got {str(moe)[:80]}")
    n_head = _json_int(p, "n_heads", where)
    D = _json_int(p, "dim", where)
    head_dim = _json_int(p, "head_dim", where, None)
    if head_dim is not None and head_dim * n_head != D:
        raise ValueError(f"{where}: head_dim {head_dim} x {n_head} heads differs from dim {D}; not supported")
    ctx = _json_int(p, "max_seq_len", where, None) or _json_int(p, "max_position_embeddings", where, 32768)
    cfg = ModelConfig(
        n_layer=_json_int(p, "n_layers", where), n_embd=D, n_ff=_json_int(p, "hidden_dim", where), n_head=n_head,
        n_head_kv=_json_int(p, "n_kv_heads", where, n_head), n_vocab=_json_int(p, "vocab_size", where),
        n_ctx_train=ctx, rms_eps=_json_float(p, "norm_eps", where, 1e-5, 1.0),
        rope_theta=_json_float(p, "rope_theta", where, 10000.0, 1e12),
        n_expert=_json_int(moe, "num_experts", where, 0, lo=0, hi=MAX_EXPERTS),
        n_expert_used=_json_int(moe, "num_experts_per_tok", where, 0, lo=0, hi=MAX_EXPERTS),
    )
    check_config(cfg, where)
    files = sorted(f for f in os.listdir(path) if re.fullmatch(r"consolidated.*\.safetensors", f))
    if not files:
        raise ValueError(f"{path}: no consolidated*.safetensors (only safetensors checkpoints are read)")
    shards = _Shards(path, files)
    src = Source(path, "mistral", cfg, closers=[shards.close], inputs=_folder_inputs(path, shards))
    try:
        # Mistral's native Q/K rows are already in the interleaved order llama.cpp uses.
        src.tensors = _plan(cfg, shards, _MISTRAL_NAMES, permute_qk=False)
        src.metadata = model_metadata(cfg)
        src.metadata["general.name"] = os.path.basename(os.path.abspath(path))
        src.metadata.update(_tokenizer_metadata(path, ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1"), cfg.n_vocab))
    except BaseException:
        src.close()
        raise
    return src


# --- GGUF ---------------------------------------------------------------------------

_OLD_EXPERT = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight")
_SKIP_KEYS = ("general.file_type", "general.quantization_version", "general.alignment")


def _open_gguf(path: str) -> Source:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf import quants as gq

    from lazymoe.format.gguf_file import GGUFFile

    f = GGUFFile(path)
    try:
        cfg = config_from_metadata(f.metadata, path, f.tensors)
        expected = cfg.tensor_shapes()
        md = {k: v for k, v in f.metadata.items() if not k.startswith(_SKIP_KEYS) and not k.startswith("split.")}
        old = {}
        for name in f.tensors:
            m = _OLD_EXPERT.fullmatch(name)
            if m:
                old[(int(m[1]), m[2], int(m[3]))] = name

        def reader(name: str, shape: tuple[int, ...], index=None) -> Part:
            """Rows of tensor `name` (logical `shape`), or of expert `index` of a merged 3-D tensor."""
            t = f.tensor_info(name)
            qt = GGMLQuantizationType(t.ggml_type)
            if qt.name in ("I8", "I16", "I32", "I64", "F64"):
                raise ValueError(f"{path}: tensor {name} has type {qt.name}, which cannot be requantized")
            want = shape if index is None else (cfg.n_expert,) + shape
            if tuple(t.shape) != tuple(want):
                raise ValueError(f"{path}: tensor {name} has shape {list(t.shape)}, expected {list(want)}")

            def read() -> np.ndarray:
                raw = f.raw(name)
                block, tsize = GGML_QUANT_SIZES[qt]
                if index is not None:                      # one expert of a merged tensor
                    per = len(raw) // cfg.n_expert
                    raw = raw[index * per:(index + 1) * per]
                shp = shape
                rows = int(np.prod(shp[:-1], dtype=np.int64)) if len(shp) > 1 else 1
                byte_shape = (rows, shp[-1] // block * tsize)
                a = np.array(gq.dequantize(raw.reshape(byte_shape), qt), dtype=np.float32).reshape(rows, shp[-1])
                # drop the mapped pages just read, so the converter's RSS does not grow with the file
                start = t.offset + (0 if index is None else index * per)
                f.madvise(start, raw.nbytes, mmap.MADV_DONTNEED)
                return a
            return read

        plans = []
        for gname, shape in expected.items():
            keep = len(shape) == 1 or gname.endswith("ffn_gate_inp.weight")
            if gname in f.tensors:
                if len(shape) == 3:
                    parts = [reader(gname, shape[1:], e) for e in range(cfg.n_expert)]
                else:
                    parts = [reader(gname, shape)]
                plans.append(TensorPlan(gname, shape, parts, keep_f32=keep))
                continue
            m = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", gname)
            if m and all((int(m[1]), m[2], e) in old for e in range(cfg.n_expert)):
                parts = [reader(old[(int(m[1]), m[2], e)], shape[1:]) for e in range(cfg.n_expert)]
                plans.append(TensorPlan(gname, shape, parts))
                continue
            if gname == TIED_OUTPUT and "token_embd.weight" in f.tensors:       # tied embeddings stay tied
                continue
            raise ValueError(f"{path}: tensor {gname} is missing")
    except BaseException:
        f.close()
        raise
    return Source(path, "gguf", cfg, md, plans, [f.close], [path])
