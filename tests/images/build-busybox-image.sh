#!/usr/bin/env bash
# Builds a minimal busybox test image for Hull from Debian's busybox-static
# (/bin/busybox):
#   $1/rootfs/            a rootfs directory
#   $1/oci/               the same rootfs as an OCI image layout (one tar+gzip layer)
#   $1/busybox-oci.tar    a tar of oci/'s contents (oci-layout, index.json, blobs/ at top level)
#   $1/pause-oci.tar      the same layer as an image whose command sleeps forever (a pod's
#                         sandbox container for the CRI tests, as Kubernetes' pause image)
# Output is deterministic (sorted tar, fixed mtimes, numeric owners, gzip -n).
# Run as root so that home/hull can be owned by 1000:1000.
set -euo pipefail

usage() { echo "usage: $0 OUTPUT_DIR" >&2; exit 2; }
[[ $# -eq 1 && -n $1 ]] || usage

BUSYBOX=${BUSYBOX:-/bin/busybox}
EPOCH=${SOURCE_DATE_EPOCH:-0}
if [[ ! -x $BUSYBOX ]]; then
    echo "$0: $BUSYBOX not found: install Debian's busybox-static (apt-get install busybox-static)" >&2
    exit 1
fi
for tool in tar gzip sha256sum stat; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is required" >&2; exit 1; }
done

umask 022
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

tar_opts=(--numeric-owner --sort=name --format=gnu --mtime="@$EPOCH")
if [[ $(id -u) -ne 0 ]]; then
    echo "$0: warning: not root, so every file in the image will be owned by 0:0 (home/hull should be 1000:1000)" >&2
    tar_opts+=(--owner=0 --group=0)
fi

# --- rootfs ------------------------------------------------------------------
rootfs=$work/rootfs
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,etc,root,home/hull,run,var}
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"
install -m 0755 "$BUSYBOX" "$rootfs/bin/busybox"
"$BUSYBOX" --list-full | while IFS= read -r applet; do
    [[ -n $applet && $applet != bin/busybox ]] || continue
    case $applet in /*|*..*) echo "$0: odd applet path $applet" >&2; exit 1 ;; esac
    mkdir -p "$rootfs/$(dirname "$applet")"
    ln -sfn /bin/busybox "$rootfs/$applet"
done

cat > "$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
hull:x:1000:1000:hull:/home/hull:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$rootfs/etc/group" <<'GROUP'
root:x:0:
hull:x:1000:
wheel:x:10:hull
nogroup:x:65534:
GROUP
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
if [[ $(id -u) -eq 0 ]]; then
    chown -R 0:0 "$rootfs"
    chown 1000:1000 "$rootfs/home/hull"
fi

# --- OCI layout --------------------------------------------------------------
oci=$work/oci
blobs=$oci/blobs/sha256
mkdir -p "$blobs"

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
# Moves file $1 into blobs/sha256/<hex>; prints "<hex> <size>".
add_blob() {
    local hex sz
    hex=$(sha "$1"); sz=$(size "$1")
    mv -f "$1" "$blobs/$hex"
    echo "$hex $sz"
}

tar "${tar_opts[@]}" -C "$rootfs" -cf "$work/layer.tar" .
diff_id=$(sha "$work/layer.tar")
gzip -n -9 -c "$work/layer.tar" > "$work/layer.tar.gz"
rm -f "$work/layer.tar"
read -r layer_hex layer_size < <(add_blob "$work/layer.tar.gz")

printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},"history":[{"created_by":"tests/images/build-busybox-image.sh"}]}' > "$work/config.json"
read -r config_hex config_size < <(add_blob "$work/config.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_hex"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_hex"'","size":'"$layer_size"'}]}' > "$work/manifest.json"
read -r manifest_hex manifest_size < <(add_blob "$work/manifest.json")

printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_hex"'","size":'"$manifest_size"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' > "$oci/index.json"

tar --numeric-owner --owner=0 --group=0 --sort=name --format=gnu --mtime="@$EPOCH" \
    -C "$oci" -cf "$work/busybox-oci.tar" oci-layout index.json blobs

# --- the pause image: same layer, a command that waits ------------------------
pause=$work/pause
mkdir -p "$pause/blobs/sha256"
cp "$blobs/$layer_hex" "$pause/blobs/sha256/"
blobs_main=$blobs
blobs=$pause/blobs/sha256
printf '%s' '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sleep","2147483647"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]},"history":[{"created_by":"tests/images/build-busybox-image.sh"}]}' > "$work/pause-config.json"
read -r pconfig_hex pconfig_size < <(add_blob "$work/pause-config.json")
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$pconfig_hex"'","size":'"$pconfig_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_hex"'","size":'"$layer_size"'}]}' > "$work/pause-manifest.json"
read -r pmanifest_hex pmanifest_size < <(add_blob "$work/pause-manifest.json")
blobs=$blobs_main
printf '%s' '{"imageLayoutVersion":"1.0.0"}' > "$pause/oci-layout"
printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$pmanifest_hex"'","size":'"$pmanifest_size"',"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}' > "$pause/index.json"
tar --numeric-owner --owner=0 --group=0 --sort=name --format=gnu --mtime="@$EPOCH" \
    -C "$pause" -cf "$work/pause-oci.tar" oci-layout index.json blobs

# --- swap into place -----------------------------------------------------------
for name in rootfs oci busybox-oci.tar pause-oci.tar; do
    if [[ -e $out/$name ]]; then
        mv "$out/$name" "$work/old-$name"
    fi
    mv "$work/$name" "$out/$name"
done

echo "built $out/rootfs, $out/oci (manifest sha256:$manifest_hex), $out/busybox-oci.tar and $out/pause-oci.tar"
