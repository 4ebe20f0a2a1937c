#!/usr/bin/env bash
# Build Hull's initramfs: the static hull-agent as /init, plus the directories it mounts
# on. Usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio
set -euo pipefail
agent=${1:?usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio}
out=${2:?usage: build-initramfs.sh AGENT_BINARY OUTPUT.cpio}
if ! file "$agent" | grep -q 'statically linked\|static-pie linked'; then
    echo "build-initramfs: $agent is not a static binary: the guest has no libc" >&2
    exit 1
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -m 0755 "$agent" "$stage/init"
mkdir -p "$stage"/{proc,sys,dev,run,tmp}
chmod 1777 "$stage/tmp"
mkdir -p "$(dirname "$out")"
# Owned by root whoever builds it; newc is the format the kernel unpacks.
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
