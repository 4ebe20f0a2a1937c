#!/usr/bin/env bash
# containerd with Hull's shim v2 vs its runc shim, medians of N (default 10), alternating:
#   1. `ctr run --rm busybox true` with --runtime io.containerd.hull.v2 vs io.containerd.runc.v2
#   2. pod start: a sandbox (pause) container plus one container, both running, as CRI
#      starts a pod (the same annotations), through ctr; then torn down (not timed).
# Starts its own containerd (own root, state, socket). Usage: benches/containerd.sh [N]
# (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
work=$(mktemp -d)
state=/run/hull-bench-ctd
root=/var/tmp/hull-bench-ctd
mkdir -p "$state/bin" "$root"
ln -sf "$(pwd)/target/release/containerd-shim-hull-v2" "$state/bin/"
cat > "$state/config.toml" <<CONF
version = 2
root = "$root"
state = "$state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$state/containerd.sock"
CONF
PATH=$state/bin:$PATH containerd --config "$state/config.toml" </dev/null >/dev/null 2>"$state/containerd.log" &
ctd=$!
trap 'kill $ctd; wait $ctd 2>/dev/null; rm -rf "$work"' EXIT
ctr=(ctr -a "$state/containerd.sock" -n bench)
for _ in $(seq 50); do "${ctr[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
"${ctr[@]}" images import --base-name localhost/busybox /var/lib/hull/images/busybox/busybox-oci.tar >/dev/null
"${ctr[@]}" images import --base-name localhost/pause /var/lib/hull/images/busybox/pause-oci.tar >/dev/null
ms() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000 )); }
for i in $(seq "$n"); do
    ms "${ctr[@]}" run --rm --runtime io.containerd.runc.v2 localhost/busybox:latest "r$$-$i" true >> "$work/runc.us"
    ms "${ctr[@]}" run --rm --runtime io.containerd.hull.v2 localhost/busybox:latest "h$$-$i" true >> "$work/hull.us"
    for rt in runc hull; do
        pod="p$rt$$-$i"
        s=$(date +%s%N)
        "${ctr[@]}" run -d --runtime "io.containerd.$rt.v2" \
            --annotation io.kubernetes.cri.container-type=sandbox \
            --annotation "io.kubernetes.cri.sandbox-id=$pod" localhost/pause:latest "$pod" sleep 1000 >/dev/null
        "${ctr[@]}" run -d --runtime "io.containerd.$rt.v2" \
            --annotation io.kubernetes.cri.container-type=container \
            --annotation "io.kubernetes.cri.sandbox-id=$pod" localhost/busybox:latest "$pod-c" sleep 1000 >/dev/null
        e=$(date +%s%N)
        echo $(( (e - s) / 1000 )) >> "$work/pod-$rt.us"
        for id in "$pod-c" "$pod"; do
            "${ctr[@]}" task kill -s KILL "$id" >/dev/null
            for _ in $(seq 100); do "${ctr[@]}" task ls | grep -q "^$id .*STOPPED" && break; sleep 0.05; done
            "${ctr[@]}" task delete "$id" >/dev/null 2>&1
            "${ctr[@]}" containers rm "$id" >/dev/null
        done
    done
done
python3 - "$work" "$n" <<'PY'
import statistics, sys
work, n = sys.argv[1], int(sys.argv[2])
med = lambda f: statistics.median(int(l) / 1000 for l in open(f"{work}/{f}.us"))
print(f"runs: {n} (medians, ms)")
r, h = med("runc"), med("hull")
print(f"ctr run --rm true, io.containerd.runc.v2: {r:8.1f}")
print(f"ctr run --rm true, io.containerd.hull.v2: {h:8.1f}   ratio hull/runc {h/r:.1f}x")
r, h = med("pod-runc"), med("pod-hull")
print(f"pod start (sandbox + 1 container), runc:  {r:8.1f}")
print(f"pod start (sandbox + 1 container), hull:  {h:8.1f}   ratio hull/runc {h/r:.1f}x")
PY
