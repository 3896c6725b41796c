#!/usr/bin/env bash
# The kernel and golden-logit tests on arm64, under emulation, without arm64 hardware (Linux, as root).
#
# Builds (once, then cached) an arm64 Debian root with mmdebstrap, runs it through qemu-user-static's
# binfmt handler, installs lazymoe with its test dependencies from PyPI's aarch64 wheels into a venv
# inside it, and runs the kernel tests and the golden-logits tests there. Exits non-zero on any failure
# and ends with pytest's summary line. Slow (emulation): see the README for how often it runs.
#
#   tests/arm64/run.sh [PYTEST ARGS...]       # default: the kernel, arm64 codegen and golden-logit tests
#
# LAZYMOE_ARM64_ROOT: where the root is cached (default ~/.cache/lazymoe/arm64-root).
# LAZYMOE_ARM64_CPU: the CPU qemu emulates (default neoverse-n1: NEON with the dot-product instructions and no
# SVE, like Apple's M1; qemu's default "max" has SVE, and OpenBLAS's SVE kernels compute garbage under qemu 7.2:
# a 24x64 @ 64x512 float32 product came out 3.7e19 off). cortex-a72 is plain NEON (no sdot: the kernels' other
# lowering; an sdot there would be an illegal instruction). Numba compiles for the same CPU (NUMBA_CPU_NAME):
# under qemu-user LLVM reads the host's /proc/cpuinfo and would see a "generic" arm64 without dotprod.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
root=${LAZYMOE_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/lazymoe/arm64-root}
suite=bookworm
cpu=${LAZYMOE_ARM64_CPU:-neoverse-n1}

say() { printf 'arm64: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { say "needs root (mmdebstrap, chroot, binfmt_misc)"; exit 2; }

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -e "$root/.complete" ]; then
    say "building the arm64 Debian root in $root (once; minutes)"
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    mmdebstrap --arch=arm64 --variant=apt --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1 \
        "$suite" "$root" >/dev/null
    touch "$root/.complete"
fi

# The tree to test: the tracked files as they are in the working tree.
rm -rf "$root/src"
mkdir -p "$root/src"
(cd "$repo" && git ls-files -z | xargs -0 -I{} cp --parents {} "$root/src/" 2>/dev/null || true)
cp /etc/resolv.conf "$root/etc/resolv.conf"
cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$cert" ] && cp "$cert" "$root/etc/ssl/certs/host-ca.crt"

mounted=()
cleanup() { for m in "${mounted[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc sys dev; do
    mountpoint -q "$root/$m" || { mount --rbind "/$m" "$root/$m"; mounted+=("$root/$m"); }
done

args=("$@")
[ ${#args[@]} -gt 0 ] || args=(tests/test_kernels.py tests/test_arm64_codegen.py tests/test_runtime.py::test_logits_match_transformers)
say "installing lazymoe and its test dependencies inside (aarch64 wheels)"
chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin QEMU_CPU="$cpu" PIP_CERT=/etc/ssl/certs/host-ca.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 /bin/sh -c \
    'cd /src && { [ -x /venv/bin/python ] || python3 -m venv /venv; } && /venv/bin/pip install -q -e ".[test]"'
say "running pytest under emulation ($cpu): ${args[*]}"
chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin QEMU_CPU="$cpu" NUMBA_CPU_NAME="$cpu" NUMBA_NUM_THREADS=2 \
    /bin/sh -c \
    "cd /src && /venv/bin/python -m pytest -q -p no:cacheprovider $(printf '%q ' "${args[@]}")"
