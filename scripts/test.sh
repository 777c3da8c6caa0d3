#!/usr/bin/env bash
# The test command of the README: installs what the tests need, then runs every test of the
# workspace (unit, integration, end-to-end with real processes and a real etcd on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --workspace --bins
cargo test --workspace --all-targets "$@"
