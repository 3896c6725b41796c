"""The `lazymoe` command: one console script, one subcommand per job.

Library code raises ValueError (or OSError) with one sentence; here it becomes one
line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import threading


class Parser(argparse.ArgumentParser):
    """argparse whose own errors are one stderr line (not the usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def check_utf8(argv: list[str]) -> None:
    """ValueError for a command-line argument that is not UTF-8 (Python keeps such bytes as lone surrogates)."""
    for i, a in enumerate(argv, 1):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError as e:
            shown = a.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise ValueError(f"command-line argument {i} ({shown[:60]!r}) is not valid UTF-8 "
                             f"(byte 0x{ord(a[e.start]) & 0xFF:02x})") from None


@functools.lru_cache(maxsize=1)
def build_parser() -> argparse.ArgumentParser:
    """The parser (built once: argparse's parse_args leaves it unchanged)."""
    from lazymoe.commands.bench import add_bench_parser
    from lazymoe.commands.demo import add_demo_parser
    from lazymoe.commands.imatrix import add_imatrix_parser
    from lazymoe.commands.info import add_info_parser
    from lazymoe.commands.quantize import add_quantize_parser, add_synth_parser
    from lazymoe.commands.run import add_chat_parser, add_run_parser
    from lazymoe.commands.serve import add_serve_parser

    p = Parser(prog="lazymoe", description="Run Mixture-of-Experts models larger than RAM.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_quantize_parser(sub)
    add_info_parser(sub)
    add_synth_parser(sub)
    add_imatrix_parser(sub)
    add_run_parser(sub)
    add_chat_parser(sub)
    add_demo_parser(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    return p


class Terminated(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so that every cleanup (a half-written output's temporary) runs."""


def _terminate(signum, frame):
    raise Terminated()


def one_line(msg: str) -> str:
    """msg with control characters escaped: an error may quote names or values from a hostile file (a key
    that swallowed the bytes after it), and must stay one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_utf8(argv)
    except ValueError as e:
        print(f"lazymoe: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lazymoe: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("lazymoe: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:             # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": ")
        print(f"lazymoe {args.command}: error: {one_line(msg)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
