#!/usr/bin/env bash
# `hull do busybox true` vs `runc run` of the same rootfs, median of N (default 10), with
# hull's per-phase split. Usage: benches/hull-do.sh [N]   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10}
image=/var/lib/hull/images/busybox/rootfs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -a "$image" "$work/rootfs"
(cd "$work" && runc spec && python3 - <<'PY'
import json
c = json.load(open("config.json"))
c["process"]["terminal"] = False
c["process"]["args"] = ["true"]
json.dump(c, open("config.json", "w"))
PY
)
for i in $(seq "$n"); do
    s=$(date +%s%N)
    runc run --bundle "$work" "bench-$$-$i" >/dev/null
    e=$(date +%s%N)
    echo $(( (e - s) / 1000 )) >> "$work/runc.us"
    s=$(date +%s%N)
    target/release/hull do --timings "$work/t$i.json" "$image" true
    e=$(date +%s%N)
    echo $(( (e - s) / 1000 )) >> "$work/hull.us"
done
python3 - "$work" "$n" <<'PY'
import json, statistics, sys
work, n = sys.argv[1], int(sys.argv[2])
med = lambda xs: statistics.median(xs)
runc = [int(l) / 1000 for l in open(f"{work}/runc.us")]
hull = [int(l) / 1000 for l in open(f"{work}/hull.us")]
ts = [json.load(open(f"{work}/t{i}.json")) for i in range(1, n + 1)]
phase = lambda k: med([t[k] for t in ts])
print(f"runs: {n} (medians, ms)")
print(f"runc run (wall):            {med(runc):8.1f}")
print(f"hull do (wall):             {med(hull):8.1f}   ratio hull/runc {med(hull)/med(runc):.1f}x")
prev = 0.0
for k, label in [("prepare_ms", "prepare (image, sandbox dir)"), ("vmm_started_ms", "VMM started"),
                 ("agent_ready_ms", "agent ready"), ("container_created_ms", "container created"),
                 ("container_started_ms", "container started"), ("exited_ms", "exited"),
                 ("cleaned_up_ms", "cleaned up")]:
    v = phase(k)
    print(f"  {label:28s} at {v:8.1f}  (+{v - prev:7.1f})")
    prev = v
PY
