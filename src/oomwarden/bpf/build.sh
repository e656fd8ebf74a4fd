#!/usr/bin/env bash
# Build the warden's BPF objects (docs/bpf.md): clang and bpftool from Debian,
# installed with apt when missing; vmlinux.h dumped from this kernel's BTF into
# .cache/bpf/; each src/oomwarden/bpf/NAME.bpf.c compiled into NAME.bpf.o next
# to its source (git-ignored), where the warden looks for it. What cannot be
# built here is said in one line per object, and the script exits 0: the
# warden then runs without it (procfs snapshots, /dev/kmsg for kernel kills).
set -uo pipefail
cd "$(dirname "$0")/../../.."
DIR=src/oomwarden/bpf
OUT=.cache/bpf
PATH="$PATH:/usr/sbin:/sbin"
mkdir -p "$OUT"

# Nothing can be built: one line, every object removed (a stale object built
# for another kernel must not be loaded).
say() { echo "bpf: $*; the warden will run without BPF (procfs, /dev/kmsg)" >&2
        rm -f "$DIR"/*.bpf.o; exit 0; }

if ! command -v clang >/dev/null || ! command -v bpftool >/dev/null \
        || [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq clang bpftool libbpf-dev; } >.cache/bpf-apt.log 2>&1 \
            || say "apt-get install clang bpftool libbpf-dev failed (see .cache/bpf-apt.log)"
    else
        say "clang, bpftool or libbpf-dev missing and cannot be installed (not root or no apt)"
    fi
fi
[ -r /sys/kernel/btf/vmlinux ] || say "no kernel BTF at /sys/kernel/btf/vmlinux"
start=$(date +%s%N)
: >"$OUT/build.log"
bpftool btf dump file /sys/kernel/btf/vmlinux format c >"$OUT/vmlinux.h.tmp" 2>>"$OUT/build.log" \
    || say "bpftool could not dump /sys/kernel/btf/vmlinux (see $OUT/build.log)"
mv "$OUT/vmlinux.h.tmp" "$OUT/vmlinux.h"
arch=$(uname -m)
case "$arch" in
    x86_64) target=x86 ;; aarch64) target=arm64 ;; *) target=$arch ;;
esac
built=()
for src in "$DIR"/*.bpf.c; do
    obj="${src%.c}.o"
    if clang -g -O2 -target bpf "-D__TARGET_ARCH_$target" -I "$OUT" -I "$DIR" \
            -c "$src" -o "$obj.tmp" 2>>"$OUT/build.log"; then
        mv "$obj.tmp" "$obj"
        built+=("$(basename "$obj")")
    else
        rm -f "$obj" "$obj.tmp"
        echo "bpf: clang could not compile $src (see $OUT/build.log); the warden will run without it" >&2
    fi
done
echo "bpf: built ${built[*]:-nothing} in $(( ($(date +%s%N) - start) / 1000000 )) ms"
