#!/usr/bin/env bash
# Build Hull's guest kernel (vmlinux, PVH entry) from Debian's linux-source-6.1.
#
#   allnoconfig + hull-guest.config (as KCONFIG_ALLCONFIG) + olddefconfig, then a check
#   that every option the fragment asks for is really `=y`.
#
# The result is cached outside the checkout, keyed by the fragment, this script and the
# source package version: $HULL_CACHE/kernel/<key>/vmlinux (HULL_CACHE defaults to
# /var/cache/hull). Prints the path of the vmlinux on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${HULL_CACHE:-/var/cache/hull}
fragment=$here/hull-guest.config
tarball=/usr/src/linux-source-6.1.tar.xz

if [ ! -f "$tarball" ]; then
    echo "build-kernel: $tarball is missing; install it: apt-get install linux-source-6.1" >&2
    exit 1
fi
srcver=$(dpkg-query -W -f '${Version}' linux-source-6.1)
key=$(cat "$fragment" "$0" <(echo "$srcver") | sha256sum | cut -c1-16)
out=$cache/kernel/$key
if [ -f "$out/vmlinux" ]; then
    echo "$out/vmlinux"
    exit 0
fi

src=$cache/src/linux-source-6.1-$srcver
if [ ! -f "$src/.hull-unpacked" ]; then
    echo "build-kernel: unpacking linux-source $srcver into $src" >&2
    rm -rf "$src" && mkdir -p "$src"
    tar -xJf "$tarball" -C "$src" --strip-components=1
    touch "$src/.hull-unpacked"
fi

build=$cache/kernel-build/$key
mkdir -p "$build"
jobs=$(nproc)
echo "build-kernel: configuring in $build" >&2
make -s -C "$src" O="$build" ARCH=x86_64 KCONFIG_ALLCONFIG="$fragment" allnoconfig >&2
make -s -C "$src" O="$build" ARCH=x86_64 olddefconfig >&2

# Every option asked for must have survived olddefconfig, and every one asked off must be off.
missing=()
while read -r line; do
    case "$line" in
        CONFIG_*=y)
            opt=${line%%=*}
            grep -qx "$opt=y" "$build/.config" || missing+=("$opt (asked =y)")
            ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }; opt=${opt%% *}
            grep -q "^$opt=" "$build/.config" && missing+=("$opt (asked off)")
            ;;
    esac
done < "$fragment"
if [ ${#missing[@]} -gt 0 ]; then
    echo "build-kernel: olddefconfig did not keep these options of $fragment:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "build-kernel: add their dependencies to the fragment (see $build/.config)" >&2
    exit 1
fi

echo "build-kernel: building vmlinux with -j$jobs (about 12 min on 2 cores); log: $build/make.log" >&2
start=$(date +%s)
set +e
make -C "$src" O="$build" ARCH=x86_64 -j"$jobs" vmlinux 2>&1 \
    | tee "$build/make.log" \
    | awk -v start="$start" '/^  (CC|AS|LD|AR)/ { n++; if (n % 250 == 0) { printf "build-kernel: %d objects, %ds\n", n, systime() - start > "/dev/stderr"; fflush("/dev/stderr") } }'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    echo "build-kernel: make failed ($rc); last lines of $build/make.log:" >&2
    tail -20 "$build/make.log" >&2
    exit 1
fi
mkdir -p "$out.tmp"
cp "$build/vmlinux" "$build/.config" "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "build-kernel: done in $(( $(date +%s) - start ))s" >&2
echo "$out/vmlinux"
