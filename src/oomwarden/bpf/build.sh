#!/usr/bin/env bash
# Build the warden's BPF objects (docs/bpf.md): clang and bpftool from Debian,
# installed with apt when missing; vmlinux.h dumped from this kernel's BTF into
# .cache/bpf/; the object next to its source (git-ignored), where
# oomwarden.sources.bpf looks for it. A build that cannot be done here prints
# one line saying why and exits 0: the warden then runs on procfs.
set -uo pipefail
cd "$(dirname "$0")/../../.."
SRC=src/oomwarden/bpf/tasks.bpf.c
OBJ=src/oomwarden/bpf/tasks.bpf.o
OUT=.cache/bpf
PATH="$PATH:/usr/sbin:/sbin"
mkdir -p "$OUT"

say() { echo "bpf: $*; the warden will use procfs" >&2; rm -f "$OBJ"; exit 0; }

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
mkdir -p "$OUT"
start=$(date +%s%N)
bpftool btf dump file /sys/kernel/btf/vmlinux format c >"$OUT/vmlinux.h.tmp" 2>"$OUT/build.log" \
    || say "bpftool could not dump /sys/kernel/btf/vmlinux (see $OUT/build.log)"
mv "$OUT/vmlinux.h.tmp" "$OUT/vmlinux.h"
arch=$(uname -m)
case "$arch" in
    x86_64) target=x86 ;; aarch64) target=arm64 ;; *) target=$arch ;;
esac
clang -g -O2 -target bpf "-D__TARGET_ARCH_$target" -I "$OUT" -c "$SRC" -o "$OBJ.tmp" \
    2>>"$OUT/build.log" || say "clang could not compile $SRC (see $OUT/build.log)"
mv "$OBJ.tmp" "$OBJ"
echo "bpf: built $OBJ in $(( ($(date +%s%N) - start) / 1000000 )) ms"
