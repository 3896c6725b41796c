"""Instruction counts of row dots' generic-IR forms compiled for arm64, on any host (llvmlite's AArch64 backend).

    python -m lazymoe.benchmarks.arm64_asm            # IQ4_NL, IQ4_XS and Q4_K for comparison
    python -m lazymoe.benchmarks.arm64_asm --asm      # and the assembly

Each codegen is wrapped in a one-function module (the row dot alone, no Numba wrapper), optimised at O3 for a
Neoverse-N1 (NEON with the dot-product instructions, as Apple's M1) and counted per mnemonic: how a form lowers on
arm64 (e.g. whether a table lookup becomes `tbl` or a tree of bit selects) without arm64 hardware. Counts, not times.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

SHOWN = ("tbl", "bsl", "bif", "bit", "cmeq", "cmtst", "smull", "smull2", "smlal", "smlal2", "sdot", "saddlp",
         "sadalp", "mul", "mla", "addv", "fmla", "ldr", "ldp")


def forms():
    """name -> codegen (w, wo, xq, xd, xc) -> f32, the generic-IR (non-x86) forms."""
    from lazymoe.kernels import iq4, kquant
    return {"iq4_nl": iq4._nl_dot_codegen(False), "iq4_xs": iq4._xs_dot_codegen(False),
            "q4_k": kquant._k_dot_codegen("q4_k", False)}


def compile_arm64(codegen) -> str:
    """Assembly of the codegen as a function dot(w, wo, xq, xd, xc) for aarch64-unknown-linux-gnu."""
    import llvmlite.binding as llvm
    from llvmlite import ir
    from numba import types
    from numba.core import typing
    from numba.core.registry import cpu_target
    ctx = cpu_target.target_context
    arr = lambda dt: types.Array(dt, 1, "C")                      # noqa: E731
    sig = typing.signature(types.float32, arr(types.uint8), types.int64, arr(types.int8), arr(types.float32),
                           arr(types.float32))
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple("aarch64-unknown-linux-gnu").create_target_machine(
        cpu="neoverse-n1", features="+neon,+dotprod", opt=3)
    mod = ir.Module("dot")
    mod.triple = "aarch64-unknown-linux-gnu"
    fn = ir.Function(mod, ir.FunctionType(ir.FloatType(), [ctx.get_value_type(t) for t in sig.args]), "dot")
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(codegen(ctx, b, sig, list(fn.args)))
    m = llvm.parse_assembly(str(mod))
    m.data_layout = str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(m, pb)
    return tm.emit_assembly(m)


def counts(asm: str) -> Counter:
    return Counter(re.findall(r"^\s+([a-z][a-z0-9.]*)\s", asm, re.M))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.arm64_asm", description=__doc__.split("\n")[0])
    ap.add_argument("--asm", action="store_true", help="print the assembly too")
    a = ap.parse_args(argv)
    for name, cg in forms().items():
        asm = compile_arm64(cg)
        c = counts(asm)
        print(f"{name}: {sum(c.values())} instructions; " + ", ".join(f"{k} {c[k]}" for k in SHOWN if c[k]))
        if a.asm:
            print(asm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
