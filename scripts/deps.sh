#!/usr/bin/env bash
# Installs the system packages Fathom's build and tests need, when missing (Debian/Ubuntu):
# protoc (tonic codegen) and etcd (membership tests). Idempotent; prints what it does.
set -euo pipefail
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ "${FATHOM_DEPS_ETCD:-1}" = 1 ]; then
  command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
