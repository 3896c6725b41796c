"""Routing traces: which experts the router chose, per token and layer (`lazymoe run --trace FILE`).

Format: JSON lines. Line 1 is a header
    {"format": "lazymoe-trace", "version": 1, "model": PATH, "n_layer": L, "n_expert": E,
     "n_expert_used": A, "tokens": T, "prompt_tokens": P}
then one line per token in the order the model saw them, prompt first:
    {"i": 0, "prompt": true, "experts": [[e, e], ...]}      # L lists of A expert ids, best first
The last generated token is not fed back to the model, so it has no line.
"""
from __future__ import annotations

import json

import numpy as np

FORMAT = "lazymoe-trace"


def write_trace(path, model, arrays, prompt_tokens: int) -> None:
    """Write arrays (a list of [T, L, A] routes, one per forward) for a run whose first prompt_tokens were the prompt."""
    cfg = model.cfg
    ids = np.concatenate(arrays) if arrays else np.zeros((0, cfg.n_layer, cfg.n_expert_used), np.int16)  # [T, L, A]
    head = {"format": FORMAT, "version": 1, "model": model.path, "n_layer": cfg.n_layer, "n_expert": cfg.n_expert,
            "n_expert_used": cfg.n_expert_used, "tokens": len(ids), "prompt_tokens": int(prompt_tokens)}
    with open(path, "w") as f:
        f.write(json.dumps(head) + "\n")
        for i, row in enumerate(ids):
            f.write(json.dumps({"i": i, "prompt": i < prompt_tokens, "experts": row.tolist()}) + "\n")


def read_trace(path):
    """(header dict, experts int16 [T, L, A], is_prompt bool [T]); ValueError naming the file if it is not a trace."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    try:
        head = json.loads(lines[0]) if lines else {}
        if head.get("format") != FORMAT:
            raise ValueError
        rows = [json.loads(line) for line in lines[1:]]
        L, A = head["n_layer"], head["n_expert_used"]
        ids = np.array([r["experts"] for r in rows], np.int16).reshape(len(rows), L, A)
        prompt = np.array([bool(r["prompt"]) for r in rows], bool)
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a lazymoe trace (JSON lines with a {FORMAT!r} header and one "
                         f"[layers][experts] list per token)") from None
    return head, ids, prompt
