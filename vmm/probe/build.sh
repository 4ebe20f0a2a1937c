#!/bin/sh
# Builds the Hull probe guest: ./build.sh OUTPUT_ELF
#
# A static, freestanding ELF64 linked at physical 16 MiB, entered through the
# Linux x86_64 64-bit boot protocol (see README.md). Uses the system gcc.
#
# PROBE_PVH=1 in the environment also emits the PVH ELF note
# (XEN_ELFNOTE_PHYS32_ENTRY), so that QEMU's `-kernel` can boot the image for
# testing. It is off by default: a loader that honours the note would take
# the PVH path and skip the boot_params checks the probe exists to make.
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTPUT_ELF" >&2
	exit 2
fi
out=$1
here=$(cd "$(dirname "$0")" && pwd)
CC=${CC:-gcc}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cflags="-std=gnu11 -O2 -Wall -Wextra -Werror
	-march=x86-64 -mtune=generic -m64
	-ffreestanding -fno-builtin -nostdlib -fno-pic -no-pie -static
	-mgeneral-regs-only -mno-red-zone -mcmodel=small
	-fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables
	-fcf-protection=none -fno-tree-loop-distribute-patterns
	-fno-common -ffunction-sections -fdata-sections"

defs=""
if [ "${PROBE_PVH:-0}" = "1" ]; then
	defs="-DPROBE_PVH_NOTE"
fi

# shellcheck disable=SC2086 # word splitting of the flag lists is intended
"$CC" $cflags $defs -c "$here/entry.S" -o "$tmp/entry.o"
# shellcheck disable=SC2086
"$CC" $cflags -c "$here/probe.c" -o "$tmp/probe.o"
# The linker script has #ifdef PROBE_PVH_NOTE sections: preprocess it.
# shellcheck disable=SC2086
"$CC" -E -P -x c $defs "$here/probe.ld" -o "$tmp/probe.ld"
# shellcheck disable=SC2086
"$CC" $cflags -T "$tmp/probe.ld" \
	-Wl,--gc-sections -Wl,--build-id=none -Wl,-z,max-page-size=0x1000 \
	-Wl,-z,noexecstack \
	"$tmp/entry.o" "$tmp/probe.o" -o "$tmp/probe.elf"

# The image must be entered at 16 MiB or above and carry no SSE/AVX code.
entry=$(readelf -h "$tmp/probe.elf" | awk '/Entry point address/ { print $4 }')
if [ $((entry)) -lt $((0x1000000)) ]; then
	echo "build.sh: entry point $entry is below 16 MiB" >&2
	exit 1
fi
if objdump -d "$tmp/probe.elf" | grep -Eq '%[xyz]mm[0-9]'; then
	echo "build.sh: SSE/AVX register use found in the image" >&2
	exit 1
fi

mkdir -p "$(dirname "$out")"
cp "$tmp/probe.elf" "$out"
