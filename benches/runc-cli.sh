#!/usr/bin/env bash
# hull as an OCI runtime vs runc, medians of N (default 10), alternating runs:
#   1. `podman run --rm --network none busybox true` with --runtime hull vs --runtime runc
#   2. `hull run` vs `runc run` (create + start + wait) on the same bundle.
# Usage: benches/runc-cli.sh [N]   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
hull=$(pwd)/target/release/hull
work=$(mktemp -d)
base=/var/tmp/hull-bench-podman
trap 'rm -rf "$work"' EXIT
mkdir -p "$base"
cat > "$base/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$base/containers.conf
podman=(podman --root "$base/storage" --runroot /run/hull-bench-podman)
loaded=$("${podman[@]}" load -q -i /var/lib/hull/images/busybox/busybox-oci.tar | sed -n 's/^Loaded image[^:]*: //p' | head -1)
"${podman[@]}" tag "$loaded" localhost/hull-bench:latest

cp -a /var/lib/hull/images/busybox/rootfs "$work/rootfs"
(cd "$work" && runc spec && python3 - <<'PY'
import json
c = json.load(open("config.json"))
c["process"]["terminal"] = False
c["process"]["args"] = ["true"]
json.dump(c, open("config.json", "w"))
PY
)
ms() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000 )); }
for i in $(seq "$n"); do
    ms "${podman[@]}" --runtime runc run --rm --pull=never --network none localhost/hull-bench true >> "$work/podman-runc.us"
    ms "${podman[@]}" --runtime "$hull" run --rm --pull=never --network none localhost/hull-bench true >> "$work/podman-hull.us"
    ms runc run --bundle "$work" "bench-runc-$$-$i" >> "$work/runc-run.us"
    ms "$hull" run --bundle "$work" "bench-hull-$$-$i" >> "$work/hull-run.us"
done
python3 - "$work" "$n" <<'PY'
import statistics, sys
work, n = sys.argv[1], int(sys.argv[2])
med = lambda f: statistics.median(int(l) / 1000 for l in open(f"{work}/{f}.us"))
print(f"runs: {n} (medians, ms)")
pr, ph, rr, hr = med("podman-runc"), med("podman-hull"), med("runc-run"), med("hull-run")
print(f"podman run --rm true, runtime runc: {pr:8.1f}")
print(f"podman run --rm true, runtime hull: {ph:8.1f}   ratio hull/runc {ph/pr:.1f}x")
print(f"runc run true:                      {rr:8.1f}")
print(f"hull run true:                      {hr:8.1f}   ratio hull/runc {hr/rr:.1f}x")
PY
