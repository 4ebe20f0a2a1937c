#!/usr/bin/env bash
# The main job: set-up (idempotent), then a container in its own microVM, on the busybox
# image the set-up built. The guest kernel it prints differs from the host's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "host kernel:  $(uname -r)"
HULL_LOG=${HULL_LOG:-info} hull do /var/lib/hull/images/busybox/oci -- \
    sh -c 'echo "guest kernel: $(uname -r)"; echo "in the container: $(id)"'
