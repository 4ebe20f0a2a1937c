#!/usr/bin/env bash
# The whole test suite: set-up (idempotent), then every unit and integration test, on
# release binaries built once. Integration tests boot real microVMs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$HOME/.cargo/bin:$PATH
bash scripts/setup.sh
# Two cores: two tests at a time keeps TCG guests from starving each other.
cargo test --release --workspace -- --test-threads="${HULL_TEST_THREADS:-2}"
