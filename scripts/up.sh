#!/usr/bin/env bash
# The README's main job: builds `fathom`, starts a local cluster (a coordinator and worker
# processes on loopback) serving a synthesized `tiny` DeepSeek-V3.2 checkpoint, streams the answer
# to one prompt with timings, and shuts everything down. Extra arguments go to `fathom up`
# (e.g. `scripts/up.sh --prompt "Hi" --max-new-tokens 8`); see `fathom up --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Only protoc is needed to build; etcd, the chart tools and NVRTC are for the tests.
FATHOM_DEPS_ETCD=0 FATHOM_DEPS_HELM=0 FATHOM_DEPS_NVRTC=0 scripts/deps.sh
cargo build -p fathom
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--prompt "The ocean is" --max-new-tokens 24 --ignore-eos)
exec target/debug/fathom up --workers "${FATHOM_WORKERS:-2}" "${args[@]}"
