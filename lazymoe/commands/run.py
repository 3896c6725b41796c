"""`lazymoe run` and `lazymoe chat`: generated text on stdout, the RAM plan and stats on stderr.

Each parser sets func=, a function taking the parsed args and returning an exit code;
runtime/cli.py turns a ValueError into one stderr line and exit code 2.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

# llama.cpp's sampling defaults for the command line; the Python API defaults to greedy.
CLI_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


def add_model_args(p: argparse.ArgumentParser, n_default: int, model_default: str | None = None) -> None:
    """The flags run, chat and serve share: the model, generation, the RAM budget and the expert cache.
    With model_default the model is optional (serve's demo model)."""
    if model_default is None:
        p.add_argument("model", help="a GGUF model file (lazymoe quantize or llama.cpp)")
    else:
        p.add_argument("model", nargs="?", default=model_default,
                       help="a GGUF model file (default: the demo model shipped with lazymoe)")
    p.add_argument("-n", "--n-predict", type=int, default=n_default, metavar="N",
                   help=f"most tokens to generate (default {n_default})")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="RAM budget for the whole process, e.g. 8G or 512M (default: available RAM minus max(1G, 5%% of RAM))")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context length in tokens: KV cache size (default: the model's, at most 4096)")
    p.add_argument("--temp", type=float, default=CLI_DEFAULTS["temperature"], metavar="T",
                   help="temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=CLI_DEFAULTS["top_k"], metavar="K", help="0 turns it off (default 40)")
    p.add_argument("--top-p", type=float, default=CLI_DEFAULTS["top_p"], metavar="P", help="1 turns it off (default 0.95)")
    p.add_argument("--min-p", type=float, default=CLI_DEFAULTS["min_p"], metavar="P", help="0 turns it off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=CLI_DEFAULTS["repeat_penalty"], metavar="R",
                   help="penalty on the last 64 tokens; 1 turns it off (default 1.0)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed, for repeatable sampling")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when this text is generated (repeatable)")
    p.add_argument("--policy", choices=("lru", "lfu", "layer"), default="layer",
                   help="expert cache policy: lru, lfu, or layer (an equal share of slots per layer; default)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="guess the next layer's experts with its router and read them early (default on)")
    p.add_argument("--prefetch-depth", type=int, default=None, metavar="N",
                   help="how many layers ahead to guess and read experts (default: 2 when the cache holds at "
                        "least 3/4 of the experts, else 1)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="read a layer's other experts while the first computes (default on)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=False,
                   help="guess the next layer's experts again from each layer's output (default off)")
    p.add_argument("--read", choices=("auto", "direct", "buffered"), default="auto",
                   help="expert reads: direct (O_DIRECT, bypassing the page cache), buffered, or auto (default): "
                        "buffered when most of the experts are in the page cache already, else direct")


def add_run_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="generate text from a prompt",
                              description="Generate text from a prompt; text on stdout, stats on stderr.")
    add_model_args(p, 128)
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and every stat instead")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="write the experts chosen per token and layer to FILE (JSON lines; see runtime/trace.py)")
    p.set_defaults(func=cmd_run)
    return p


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("chat", help="chat interactively (stdin lines; /exit or EOF ends)",
                              description="Chat with the model's chat template; the KV cache is kept across turns.")
    add_model_args(p, 512)
    p.add_argument("--system", default=None, metavar="TEXT", help="a system prompt")
    p.set_defaults(func=cmd_chat)
    return p


def sampling(args) -> dict:
    """Generation options from args, checked before the model is loaded."""
    if args.n_predict < 1:
        raise ValueError(f"-n must be at least 1, got {args.n_predict}")
    return check_generation({"max_tokens": args.n_predict, "temperature": args.temp, "top_k": args.top_k,
                             "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
                             "seed": args.seed, "stop": args.stop})


def check_generation(gen: dict) -> dict:
    """ValueError now, before any loading, for options that stream_generate would refuse."""
    from lazymoe.format.checks import whole_number
    from lazymoe.runtime.sampling import Sampler, StopStrings
    Sampler(gen.get("temperature", 0.0), gen.get("top_k", 0), gen.get("top_p", 1.0), gen.get("min_p", 0.0),
            gen.get("repeat_penalty", 1.0), gen.get("seed"), gen.get("frequency_penalty", 0.0),
            gen.get("presence_penalty", 0.0))
    StopStrings(gen.get("stop", ()))
    whole_number(gen.get("max_tokens", 1), "max_tokens", 1)
    return gen


def cache_options(args):
    """The expert-cache flags as one CacheOptions."""
    from lazymoe.runtime.expert_cache import CacheOptions
    return CacheOptions(policy=args.policy, read=args.read, prefetch=args.prefetch,
                        prefetch_depth=args.prefetch_depth, overlap=args.overlap,
                        refine=args.refine)


def machine_budget(ram, command: str):
    """`ram` as given, or None (the default budget) with a one-line note on stderr when it is more than
    this machine's memory: a plan for RAM that is not there would be refused by the kernel, not by us."""
    import psutil

    from lazymoe.runtime.memory import fmt_bytes, parse_size
    if ram is None:
        return None
    total = psutil.virtual_memory().total
    if parse_size(ram) <= total:
        return ram
    print(f"lazymoe {command}: note: --ram {ram} is more than this machine's {fmt_bytes(total)} of memory; "
          f"using the default budget (available memory minus a reserve; the RAM plan shows it)", file=sys.stderr)
    return None


def load(path: str, ram, ctx, cache, quiet: bool, command: str = "run"):
    """load_model (the caller prints model.plan.describe() once the first reply is done, so that an error
    found while loading or on the first prompt is the only stderr line)."""
    from lazymoe.runtime.model import load_model
    return load_model(path, ram_budget=machine_budget(ram, command), ctx=ctx,
                      progress=not quiet and sys.stderr.isatty(), cache=cache)


def format_stats(s: dict) -> str:
    prefetch = (f", prefetch {s['prefetch_issued']} issued, {s['prefetch_useful']} useful, recall "
                f"{100 * s['prefetch_recall']:.0f}%") if s.get("prefetch_issued") or s.get("prefetch_recall") else ""
    return (f"prompt {s['prompt_tokens']} tokens at {s['prompt_tok_per_s']:.1f} tok/s, generated "
            f"{s['generated_tokens']} at {s['gen_tok_per_s']:.2f} tok/s, first token after "
            f"{s['time_to_first_token_s']:.2f} s; experts hit {100 * s['hit_rate']:.0f}% "
            f"(generation {100 * s['gen_hit_rate']:.0f}%), {s['mb_read_per_token']:.1f} MB read per token{prefetch}; "
            f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB of {s['ram_budget_bytes'] / 2**20:.0f} MiB budget")


def stream_reply(model, prompt, gen: dict, show: bool, reuse: bool = False):
    """Generate from prompt (text or ids), writing the pieces to stdout as they come when show; returns
    (text, last Step)."""
    from lazymoe.runtime.generate import collect

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
    return collect(model.stream_generate(prompt, reuse=reuse, **gen), write if show else None)


def run_prompt(path: str, prompt: str, gen: dict, ram=None, ctx=None, cache=None, as_json: bool = False,
               trace: str | None = None, echo_prompt: bool = False) -> int:
    """`lazymoe run` (and `demo`): load, generate, print the text (or one JSON object) and the stats."""
    if not prompt:
        raise ValueError("the prompt is empty")
    check_generation(gen)
    model = load(path, ram, ctx, cache, quiet=as_json)
    if trace:
        model.net.trace = []
    try:
        if echo_prompt and not as_json:
            sys.stdout.write(prompt)           # the continuation follows the prompt, as llama.cpp prints it
        text, last = stream_reply(model, prompt, gen, show=not as_json)
        if trace:
            from lazymoe.runtime.trace import write_trace
            write_trace(trace, model, model.net.trace, last.stats["prompt_tokens"])
        if as_json:
            out = {"text": text, "tokens": list(last.token_ids), **last.stats,
                   "plan": model.plan.as_dict(), "cache": model.experts.counters() if model.experts else None}
            print(json.dumps(out))
        else:
            sys.stdout.write("\n")
            print(model.plan.describe(), file=sys.stderr)
            print(format_stats(last.stats), file=sys.stderr)
    finally:
        model.close()
    return 0


def cmd_run(args) -> int:
    gen = sampling(args)
    return run_prompt(args.model, args.prompt, gen, ram=args.ram, ctx=args.ctx, cache=cache_options(args),
                      as_json=args.json, trace=args.trace)


def _read_line(stdin, n: int) -> str:
    """Line n of chat's stdin; ValueError for bytes that are not UTF-8 (decoded strictly, or kept as lone
    surrogates by Python's surrogateescape)."""
    try:
        line = stdin.readline()
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin line {n} is not valid UTF-8 (byte 0x{e.object[e.start]:02x})") from None
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"stdin line {n} is not valid UTF-8 (byte 0x{ord(line[e.start]) & 0xFF:02x} at "
                         f"character {e.start + 1})") from None
    return line


def cmd_chat(args, stdin=None) -> int:
    from lazymoe.runtime.chat import chat_prompt_ids
    stdin = stdin if stdin is not None else sys.stdin
    gen = sampling(args)
    model = load(args.model, args.ram, args.ctx, cache_options(args), quiet=False, command="chat")
    tok = model.tokenizer
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    planned = False
    try:
        for n in itertools.count(1):
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = _read_line(stdin, n)
            if not line or line.strip() == "/exit":
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            ids = chat_prompt_ids(messages, model.chat_template, tok, model.ctx)
            reply, last = stream_reply(model, ids, gen, show=True, reuse=True)
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": reply.strip()})
            if not planned:
                print(model.plan.describe(), file=sys.stderr)
                planned = True
            print(format_stats(last.stats) + f"; {last.stats['prompt_tokens_cached']} tokens reused from the KV cache",
                  file=sys.stderr)
    finally:
        model.close()
    return 0
