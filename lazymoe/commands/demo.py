"""`lazymoe demo`: run the small Mixtral-architecture model shipped inside the package, offline.

The model (runtime/data/lazymoe-demo-q4_0.gguf, see MODEL_CARD.md beside it) was trained by
benchmarks/train_demo.py on Python's standard library source, so it continues Python code.
"""
from __future__ import annotations

import os

from lazymoe.commands.run import CLI_DEFAULTS
from lazymoe.runtime import DEMO_MODEL

DEFAULT_PROMPT = "def fibonacci(n):\n"


def add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the small demo model shipped with lazymoe (offline)",
                              description="Continue a prompt with the small Mixtral-architecture model shipped in the "
                                          "package (8 experts, top-2, trained on Python source) and print the stats.")
    p.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="the prompt (default: a Python function header)")
    p.add_argument("-n", "--n-predict", type=int, default=96, metavar="N", help="most tokens to generate (default 96)")
    p.add_argument("--ram", default=None, metavar="SIZE", help="RAM budget, e.g. 512M (default: available RAM minus max(1G, 5%% of RAM))")
    p.add_argument("--temp", type=float, default=0.0, metavar="T", help="temperature; 0 is greedy (default 0)")
    p.add_argument("-s", "--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and every stat")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from lazymoe.commands.run import run_prompt
    if not os.path.isfile(DEMO_MODEL):
        raise ValueError(f"{DEMO_MODEL}: the demo model is missing from this installation")
    gen = {"max_tokens": args.n_predict, "temperature": args.temp, "seed": args.seed, "repeat_penalty": 1.1,
           "top_k": CLI_DEFAULTS["top_k"], "top_p": CLI_DEFAULTS["top_p"], "min_p": CLI_DEFAULTS["min_p"]}
    return run_prompt(DEMO_MODEL, args.prompt, gen, ram=args.ram, as_json=args.json, echo_prompt=True)
