"""Train lazymoe's demo model: a small Mixtral (top-2 of 8 experts per layer) on Python's own source.

    python -m lazymoe.benchmarks.train_demo [--minutes 30] [--out DIR]

Needs the `ref` extra (torch, transformers, sentencepiece); CPU only. Steps:
1. Text: the .py files of this Python's standard library (every fresh machine has them),
   tests and site-packages left out; every 10th file (sorted by path) is held out.
2. Tokenizer: SentencePiece BPE with byte fallback, VOCAB pieces, trained on the training files.
3. Model: transformers' MixtralForCausalLM from scratch (CONFIG below), AdamW, cosine schedule
   over the time budget, the router load-balancing loss on so experts specialise.
4. Saved as a normal Hugging Face checkpoint (save_pretrained + tokenizer.model + Mixtral's chat
   template), converted by `lazymoe quantize` to Q4_0 (the real converter path), and the GGUF
   copied to runtime/data/ with a model card and the golden greedy ids of the Hugging Face
   model run on the GGUF's own dequantized weights (tests/fixtures/demo_golden.json).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "runtime", "data")
GGUF_NAME = "lazymoe-demo-q4_0.gguf"
VOCAB = 4096
SEQ = 256
BATCH = 16
SEED = 1234
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=VOCAB,
              max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
              router_aux_loss_coef=0.02, output_router_logits=True, bos_token_id=1, eos_token_id=2)
GOLDEN_PROMPT = "def fibonacci(n):\n"
GOLDEN_TOKENS = 48


def source_files() -> tuple[list[str], list[str]]:
    """(training files, held-out files) from the standard library."""
    std = sysconfig.get_paths()["stdlib"]
    files = sorted(p for p in glob.glob(os.path.join(std, "**", "*.py"), recursive=True)
                   if not any(s in p.split(os.sep) for s in ("test", "tests", "site-packages", "idle_test", "lib2to3")))
    held = files[::10]
    held_set = set(held)
    return [p for p in files if p not in held_set], held


def read(p: str) -> str:
    with open(p, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_tokenizer(files: list[str], out_dir: str) -> str:
    import sentencepiece as spm

    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for p in files:
            f.write(read(p))
            f.write("\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(out_dir, "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, num_threads=2, input_sentence_size=400000,
        shuffle_input_sentence=True, seed_sentencepiece_size=1000000, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=16384, minloglevel=2)
    os.unlink(corpus)
    return os.path.join(out_dir, "tokenizer.model")


def encode_files(sp, files: list[str]) -> np.ndarray:
    """All files as one token stream, each file BOS ... EOS."""
    ids = []
    for p in files:
        ids.append(sp.bos_id())
        ids.extend(sp.encode(read(p)))
        ids.append(sp.eos_id())
    return np.asarray(ids, dtype=np.int64)


def perplexity(model, stream: np.ndarray, n_windows: int = 64) -> float:
    import torch

    model.eval()
    nll, n = 0.0, 0
    starts = np.linspace(0, len(stream) - SEQ - 1, n_windows).astype(np.int64)
    with torch.no_grad():
        for s in range(0, n_windows, 8):
            x = torch.from_numpy(np.stack([stream[i:i + SEQ + 1] for i in starts[s:s + 8]]))
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            n += x[:, 1:].numel()
    model.train()
    return math.exp(nll / n)


def train(minutes: float, out_dir: str) -> dict:
    import sentencepiece as spm
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(SEED)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(os.cpu_count() or 2)
    train_files, held_files = source_files()
    tok_path = train_tokenizer(train_files, out_dir)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    train_ids, held_ids = encode_files(sp, train_files), encode_files(sp, held_files)
    print(f"{len(train_files)} training files ({len(train_ids):,} tokens), {len(held_files)} held out ({len(held_ids):,} tokens)",
          flush=True)

    model = MixtralForCausalLM(MixtralConfig(**CONFIG, attn_implementation="eager"))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    rng = np.random.default_rng(SEED)
    budget = minutes * 60
    t0 = time.perf_counter()
    step, warm = 0, 50
    from tqdm import tqdm
    bar = tqdm(total=int(budget), unit="s", desc="train")
    while True:
        el = time.perf_counter() - t0
        if el >= budget:
            break
        frac = el / budget
        lr = 3e-3 * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - SEQ - 1, BATCH)
        x = torch.from_numpy(np.stack([train_ids[s:s + SEQ + 1] for s in starts]))
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())
        # HF shifts labels itself; feed the same window as input and label
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 20 == 0:
            bar.update(int(time.perf_counter() - t0) - bar.n)
            bar.set_postfix(loss=f"{float(out.loss):.3f}", lr=f"{lr:.1e}")
    bar.close()
    secs = time.perf_counter() - t0
    model.config.output_router_logits = False
    ppl = perplexity(model, held_ids)
    print(f"{step} steps in {secs / 60:.1f} min; held-out perplexity {ppl:.2f}", flush=True)
    hf_dir = os.path.join(out_dir, "hf")
    model.save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(tok_path, os.path.join(hf_dir, "tokenizer.model"))
    from lazymoe.format.chat_templates import MIXTRAL_8X7B_TEMPLATE
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": MIXTRAL_8X7B_TEMPLATE}, f, indent=2)
    return {"steps": step, "minutes": secs / 60, "params": n_params, "train_tokens_seen": step * BATCH * SEQ,
            "train_files": len(train_files), "held_out_files": len(held_files), "train_tokens": int(len(train_ids)),
            "held_out_tokens": int(len(held_ids)), "held_out_ppl_hf_f32": ppl, "hf_dir": hf_dir}


def golden(gguf_path: str) -> dict:
    """Greedy ids of the Hugging Face model run on the GGUF's own dequantized weights."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from lazymoe.benchmarks.hf_reference import hf_state_dict
    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.runtime.tokenizer import Tokenizer

    g = GGUFFile(gguf_path)
    cfg = config_from_metadata(g.metadata, gguf_path)
    tok = Tokenizer.from_gguf_metadata(g.metadata)
    conf = {k: v for k, v in CONFIG.items() if k != "output_router_logits"}
    model = MixtralForCausalLM(MixtralConfig(**conf, attn_implementation="eager")).eval()
    model.load_state_dict(hf_state_dict(g, cfg, True), strict=True)
    ids = tok.encode(GOLDEN_PROMPT, bos=True)
    prompt_len = len(ids)
    with torch.no_grad():
        for _ in range(GOLDEN_TOKENS):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return {"prompt": GOLDEN_PROMPT, "prompt_ids": ids[:prompt_len], "greedy_ids": ids[prompt_len:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args(argv)
    from lazymoe.quantize.convert import convert

    out = a.out or tempfile.mkdtemp(prefix="lazymoe-demo-")
    os.makedirs(out, exist_ok=True)
    info = train(a.minutes, out)
    gguf_path = os.path.join(out, GGUF_NAME)
    s = convert(info["hf_dir"], gguf_path, "q4_0", force=True)
    print(s)
    gold = golden(gguf_path)
    os.makedirs(DATA, exist_ok=True)
    shutil.copy(gguf_path, os.path.join(DATA, GGUF_NAME))
    with open(os.path.join(ROOT, "tests", "fixtures", "demo_golden.json"), "w") as f:
        json.dump(gold, f, indent=1)
    info.update(gguf_bytes=os.path.getsize(gguf_path), seed=SEED, config=CONFIG, vocab=VOCAB, seq=SEQ, batch=BATCH)
    with open(os.path.join(DATA, "demo_train.json"), "w") as f:
        json.dump({k: v for k, v in info.items() if k != "hf_dir"}, f, indent=1)
    print(json.dumps({k: v for k, v in info.items() if k not in ("config",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
