#!/usr/bin/env bash
# Everything Hull needs on a fresh Debian 12 machine (as root): Debian packages, the
# vhost-user back ends from crates.io, the guest kernel (cached), release binaries, the
# initramfs, and a small busybox image built locally. Safe to run again: each step skips
# what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
lib=${HULL_LIB:-/var/lib/hull}
say() { echo "setup: $*" >&2; }

packages=(linux-source-6.1 build-essential bc flex bison libelf-dev libssl-dev cpio file
          qemu-system-x86 busybox-static runc libcap-ng-dev libseccomp-dev pkg-config xz-utils
          podman conmon crun catatonit containernetworking-plugins containerd python3
          protobuf-compiler iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

export PATH=$HOME/.cargo/bin:$PATH
command -v virtiofsd >/dev/null || { say "cargo install virtiofsd (a few minutes)"; cargo install --locked --quiet virtiofsd; }
command -v vhost-device-vsock >/dev/null || { say "cargo install vhost-device-vsock (a few minutes)"; cargo install --locked --quiet vhost-device-vsock; }
# Engines (conmon, containerd) run hull with their own PATH: put the helpers on a common one.
for helper in virtiofsd vhost-device-vsock; do
    [ "$(command -v $helper)" = /usr/local/bin/$helper ] || ln -sf "$(command -v $helper)" /usr/local/bin/$helper
done

say "guest kernel"
kernel=$(guest-kernel-config/build-kernel.sh)

# The agent runs as PID 1 in a guest without libc: static. musl where the target can be
# had, else glibc with +crt-static.
say "building release binaries"
if rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
    cargo build --release --quiet -p hull-agent --target x86_64-unknown-linux-musl
    agent=target/x86_64-unknown-linux-musl/release/hull-agent
else
    say "no musl target: building the agent with glibc +crt-static"
    RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet -p hull-agent --target x86_64-unknown-linux-gnu
    agent=target/x86_64-unknown-linux-gnu/release/hull-agent
fi
cargo build --release --quiet -p hull-shim --bin hull --bin containerd-shim-hull-v2
cargo build --release --quiet -p hull-vmm --bin hull-vmm

mkdir -p "$lib"
guest-kernel-config/build-initramfs.sh "$agent" "$lib/initramfs.cpio" >/dev/null
cp "$kernel" "$lib/vmlinux.tmp" && mv "$lib/vmlinux.tmp" "$lib/vmlinux"
ln -sf "$root/target/release/hull" /usr/local/bin/hull
ln -sf "$root/target/release/hull-vmm" /usr/local/bin/hull-vmm
# containerd finds its shims on its PATH.
ln -sf "$root/target/release/containerd-shim-hull-v2" /usr/local/bin/containerd-shim-hull-v2

say "busybox image"
if [ ! -f "$lib/images/busybox/pause-oci.tar" ] || [ tests/images/build-busybox-image.sh -nt "$lib/images/busybox/busybox-oci.tar" ]; then
    tests/images/build-busybox-image.sh "$lib/images/busybox" >/dev/null
fi
say "ready: kernel $lib/vmlinux, initramfs $lib/initramfs.cpio, image $lib/images/busybox/oci"
